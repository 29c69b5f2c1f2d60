"""Tensor-parallel models (mlx-lm's ``model.shard()``) under the patch.

Two levels: in this process, a model sharded for rank 0 of a pretend
two-member group, to check which classes its layers become and that every
quantized matmul reaches mtp_splitk.ops with its per-device shape; and two
real processes on MLX's ring backend over loopback, whose greedy output
(plain and speculative, unpatched and patched) must equal one process's.

The tiny models are quantized with group size 32 here: with the default 64,
a row-split layer of the tiny widths would hold K = 64 / 2 = 32 weights per
row on each device, less than a group, and MLX refuses to build it.
"""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest

import mtp_splitk
from mtp_splitk import cli, ops, plan, synthetic, tp
from mtp_splitk.bench import measure, ring
from mtp_splitk.bench.drafters import AcceptanceControlledDrafter
from mtp_splitk.speculative import DraftModelDrafter

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_tp_worker.py")
# The families whose mlx-lm models implement shard() that this project targets.
FAMILIES = ("llama", "qwen3", "qwen3_moe", "deepseek_v3")
QUANTIZATION = {"bits": 4, "group_size": 32, "mode": "affine"}
PROMPT = list(range(5, 45))  # 40 tokens x top-2 experts >= 64: SwitchGLU sorts
MAX_TOKENS = 24
K = 3
TIMEOUT = 120  # seconds for both ranks, start-up included (10-25 s on 2 busy CPU cores)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """float32, so that the sharded sums' different rounding (last bits of
    float32, not of bfloat16) cannot flip a greedy near-tie."""
    root = tmp_path_factory.mktemp("tp-models")
    dirs = {}
    dirs["llama"], dirs["llama-draft"] = synthetic.write_pair(
        root / "llama", quantization=QUANTIZATION, dtype="float32"
    )
    for family in FAMILIES[1:]:
        dirs[family] = synthetic.write_model(
            root / family, family, quantization=QUANTIZATION, dtype="float32"
        )
    return dirs


# -- the per-device shapes ------------------------------------------------------------------


class PretendGroup:
    """What shard() reads of a group: its size and this process's rank."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def expected_per_device(path: str, cls: str, full: tuple, n: int) -> tuple:
    """The shape mlx-lm's shard() leaves on each of n devices (see mtp_splitk.tp)."""
    name = path.rsplit(".", 1)[-1]
    split_n = (*full[:-2], full[-2] // n, full[-1])
    split_k = (*full[:-1], full[-1] // n)
    if cls == "QuantizedAllToShardedLinear":
        return split_n
    if cls == "QuantizedShardedToAllLinear":
        return split_k
    if cls == "QuantizedMultiLinear":  # MLA's per-head projections: heads
        return (full[0] // n, *full[1:])
    if cls == "QuantizedSwitchLinear" or ".shared_experts." in path:  # sliced in place
        return split_k if name == "down_proj" else split_n
    return full  # replicated: embeddings, LM head, routers, DSv3 q_a / kv_a


def check_shapes(full: dict, sharded: dict, n: int) -> None:
    assert set(full) == set(sharded), "shard() added or removed quantized layers"
    for path, (cls, shape) in sharded.items():
        assert tuple(shape) == expected_per_device(path, cls, tuple(full[path][1]), n), path


def _spy(monkeypatch):
    """(op, id(weight), shape as ops computes it) of every call reaching mtp_splitk.ops."""
    calls = []

    def recording(op):
        original = getattr(ops, op)

        def wrapper(x, w, scales, *args, **kwargs):
            bits, group_size = kwargs.get("bits"), kwargs.get("group_size")
            mode = kwargs.get("mode", "affine")
            group_size, bits = ops.resolve_mode(mode, group_size, bits)
            *lead, rows, words = w.shape
            calls.append((op, id(w), (*lead, rows, words * 32 // bits)))
            return original(x, w, scales, *args, **kwargs)

        monkeypatch.setattr(ops, op, wrapper)

    for op in ("quantized_matmul", "gather_qmm"):
        recording(op)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_layers_reach_ops_with_per_device_shapes(model_dirs, family, monkeypatch):
    """shard() for rank 0 of two: the layers become the classes mtp_splitk.tp
    lists, each holds its per-device share, and under the patch each one's
    call reaches mtp_splitk.ops, and the planner, with that share's N and K."""
    full_model, _ = mlx_lm.load(str(model_dirs[family]))
    full = tp.matmul_shapes(full_model)
    model, _ = mlx_lm.load(str(model_dirs[family]))
    model.shard(PretendGroup(0, 2))
    sharded = tp.matmul_shapes(model)
    check_shapes(full, sharded, 2)
    classes = {cls for cls, _ in sharded.values()}
    assert {"QuantizedAllToShardedLinear", "QuantizedShardedToAllLinear"} <= classes
    if family in ("qwen3_moe", "deepseek_v3"):
        assert "QuantizedSwitchLinear" in classes
    if family == "deepseek_v3":
        assert "QuantizedMultiLinear" in classes
    # Nothing was left in float, where the patch would not see it.
    unquantized = (nn.Linear, nn.AllToShardedLinear, nn.ShardedToAllLinear)
    assert not [p for p, m in model.named_modules() if isinstance(m, unquantized)]

    # Run rank 0's share alone: its sums go over a group of one (all_sum is
    # the identity), so the numbers are a partial sum, the shapes are real.
    alone = mx.distributed.init()
    for _, m in model.named_modules():
        if hasattr(m, "group"):
            m.group = alone
        if getattr(m, "sharding_group", None) is not None:
            m.sharding_group = alone
    planned = set()
    ops.clear_cache()  # so that every call signature asks the planner afresh
    dense, gather = plan.plan_dense, plan.plan_gather
    monkeypatch.setattr(
        plan, "plan_dense", lambda M, N, K, *a, **k: planned.add((N, K)) or dense(M, N, K, *a, **k)
    )
    monkeypatch.setattr(
        plan,
        "plan_gather",
        lambda P, E, N, K, *a, **k: planned.add((E, N, K)) or gather(P, E, N, K, *a, **k),
    )
    calls = _spy(monkeypatch)
    with mtp_splitk.enabled():
        out = model(mx.array([PROMPT]))  # prefill: SwitchGLU sorts its pairs
        out = model(mx.array([PROMPT[:4]]))  # a verify-sized call: unsorted
    mx.eval(out)

    weights = {id(m["weight"]) for path, m in model.named_modules() if path in sharded}
    seen = {w: shape for _, w, shape in calls}
    for path, m in model.named_modules():
        if path not in sharded or isinstance(m, nn.QuantizedEmbedding):
            continue  # an untied embedding is a lookup, not a matmul
        assert id(m["weight"]) in seen, f"{path} did not reach mtp_splitk.ops"
        assert seen[id(m["weight"])] == tuple(sharded[path][1]), path
    assert set(seen) <= weights  # and nothing else did
    # The planner is asked about each sharded layer's per-device (N, K), or
    # (E, N, K) for experts, and about no other shapes. (MLA's per-head
    # projections are batched matmuls: ops sends them to MLX unplanned.)
    assert planned <= {tuple(s) for _, s in sharded.values()}
    for path, (cls, shape) in sharded.items():
        if cls not in ("QuantizedEmbedding", "QuantizedLinear", "QuantizedMultiLinear"):
            assert tuple(shape) in planned, path


def test_planner_plans_the_per_device_shape(monkeypatch):
    """The plan is made for the shape the op hands it. A Qwen3-30B-A3B expert
    (768 x 2048) split over two devices is 384 x 2048 on each: half the rows
    fill half the blocks, so the planner splits K over more warps."""
    h100 = plan.Device("cuda", "NVIDIA H100 80GB HBM3", 132)
    # A table that admits both shapes, so the test follows the rule, not the
    # measured ranges of whatever table is installed.
    table = {"moe_p_range": {"affine4:98304x2048": [1, 64]}}
    monkeypatch.setattr(plan, "load_tuning", lambda name: table)
    args = (4, 64, "affine", mx.bfloat16)
    full = plan.plan_gather(8, 128, 768, 2048, *args, device=h100)
    half = plan.plan_gather(8, 128, 384, 2048, *args, device=h100)
    assert (full.N, full.K) == (768, 2048) and (half.N, half.K) == (384, 2048)
    assert half.warps_k == plan.choose_warps_k(8 * 384, 2048, 132) > full.warps_k


# -- two processes on the ring backend ------------------------------------------------------


def single_process(model_dirs):
    """The reference: every family whole in this process, the same runs."""
    prompt = mx.array(PROMPT)
    ref = {}
    for family in FAMILIES:
        model, _ = mlx_lm.load(str(model_dirs[family]))
        reference = AcceptanceControlledDrafter.record(model, prompt, MAX_TOKENS)
        vocab = model.args.vocab_size
        drafters = {
            "acceptance": lambda m: AcceptanceControlledDrafter(
                reference + [0] * (K + 1), 0.7, vocab, seed=1
            )
        }
        if family == "llama":
            draft, _ = mlx_lm.load(str(model_dirs["llama-draft"]))
            drafters["draft"] = lambda m: DraftModelDrafter(draft)
        ref[family] = {
            "reference": reference,
            "tokens": measure.greedy_runs(model, prompt, MAX_TOKENS, drafters, K),
            "logits": measure.probe_logits(model, prompt, reference[: K + 1]),
            "shapes": tp.matmul_shapes(model),
        }
    return ref


@pytest.mark.slow
def test_two_ring_processes_decode_like_one(model_dirs, tmp_path):
    ref = single_process(model_dirs)
    for family, r in ref.items():
        runs = r["tokens"]
        assert runs["mlx"] == runs["patched"], family  # CPU: the ops fall back to MLX's
        assert all(tokens == runs["mlx"]["plain"] for tokens in runs["mlx"].values()), family

    job = {
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "num_draft_tokens": K,
        "models": {
            family: {
                "path": str(model_dirs[family]),
                "reference": ref[family]["reference"],
                "draft": str(model_dirs["llama-draft"]) if family == "llama" else None,
            }
            for family in FAMILIES
        },
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    try:
        ring.launch_local(
            [sys.executable, str(WORKER), str(tmp_path / "job.json"), str(tmp_path)],
            n=2,
            timeout=TIMEOUT,
            cwd=str(REPO),
        )
    except ring.RankFailure as e:
        pytest.fail(str(e), pytrace=False)

    for rank in range(2):
        doc = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert doc["size"] == 2
        for family in FAMILIES:
            got = doc["models"][family]
            # Every rank, every run (plain, acceptance-controlled drafter, the
            # llama draft model), unpatched and patched: the one-process tokens.
            assert got["tokens"] == ref[family]["tokens"], (rank, family)
            # And the logits (tiny llama's greedy output is one token repeated,
            # which would hide much): equal up to the sums' float32 rounding.
            for label, logits in got["logits"].items():
                a, b = mx.array(logits), mx.array(ref[family]["logits"][label])
                assert mx.abs(a - b).max().item() <= 1e-4 * mx.abs(b).max().item(), (
                    rank, family, label
                )
            check_shapes(ref[family]["shapes"], got["shapes"], 2)
            # The patched runs asked the planner about the per-device shapes.
            planned = {(kind, tuple(s)) for kind, s in got["planned"]}
            for path, (cls, shape) in got["shapes"].items():
                if cls in ("QuantizedAllToShardedLinear", "QuantizedShardedToAllLinear"):
                    assert ("dense", tuple(shape)) in planned, (family, path)
                if cls == "QuantizedSwitchLinear":
                    assert ("gather", tuple(shape)) in planned, (family, path)


@pytest.mark.slow
def test_bench_tp_smoke(tmp_path):
    """python -m scripts.bench_tp --smoke (mtp-splitk bench tp --smoke):
    starts its own 2 ring ranks, and fails unless the sharded greedy tokens
    equal one device's."""
    result = subprocess.run(
        [sys.executable, "-m", "scripts.bench_tp", "--smoke",
         "--out", str(tmp_path / "out"), "--model-dir", str(tmp_path / "models"),
         "--timeout", str(TIMEOUT)],
        capture_output=True, text=True, timeout=TIMEOUT + 30, cwd=str(REPO),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    doc = json.loads((tmp_path / "out" / "bench_tp.json").read_text())
    (model,) = doc["models"].values()
    assert set(model["verify_ms"]) == {"one device", "sharded x2"}
    assert all(v["equal"] for v in model["agreement"]["sharded x2"].values())
    assert (tmp_path / "out" / "bench_tp.md").read_text().startswith("# Tensor parallelism")


def test_cli_reaches_bench_tp_and_rejects_bad_input(capsys):
    assert cli.main(["bench", "tp", "--models", "gpt-9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "mtp-splitk: error: unknown model 'gpt-9'; expected one of "
        "['qwen3-30b-a3b', 'llama3-8b'] or FAMILY:SIZE"
    ]
