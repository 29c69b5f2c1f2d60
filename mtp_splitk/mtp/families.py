# Copyright © 2026 mtp_splitk contributors

"""Where each model family keeps its MTP weights and how to build its head.

A :class:`Family` knows, for one checkpoint layout:

- which stored keys belong to MTP layers (the ones mlx-lm's ``sanitize``
  drops, so the target loads without them);
- how a stored key of the first MTP layer maps to a parameter of the mlx
  head (:mod:`mtp_splitk.mtp.heads`) and back;
- how to build the head from the target's own decoder-block class;
- how to turn *raw* Hugging Face tensors into mlx-lm's form (stacked experts,
  MLA's split ``kv_b_proj``, Qwen's zero-centred norms). Weights written by
  :func:`mtp_splitk.mtp.convert` or by the synthetic writer are already in
  that form, and every step below is either idempotent on them or gated on the
  same "is this checkpoint raw?" test that mlx-lm's own ``sanitize`` uses for
  the target's weights.

Only the first MTP layer is used: DeepSeek-V3, GLM-4.5, Qwen3-Next and
Qwen3.5 release one, and vLLM's MiMo MTP serves only its first
(``assert spec_step_idx == 0`` in ``mimo_mtp.py``). Further drafts iterate the
head on its own output (see :mod:`mtp_splitk.mtp.heads`).
"""

import importlib
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from ..compat import get_classes

from .heads import DeepSeekMTP, MiMoMTP, MTPHead, QwenMTP


class Family:
    """One MTP checkpoint layout; subclasses fill in the names."""

    #: mlx-lm model modules (``mlx_lm.models.<name>``) that use this layout.
    modules: tuple = ()
    #: Human-readable description of the stored keys, for error messages.
    describes: str = ""
    #: What to do when a checkpoint has no MTP weights, for error messages.
    remedy: str = (
        "mlx_lm.convert drops them; convert the Hugging Face checkpoint with "
        "`mtp-splitk convert` (mtp_splitk.mtp.convert) to keep them."
    )

    def prefix(self, args) -> str:
        """Stored-key prefix of the first MTP layer."""
        raise NotImplementedError

    def is_mtp_key(self, key: str, args) -> bool:
        """True for every stored key of every MTP layer (what sanitize drops)."""
        raise NotImplementedError

    def head_key(self, rest: str) -> Optional[str]:
        """Head parameter path for a stored key of the first MTP layer, given
        without its prefix; ``None`` for a tensor the head does not load."""
        raise NotImplementedError

    def stored_key(self, head_path: str, args) -> str:
        """Inverse of :meth:`head_key`: the stored name of a head parameter
        (or module path) under the family's own checkpoint names."""
        raise NotImplementedError

    def build(self, module, args) -> MTPHead:
        """An unquantized head for the target ``args`` of mlx-lm ``module``."""
        raise NotImplementedError

    def is_raw(self, weights: Dict[str, mx.array]) -> bool:
        """Whether a checkpoint holds raw Hugging Face tensors (as opposed to
        mlx-lm's converted form), by the test the family's sanitize uses."""
        return False

    def sanitize(self, module, args, weights: Dict[str, mx.array], raw: bool):
        """Stored first-layer MTP tensors (keys without prefix) -> head
        parameters in mlx-lm's form."""
        raise NotImplementedError


class _BlockFamily(Family):
    """A head stored as its own tensors (``_own``) and one decoder block under
    :meth:`prefix`; the head holds the block as ``block``."""

    _own: tuple = ()
    _skipped: tuple = ()  # stored tensors the head does not load

    def head_key(self, rest):
        if rest.startswith(self._skipped) or "rotary_emb.inv_freq" in rest:
            return None
        if rest.startswith(self._own):
            return rest
        return "block." + rest

    def stored_key(self, head_path, args):
        if head_path.startswith("block."):
            head_path = head_path[len("block.") :]
        return self.prefix(args) + head_path

    def _renamed(self, weights):
        """The tensors the head loads, under its own names."""
        return {h: v for k, v in weights.items() if (h := self.head_key(k)) is not None}


class DeepSeekFamily(_BlockFamily):
    """DeepSeek-V3 and GLM-4.5 (-Air): ``model.layers.{num_hidden_layers}.*``.

    The MTP block is the family's decoder layer at index ``num_hidden_layers``
    (vLLM builds ``DeepseekV2DecoderLayer`` / ``Glm4MoeDecoderLayer`` with
    that prefix, so the dense-vs-MoE rule sees that index too).
    """

    modules = ("deepseek_v3", "glm4_moe")
    describes = (
        "the layer after the last decoder layer: enorm, hnorm, eh_proj, "
        "shared_head.norm and one decoder block"
    )
    _own = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
    # Copies of the target's embedding and LM head (DeepSeek-V3 stores them
    # again under the MTP layer; SGLang's deepseek_nextn.py skips them too).
    _skipped = ("embed_tokens.", "shared_head.head.")
    _blocks = {"deepseek_v3": "DeepseekV3DecoderLayer", "glm4_moe": "DecoderLayer"}

    def prefix(self, args):
        return f"model.layers.{args.num_hidden_layers}."

    def is_mtp_key(self, key, args):
        parts = key.split(".")
        return (
            len(parts) > 2
            and parts[0] == "model"
            and parts[1] == "layers"
            and parts[2].isdigit()
            and int(parts[2]) >= args.num_hidden_layers
        )

    def build(self, module, args):
        name = module.__name__.rsplit(".", 1)[-1]
        block = getattr(module, self._blocks[name])(args, args.num_hidden_layers)
        # Mirror the target's own mask: DeepSeek-V3's MLA asks for an array
        # mask, GLM-4.5's attention takes mlx-lm's "causal" shorthand.
        return DeepSeekMTP(
            block,
            args.hidden_size,
            args.rms_norm_eps,
            mask_as_array=name == "deepseek_v3",
        )

    def sanitize(self, module, args, weights, raw):
        # The block needs exactly what the family's sanitize does to a target
        # layer (stack per-expert tensors, dequantize fp8 blocks, split MLA's
        # kv_b_proj), so run it on the tensors renamed to target layer 0. All
        # of those steps are keyed on raw tensor names, so converted weights
        # pass through unchanged.
        stand_in = "model.layers.0."
        renamed = {stand_in + k: v for k, v in weights.items()}
        model = _sanitizer(module, args)
        out = {}
        for k, v in model.sanitize(renamed).items():
            if k.startswith(stand_in):
                head = self.head_key(k[len(stand_in) :])
                if head is not None:
                    out[head] = v
        return out


class QwenFamily(Family):
    """Qwen3-Next and Qwen3.5 (dense and MoE): ``mtp.*``.

    The block is a full-attention decoder layer (vLLM builds it with
    ``layer_type="full_attention"``); mlx-lm picks linear vs full attention
    from the layer index, so we build it at the first full-attention index.
    """

    modules = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
    describes = (
        "mtp.fc, mtp.pre_fc_norm_embedding, mtp.pre_fc_norm_hidden, "
        "mtp.layers.0.* and mtp.norm"
    )
    # Hugging Face Qwen3-Next/3.5 RMSNorms scale by (1 + w); mlx-lm adds the 1
    # when it converts (``norm_keys`` in its sanitize). In the MTP module every
    # RMSNorm is of that kind (the gated norm only lives in linear attention).
    _norms = (
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "q_norm.weight",
        "k_norm.weight",
        "pre_fc_norm_embedding.weight",
        "pre_fc_norm_hidden.weight",
        "norm.weight",
    )

    def prefix(self, args):
        return "mtp."

    def is_mtp_key(self, key, args):
        # The same test as qwen3_next.py / qwen3_5.py sanitize.
        return "mtp." in key

    def head_key(self, rest):
        if "rotary_emb.inv_freq" in rest:
            return None
        parts = rest.split(".")
        if parts[0] == "layers" and parts[1] != "0":
            return None
        return rest

    def stored_key(self, head_path, args):
        return "mtp." + head_path

    def build(self, module, args):
        name = module.__name__.rsplit(".", 1)[-1]
        index = args.full_attention_interval - 1
        if name == "qwen3_next":
            block = module.Qwen3NextDecoderLayer(args, index)
            # vLLM's MTP layer is "mtp.layers.0", so its dense-vs-MoE rule
            # sees layer 0; re-decide if the stand-in index would differ.
            moe = (
                0 not in args.mlp_only_layers
                and args.num_experts > 0
                and 1 % args.decoder_sparse_step == 0
            )
            if moe != isinstance(block.mlp, module.Qwen3NextSparseMoeBlock):
                block.mlp = (
                    module.Qwen3NextSparseMoeBlock(args)
                    if moe
                    else module.Qwen3NextMLP(args.hidden_size, args.intermediate_size)
                )
        else:
            qwen3_5 = importlib.import_module("mlx_lm.models.qwen3_5")
            block = qwen3_5.DecoderLayer(args, index)
        assert not block.is_linear
        return QwenMTP(block, args.hidden_size, args.rms_norm_eps)

    def is_raw(self, weights):
        # qwen3_next.py sanitize: raw iff per-expert tensors are present;
        # qwen3_5.py: raw iff conv1d weights still have Hugging Face's layout.
        return any(
            (
                k.startswith("model.layers.")
                and k.endswith(".mlp.experts.0.up_proj.weight")
            )
            or ("conv1d.weight" in k and v.shape[-1] != 1)
            for k, v in weights.items()
        )

    def sanitize(self, module, args, weights, raw):
        weights = dict(weights)
        experts = "layers.0.mlp.experts"
        # Qwen3-Next: one tensor per expert.
        for n in ("gate_proj", "up_proj", "down_proj"):
            if f"{experts}.0.{n}.weight" in weights:
                weights[f"layers.0.mlp.switch_mlp.{n}.weight"] = mx.stack(
                    [
                        weights.pop(f"{experts}.{e}.{n}.weight")
                        for e in range(args.num_experts)
                    ]
                )
        # Qwen3.5-MoE: fused gate_up / down tensors (as qwen3_5_moe.py sanitize).
        if f"{experts}.gate_up_proj" in weights:
            gate_up = weights.pop(f"{experts}.gate_up_proj")
            mid = gate_up.shape[-2] // 2
            weights["layers.0.mlp.switch_mlp.gate_proj.weight"] = gate_up[..., :mid, :]
            weights["layers.0.mlp.switch_mlp.up_proj.weight"] = gate_up[..., mid:, :]
            weights["layers.0.mlp.switch_mlp.down_proj.weight"] = weights.pop(
                f"{experts}.down_proj"
            )
        out = {}
        for k, v in weights.items():
            head = self.head_key(k)
            if head is None:
                continue
            if raw and v.ndim == 1 and k.endswith(self._norms):
                v = v + 1.0
            out[head] = v
        return out


class MiMoFamily(_BlockFamily):
    """MiMo: ``model.mtp_layers.N.*``, the block's tensors directly under it."""

    modules = ("mimo",)
    describes = (
        "token_layernorm, hidden_layernorm, input_proj, final_layernorm and "
        "one decoder block"
    )
    _own = ("token_layernorm.", "hidden_layernorm.", "input_proj.", "final_layernorm.")

    def prefix(self, args):
        return "model.mtp_layers.0."

    def is_mtp_key(self, key, args):
        return key.startswith("model.mtp_layers.")

    def build(self, module, args):
        return MiMoMTP(
            module.TransformerBlock(args), args.hidden_size, args.rms_norm_eps
        )

    def sanitize(self, module, args, weights, raw):
        return self._renamed(weights)


class TrainedFamily(DeepSeekFamily):
    """Targets released without MTP weights (Llama, Qwen2, Qwen3): a head in
    DeepSeek-V3's layout over the target's own ``TransformerBlock`` (full
    attention), trained by ``mtp-splitk train-mtp`` (:mod:`mtp_splitk.mtp.train`)
    and stored in ``mtp.safetensors`` in mlx-lm's form, so nothing to sanitize.
    """

    modules = ("llama", "qwen2", "qwen3")
    remedy = (
        "These models ship without an MTP head: train one with `mtp-splitk "
        "train-mtp --model MODEL --out OUT` and load OUT."
    )

    def build(self, module, args):
        block = module.TransformerBlock(args)
        return DeepSeekMTP(block, args.hidden_size, args.rms_norm_eps, False)

    def sanitize(self, module, args, weights, raw):
        return self._renamed(weights)


FAMILIES = (DeepSeekFamily(), QwenFamily(), MiMoFamily(), TrainedFamily())


def model_module(config: dict):
    """The mlx-lm module (``mlx_lm.models.<type>``) that loads ``config``."""
    model_class, _ = get_classes(config)
    return importlib.import_module(model_class.__module__)


def family_for(module) -> Family:
    name = module.__name__.rsplit(".", 1)[-1]
    for family in FAMILIES:
        if name in family.modules:
            return family
    supported = ", ".join(m for f in FAMILIES for m in f.modules)
    raise ValueError(
        f"No multi-token-prediction layout is known for model type {name!r} "
        f"(supported: {supported})."
    )


def model_text_args(model: nn.Module):
    """The text-model arguments of a loaded mlx-lm model."""
    return getattr(model, "language_model", model).args


def _sanitizer(module, args):
    """Something the family's ``Model.sanitize`` can run on.

    DeepSeek-V3's and GLM-4.5's ``sanitize`` read nothing but ``self.args``,
    so a stand-in object spares building (even lazily) a whole target.
    """
    return _SanitizeOnly(module.Model, args)


class _SanitizeOnly:
    def __init__(self, model_class, args):
        self.args = args
        self._model_class = model_class

    def sanitize(self, weights):
        return self._model_class.sanitize(self, weights)
