# Copyright © 2026 mtp_splitk contributors

"""`mtp-splitk generate` / `convert` / `synthesize`: end to end in subprocesses, seams in
process."""

import argparse
import json
import re

import mlx_lm
import pytest
from _cli import (  # noqa: F401 (cache and in_cache are fixtures)
    RECORD_TOKENS,
    cache,
    error_lines,
    histogram,
    in_cache,
    run,
    stats_lines,
    tokens,
)
from mlx_lm.generate import GenerationResponse, setup_arg_parser

from mtp_splitk import cache as model_cache
from mtp_splitk import cli, patch, plan, synthetic
from mtp_splitk.bench.drafters import AcceptanceControlledDrafter
from mtp_splitk.commands import generate
from mtp_splitk.commands.stats import Recorder
from mtp_splitk.mtp import MTPHead
from mtp_splitk.speculative import Stats, speculative_generate_step
from mtp_splitk.synthetic import write_mtp_model

# -- end to end ----------------------------------------------------------------------------


def test_default_generate_with_stats_on_a_fresh_machine(tmp_path):
    cache = tmp_path / "fresh-cache"
    first = run("generate", "--stats", "--max-tokens", "40", cache=cache)
    assert first.returncode == 0, first.stderr
    assert "building the synthetic demo models" in first.stderr
    stats = stats_lines(first.stderr)
    pair = next(cache.glob("tiny-pair-llama-*"))
    assert stats["Target"] == str(pair / "target")
    assert stats["Drafter"] == f"draft model {pair / 'draft'}, k=3"
    assert stats["Loop"].startswith("overlapped")  # mtp_splitk's loop, not mlx-lm's
    assert stats["Prompt"].endswith("tokens-per-sec")
    assert stats["Generation"].startswith("40 tokens,")
    rate = float(re.search(r"acceptance rate ([\d.]+)%", stats["Speculation"]).group(1))
    assert 20 < rate < 100  # the layer-skip draft agrees often, not always
    steps = int(re.match(r"(\d+) steps", stats["Speculation"]).group(1))
    assert 10 <= steps < 40  # fewer target passes than tokens
    assert stats["Verify step"] == "not timed (the overlapped loop never waits for one)"
    counts = histogram(stats)
    assert sorted(counts) == [0, 1, 2, 3] and sum(counts.values()) == steps  # every bucket 0..k
    assert "==========" in first.stdout  # mlx-lm's own verbose output

    again = run("generate", "--max-tokens", "5", "--verbose", "False", "--stats", cache=cache)
    assert again.returncode == 0, again.stderr
    assert "building" not in again.stderr  # built once
    assert "[stats]" not in again.stdout and "[stats] Loop: overlapped" in again.stderr
    assert again.stdout.strip()


def test_no_overlap_keeps_the_synchronous_loop_with_the_same_tokens(cache):
    """Both loops of mtp_splitk (and plain greedy decoding) emit the same tokens;
    --stats says which loop ran and times the synchronous one's verify passes."""
    args = ["generate", "--max-tokens", "24", "--stats", "--verbose", "False"]
    overlapped = run(*args, cache=cache, code=RECORD_TOKENS)
    synchronous = run(*args, "--no-overlap", cache=cache, code=RECORD_TOKENS)
    target = next(cache.glob("tiny-pair-llama-*")) / "target"
    plain = run(*args, "--model", str(target), cache=cache, code=RECORD_TOKENS)
    assert len(tokens(plain)) == 24
    assert tokens(overlapped) == tokens(synchronous) == tokens(plain)
    assert stats_lines(overlapped.stderr)["Loop"].startswith("overlapped")
    stats = stats_lines(synchronous.stderr)
    assert stats["Loop"] == "synchronous (--no-overlap)"
    steps, drafted, accepted = speculation(stats)
    assert steps + accepted == 24 and drafted <= 3 * steps
    match = re.fullmatch(r"([\d.]+) ms mean over (\d+) target passes of ([\d.]+) rows mean .*",
                         stats["Verify step"])
    assert match and float(match[1]) > 0 and int(match[2]) == steps
    assert 1 <= float(match[3]) <= 4  # the last token and up to k = 3 drafts
    assert stats_lines(plain.stderr)["Drafter"] == "none (plain decoding)"


def test_overlapped_loop_compiles_its_step_unless_no_compile(cache):
    """With the patch on (as mtp-splitk generate has it) the overlapped loop replays
    its step through mx.compile; --no-compile builds it in Python; same tokens."""
    args = ["generate", "--max-tokens", "16", "--stats", "--verbose", "False"]
    compiled = run(*args, cache=cache, code=RECORD_TOKENS)
    uncompiled = run(*args, "--no-compile", cache=cache, code=RECORD_TOKENS)
    assert len(tokens(compiled)) == 16 and tokens(compiled) == tokens(uncompiled)
    assert stats_lines(compiled.stderr)["Loop"].startswith("overlapped, compiled (mx.compile)")
    assert stats_lines(uncompiled.stderr)["Loop"].startswith("overlapped (step n+1")


def test_help_and_version():
    help_text = cli_output("generate", "--help")
    assert "--no-overlap" in help_text and "--no-compile" in help_text and "--split-k" in help_text
    assert "Llama-3.2-3B-Instruct" not in help_text  # mlx-lm's default is not ours
    assert "Default: the demo model SmolLM2-135M-Instruct" in " ".join(help_text.split())
    import mlx.core as mx
    from mtp_splitk import __version__

    version = cli_output("--version").strip()
    expected = f"mtp_splitk {__version__} (mlx {mx.__version__}, mlx-lm {mlx_lm.__version__})"
    assert version == expected


def cli_output(*args) -> str:
    """stdout of ``mtp-splitk ARGS`` run in process, which exits 0 (help, version)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli.main(list(args))
    assert exit_.value.code in (0, None)
    return out.getvalue()


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--model", "/nonexistent/model"],
            "--model /nonexistent/model: model directory not found",
        ),
        (
            ["--split-k", "3"],
            "argument --split-k: expected auto, off or one of "
            + ", ".join(map(str, plan.WARP_CHOICES)),
        ),
        (["--max-tokens", "many"], "argument --max-tokens/-m: invalid int value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cache, args, message):
    result = run("generate", *args, cache=cache)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == lines[0]


def test_draft_with_another_vocabulary_is_refused(cache, tmp_path):
    draft = synthetic.write_model(tmp_path / "draft", "llama", vocab_size=320)
    result = run("generate", "--draft-model", str(draft), cache=cache)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [
        "mtp-splitk: error: Draft model tokenizer does not match model tokenizer."
    ]


# -- --mtp and convert, end to end ---------------------------------------------------------


def speculation(stats):
    """(steps, drafted, accepted) from --stats' Speculation line."""
    match = re.match(r"(\d+) steps, (\d+) drafted, (\d+) accepted", stats["Speculation"])
    return tuple(map(int, match.groups()))


def assert_same_tokens_with_mtp(model, cache, max_tokens):
    """Greedy ``generate --mtp`` emits exactly plain greedy ``generate``'s tokens."""
    args = ["generate", "--model", str(model), "--max-tokens", str(max_tokens)]
    plain = run(*args, "--temp", "0", cache=cache, code=RECORD_TOKENS)
    mtp = run(*args, "--temp", "0", "--mtp", "--stats", cache=cache, code=RECORD_TOKENS)
    assert len(tokens(plain)) == max_tokens  # no eos: the whole budget is compared
    assert tokens(mtp) == tokens(plain)
    text = lambda result: result.stdout.split("==========")[1]  # noqa: E731
    assert text(mtp) == text(plain)
    steps, drafted, accepted = speculation(stats_lines(mtp.stderr))
    assert drafted > 0 and steps + accepted == max_tokens  # each step: accepted + 1


def test_mtp_generate_gives_the_tokens_of_plain_greedy_generate(cache, tmp_path):
    # Qwen3.5: a hybrid target (its recurrent caches roll back by snapshot and
    # replay) that stock mlx_lm.load also reads with the MTP tensors in its
    # shards, so plain generate runs on the very same directory.
    assert_same_tokens_with_mtp(write_mtp_model(tmp_path / "m", "qwen3_5"), cache, 24)


def test_mtp_without_model_on_a_fresh_machine(tmp_path):
    result = run("generate", "--mtp", "--stats", "-m", "16", cache=tmp_path / "fresh")
    assert result.returncode == 0, result.stderr
    assert "building the synthetic demo models" in result.stderr
    assert f"tiny-mtp-{generate.MTP_FAMILY}-" in result.stderr
    stats = stats_lines(result.stderr)
    assert stats["Generation"].startswith("16 tokens,")
    assert stats["Drafter"] == "the target's MTP head, k=3"
    # A hybrid (Gated DeltaNet) target, in the overlapped loop too, its step compiled by default.
    assert stats["Loop"] == "overlapped, compiled (mx.compile) (step n+1 is queued before step n's verdict is read)"
    steps, drafted, accepted = speculation(stats)
    assert drafted > 0 and steps + accepted == 16
    assert sum(histogram(stats).values()) == steps
    assert stats["Verify step"] == "not timed (the overlapped loop never waits for one)"


def test_mtp_on_a_model_without_mtp_weights_is_one_line_and_exit_2(cache, tmp_path):
    model = synthetic.write_model(tmp_path / "m", generate.MTP_FAMILY)
    result = run("generate", "--mtp", "--model", str(model), cache=cache)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"mtp-splitk: error: No multi-token-prediction weights in {model}: "
        "looked for keys starting with 'mtp.'"
    )
    assert result.stderr.strip().splitlines()[-1] == lines[0]
    assert "==========" not in result.stdout  # refused before generating


def test_convert_keeps_the_head_for_generate_mtp(cache, tmp_path):
    # As on the Hub: unquantized, the MTP tensors in the model's own shards.
    source = write_mtp_model(tmp_path / "hf", "mimo", quantization=None, quantize_mtp=False)
    out = tmp_path / "mlx"
    args = ["--hf-path", str(source), "--mlx-path", str(out), "-q"]
    result = run("convert", *args, cache=cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(out)
    with open(out / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert weight_map["model.mtp_layers.0.input_proj.scales"] == "mtp.safetensors"
    assert_same_tokens_with_mtp(out, cache, 16)


# -- in process ----------------------------------------------------------------------------


def test_generate_takes_every_mlx_lm_generate_flag():
    ours = generate.setup_arg_parser()
    theirs = setup_arg_parser()
    flags = lambda p: {s for a in p._actions for s in a.option_strings}  # noqa: E731
    assert flags(theirs) <= flags(ours)
    assert {"--split-k", "--stats", "--mtp", "--num-draft-tokens"} <= flags(ours)
    args = ours.parse_args(["--kv-bits", "8", "--draft-model", "d", "--split-k", "off"])
    assert (args.kv_bits, args.draft_model, args.split_k) == (8, "d", 0)


def test_parse_split_k():
    assert generate.parse_split_k("auto") is None
    assert generate.parse_split_k("OFF") == 0
    assert generate.parse_split_k("0") == 0
    assert generate.parse_split_k("8") == 8
    for bad in ("3", "-4", "32", "", "fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            generate.parse_split_k(bad)


def test_bad_input_in_process(in_cache, capsys):
    assert cli.main([]) == 2
    assert cli.main(["generate", "--model", str(in_cache)]) == 2  # a directory, not a model
    assert cli.main(["synthesize", str(in_cache), "--family", "llama"]) == 2  # not empty
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "mtp-splitk: error: the following arguments are required: command",
        f"mtp-splitk: error: --model {in_cache}: not a model directory (no config.json)",
        f"mtp-splitk: error: {in_cache}: exists and is not empty",
    ]


def test_mtp_bad_input_in_process(in_cache, capsys):
    target, draft = generate.default_models()
    assert cli.main(["generate", "--mtp", "--draft-model", str(draft)]) == 2
    assert cli.main(["generate", "--mtp", "--model", str(target)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "mtp-splitk: error: --mtp and --draft-model are alternatives; give one",
        f"mtp-splitk: error: No multi-token-prediction weights in {target}: looked for "
        "keys starting with 'model.layers.4.' (the layer after the last decoder layer: "
        "enorm, hnorm, eh_proj, shared_head.norm and one decoder block) in "
        "model*.safetensors and mtp.safetensors. These models ship without an MTP head: "
        "train one with `mtp-splitk train-mtp --model MODEL --out OUT` and load OUT.",
    ]


def test_convert_bad_input_in_process(in_cache, tmp_path, capsys):
    with_mtp = write_mtp_model(tmp_path / "mtp", "mimo", quantization=None)
    without = synthetic.write_model(tmp_path / "no-mtp", "mimo", quantization=None)
    llama = synthetic.write_model(tmp_path / "llama", "qwen3_moe", quantization=None)
    out = tmp_path / "out"
    for args, message in [
        ([], "convert: the following arguments are required: --hf-path/--model"),
        (["--hf-path", str(out)], f"--hf-path {out}: model directory not found"),
        (["--hf-path", str(in_cache)], "not a model directory (no config.json)"),
        (
            ["--hf-path", str(without), "--mlx-path", str(out)],
            f"No multi-token-prediction weights in {without}: looked for keys "
            "starting with 'model.mtp_layers.0.'",
        ),
        (
            ["--hf-path", str(llama), "--mlx-path", str(out)],
            "No multi-token-prediction layout is known for model type 'qwen3_moe'",
        ),
        (
            ["--hf-path", str(with_mtp), "--mlx-path", str(tmp_path)],
            f"Cannot save to the path {tmp_path} as it already exists.",
        ),
        (["--hf-path", str(with_mtp), "--q-mode", "int3"], "argument --q-mode: invalid"),
    ]:
        assert cli.main(["convert", *args]) == 2, args
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and message in lines[0], (args, lines)
    assert not out.exists()  # refused before converting anything


def test_mtp_flag_routes_mlx_lm_speculative_branch(in_cache, monkeypatch, capsys):
    """--mtp hands the token loop to mtp_splitk.mtp.generate_step inside
    mlx-lm's own stream_generate, patched, with the requested split and the
    head of the model main() loaded; --stats counts the loop's drafts and the
    accepted tokens of mlx-lm's responses."""
    import mtp_splitk.mtp

    seen = {}

    def all_accepted(prompt, model, stream, *, head, stats, max_tokens, **kwargs):
        # The real loop, drafting the target's own greedy continuation so
        # every draft is accepted (a random MTP head's never are).
        seen.update(
            patched=patch.is_enabled(),
            split=plan.forced_split(),
            k=kwargs["num_draft_tokens"],
            head=isinstance(head, MTPHead),
        )
        reference = AcceptanceControlledDrafter.record(model, prompt, max_tokens)
        seen["reference"] = reference
        drafter = AcceptanceControlledDrafter(reference, 1.0, vocab_size=1)
        return speculative_generate_step(
            prompt, model, drafter, stream, max_tokens=max_tokens, stats=stats, **kwargs
        )

    monkeypatch.setattr(mtp_splitk.mtp, "generate_step", all_accepted)
    code = cli.main(
        [
            "generate",
            "--mtp",
            "--stats",
            "--max-tokens",
            "12",
            "--split-k",
            "4",
            "--num-draft-tokens",
            "2",
            "--verbose",
            "False",
            "--no-overlap",  # the synchronous loop, which times its verify passes
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    reference = seen.pop("reference")
    assert seen == {"patched": True, "split": 4, "k": 2, "head": True}
    assert not patch.is_enabled() and plan.forced_split() is None  # restored
    assert len(reference) == 12  # no eos: every step is 2 drafts + 1 token
    assert "mtp-splitk: warning: --split-k 4: no split-K kernel runs on the CPU" in err
    stats = stats_lines(err)
    assert stats["Speculation"] == (
        "4 steps, 8 drafted, 8 accepted (acceptance rate 100.0%), 3.00 tokens/step"
    )
    assert histogram(stats) == {0: 0, 1: 0, 2: 4}
    assert re.fullmatch(
        r"[\d.]+ ms mean over 4 target passes of 3\.00 rows mean \(.*\)", stats["Verify step"]
    )


@pytest.mark.parametrize("flags,overlap", [([], True), (["--no-overlap"], False)])
def test_draft_model_runs_mtp_splitks_loop(in_cache, monkeypatch, capsys, flags, overlap):
    """With a draft model the token loop is mtp_splitk's (not mlx-lm's), with
    the loop --no-overlap asks for, the draft model as drafter, and mlx-lm's
    options (k, max tokens, sampler) passed through."""
    seen = []

    def loop(prompt, model, drafter, stream, **kwargs):
        seen.append((type(drafter).__name__, kwargs["overlap"], kwargs["num_draft_tokens"]))
        return speculative_generate_step(prompt, model, drafter, stream, **kwargs)

    monkeypatch.setattr(generate, "speculative_generate_step", loop)
    args = ["generate", "-m", "6", "--num-draft-tokens", "2", "--verbose", "False", *flags]
    assert cli.main(args) == 0
    assert seen == [("DraftModelDrafter", overlap, 2)]
    assert len(capsys.readouterr().out.strip()) > 0


def test_recorder_statistics():
    loop = Stats()
    for accepted, rows in [(2, 3), (0, 3), (1, 3), (1, 2)]:
        loop.record_step(min(2, rows - 1), accepted, rows)
    loop.verify_time = 0.010
    rec = Recorder(loop=loop)
    for i, f in enumerate([True, True, False, False, True, False, True, False]):
        rec.add(GenerationResponse("", 0, None, f, 5, 100.0, i + 1, 50.0, 0.0))
    text = rec.summary(["Target: t", "Drafter: d"], num_draft_tokens=3)
    lines = text.splitlines()
    assert lines[:3] == [
        "[stats] Target: t",
        "[stats] Drafter: d",
        "[stats] Loop: synchronous (--no-overlap)",
    ]
    assert (
        "Speculation: 4 steps, 7 drafted, 4 accepted (acceptance rate 57.1%), 2.00 tokens/step"
        in text
    )
    # k = 3: the bucket of 3 is there, empty.
    assert "Steps by drafts accepted (accepted:steps, every count 0..k=3): 0:1 1:2 2:1 3:0" in text
    assert "Verify step: 2.50 ms mean over 4 target passes of 2.75 rows mean" in text
    assert "Generation: 8 tokens, 50.000 tokens-per-sec" in text
    loop.overlapped = True
    assert "Verify step: not timed" in rec.summary([], 3)
    assert "Loop: overlapped" in rec.summary([], 3)
    loop.overlapped, loop.overlap_off = False, "no reason"
    assert "Loop: synchronous (the overlapped loop cannot run: no reason)" in rec.summary([], 3)
    plain = Recorder().summary(["Drafter: none (plain decoding)"])
    assert "Speculation: none" in plain and "Loop" not in plain


def test_synthesize(tmp_path, capsys):
    path = tmp_path / "m"
    assert (
        cli.main(
            [
                "synthesize",
                str(path),
                "--family",
                "qwen3_moe",
                "--size",
                "small",
                "--mode",
                "mxfp4",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.strip() == str(path)
    assert "(100%" in captured.err
    model, _ = mlx_lm.load(str(path))
    assert model.layers[0].mlp.switch_mlp.up_proj.mode == "mxfp4"
    assert (
        cli.main(
            ["synthesize", str(tmp_path / "x"), "--family", "llama", "--size", "qwen3-0.6b"]
        )
        == 2
    )
    assert "qwen3 shape, not llama" in capsys.readouterr().err


# -- the cache -----------------------------------------------------------------------------


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(model_cache.ENV, str(tmp_path / "mine"))
    assert model_cache.root() == tmp_path / "mine"
    monkeypatch.delenv(model_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache.root() == tmp_path / "xdg" / "mtp_splitk"


def test_cache_builds_once_and_never_leaves_half_a_directory(tmp_path):
    writes = []

    def write(path):
        writes.append(path)
        (path / "config.json").write_text("{}")

    final = tmp_path / "a" / "model"
    assert model_cache.build_once(final, write) == final
    assert model_cache.build_once(final, write) == final
    assert len(writes) == 1 and writes[0].parent == final.parent and writes[0] != final
    assert [p.name for p in final.parent.iterdir()] == ["model"]  # renamed into place

    def interrupted(path):
        (path / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model_cache.build_once(tmp_path / "b" / "model", interrupted)
    assert list((tmp_path / "b").iterdir()) == []

    def overtaken(path):
        (path / "config.json").write_text("ours")
        other = tmp_path / "c" / "model"  # another process finishes first
        other.mkdir()
        (other / "config.json").write_text("theirs")

    final = model_cache.build_once(tmp_path / "c" / "model", overtaken)
    assert (final / "config.json").read_text() == "theirs"
    assert [p.name for p in final.parent.iterdir()] == ["model"]

    with pytest.raises(RuntimeError, match="made no config.json"):
        model_cache.build_once(tmp_path / "d" / "model", lambda path: None)
    assert list((tmp_path / "d").iterdir()) == []
