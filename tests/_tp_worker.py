"""One rank of tests/test_distributed.py (run by mtp_splitk.bench.ring.launch_local).

    python tests/_tp_worker.py JOB.json OUT_DIR

For each model of the job: load it sharded over the ring group the way
mlx-lm's distributed generate does (``mlx_lm.utils.sharded_load``, which
calls ``model.shard(group)``), decode greedily, plain and speculative,
unpatched and patched, and record the per-device shape of every quantized
layer and the shapes the planner was asked about. Writes OUT_DIR/rank<r>.json.
"""

import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import load
from mlx_lm.utils import sharded_load

from mtp_splitk import ops, plan, tp
from mtp_splitk.bench import measure
from mtp_splitk.bench.drafters import AcceptanceControlledDrafter
from mtp_splitk.speculative import DraftModelDrafter


def planner_spy(seen):
    """Record the (kind, shape) of every planner question; ops looks the
    planner's functions up on the module at call time."""
    dense, gather = plan.plan_dense, plan.plan_gather

    def plan_dense(M, N, K, *args, **kwargs):
        seen.add(("dense", (N, K)))
        return dense(M, N, K, *args, **kwargs)

    def plan_gather(P, E, N, K, *args, **kwargs):
        seen.add(("gather", (E, N, K)))
        return gather(P, E, N, K, *args, **kwargs)

    plan.plan_dense, plan.plan_gather = plan_dense, plan_gather
    return dense, gather


def main(job_path, out_dir):
    job = json.loads(Path(job_path).read_text())
    group = tp.init_group("ring")
    prompt = mx.array(job["prompt"])
    k = job["num_draft_tokens"]
    results = {}
    for name, spec in job["models"].items():
        tic = time.perf_counter()
        model, _ = sharded_load(spec["path"], tensor_group=group)
        reference = spec["reference"] + [0] * (k + 1)
        vocab = model.args.vocab_size
        drafters = {
            "acceptance": lambda m: AcceptanceControlledDrafter(reference, 0.7, vocab, seed=1)
        }
        if spec.get("draft"):
            # The draft stays whole on every rank (it is small; mlx-lm shards
            # only the model it is given).
            draft, _ = load(spec["draft"])
            drafters["draft"] = lambda m: DraftModelDrafter(draft)
        seen = set()
        original = planner_spy(seen)
        ops.clear_cache()  # a model of the same shapes before must not hide the planner's calls
        try:
            tokens = measure.greedy_runs(model, prompt, job["max_tokens"], drafters, k)
            logits = measure.probe_logits(model, prompt, spec["reference"][: k + 1])
        finally:
            plan.plan_dense, plan.plan_gather = original
        results[name] = {
            "tokens": tokens,
            "logits": logits,
            "shapes": tp.matmul_shapes(model),
            "planned": sorted([kind, list(shape)] for kind, shape in seen),
        }
        print(f"rank {group.rank()}: {name} {time.perf_counter() - tic:.1f} s", flush=True)
    out = Path(out_dir) / f"rank{group.rank()}.json"
    out.write_text(json.dumps({"size": group.size(), "models": results}))
    tp.barrier(group)


if __name__ == "__main__":
    main(*sys.argv[1:])
