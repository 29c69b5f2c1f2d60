# Copyright © 2026 mtp_splitk contributors

"""Where a trained head goes: a model directory that every loader reads.

The output directory becomes a model directory of its own: the target's
small files (config, tokenizer, index) are copied, its weight shards are
symbolic links (copies where links are not possible), and the head is
``mtp.safetensors`` under the family's stored key names, exactly where
:func:`mtp_splitk.mtp.convert` puts a converted checkpoint's head. So
``mtp.load(OUT)``, ``mtp-splitk generate --mtp --model OUT`` and stock
``mlx_lm.load(OUT)`` (which globs only ``model*.safetensors``) all work
without a pointer format, and the source directory (often a read-only
Hugging Face cache snapshot) is never written to. With ``--out`` equal to
the model directory only ``mtp.safetensors`` is added there.
"""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx

from ..families import family_for, model_module, model_text_args
from ..heads import MTPHead
from ..loading import MTP_SHARD, stored_tensors

#: Training state (data, checkpoint, optimizer) inside the output directory.
STATE_DIR = "train_state"


def link_model(model_dir: Path, out: Path):
    """Make ``out`` a model directory viewing ``model_dir`` (see module doc)."""
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() == model_dir.resolve():
        return
    for src in sorted(model_dir.iterdir()):
        dst = out / src.name
        if src.name == MTP_SHARD or not src.is_file() or dst.exists():
            continue
        if src.suffix == ".safetensors":
            try:
                os.symlink(src.resolve(), dst)
                continue
            except OSError:
                pass
        shutil.copy2(src, dst)


def write_head(head: MTPHead, model, config: dict, out: Path, dtype: mx.Dtype):
    """``head`` as ``out/mtp.safetensors`` (in ``dtype``), with index entries
    when the directory has a shard index (as ``mtp.convert`` writes them)."""
    family = family_for(model_module(config))
    args = model_text_args(model)
    tensors = {
        k: v.astype(dtype) for k, v in stored_tensors(head, family, args).items()
    }
    tmp = out / "mtp.tmp.safetensors"
    mx.save_safetensors(str(tmp), tensors, metadata={"format": "mlx"})
    os.replace(tmp, out / MTP_SHARD)
    index_path = out / "model.safetensors.index.json"
    if index_path.exists():
        with open(index_path) as f:
            index = json.load(f)
        weight_map = {k: v for k, v in index["weight_map"].items() if v != MTP_SHARD}
        weight_map.update({k: MTP_SHARD for k in tensors})
        index["weight_map"] = dict(sorted(weight_map.items()))
        if index_path.is_symlink():
            index_path.unlink()
        with open(index_path, "w") as f:
            json.dump(index, f, indent=4)
