"""Rows of bench_moe's JSON from a run's printed lines (run 14's was cut by its time box before it wrote any).

From the repo root: python3 benchmarks/h200/run14/moe/rebuild_rows.py benchmarks/h200/run14/bench_moe_cut.log benchmarks/h200/run14/moe/bench_moe.json
Every row's printed judged speedup is recomputed from its parsed times and must match (assert)."""
import ast, json, re, sys
sys.path.insert(0, ".")
from scripts.bench_moe import SHAPES
from mtp_splitk.bench import tune

log = open(sys.argv[1]).read().splitlines()
shapes = {s[0]: s[1:] for s in SHAPES}
head = re.match(r"device (.*); copy (\d+) GB/s; trivial op ([\d.]+) us", log[0])
meta = dict(device=head[1], mlx="0.32.4", copy_gbps=float(head[2]), trivial_op_us=float(head[3]),
            command="python3 -m scripts.bench_moe --out /tmp/results/moe --tune (cut at 230 s; rows rebuilt from its log)",
            swept=True)
rows, chosen = [], {}
row_re = re.compile(r"(.+?)\s+M=\s*(\d+) P=\s*(\d+) uniq=\s*([\d.]+): ours\s+([\d.]+) us\s+mlx\s+([\d.]+) us; chain ours\s+([\d.]+) mlx\s+([\d.]+)\s+x([\d.]+)\s+(\d+)% floor ([\d.]+)(?:; gate/up\+swiglu fused ([\d.]+) us, mlx ([\d.]+))?$")
for line in log[1:]:
    if "split,depth" in line:
        name = line.split(":")[0].strip()
        cands = dict((ast.literal_eval(k), float(v)) for k, v in re.findall(r"(\(\d+, \d+\)):([\d.]+)", line))
        chosen[name] = min(cands, key=cands.get)
        continue
    m = row_re.match(line)
    if not m:
        continue
    name = m[1].strip()
    E, N, K, top_k = shapes[name]
    M = int(m[2])
    warps, depth = chosen[name]
    us_ours, us_mlx, c_ours, c_mlx = map(float, m.group(5, 6, 7, 8))
    row = dict(shape=name, E=E, N=N, K=K, top_k=top_k, M=M, pairs=int(m[3]), unique_experts=float(m[4]),
               warps_k=warps, depth=depth, us_ours=us_ours, us_mlx=us_mlx, chain_us_ours=c_ours, chain_us_mlx=c_mlx,
               speedup=tune.judged_speedup(M, us_mlx / us_ours, c_mlx / c_ours),
               pct_unique_bytes_bw=float(m[10]), floor_us=float(m[11]))
    assert abs(row["speedup"] - float(m[9])) < 0.006, (line, row["speedup"])  # the printed judgement, recomputed
    if m[12]:
        row["us_glu_ours"], row["us_glu_mlx"] = float(m[12]), float(m[13])
    rows.append(row)
json.dump(dict(meta=meta, rows=rows), open(sys.argv[2], "w"), indent=1)
print(len(rows), "rows;", chosen)
