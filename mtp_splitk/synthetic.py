# Copyright © 2026 mtp_splitk contributors

"""Synthetic mlx-lm model directories: real file layout, random weights.

A directory written here looks like ``mlx_lm.convert`` output (config.json
with mlx-lm's ``quantization`` entry, safetensors shards named and indexed the
way ``mlx_lm.utils.save_model`` names them, tokenizer files saved by
``transformers``) and loads through ``mlx_lm.load`` and nothing else.

The model's structure always comes from mlx-lm's own ``Model``/``ModelArgs``
classes, built lazily: MLX arrays are not computed until evaluated, so even a
30B-parameter model costs nothing to *describe*. What differs by size is where
the values come from:

- ``tiny`` and ``small``: the model is evaluated (mlx-lm's own
  initialisation, then ``nn.quantize`` through
  ``mlx_lm.utils.quantize_model``, as convert does).
- real shapes: only the shapes and dtypes are taken from the lazy model; the
  stored tensors (packed uint32 words, scales, biases) are written directly,
  streamed from small random pools, so a 30B directory costs disk bandwidth,
  not compute or RAM.

The tokenizer is a byte-level BPE trained in code on a few sentences and padded
to the model's vocabulary with word-like filler tokens, so any sampled id
decodes to text. No network is used.
"""

import contextlib
import copy
import hashlib
import io
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from .ops import resolve_mode

# Bump when the bytes written for the same arguments change (cached models are keyed on it).
FORMAT_VERSION = 1
DEFAULT_QUANTIZATION = {"bits": 4, "group_size": 64, "mode": "affine"}
TINY_VOCAB = 384

# ChatML: one role line per message; <|im_end|> is the eos token.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = (
    "The quick brown fox jumps over the lazy dog while the small model writes tokens. "
    "Speculative decoding drafts a few tokens with a cheap model and verifies all of "
    "them with one pass of the large model; the tokens that agree are kept. "
    "A quantized matrix multiply streams packed weights, dequantizes them in registers "
    "and multiplies them with a handful of rows. Hello, world! How are you today? "
    "We split the reduction along K so that every streaming multiprocessor has work. "
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation: , . ; : ! ? ( ) [ ] "
)
_BPE_VOCAB_CAP = 512  # merges learned from the corpus; the rest of the vocabulary is filler

# -- model families -------------------------------------------------------------------------

_DENSE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
}
_LINEAR_ATTENTION = {  # Gated DeltaNet layers of qwen3_next / qwen3_5
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 2,  # layer 0 linear, layer 1 full attention
}

# Tiny configs: every matmul's input width is a multiple of 64 so that it is
# quantized at group size 64 (quantize_model skips layers that do not divide).
TINY = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        **_DENSE,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,  # the LM head is QuantizedEmbedding.as_linear
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        **_DENSE,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        **_DENSE,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    },
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_shared_experts": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "routed_scaling_factor": 2.5,
        "n_group": 2,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "first_k_dense_replace": 1,  # layer 0 dense MLP, layer 1 MoE
        "moe_layer_freq": 1,
        # MLA: embed_q / unembed_out (QuantizedMultiLinear) reduce over
        # qk_nope_head_dim and kv_lora_rank, so both are multiples of 64.
        "kv_lora_rank": 64,
        "q_lora_rank": 64,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        **_DENSE,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "gpt_oss": {
        "architectures": ["GptOssForCausalLM"],
        **_DENSE,
        "intermediate_size": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        # A window longer than the test sequences keeps the rotating cache
        # trimmable, which speculative decoding needs.
        "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"],
        "tie_word_embeddings": False,
    },
    "mimo": {
        "architectures": ["MiMoForCausalLM"],
        **_DENSE,
        "rms_norm_eps": 1e-5,
        "rope_theta": 640000.0,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 1,
    },
    "qwen3_next": {
        "architectures": ["Qwen3NextForCausalLM"],
        **_DENSE,
        **_LINEAR_ATTENTION,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "tie_word_embeddings": False,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    },
    "qwen3_5": {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_5_text",
            **_DENSE,
            **_LINEAR_ATTENTION,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000000.0,
                "partial_rotary_factor": 0.25,
            },
        },
    },
}
FAMILIES = tuple(TINY)

# "small": tiny with every width x4, so each matmul reduces over K >= 128 and
# the GPU kernels (which need K >= 128) plan it. Still loads in a moment.
_WIDTHS = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "head_dim",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
)

# Real shapes (published configs), for the GPU. Each names its family.
SIZES = {
    "llama3-8b": (
        "llama",
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": False,
            "vocab_size": 128256,
        },
    ),
    # The Llama 3 vocabulary, so it drafts for llama3-8b.
    "llama3.2-1b": (
        "llama",
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
            "vocab_size": 128256,
        },
    ),
    "qwen3-30b-a3b": (
        "qwen3_moe",
        {
            "architectures": ["Qwen3MoeForCausalLM"],
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 768,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 40960,
            "tie_word_embeddings": False,
            "vocab_size": 151936,
        },
    ),
    # The Qwen3 vocabulary, so it drafts for qwen3-30b-a3b.
    "qwen3-0.6b": (
        "qwen3",
        {
            "architectures": ["Qwen3ForCausalLM"],
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 40960,
            "tie_word_embeddings": True,
            "vocab_size": 151936,
        },
    ),
}


def _text_config(config: dict) -> dict:
    """The dict that holds the language model's fields (nested for qwen3_5)."""
    return config.get("text_config", config)


def model_config(
    family: str,
    size: str = "tiny",
    vocab_size: Optional[int] = None,
    dtype: str = "bfloat16",
) -> dict:
    """The HF-style config.json contents (before quantization) of a synthetic model.

    ``dtype`` is the checkpoint's ``torch_dtype``, which convert casts to.
    """
    if family not in TINY:
        raise ValueError(
            f"Unknown family {family!r}; expected one of {', '.join(FAMILIES)}."
        )
    if size in ("tiny", "small"):
        fields = copy.deepcopy(TINY[family])
        if size == "small":
            text = _text_config(fields)
            text.update({k: 4 * v for k, v in text.items() if k in _WIDTHS})
    elif size in SIZES:
        size_family, fields = SIZES[size]
        if size_family != family:
            raise ValueError(f"Size {size!r} is a {size_family} shape, not {family}.")
    else:
        names = ", ".join(
            ["tiny", "small", *(s for s, (f, _) in SIZES.items() if f == family)]
        )
        raise ValueError(f"Unknown size {size!r} for {family}; expected one of {names}.")
    config = {"model_type": family, **copy.deepcopy(fields), "torch_dtype": dtype}
    text = _text_config(config)
    text["vocab_size"] = vocab_size or text.get("vocab_size", TINY_VOCAB)
    if text["vocab_size"] < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least 260, got {text['vocab_size']}.")
    return config


# -- tokenizer ------------------------------------------------------------------------------


def _filler_tokens(count: int, taken) -> List[str]:
    """Word-like byte-level tokens ("Ġbaku", ...) that no merge produces."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    tokens, i = [], 0
    while len(tokens) < count:
        word, n = "", i
        while True:
            word += syllables[n % len(syllables)]
            n //= len(syllables)
            if n == 0:
                break
        i += 1
        token = "Ġ" + word  # "Ġ" is the byte-level form of a leading space
        if token not in taken:
            tokens.append(token)
    return tokens


def build_tokenizer(vocab_size: int = TINY_VOCAB):
    """A ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` tokens.

    Byte-level BPE (every string encodes), special tokens at the end of the
    vocabulary as in Qwen's, a ChatML chat template, eos ``<|im_end|>``.
    Deterministic: the same vocab_size gives the same tokenizer.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base_size = vocab_size - len(SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(base_size, _BPE_VOCAB_CAP),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer)

    # Fill the vocabulary up to the model's size. The filler entries are plain
    # vocabulary (no merge produces them), so they decode but never encode.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for token in _filler_tokens(base_size - len(vocab), vocab):
        vocab[token] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    assert tok.get_vocab_size() == vocab_size

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


# -- lazy model -----------------------------------------------------------------------------


def lazy_model(config: dict, quantization: Optional[dict] = None):
    """mlx-lm's model for ``config``, cast and quantized the way convert does it.

    Nothing is computed: the parameters are lazy MLX arrays whose shapes and
    dtypes are those a converted checkpoint stores. Returns (model, config),
    the config with mlx-lm's ``quantization`` entries added.
    """
    from mlx_lm.convert import MODEL_CONVERSION_DTYPES
    from .compat import get_classes

    model_class, args_class = get_classes(config)
    model = model_class(args_class.from_dict(copy.deepcopy(config)))

    # Cast floating parameters to the checkpoint dtype, as convert does.
    dtype = config.get("torch_dtype")
    if dtype in MODEL_CONVERSION_DTYPES:
        dtype = getattr(mx, dtype)
        keep = getattr(model, "cast_predicate", lambda _: True)

        def cast(path, v):
            if keep(path) and mx.issubdtype(v.dtype, mx.floating):
                return v.astype(dtype)
            return v

        model.update(tree_map_with_path(cast, model.parameters()))

    return _quantize(model, config, quantization)


def _quantize(model, config: dict, quantization: Optional[dict]):
    from mlx_lm.utils import quantize_model

    if quantization is None:
        return model, config
    mode = quantization.get("mode", "affine")
    group_size, bits = resolve_mode(
        mode, quantization.get("group_size"), quantization.get("bits")
    )
    # quantize_model reports bits per weight on stdout; a library stays quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        return quantize_model(model, config, group_size, bits, mode=mode)


# -- stored tensors -------------------------------------------------------------------------

# safetensors dtype names, and the numpy dtype that carries the same bytes
# (numpy has no bfloat16: its bits travel as uint16).
_STORED = {
    mx.bool_: ("BOOL", np.bool_),
    mx.uint8: ("U8", np.uint8),
    mx.uint16: ("U16", np.uint16),
    mx.uint32: ("U32", np.uint32),
    mx.int8: ("I8", np.int8),
    mx.int16: ("I16", np.int16),
    mx.int32: ("I32", np.int32),
    mx.int64: ("I64", np.int64),
    mx.float16: ("F16", np.float16),
    mx.bfloat16: ("BF16", np.uint16),
    mx.float32: ("F32", np.float32),
}
_NUMPY_STORED = {np.dtype(n): s for s, n in _STORED.values() if s != "BF16"}

CHUNK = 1 << 21  # elements per write when streaming
POOL = 1 << 22  # random values per pool; chunks are slices of it at random offsets
SMALL = 1 << 20  # float tensors up to this size keep mlx-lm's own initial values


@dataclass
class Tensor:
    """One stored tensor: its name, safetensors dtype, shape and its bytes in chunks."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    nbytes: int
    chunks: Callable[[], Iterator[np.ndarray]]


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, mx.array):
        return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)
    return np.ascontiguousarray(a)


def tensor_from_array(name: str, a) -> Tensor:
    """A Tensor holding an mx.array or np.ndarray as it is."""
    if isinstance(a, mx.array):
        if a.dtype not in _STORED:
            raise ValueError(f"{name}: dtype {a.dtype} cannot be stored in safetensors.")
        dtype = _STORED[a.dtype][0]
    else:
        a = np.asarray(a)
        if a.dtype not in _NUMPY_STORED:
            raise ValueError(f"{name}: dtype {a.dtype} cannot be stored in safetensors.")
        dtype = _NUMPY_STORED[a.dtype]
    itemsize = 2 if dtype == "BF16" else np.dtype(_as_numpy_dtype(dtype)).itemsize
    return Tensor(
        name, dtype, tuple(a.shape), a.size * itemsize, lambda: iter([_as_numpy(a)])
    )


def _as_numpy_dtype(stored: str):
    return next(n for s, n in _STORED.values() if s == stored)


def write_safetensors(path, tensors: List[Tensor], progress=None) -> None:
    """Stream ``tensors`` into one safetensors file (the format mx.load reads).

    The header is written first from the shapes alone, then each tensor's
    chunks, so memory stays at one chunk whatever the file size.
    """
    header = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            written = 0
            for chunk in t.chunks():
                f.write(np.ascontiguousarray(chunk).data)
                written += chunk.nbytes
                if progress is not None:
                    progress(chunk.nbytes)
            if written != t.nbytes:
                raise AssertionError(
                    f"{t.name}: wrote {written} bytes, expected {t.nbytes}."
                )


# -- packed values for real shapes ----------------------------------------------------------

_FP4_MAGNITUDES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)


def _e4m3_values() -> np.ndarray:
    """The value of every fp8 E4M3 code (NaN for 0x7F and 0xFF)."""
    codes = np.arange(256)
    exp, man = (codes >> 3) & 0xF, (codes & 7).astype(np.float64)
    mag = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7))
    mag = np.where((codes & 0x7F) == 0x7F, np.nan, mag)
    return np.where(codes & 0x80, -mag, mag)


def _rms(values) -> float:
    return float(np.sqrt(np.nanmean(np.square(values))))


def _to_stored(x: np.ndarray, stored: str) -> np.ndarray:
    """float32 values in the bytes of a floating safetensors dtype."""
    if stored == "BF16":
        bits = x.astype(np.float32).view(np.uint32)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
        return (bits >> 16).astype(np.uint16)
    return x.astype(_as_numpy_dtype(stored))


class _Pools:
    """Random value pools shared by all tensors of one model.

    Generating fresh random numbers for 30B weights would take minutes on a
    few CPU cores; slicing pools at random offsets (and XOR-ing packed words
    with a random key) costs a memory copy. The model's numerics do not care,
    the bandwidth a benchmark measures does not either.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.cache = {}

    def rng(self, *key) -> np.random.Generator:
        # Not hash(): Python salts string hashes per process.
        digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
        return np.random.default_rng([self.seed, int.from_bytes(digest, "little")])

    def get(self, key, make):
        if key not in self.cache:
            self.cache[key] = make(self.rng("pool", *key))
        return self.cache[key]

    def stream(self, pool, n, rng, xor=False, fix=None) -> Iterator[np.ndarray]:
        done = 0
        while done < n:
            size = min(CHUNK, n - done)
            start = int(rng.integers(0, len(pool) - size + 1))
            chunk = pool[start : start + size]
            if xor:
                chunk = chunk ^ pool.dtype.type(rng.integers(0, 2**32))
            if fix is not None:
                chunk = fix(chunk)
            yield chunk
            done += size


def _no_fp8_nan(words: np.ndarray) -> np.ndarray:
    """Turn the E4M3 NaN bytes (0x7F, 0xFF) into the largest finite values."""
    b = words.view(np.uint8).copy()
    b[(b & 0x7F) == 0x7F] ^= 1
    return b.view(np.uint32)


def _packed_tensors(prefix, module, params, pools: _Pools) -> List[Tensor]:
    """Stored tensors of one quantized layer, values drawn from ``pools``.

    Weights are uniformly random codes. Scales (and affine biases) are chosen
    so that the dequantized weights have the spread of mlx-lm's own
    initialisation, uniform in +-1/sqrt(K), so activations stay finite.
    """
    mode, bits, group_size = module.mode, module.bits, module.group_size
    scales = params["scales"]
    K = scales.shape[-1] * group_size
    amplitude = 1 / math.sqrt(K)
    rng = lambda leaf: pools.rng(prefix, leaf)  # noqa: E731
    out = []

    w = params["weight"]
    words = pools.get(("words",), lambda r: r.integers(0, 2**32, POOL, np.uint32))
    fix = _no_fp8_nan if mode == "mxfp8" else None
    out.append(_streamed(prefix + ".weight", w, pools, words, rng("w"), xor=True, fix=fix))

    if mode == "affine":
        stored = _STORED[scales.dtype][0]
        levels = 2**bits - 1

        def make_scale(r):
            jitter = r.uniform(0.75, 1.25, POOL).astype(np.float32)
            return jitter * np.float32(2 * amplitude / levels)

        scale_pool = pools.get(("scale", K, bits), make_scale)
        # Each group's bias centres its codes on zero: w = s * (q - levels / 2).
        s = pools.get(("scale", K, bits, stored), lambda r: _to_stored(scale_pool, stored))
        b = pools.get(
            ("bias", K, bits, stored),
            lambda r: _to_stored(-scale_pool * np.float32(levels / 2), stored),
        )
        # The same offsets for scales and biases keep each group's pair together.
        out.append(_streamed(prefix + ".scales", scales, pools, s, rng("s")))
        out.append(_streamed(prefix + ".biases", params["biases"], pools, b, rng("s")))
    else:
        out.append(
            _streamed(
                prefix + ".scales", scales, pools, _fp_scales(mode, K, pools), rng("s")
            )
        )
    return out


def _fp_scales(mode: str, K: int, pools: _Pools) -> np.ndarray:
    """uint8 scale codes for the microscaling modes (E8M0, or E4M3 for nvfp4)."""
    e4m3 = _e4m3_values()
    element_rms = _rms(e4m3[:127]) if mode == "mxfp8" else _rms(_FP4_MAGNITUDES)
    # The weights' rms, a / sqrt(3) for uniform(+-a), over the elements' rms.
    target = 1 / math.sqrt(3 * K) / element_rms

    def make(r):
        if mode == "nvfp4":
            centre = int(np.nanargmin(np.abs(e4m3[:127] - target)))
        else:  # E8M0: the code is a biased power-of-two exponent
            centre = 127 + round(math.log2(target))
        return (centre + r.integers(-1, 1, POOL, endpoint=True)).astype(np.uint8)

    return pools.get(("fp-scale", mode, K), make)


def _streamed(name, like, pools, pool, rng, xor=False, fix=None) -> Tensor:
    stored, npdtype = _STORED[like.dtype]
    n = like.size
    itemsize = np.dtype(npdtype).itemsize
    if pool.dtype != np.dtype(npdtype):
        raise AssertionError(f"{name}: pool dtype {pool.dtype} for stored {stored}.")
    seed = int(rng.integers(0, 2**32))
    return Tensor(
        name,
        stored,
        tuple(like.shape),
        n * itemsize,
        lambda: pools.stream(pool, n, np.random.default_rng(seed), xor=xor, fix=fix),
    )


def _float_tensor(name, value, pools: _Pools) -> Tensor:
    """A floating parameter: mlx-lm's own initial value when small (norms are
    ones, router biases zeros), else uniform in +-1/sqrt(last dim)."""
    if value.size <= SMALL or not mx.issubdtype(value.dtype, mx.floating):
        return tensor_from_array(name, value)
    stored = _STORED[value.dtype][0]
    width = value.shape[-1]
    amplitude = 1 / math.sqrt(width)
    pool = pools.get(
        ("float", width, stored),
        lambda r: _to_stored(
            r.uniform(-amplitude, amplitude, POOL).astype(np.float32), stored
        ),
    )
    return _streamed(name, value, pools, pool, pools.rng(name))


def _quantized_modules(model) -> Dict[str, nn.Module]:
    return {
        path: m
        for path, m in model.named_modules()
        if hasattr(m, "bits") and hasattr(m, "group_size") and "scales" in m
    }


def packed_tensors(model, seed: int = 0) -> List[Tensor]:
    """Every stored tensor of a (lazy) model, values synthesized in packed form.

    Only the shapes and dtypes of the model's parameters are used: nothing of
    the lazy model is evaluated but the small floating parameters.
    """
    pools = _Pools(seed)
    params = dict(tree_flatten(model.parameters()))
    quantized = _quantized_modules(model)
    done, tensors = set(), []
    for name in params:
        prefix, leaf = name.rsplit(".", 1)
        module = quantized.get(prefix)
        if module is not None and leaf in ("weight", "scales", "biases"):
            if prefix in done:
                continue
            if module.get("global_scale") is not None:
                raise NotImplementedError(
                    f"{prefix}: nvfp4 global scales are not synthesized."
                )
            done.add(prefix)
            leaves = {
                k: params[f"{prefix}.{k}"]
                for k in ("weight", "scales", "biases")
                if f"{prefix}.{k}" in params
            }
            tensors.extend(_packed_tensors(prefix, module, leaves, pools))
        else:
            tensors.append(_float_tensor(name, params[name], pools))
    # Keep mlx-lm's parameter order (the order convert writes).
    order = {name: i for i, name in enumerate(params)}
    return sorted(tensors, key=lambda t: order[t.name])


def evaluated_tensors(model) -> List[Tensor]:
    """Every stored tensor of a model, with its evaluated values."""
    params = tree_flatten(model.parameters())
    mx.eval([v for _, v in params])
    return [tensor_from_array(k, v) for k, v in params]


# -- model directories ----------------------------------------------------------------------


def _shards(tensors: List[Tensor], max_bytes: int) -> List[List[Tensor]]:
    """Split like mlx_lm.utils.make_shards: in order, a new shard past the limit."""
    shards, size = [], 0
    for t in tensors:
        if not shards or size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_directory(
    path,
    config: dict,
    tensors: List[Tensor],
    total_parameters: int,
    progress: Optional[Callable[[int, int], None]] = None,
    max_shard_bytes: Optional[int] = None,
) -> Path:
    """Write config.json, the tokenizer, safetensors shards and their index."""
    from mlx_lm.utils import MAX_FILE_SIZE_GB, save_config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty.")

    text = _text_config(config)
    tokenizer = build_tokenizer(text["vocab_size"])
    config = copy.deepcopy(config)
    config["eos_token_id"] = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    save_config(config, path / "config.json")
    tokenizer.save_pretrained(path)

    shards = _shards(tensors, max_shard_bytes or MAX_FILE_SIZE_GB << 30)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    total = sum(t.nbytes for t in tensors)
    done = 0

    def advance(n):
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    weight_map = {}
    for i, shard in enumerate(shards):
        name = fmt.format(i + 1, len(shards))
        write_safetensors(path / name, shard, advance)
        weight_map.update({t.name: name for t in shard})
    index = {
        "metadata": {"total_size": total, "total_parameters": total_parameters},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)
    return path


# A dict of stored tensors, or a function of the final config returning one.
def _prefer_words(model, vocab_size: int) -> None:
    """Halve the LM-head rows of the 256 single-byte tokens.

    A random model picks any id, and two thirds of a 384-token vocabulary are
    single bytes, mostly control characters: the demo would print newlines.
    Real models give such tokens small output norms; so does this one.
    """
    tokens = build_tokenizer(vocab_size).convert_ids_to_tokens(list(range(vocab_size)))
    rows = mx.array([0.5 if len(t) == 1 else 1.0 for t in tokens])[:, None]
    params = dict(tree_flatten(model.parameters()))
    head = [k for k in params if k.endswith("lm_head.weight")]
    head = head or [k for k in params if k.endswith("embed_tokens.weight")]  # tied
    model.load_weights(
        [(k, (params[k] * rows).astype(params[k].dtype)) for k in head], strict=False
    )


ExtraWeights = Optional[Union[Dict[str, object], Callable[[dict], Dict[str, object]]]]


def write_model(
    path,
    family: str,
    size: str = "tiny",
    quantization: Optional[dict] = DEFAULT_QUANTIZATION,
    seed: int = 0,
    vocab_size: Optional[int] = None,
    extra_weights: ExtraWeights = None,
    *,
    dtype: str = "bfloat16",
    packed: Optional[bool] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    max_shard_bytes: Optional[int] = None,
) -> Path:
    """Write a synthetic mlx-lm model directory and return its path.

    Args:
        path: an empty or missing directory.
        family: one of ``FAMILIES`` (an mlx-lm model_type).
        size: ``"tiny"``, ``"small"`` or a real shape of that family (``SIZES``).
        quantization: ``{"bits", "group_size", "mode"}`` as for
            ``mlx_lm.convert`` (affine 2-8 bits, mxfp4, mxfp8, nvfp4), or
            None for an unquantized model.
        seed: the same seed writes the same bytes.
        vocab_size: overrides the family's (tiny and small: 384).
        extra_weights: more tensors (mx.array or np.ndarray) stored as given,
            after the model's, under their final names: e.g. MTP heads under
            the family's HF names. Either a dict or a function of the final
            config (the one written to config.json, quantization entries
            included) returning one. mlx_lm.load (strict) accepts them only
            where the family's sanitize drops them from converted checkpoints
            too: qwen3_5 ("mtp.*") and mimo ("model.mtp_layers.*") do;
            qwen3_next drops "mtp.*" only from unconverted ones, deepseek_v3
            only "model.layers.61.*".
        dtype: the checkpoint dtype (``torch_dtype``).
        packed: synthesize packed values instead of evaluating the model;
            default: True for the real shapes, False for tiny and small.
        progress: called as ``progress(bytes_done, bytes_total)`` while writing.
        max_shard_bytes: shard size limit (default mlx-lm's 5 GB).
    """
    config = model_config(family, size, vocab_size, dtype)
    if packed is None:
        packed = size in SIZES
    if not packed:
        mx.random.seed(seed)  # mlx-lm's initialisers draw from the global generator
    model, config = lazy_model(config, quantization)
    tensors = packed_tensors(model, seed) if packed else evaluated_tensors(model)
    return _write_with_extras(
        path, model, config, tensors, extra_weights, progress, max_shard_bytes
    )


def write_pair(
    path,
    family: str = "llama",
    quantization: Optional[dict] = DEFAULT_QUANTIZATION,
    seed: int = 0,
    *,
    target_layers: int = 4,
    draft_layers: int = 1,
    dtype: str = "bfloat16",
) -> Tuple[Path, Path]:
    """Write a tiny target and a draft for it into ``path/target`` and ``path/draft``.

    The draft is the target's first ``draft_layers`` layers with the same
    embeddings, final norm, LM head and tokenizer (a layer-skip draft):
    random weights give no two independent models anything to agree on,
    while this draft agrees with its target on most tokens and still
    disagrees on some, so both the accept and the reject paths run.
    """
    if not 0 < draft_layers < target_layers:
        raise ValueError("need 0 < draft_layers < target_layers.")
    path = Path(path)
    config = model_config(family, "tiny", dtype=dtype)
    _text_config(config)["num_hidden_layers"] = target_layers
    mx.random.seed(seed)
    target, _ = lazy_model(config, None)
    _prefer_words(target, _text_config(config)["vocab_size"])
    target, target_config = _quantize(target, config, quantization)
    tensors = evaluated_tensors(target)
    _write_with_extras(path / "target", target, target_config, tensors)

    _text_config(config)["num_hidden_layers"] = draft_layers
    draft, draft_config = lazy_model(config, quantization)
    by_name = {t.name: t for t in tensors}
    shared = []
    for name, value in tree_flatten(draft.parameters()):
        t = by_name[name]  # every draft parameter is one of the target's
        if t.shape != tuple(value.shape):
            raise AssertionError(f"{name}: draft shape {value.shape} != target {t.shape}.")
        shared.append(t)
    _write_with_extras(path / "draft", draft, draft_config, shared)
    return path / "target", path / "draft"


def _write_with_extras(
    path,
    model,
    config,
    tensors,
    extra_weights: ExtraWeights = None,
    progress=None,
    max_shard_bytes=None,
) -> Path:
    from mlx_lm.utils import get_total_parameters

    if callable(extra_weights):
        extra_weights = extra_weights(copy.deepcopy(config))
    taken = {t.name for t in tensors}
    for name, value in (extra_weights or {}).items():
        if name in taken:
            raise ValueError(f"extra weight {name!r} collides with a model weight.")
        tensors = tensors + [tensor_from_array(name, value)]
    return write_directory(
        path, config, tensors, get_total_parameters(model), progress, max_shard_bytes
    )
