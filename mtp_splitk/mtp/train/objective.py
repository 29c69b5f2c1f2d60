# Copyright © 2026 mtp_splitk contributors

"""The head to train and what it is trained to do.

Self-distillation: at position ``t`` the head reads the target's hidden
state ``h_t`` and the embedding of ``x_{t+1}`` and should give the
distribution the target gives at ``t + 1`` (its prediction of ``x_{t+2}``).
The loss is the KL divergence from the target's distribution (all of it, or
its top-k renormalised) to the head's, plus a relative squared error pulling
the head's output towards ``h_{t+1}`` itself: drafts after the first feed
the head its own output where the target's hidden state went (as
:class:`mtp_splitk.speculative.MTPDrafter` does), so the closer it is to
one, the better the later drafts.

With ``depth > 1`` the head is also unrolled on its own output, the way it
drafts: step ``d`` reads step ``d - 1``'s output and ``x_{t+d}`` and is
matched to the target at ``t + d``. Each unrolled step attends to the other
unrolled entries rather than to target-fed ones, an approximation of what
the drafter's cache holds (exact for the entry itself); its terms weigh
``0.5 ** (d - 1)``.
"""

from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..families import family_for, model_module, model_text_args
from ..heads import DeepSeekMTP, MTPHead
from ..loading import mtp_tensors, read_weights
from ...speculative.target import TargetParts
from .teacher import Teacher, run_target


def build_head(model: nn.Module, config: dict, init: str = "identity") -> MTPHead:
    """A float32 head in DeepSeek-V3's layout for the target.

    - ``"identity"``: the block is the target's last decoder layer
      (dequantized) with its output projections zeroed, so it starts as the
      identity, and the projection passes the hidden state through: the head
      starts out predicting the target's own next-token distribution, as
      Medusa's zero-initialised heads do, and learns the shift from there.
    - ``"last-layer"``: the block is the target's last layer, the projection
      random, the final norm the target's.
    - ``"random"``: mlx-lm's initialisation.
    """
    module = model_module(config)
    args = model_text_args(model)
    head = family_for(module).build(module, args)
    if not isinstance(head, DeepSeekMTP):
        raise ValueError("train-mtp trains heads in DeepSeek-V3's layout only")
    head.set_dtype(mx.float32)
    text = getattr(model, "language_model", model)
    if init in ("identity", "last-layer"):
        block = float_parameters(text.model.layers[-1])
        head.block.load_weights(list(block.items()), strict=True)
    if init == "identity":
        for name, value in tree_flatten(head.block.parameters()):
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                head.block.update(tree_unflatten([(name, mx.zeros_like(value))]))
        dims = args.hidden_size
        eye = mx.eye(dims, dtype=mx.float32)
        head.eh_proj.weight = mx.concatenate([mx.zeros_like(eye), eye], axis=1)
    elif init == "last-layer":
        head.shared_head.norm.weight = text.model.norm.weight.astype(mx.float32)
    elif init != "random":
        raise ValueError(f"init must be identity, last-layer or random, not {init!r}")
    mx.eval(head.parameters())
    return head


def head_from(model: nn.Module, config: dict, source) -> MTPHead:
    """A float32 head (as :func:`build_head`) holding the head stored in the
    model directory ``source`` (its ``mtp.safetensors``, as train-mtp writes
    it): training that continues from a shipped head."""
    module = model_module(config)
    family, args = family_for(module), model_text_args(model)
    stored = mtp_tensors(family, args, read_weights(Path(source)))
    if not stored or any(k.endswith(".scales") for k in stored):
        raise ValueError(f"--init-from {source}: no unquantized MTP head for this target there")
    head = build_head(model, config, "random")
    tensors = family.sanitize(module, args, stored, raw=False)
    head.load_weights([(k, v.astype(mx.float32)) for k, v in tensors.items()], strict=True)
    mx.eval(head.parameters())
    return head


def float_parameters(module: nn.Module) -> Dict[str, mx.array]:
    """``module``'s parameters in float32, quantized layers dequantized."""
    out = {}
    quantized = {}
    for path, m in module.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            quantized[path] = m
    for name, value in tree_flatten(module.parameters()):
        base, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        m = quantized.get(base)
        if m is None:
            out[name] = value.astype(mx.float32)
        elif leaf == "weight":
            w = mx.dequantize(
                m.weight,
                m.scales,
                m.get("biases"),
                group_size=m.group_size,
                bits=m.bits,
                mode=m.mode,
            )
            out[name] = w.astype(mx.float32)
        elif leaf == "bias":
            out[name] = value.astype(mx.float32)
    return out


def _kl(logits: mx.array, teacher) -> mx.array:
    """Per-position KL(teacher || head): over the whole vocabulary for full
    teacher logits, over the teacher's renormalised top-k for ``(idx, val)``."""
    logq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if isinstance(teacher, tuple):
        idx, val = teacher
        logp = val - mx.logsumexp(val, axis=-1, keepdims=True)
        logq = mx.take_along_axis(logq, idx, axis=-1)
    else:
        logp = teacher - mx.logsumexp(teacher, axis=-1, keepdims=True)
    return (mx.exp(logp) * (logp - logq)).sum(axis=-1)


def _argmax(teacher) -> mx.array:
    if isinstance(teacher, tuple):
        idx, val = teacher
        return mx.take_along_axis(idx, val.argmax(-1)[..., None], axis=-1)[..., 0]
    return teacher.argmax(-1)


def _window(teacher, start: int, n: int):
    if isinstance(teacher, tuple):
        return tuple(t[:, start : start + n] for t in teacher)
    return teacher[:, start : start + n]


def step_loss(
    head: MTPHead,
    parts: TargetParts,
    tokens: mx.array,
    lengths: mx.array,
    prompt_lens: mx.array,
    teacher: Optional[Teacher] = None,
    *,
    depth: int = 1,
    top_k: int = 0,
    hidden_weight: float = 1.0,
) -> Tuple[mx.array, Dict[str, mx.array]]:
    """Loss of one batch and its metrics (``kl``, ``hidden``, ``agree``: the
    fraction of positions where the first draft is the teacher's argmax).

    ``tokens`` (B, L) right-padded; ``teacher`` the target's outputs for them
    (:mod:`.teacher`), computed here (with ``top_k``) when not given. Only the
    positions the loop drafts from count, those whose first draft is of a
    generated token (``t >= prompt_len - 2``, as in :mod:`.evaluate`).
    """
    if teacher is None:
        teacher = run_target(parts, tokens, top_k)
    h, out = mx.stop_gradient(teacher[0]), teacher[1]
    emb = parts.embed(tokens).astype(mx.float32)
    target = h.astype(mx.float32)
    # The head runs over every position (the prompt's are the drafts' context)
    # but the LM head, most of the cost, only from the first that counts.
    s = max(0, int(prompt_lens.min().item()) - 2)
    positions = mx.arange(s, tokens.shape[1] - 1)[None]
    first = positions >= (prompt_lens[:, None] - 2)

    total = mx.array(0.0)
    metrics = {}
    g = target[:, :-1]
    for d in range(1, depth + 1):
        n = tokens.shape[1] - d
        g = head(g[:, :n], emb[:, d : d + n])
        logits = parts.logits(g[:, s:].astype(h.dtype)).astype(mx.float32)
        m = n - s
        mask = (first[:, :m] & (positions[:, :m] + d < lengths[:, None])).astype(
            mx.float32
        )
        count = mx.maximum(mask.sum(), 1.0)
        want = _window(out, s + d, m)  # the target at t + d
        kl = (_kl(logits, want) * mask).sum() / count
        next_h = target[:, s + d :]
        rel = ((g[:, s:] - next_h) ** 2).sum(-1) / ((next_h**2).sum(-1) + 1e-6)
        hid = (rel * mask).sum() / count
        total = total + 0.5 ** (d - 1) * (kl + hidden_weight * hid)
        if d == 1:
            agree = logits.argmax(-1) == _argmax(want)
            metrics.update(kl=kl, hidden=hid, agree=(agree * mask).sum() / count)
    return total, metrics
