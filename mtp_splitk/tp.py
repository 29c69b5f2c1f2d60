# Copyright © 2026 mtp_splitk contributors

"""Tensor-parallel models: mlx-lm's ``model.shard()`` under the patch.

mlx-lm shards a model over an ``mx.distributed`` group (ring on CPU / Mac,
NCCL on CUDA) with ``model.shard(group)``, which ``mlx_lm.utils.sharded_load``
calls before the weights are evaluated. In mlx-lm 0.32.2's ``llama``,
``qwen3``, ``qwen3_moe`` and ``deepseek_v3`` the quantized matmuls then are
(``n`` devices):

==============================  ==========================================  ==============
layer                           after ``shard()``                           on each device
==============================  ==========================================  ==============
q/k/v, gate/up, DSv3 q_b_proj   ``nn.QuantizedAllToShardedLinear``          N / n
o_proj, down_proj               ``nn.QuantizedShardedToAllLinear`` (sums)   K / n
MoE experts (``SwitchGLU``)     ``QuantizedSwitchLinear``, sliced in place  gate/up N / n,
                                (the MoE block sums)                        down K / n
DSv3 shared experts             ``nn.QuantizedLinear``, sliced in place     likewise
MLA embed_q / unembed_out       ``QuantizedMultiLinear``, heads sliced      heads / n
embeddings, LM head, routers,   unchanged (replicated)                      full
DSv3 q_a / kv_a projections
==============================  ==========================================  ==============

Every one of these classes is in ``patch.PATCHES``, and ``ops`` reads N and K
from the weight it is handed at call time, so the planner plans (and the
tuning table is looked up) for the per-device shape, never the full one.

This module holds what the tensor-parallel test and ``scripts/bench_tp.py``
share: the per-device matmul shapes of a model, greedy decoding runs with and
without the patch, and a launcher for ranks on one machine over the ring
backend's loopback (what ``mlx.launch --backend ring -n 2`` does, with free
ports and each rank's exit status kept).
"""

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from . import patch

# -- shapes ---------------------------------------------------------------------------------


def matmul_shapes(model: nn.Module) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """{module path: (class name, shape)} of every quantized matmul layer.

    The shape is the unpacked weight's on this device: (N, K), or (E, N, K)
    for experts and (heads, N, K) for MLA's per-head projections.
    """
    shapes = {}
    for path, m in model.named_modules():
        if not (hasattr(m, "bits") and hasattr(m, "group_size") and "scales" in m):
            continue
        *lead, rows, words = m["weight"].shape
        shapes[path] = (type(m).__name__, (*lead, rows, words * 32 // m.bits))
    return shapes


# -- greedy decoding ------------------------------------------------------------------------

# name -> a function of the target that makes a fresh drafter
Drafters = Dict[str, Callable[[nn.Module], object]]


def greedy_runs(
    model: nn.Module,
    prompt: mx.array,
    max_tokens: int,
    drafters: Drafters,
    num_draft_tokens: int = 3,
) -> Dict[str, Dict[str, List[int]]]:
    """Greedy tokens of mlx-lm's plain loop and of the speculative loop with
    each drafter, unpatched and patched: {"mlx" | "patched": {run: tokens}}."""
    from mlx_lm.generate import generate_step

    from .speculative import speculative_generate_step

    out = {}
    for label, on in (("mlx", False), ("patched", True)):
        with patch.enabled(on):
            runs = {
                "plain": [int(t) for t, _ in generate_step(prompt, model, max_tokens=max_tokens)]
            }
            for name, make in drafters.items():
                steps = speculative_generate_step(
                    prompt,
                    model,
                    make(model),
                    num_draft_tokens=num_draft_tokens,
                    max_tokens=max_tokens,
                )
                runs[name] = [int(t) for t, _, _ in steps]
        out[label] = runs
    return out


def probe_logits(model: nn.Module, prompt: mx.array, rows: Sequence[int]) -> Dict[str, list]:
    """float32 logits of the prompt's last position and of one verify-sized
    call of ``rows`` after it, unpatched and patched: {"mlx" | "patched": rows x V}.
    A check that does not depend on how varied a random model's tokens are."""
    from mlx_lm.models.cache import make_prompt_cache

    out = {}
    for label, on in (("mlx", False), ("patched", True)):
        with patch.enabled(on):
            cache = make_prompt_cache(model)
            last = model(prompt[None], cache=cache)[0, -1:]
            verify = model(mx.array(rows)[None], cache=cache)[0]
            logits = mx.concatenate([last, verify]).astype(mx.float32)
            out[label] = logits.tolist()
    return out


# -- launching ranks on this machine --------------------------------------------------------


def free_ports(count: int) -> List[int]:
    """Ports the kernel reports free on 127.0.0.1 (held open together so
    that they differ; another program could still take one before a rank
    binds it, which shows as that rank's connection error)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class RankFailure(RuntimeError):
    """A rank exited with an error or the ranks ran past their time."""


def launch_local(
    command: Sequence[str],
    n: int = 2,
    timeout: float = 120.0,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[str] = None,
) -> List[str]:
    """Run ``command`` as ``n`` ranks of a ring group on 127.0.0.1.

    Each rank gets ``MLX_RANK`` and ``MLX_HOSTFILE`` (a JSON list of one
    ``ip:port`` list per rank), as ``mlx.launch --backend ring`` sets them,
    so ``mx.distributed.init(backend="ring")`` in the command connects them.
    Unlike ``mlx.launch`` (fixed starting port; exit status 0 when a rank
    fails) this picks free ports and raises :class:`RankFailure`, with every
    rank's output, when a rank fails or ``timeout`` seconds pass (the ranks
    are then killed). Returns each rank's output (stdout and stderr).
    """
    with tempfile.TemporaryDirectory(prefix="mtp-splitk-ring-") as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
        base = dict(os.environ if env is None else env)
        # The ranks decide for themselves when to patch.
        base.pop("MTP_SPLITK", None)
        logs = [open(Path(tmp) / f"rank{r}.log", "w+") for r in range(n)]
        procs = [
            subprocess.Popen(
                list(command),
                env={**base, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
                stdout=logs[r],
                stderr=subprocess.STDOUT,
                cwd=cwd,
            )
            for r in range(n)
        ]
        end = time.monotonic() + timeout
        timed_out = False
        try:
            # A rank that fails leaves the others waiting on it in a
            # collective: stop everyone as soon as one exits non-zero.
            while any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    break
                if time.monotonic() > end:
                    timed_out = True
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    codes = [p.returncode for p in procs]
    if timed_out or any(codes):
        what = f"timed out after {timeout:.0f} s" if timed_out else f"exit codes {codes}"
        report = "\n".join(
            f"--- rank {r} (exit {c}) ---\n{o[-4000:]}"
            for r, (c, o) in enumerate(zip(codes, outputs))
        )
        raise RankFailure(f"{n} ring ranks of {' '.join(command)}: {what}\n{report}")
    return outputs


def init_group(backend: str = "any") -> mx.distributed.Group:
    """The launched group (strict: a missing or broken set-up raises instead of
    silently giving a group of one)."""
    group = mx.distributed.init(strict=True, backend=backend)
    if group.size() < 2:
        raise RuntimeError(f"the {backend} group has one member; launch at least two ranks.")
    return group


def barrier(group: mx.distributed.Group) -> None:
    # On the default stream: the ring backend runs on the CPU stream, NCCL
    # on the GPU one. (mlx_lm.utils.sharded_load's own barrier names the CPU
    # stream, which has not been tried here on NCCL; see load_sharded.)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


def load_sharded(path, group: mx.distributed.Group):
    """``mlx_lm.utils.sharded_load(path, tensor_group=group)`` for a local
    directory: load lazily, ``model.shard(group)``, then evaluate, so each
    device reads and holds only its share. Returns (model, tokenizer)."""
    from mlx_lm import load

    model, tokenizer = load(str(path), lazy=True)
    model.shard(group)
    mx.eval(model.parameters())
    barrier(group)
    return model, tokenizer
