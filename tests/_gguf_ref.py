# Copyright © 2026 mtp_splitk contributors
"""Test-side GGUF truth, written from the GGUF spec and llama.cpp, independent of
mtp_splitk.gguf and of MLX: a file writer, numpy quantizers and dequantizers of the block
formats, and llama.cpp's q/k row permutation with its inverse as an index map."""

import struct

import numpy as np
from tokenizers import pre_tokenizers

TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q8_0": 8, "BF16": 30}
# GGUF metadata value types
U32, I32, F32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9


def _str(x: str) -> bytes:
    b = x.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def kv(key, value):
    """One metadata entry; ints are uint32, floats float32, lists of str/int arrays."""
    if isinstance(value, bool):
        body = struct.pack("<I?", BOOL, value)
    elif isinstance(value, int):
        body = struct.pack("<II", U32, value)
    elif isinstance(value, float):
        body = struct.pack("<If", F32, value)
    elif isinstance(value, str):
        body = struct.pack("<I", STRING) + _str(value)
    elif value and isinstance(value[0], str):
        body = struct.pack("<IIQ", ARRAY, STRING, len(value)) + b"".join(map(_str, value))
    else:
        body = struct.pack("<IIQ", ARRAY, I32, len(value)) + np.asarray(value, "<i4").tobytes()
    return _str(key) + body


def write_gguf(path, metadata: dict, tensors: list):
    """``tensors``: (name, row-major shape, type name, raw bytes). Version 3, alignment 32."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    out += b"".join(kv(k, v) for k, v in metadata.items())
    offset, data = 0, []
    for name, shape, type_name, raw in tensors:
        dims = b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += _str(name) + struct.pack("<I", len(shape)) + dims
        out += struct.pack("<IQ", TYPE_IDS[type_name], offset)
        padded = raw + b"\0" * (-len(raw) % 32)
        data.append(padded)
        offset += len(padded)
    out += b"\0" * (-len(out) % 32)
    with open(path, "wb") as f:
        f.write(out + b"".join(data))


def _f16(a):
    return np.asarray(a, np.float32).astype("<f2")


def quantize(x: np.ndarray, type_name: str) -> bytes:
    """llama.cpp's reference quantizers (ggml-quants.c quantize_row_*_ref), row-major."""
    x = np.asarray(x, np.float32)
    if type_name == "F32":
        return x.astype("<f4").tobytes()
    if type_name == "F16":
        return _f16(x).tobytes()
    if type_name == "BF16":
        return (x.view(np.uint32) >> 16).astype("<u2").tobytes()  # truncation is fine here
    b = x.reshape(-1, 32)
    if type_name == "Q8_0":
        d = np.abs(b).max(1, keepdims=True) / 127
        q = np.round(b / np.where(d == 0, 1, d)).astype(np.int8)
        return b"".join(_f16(di).tobytes() + qi.tobytes() for di, qi in zip(d, q))
    if type_name == "Q4_1":
        lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
        d = (hi - lo) / 15
        q = np.clip(np.round((b - lo) / np.where(d == 0, 1, d)), 0, 15).astype(np.uint8)
        head = np.concatenate([_f16(d), _f16(lo)], 1)
    elif type_name == "Q4_0":
        amax_at = np.abs(b).argmax(1)
        d = b[np.arange(len(b)), amax_at][:, None] / -8
        q = np.clip(np.floor(b / np.where(d == 0, 1, d) + 8.5), 0, 15).astype(np.uint8)
        head = _f16(d)
    else:
        raise ValueError(type_name)
    packed = q[:, :16] | (q[:, 16:] << 4)
    return b"".join(h.tobytes() + p.tobytes() for h, p in zip(head, packed))


def dequantize(raw: np.ndarray, type_name: str, shape) -> np.ndarray:
    """The GGUF block formats decoded in numpy (float32)."""
    raw = np.asarray(raw, np.uint8)
    if type_name == "F32":
        return raw.view("<f4").reshape(shape).copy()
    if type_name == "F16":
        return raw.view("<f2").astype(np.float32).reshape(shape)
    if type_name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    size = {"Q8_0": 34, "Q4_1": 20, "Q4_0": 18}[type_name]
    blocks = raw.reshape(-1, size)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)
    if type_name == "Q8_0":
        return (d * blocks[:, 2:].view(np.int8)).reshape(shape)
    qs = blocks[:, size - 16 :]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    if type_name == "Q4_1":
        m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
        return (d * q + m).reshape(shape)
    return (d * (q - 8)).reshape(shape)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's ``permute``: Hugging Face rows -> GGUF rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_rows_from_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse, as an index map: HF row (head h, half j, i) is GGUF row h*hd + 2i + j."""
    head_dim = w.shape[0] // n_head
    half = head_dim // 2
    r = np.arange(w.shape[0])
    h, j, i = r // head_dim, (r % head_dim) // half, r % half
    return w[h * head_dim + 2 * i + j]


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_llama_gguf(path, types: dict, tied: bool = True, bias: bool = False, seed: int = 0):
    """Write a 2-layer llama GGUF with a byte-level vocabulary (3 special tokens, the 256
    byte symbols, and "Ġt" from one merge). ``types`` maps a GGUF tensor name to its type
    (default Q4_1 for matrices, F32 for vectors); ``bias`` adds attention biases. Returns
    the Hugging Face weights the file stands for: what the quantized numbers decode to,
    q/k rows back in HF order."""
    hidden, ffn, heads, kv_heads, layers = 64, 96, 4, 2, 2
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt"]
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (len(tokens), hidden)
    for i in range(layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
            f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        })  # fmt: skip
        if bias:
            for proj, n in (
                ("attn_q", hidden),
                ("attn_k", kv),
                ("attn_v", kv),
                ("attn_output", hidden),
            ):
                shapes[f"blk.{i}.{proj}.bias"] = (n,)
    tensors, hf = [], {}
    for name, shape in shapes.items():
        stem, _, suffix = name.rpartition(".")
        is_norm = len(shape) == 1 and suffix == "weight"
        w = (1 + 0.1 * rng.standard_normal(shape)) if is_norm else 0.2 * rng.standard_normal(shape)
        type_name = types.get(name, "F32" if len(shape) == 1 else "Q4_1")
        n_head = {"attn_q": heads, "attn_k": kv_heads}.get(stem.split(".")[-1])
        if n_head:
            w = llama_cpp_permute(w, n_head)
        raw = quantize(w, type_name)
        tensors.append((name, shape, type_name, raw))
        decoded = dequantize(np.frombuffer(raw, np.uint8), type_name, shape)
        hf[name] = hf_rows_from_gguf(decoded, n_head) if n_head else decoded
    metadata = {
        "general.architecture": "llama",
        "llama.block_count": layers,
        "llama.context_length": 256,
        "llama.embedding_length": hidden,
        "llama.feed_forward_length": ffn,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.rope.freq_base": 10000.0,
        "llama.rope.dimension_count": head_dim,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": len(tokens),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)),
        "tokenizer.ggml.merges": ["Ġ t"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }
    write_gguf(path, metadata, tensors)
    return hf
