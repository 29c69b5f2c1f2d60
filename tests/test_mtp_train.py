# Copyright © 2026 mtp_splitk contributors

"""train-mtp: a self-distilled MTP head for targets without one (CPU, seconds)."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import generate_step as plain_generate_step

from mtp_splitk import mtp, synthetic
from mtp_splitk import cli
from mtp_splitk.compat import get_classes
from mtp_splitk.mtp.families import (
    TrainedFamily,
    family_for,
    model_module,
    model_text_args,
)
from mtp_splitk.mtp.loading import MTP_SHARD, stored_tensors
from mtp_splitk.mtp.train import build_head, step_loss
from mtp_splitk.mtp.train.data import Batches, Sequences
from mtp_splitk.mtp.train.evaluate import chains
from mtp_splitk.mtp.train.teacher import TeacherCache, run_target
from mtp_splitk.mtp import MTPDrafter
from mtp_splitk.speculative import Stats, TargetParts, speculative_generate_step

SMALL = [
    "--prompts", "16", "--max-tokens", "16", "--gen-batch", "8", "--batch-size", "4",
    "--eval-prompts", "4", "--eval-tokens", "16", "--lr", "3e-3", "--warmup", "2",
    "--log-every", "2",
]  # fmt: skip


def run(model, out, *flags):
    assert cli.main(["train-mtp", "--model", str(model), "--out", str(out), *SMALL, *flags]) == 0
    return json.loads((out / "train_state" / "state.json").read_text())


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """family -> an unquantized float32 tiny model without MTP weights (float32
    on the CPU: bfloat16 and quantized matmuls are slow there)."""
    paths = {}

    def get(family):
        if family not in paths:
            path = tmp_path_factory.mktemp(family) / "model"
            paths[family] = synthetic.write_model(
                path, family, quantization=None, dtype="float32"
            )
        return paths[family]

    return get


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_trained_layout_over_the_targets_own_block(model_type):
    """DeepSeek-V3's names after the last layer, the family's TransformerBlock,
    stored keys that load back; the backbone / LM-head split is the model."""
    config = synthetic.model_config("llama" if model_type == "llama" else "qwen3")
    config["model_type"] = model_type  # qwen2's arguments are a subset of qwen3's
    model_class, args_class = get_classes(config)
    model = model_class(args_class.from_dict(config))
    module = model_module(config)
    family, args = family_for(module), model_text_args(model)
    assert isinstance(family, TrainedFamily)
    head = family.build(module, args)
    assert type(head.block) is module.TransformerBlock

    parts = TargetParts(model)
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert mx.array_equal(parts.logits(parts.hidden(x)), model(x))
    assert head(parts.hidden(x), parts.embed(x)).shape == (1, 8, args.hidden_size)

    stored = stored_tensors(head, family, args)
    prefix = f"model.layers.{args.num_hidden_layers}."
    assert {prefix + n + ".weight" for n in ("enorm", "hnorm", "eh_proj")} <= set(
        stored
    )
    assert all(k.startswith(prefix) and family.is_mtp_key(k, args) for k in stored)
    back = family.sanitize(
        module, args, {k[len(prefix) :]: v for k, v in stored.items()}, False
    )
    family.build(module, args).load_weights(list(back.items()), strict=True)


def test_identity_init_predicts_the_targets_next_token(target):
    """--init identity: the head starts as the target's own next-token
    distribution (sharpness aside), the last layer copied but silenced."""
    model, tokenizer = mlx_lm.load(str(target("qwen3")))
    config = json.loads((target("qwen3") / "config.json").read_text())
    head = build_head(model, config, "identity")
    parts = TargetParts(model)
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    h = parts.hidden(x)
    g = head(h, parts.embed(mx.roll(x, -1, axis=1)))
    assert mx.array_equal(parts.logits(g).argmax(-1), parts.logits(h).argmax(-1))
    last = model.model.layers[-1]
    assert mx.array_equal(
        head.block.self_attn.q_proj.weight, last.self_attn.q_proj.weight
    )
    assert not mx.any(head.block.mlp.down_proj.weight)


def test_llama_head_trains_resumes_and_loads(target, tmp_path):
    path = target("llama")
    whole = run(path, tmp_path / "whole", "--steps", "8")
    assert whole["step"] == 8 and whole["device"] == "cpu (cpu)"  # the record names its machine

    # Stopped after 5 steps and rerun: the same head as the uninterrupted run.
    first = run(path, tmp_path / "parted", "--steps", "8", "--stop-after", "5")
    assert first["step"] == 5
    second = run(path, tmp_path / "parted", "--steps", "8")
    assert second["step"] == 8 and second["initial_eval"] == first["initial_eval"]
    a = mx.load(str(tmp_path / "whole" / "train_state" / "head.safetensors"))
    b = mx.load(str(tmp_path / "parted" / "train_state" / "head.safetensors"))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]) for k in a)

    # --init-from: a run that starts from that head (no steps) exports it again.
    again = run(path, tmp_path / "again", "--steps", "0", "--init-from", str(tmp_path / "whole"))
    assert again["initial_eval"] == whole["eval"]
    c = mx.load(str(tmp_path / "again" / MTP_SHARD))
    d = mx.load(str(tmp_path / "whole" / MTP_SHARD))
    assert set(c) == set(d) and all(mx.array_equal(c[k], d[k]) for k in c)

    # The output is a model directory: stock mlx-lm loads the target, the MTP
    # loader finds the head under DeepSeek-style names after the last layer.
    out = tmp_path / "whole"
    stored = mx.load(str(out / MTP_SHARD))
    assert "model.layers.2.eh_proj.weight" in stored
    assert "model.layers.2.self_attn.q_proj.weight" in stored
    assert not any("embed_tokens" in k or "lm_head" in k for k in stored)
    mlx_lm.load(str(out))
    model, head, _ = mtp.load(str(out))

    # Training lowered the loss on a fixed batch (against the initial head).
    config = json.loads((path / "config.json").read_text())
    mx.random.seed(0)
    initial = build_head(model, config)
    data = Sequences.load(out / "train_state" / "data.safetensors")
    batch = Batches(data, 4, seed=0)(0)
    parts = TargetParts(model)
    before, _ = step_loss(initial, parts, *batch)
    after, _ = step_loss(head, parts, *batch)
    assert after.item() < 0.8 * before.item()

    # The cached teacher (built in other batches, other padding) is the target
    # run on this batch: the same top-k at the real positions, the same loss.
    cache = TeacherCache(parts, data, 8, batch_size=3)
    cached = cache.batch(Batches(data, 4, seed=0).rows(0), batch[0].shape[1])
    hidden, (_, val) = run_target(parts, batch[0], 8)
    real = np.arange(batch[0].shape[1])[None] < np.array(batch[1])[:, None]
    assert np.allclose(np.array(cached[0])[real], np.array(hidden)[real], atol=1e-5)
    top = lambda v: np.sort(np.array(v)[real], axis=-1)  # noqa: E731
    assert np.allclose(top(cached[1][1]), top(val), atol=1e-4)
    on_the_fly, _ = step_loss(head, parts, *batch, top_k=8)
    from_cache, _ = step_loss(head, parts, *batch, cached)
    assert abs(on_the_fly.item() - from_cache.item()) < 1e-4 * on_the_fly.item()

    # A time budget too short for anything still ends with a usable head.
    hurried = run(path, tmp_path / "hurried", "--steps", "100000", "--minutes", "0.001")
    assert 0 <= hurried["step"] < 100000 and "eval" in hurried
    assert (tmp_path / "hurried" / MTP_SHARD).exists()

    # Greedy speculative decoding with the trained head is plain greedy.
    prompt = mx.array([5, 17, 99, 3, 250, 8], mx.uint32)
    plain = [t for t, _ in plain_generate_step(prompt, model, max_tokens=12)]
    out_tokens = mtp.generate_step(prompt, model, model_path=out, max_tokens=12)
    assert [t for t, _, _ in out_tokens] == plain


def test_held_out_acceptance_is_what_the_loop_accepts(target, tmp_path):
    """Qwen3 (untied LM head: its greedy text does not repeat one token).
    The evaluation's per-position draft chains, walked the way the loop
    advances, give the loop's own accepted drafts per step; training raises
    the acceptance; the loop's output is plain greedy either way."""
    path = target("qwen3")
    out = tmp_path / "out"
    state = run(
        path, out, "--steps", "80", "--prompts", "48", "--max-tokens", "24",
        "--eval-prompts", "8",
    )  # fmt: skip
    assert state["eval"]["accept"][0] > state["initial_eval"]["accept"][0] + 0.1

    model, head, _ = mtp.load(str(out))
    parts = TargetParts(model)
    held_out = Sequences.load(out / "train_state" / "eval.safetensors")
    k = 3
    walked, looped = [], []
    for seq, p, c in zip(
        held_out.tokens, held_out.prompt_lens, chains(head, parts, held_out, k)
    ):
        prompt = mx.array(seq[:p], mx.uint32)
        stats = Stats()
        tokens = [
            t
            for t, _, _ in speculative_generate_step(
                prompt, model, MTPDrafter(model, head), num_draft_tokens=k,
                max_tokens=len(seq) - p, stats=stats,
            )
        ]  # fmt: skip
        assert tokens == seq[p:]  # the held-out text is the target's greedy text
        i = 0  # c[i] is about position p - 2 + i; a step accepts c[i], moves c[i] + 1
        while i + k + 2 < len(c):  # steps whose k drafts all lie in the text
            walked.append(int(c[i]))
            i += int(c[i]) + 1
        looped += stats.accepted_per_step[: len(walked) - len(looped)]
    assert walked == looped and sum(walked) > 0
