# Copyright © 2026 mtp_splitk contributors
"""Rebuild a Hugging Face ``tokenizer.json`` from a GGUF file's tokenizer metadata.

Only GPT-2-style byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is handled; the
pre-tokenizer follows llama.cpp's ``tokenizer.ggml.pre`` name (llama-vocab.cpp's regexes).
transformers can read a GGUF tokenizer itself only through torch, which this project does
not need, so the ``tokenizers`` library builds it here.
"""

import json
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp pre-tokenizer names -> whether digits are split one by one before the GPT-2
# regex (llama-vocab.cpp: "\\p{N}" ahead of the GPT-2 expression for these).
_PRE_TOKENIZERS = {
    "gpt2": False,
    "smollm": True,
    "starcoder": True,
    "refact": True,
    "codeshell": True,
}
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4


def build_tokenizer(metadata: dict) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equal to the GGUF's byte-level BPE vocabulary."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2' BPE)")
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} is not supported ({', '.join(_PRE_TOKENIZERS)})"
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    types = np.asarray(metadata.get("tokenizer.ggml.token_type", np.ones(len(tokens))))
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_TOKENIZERS[pre]:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Already in the vocabulary, so they keep their ids; added, they are never split.
    for kind, add in ((CONTROL, tok.add_special_tokens), (USER_DEFINED, tok.add_tokens)):
        ids = np.nonzero(types == kind)[0]
        add([AddedToken(tokens[i], special=kind == CONTROL, normalized=False) for i in ids])
    return tok


def _token(metadata, key):
    i = metadata.get(f"tokenizer.ggml.{key}_token_id")
    return None if i is None else metadata["tokenizer.ggml.tokens"][int(i)]


def tokenizer_config(metadata: dict, tokenizer: Tokenizer) -> dict:
    """tokenizer_config.json: special tokens, BOS handling and the chat template."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(metadata.get("llama.context_length", 2048)),
    }
    for key in ("bos", "eos", "unk", "pad"):
        if (token := _token(metadata, key)) is not None:
            config[f"{key}_token"] = token
    specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    named = {config.get(f"{k}_token") for k in ("bos", "eos", "unk", "pad")}
    config["additional_special_tokens"] = [t for t in specials if t not in named]
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return config


def write_tokenizer(metadata: dict, out_dir) -> None:
    """Write tokenizer.json and tokenizer_config.json into ``out_dir``."""
    out_dir = Path(out_dir)
    tok = build_tokenizer(metadata)
    tok.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(metadata, tok)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
