# Copyright © 2026 mtp_splitk contributors
"""Convert a llama-architecture GGUF file into an mlx-lm model directory.

The tensors come from ``mx.load`` (which gives Q4_0, Q4_1 and Q8_0 tensors as MLX affine
``weight``/``scales``/``biases`` triples of group size 32); this module reads the GGUF header
itself only for what ``mx.load`` does not say: each tensor's GGUF type (so an unsupported
one fails with its name) and where its bytes are. The tokenizer is rebuilt from the GGUF's
vocabulary with the ``tokenizers`` library.
"""

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .gguf_tokenizer import write_tokenizer

# GGML tensor type ids (ggml.h) of the types this converter reads, and the others by name
# so that an error can say what a file holds.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip
# type -> (bytes per block, elements per block, bits once in MLX's affine layout or None)
SUPPORTED_TYPES = {
    "F32": (4, 1, None),
    "F16": (2, 1, None),
    "BF16": (2, 1, None),
    "Q4_0": (18, 32, 4),
    "Q4_1": (20, 32, 4),
    "Q8_0": (34, 32, 8),
}
GROUP_SIZE = 32

# GGUF metadata value types (8 string and 9 array are read apart): struct format, numpy dtype.
_VALUE_TYPES = {
    0: ("B", "u1"), 1: ("b", "i1"), 2: ("H", "<u2"), 3: ("h", "<i2"), 4: ("I", "<u4"),
    5: ("i", "<i4"), 6: ("f", "<f4"), 7: ("?", "?"), 10: ("Q", "<u8"), 11: ("q", "<i8"),
    12: ("d", "<f8"),
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple  # row-major (numpy/MLX) order: GGUF lists the dimensions innermost first
    type_name: str
    offset: int  # absolute byte offset of the data in the file
    nbytes: int | None  # None for types this module does not read


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt):
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self):
        n = self.unpack("Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.unpack("I"), self.unpack("Q")
            if etype == 8:
                return [self.string() for _ in range(count)]
            if etype == 9:
                raise ValueError("GGUF: nested arrays are not supported")
            dt = np.dtype(_VALUE_TYPES[etype][1])
            arr = np.frombuffer(self.buf, dt, count, self.pos).copy()
            self.pos += count * dt.itemsize
            return arr
        return self.unpack(_VALUE_TYPES[vtype][0])


def read_gguf(path) -> tuple[dict, dict[str, TensorInfo]]:
    """Read a GGUF file's metadata and tensor table (not the tensor data).

    Returns ``(metadata, tensors)``: metadata values are Python scalars, strings, lists of
    strings or numpy arrays; ``tensors`` maps each name to its ``TensorInfo``.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        cur = _Cursor(mm)
        if bytes(mm[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
        cur.pos = 4
        version = cur.unpack("I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("I"))
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("Q") for _ in range(cur.unpack("I"))]
            raw.append((name, tuple(reversed(dims)), cur.unpack("I"), cur.unpack("Q")))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, shape, type_id, offset in raw:
        type_name = GGML_TYPE_NAMES.get(type_id, f"type {type_id}")
        nbytes = None
        if type_name in SUPPORTED_TYPES:
            block_bytes, block_elems, _ = SUPPORTED_TYPES[type_name]
            nbytes = int(np.prod(shape)) // block_elems * block_bytes
        tensors[name] = TensorInfo(name, shape, type_name, data_start + offset, nbytes)
    return metadata, tensors


def raw_tensor_bytes(path, info: TensorInfo) -> np.ndarray:
    """The tensor's bytes as stored in the file (a uint8 array)."""
    return np.fromfile(path, np.uint8, count=info.nbytes, offset=info.offset)


# GGUF llama tensor names -> Hugging Face llama names (the layout mlx-lm's llama loads).
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no llama counterpart in mlx-lm")


def unpermute_rows(a: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py ``permute``).

    llama.cpp interleaves the two rotary halves of each head's rows; Hugging Face keeps them
    as two blocks. Works on any array whose first axis is the rows (a float weight, or the
    packed weight, scales and biases of a quantized one: each row is whole).
    """
    rows = a.shape[0]
    half = rows // n_head // 2
    return a.reshape(n_head, half, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _meta(metadata, key, default=None):
    value = metadata.get(key, default)
    if value is None:
        raise ValueError(f"GGUF metadata has no {key!r}")
    return value.item() if isinstance(value, np.generic) else value


def llama_config(metadata: dict, tensors: dict) -> dict:
    """config.json for mlx-lm's llama from the GGUF ``llama.*`` metadata."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    if "llama.expert_count" in metadata:
        raise ValueError("GGUF llama with experts (MoE) is not supported")
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        raise ValueError(f"GGUF RoPE scaling {scaling!r} is not supported")
    heads = int(_meta(metadata, "llama.attention.head_count"))
    hidden = int(_meta(metadata, "llama.embedding_length"))
    head_dim = int(metadata.get("llama.attention.key_length", hidden // heads))
    rope_dim = int(metadata.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"GGUF partial RoPE ({rope_dim} of {head_dim}) is not supported")
    eps = float(_meta(metadata, "llama.attention.layer_norm_rms_epsilon"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_meta(metadata, "llama.block_count")),
        "intermediate_size": int(_meta(metadata, "llama.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(f"{eps:.7g}"),  # the file stores float32: 1e-5 reads 9.99e-6
        "vocab_size": int(
            metadata.get("llama.vocab_size", len(_meta(metadata, "tokenizer.ggml.tokens")))
        ),
        "max_position_embeddings": int(_meta(metadata, "llama.context_length")),
        "rope_theta": float(metadata.get("llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "bos_token_id": int(_meta(metadata, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_meta(metadata, "tokenizer.ggml.eos_token_id")),
    }


def check_types(tensors: dict) -> None:
    """A ValueError naming the first tensor whose GGUF type this module cannot convert."""
    for info in tensors.values():
        if info.type_name not in SUPPORTED_TYPES:
            raise ValueError(
                f"GGUF tensor {info.name!r} has type {info.type_name}, which is not "
                f"supported (supported: {', '.join(SUPPORTED_TYPES)})"
            )


def load_tensors(path, tensors: dict) -> dict[str, mx.array]:
    """Every tensor in MLX form, under its GGUF name (quantized ones as three arrays)."""
    arrays = mx.load(str(path))
    for info in tensors.values():
        if info.type_name == "BF16":
            # mx.load turns BF16 into float16, which loses bf16's range; read it as stored.
            raw = raw_tensor_bytes(path, info).view(np.uint16).reshape(info.shape)
            arrays[info.name] = mx.array(raw).view(mx.bfloat16)
    return arrays


def convert(gguf_path, out_dir, variant: str = "q4", dtype=mx.float16) -> Path:
    """Write an mlx-lm model directory for a llama GGUF file.

    ``variant="q4"`` keeps the file's own quantized numbers (MLX affine, group size 32,
    4 or 8 bits per tensor as in the file, with per-module entries in
    ``config["quantization"]``), its scales, biases and float tensors in ``dtype``
    (float16 holds the file's scales exactly, float32 too); ``variant="float"``
    dequantizes every tensor to ``dtype``. The model computes in ``dtype``. Returns
    ``out_dir``.
    """
    if variant not in ("q4", "float"):
        raise ValueError(f"variant must be 'q4' or 'float', not {variant!r}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    metadata, tensors = read_gguf(gguf_path)
    check_types(tensors)
    config = llama_config(metadata, tensors)
    arrays = load_tensors(gguf_path, tensors)

    weights, bits_of = {}, {}
    for info in tensors.values():
        stem, _, suffix = info.name.rpartition(".")  # suffix: weight or bias
        bits = SUPPORTED_TYPES[info.type_name][2]
        if bits is None:
            parts = {suffix: arrays[info.name]}
        else:
            parts = {s: arrays[f"{stem}.{s}"] for s in ("weight", "scales", "biases")}
        if stem.endswith((".attn_q", ".attn_k")):
            heads = "num_attention_heads" if stem.endswith("q") else "num_key_value_heads"
            parts = {s: unpermute_rows(a, config[heads]) for s, a in parts.items()}
        if bits is not None and variant == "float":
            # In float32 (mx.dequantize computes in the scales' dtype), so that the cast
            # below rounds once.
            scales, biases = (parts[s].astype(mx.float32) for s in ("scales", "biases"))
            parts = {"weight": mx.dequantize(parts["weight"], scales, biases, GROUP_SIZE, bits)}
            bits = None
        module = hf_name(info.name).rpartition(".")[0]
        for s, a in parts.items():
            weights[f"{module}.{s}"] = a if s == "weight" and bits else a.astype(dtype)
        if bits is not None or (suffix == "weight" and len(info.shape) == 2):
            bits_of[module] = bits  # None: a float matrix, kept out of nn.quantize

    quantized = [b for b in bits_of.values() if b is not None]
    if quantized:
        common = max(set(quantized), key=quantized.count)
        quant = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
        for module, bits in sorted(bits_of.items()):
            if bits is None:
                quant[module] = False
            elif bits != common:
                quant[module] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
        config["quantization"] = config["quantization_config"] = quant
    config["torch_dtype"] = str(dtype).split(".")[-1]

    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, {"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(metadata, out_dir)
    return out_dir
