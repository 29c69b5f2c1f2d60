# Copyright © 2026 mtp_splitk contributors

"""Checkpoints with an MTP head in their shards: ``mtp-splitk generate``
loads them without ``--mtp`` (the MTP tensors dropped), and ``mtp-splitk
convert`` converts the project's own synthetic ones of every layout whose
mlx-lm sanitize keeps some MTP keys (Qwen3-Next, DeepSeek-V3 not 61 layers
deep)."""

import mlx.core as mx
import pytest
from _cli import error_lines
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load
from mlx_lm.generate import generate_step

from mtp_splitk import cli, mtp
from mtp_splitk.mtp import MTPDrafter
from mtp_splitk.speculative import speculative_generate_step
from mtp_splitk.synthetic import write_mtp_model

FAMILIES = ["qwen3_next", "deepseek_v3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_without_mtp_drops_the_mtp_tensors(family, tmp_path, capsys):
    path = write_mtp_model(tmp_path / family, family)
    with pytest.raises(ValueError, match="parameters not in model"):
        mlx_load(str(path))  # stock mlx-lm refuses the MTP tensors in the shards
    argv = ["generate", "--model", str(path), "-m", "5", "--verbose", "False", "--stats"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and not error_lines(captured.err)
    assert "[stats] Generation: 5 tokens" in captured.err


def greedy(model, prompt, n, drafter=None):
    if drafter is None:
        return [int(t) for t, _ in generate_step(prompt, model, max_tokens=n)]
    steps = speculative_generate_step(prompt, model, drafter, num_draft_tokens=2, max_tokens=n)
    return [int(t) for t, _, _ in steps]


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_a_hugging_face_style_checkpoint(family, tmp_path, capsys):
    """Unquantized, the MTP tensors in the model's own shards, as on the Hub:
    converted and quantized, the head is kept and drafts for the target."""
    source = write_mtp_model(tmp_path / "hf", family, quantization=None, quantize_mtp=False)
    out = tmp_path / "mlx"
    assert cli.main(["convert", "--hf-path", str(source), "--mlx-path", str(out), "-q"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(out)
    mlx_load(str(out))  # stock mlx-lm reads the converted target
    model, head, tokenizer = mtp.load(str(out))
    assert any(k.endswith(".scales") for k, _ in tree_flatten(head.parameters()))
    prompt = mx.array(tokenizer.encode("Speculative decoding drafts a few tokens"))
    plain = greedy(model, prompt, 12)
    spec = greedy(model, prompt, 12, MTPDrafter(model, head))
    if family == "qwen3_next":
        assert spec == plain
    else:
        # DeepSeek-V3's attention takes another path for one row than for several:
        # in bfloat16 a near-tie may flip (README, Limits); the run must start equal.
        assert spec[:4] == plain[:4] and len(spec) == 12


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_an_mlx_checkpoint_keeps_the_head_unchanged(family, tmp_path, capsys):
    """A source already quantized by MLX (the synthetic writer's default)
    converted without -q: the head comes out as it went in, its floating
    tensors cast to the checkpoint's dtype as mlx_lm.convert casts the target's."""
    source = write_mtp_model(tmp_path / "src", family)
    out = tmp_path / "mlx"
    assert cli.main(["convert", "--hf-path", str(source), "--mlx-path", str(out)]) == 0
    _, before, _ = mtp.load(str(source))
    _, after, _ = mtp.load(str(out))
    a, b = dict(tree_flatten(before.parameters())), dict(tree_flatten(after.parameters()))
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        # Kept, or cast to bfloat16 (what the cast predicate keeps stays float32).
        assert b[k].dtype in (a[k].dtype, mx.bfloat16), k
        assert mx.array_equal(a[k].astype(b[k].dtype), b[k]).item(), k
