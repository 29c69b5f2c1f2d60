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

This module holds the per-device matmul shapes of a model and what running
one sharded takes (a strict group, a barrier, a sharded load). The test and
benchmark tools around it (greedy runs unpatched vs patched, ranks launched
on one machine) are in ``mtp_splitk.bench``.
"""

from typing import Dict, Tuple

import mlx.core as mx
import mlx.nn as nn

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


# -- running sharded ----------------------------------------------------------------------


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
    model.eval()  # shard() builds new layers, in training mode: their kernel calls would carry derivatives
    mx.eval(model.parameters())
    barrier(group)
    return model, tokenizer
