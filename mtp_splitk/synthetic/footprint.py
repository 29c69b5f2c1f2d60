# Copyright © 2026 mtp_splitk contributors

"""What a synthetic model holds, from its lazy shapes alone: parameters
(total and per token), and the bytes :func:`~mtp_splitk.synthetic.write_model`
(and :func:`~mtp_splitk.synthetic.write_mtp_model`) would store, without
computing or writing anything, so an 80B-parameter size costs a moment."""

from typing import Dict, Optional

from mlx.utils import tree_flatten

from .configs import model_config, text_config
from .model import lazy_model
from .mtp import mtp_head


def _parameters(module):
    """``module``'s (path, parameter) pairs and the paths of its routed experts'."""
    # Lazy: mlx-lm takes a second to import, and the CLI imports this package.
    from mlx_lm.models.switch_layers import SwitchGLU

    routed = {
        f"{path}.{leaf}"
        for path, m in module.named_modules()
        if isinstance(m, SwitchGLU)
        for leaf, _ in tree_flatten(m.parameters())
    }
    return tree_flatten(module.parameters()), routed


def footprint(
    family: str,
    size: str,
    quantization: Optional[dict] = None,
    mtp: bool = False,
) -> Dict[str, int]:
    """Counts for ``family`` at ``size`` stored with ``quantization``.

    Returns ``parameters`` (as Hugging Face counts them: unquantized, the
    embedding and the LM head included), ``active_parameters`` (those one
    token uses: routed experts scaled by top-k over the expert count),
    ``embedding_parameters`` (the embedding and an untied LM head) and
    ``bytes`` (the stored tensors, as quantized). With ``mtp`` the MTP head
    (the family's first MTP layer, quantized like the target) is added to
    each, as ``write_mtp_model`` stores it.
    """
    config = model_config(family, size)
    top_k = text_config(config).get("num_experts_per_tok", 0)
    full = [_parameters(lazy_model(config, None)[0])]
    model, stored_config = lazy_model(config, quantization)
    stored = [tree_flatten(model.parameters())]
    if mtp:
        full.append(_parameters(mtp_head(config, quantize=False)[0]))
        stored.append(tree_flatten(mtp_head(stored_config)[0].parameters()))
    counts = dict.fromkeys(("parameters", "active_parameters", "embedding_parameters"), 0)
    for params, routed in full:
        for path, v in params:
            counts["parameters"] += v.size
            # Routed experts' weights are (experts, out, in): top-k of them a token.
            share = top_k / v.shape[0] if path in routed else 1
            counts["active_parameters"] += round(v.size * share)
            if path.endswith(("embed_tokens.weight", "lm_head.weight")):
                counts["embedding_parameters"] += v.size
    counts["bytes"] = sum(v.nbytes for params in stored for _, v in params)
    return counts
