"""`mtp-splitk generate` / `convert` / `synthesize`: end to end in subprocesses, seams in
process."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx_lm
import pytest
from mlx_lm.generate import GenerationResponse, setup_arg_parser

from mtp_splitk import cli, patch, plan, synthetic
from mtp_splitk.mtp import MTPHead
from mtp_splitk.mtp.synthetic import write_mtp_model
from mtp_splitk.speculative import AcceptanceControlledDrafter, speculative_generate_step

REPO = Path(__file__).resolve().parents[1]


# The CLI with mlx-lm's stream_generate wrapped to print each token id on
# stderr, so a test compares tokens, not only the text they decode to.
RECORD_TOKENS = """
import importlib, sys
from mtp_splitk import cli
generate = importlib.import_module("mlx_lm.generate")
inner = generate.stream_generate
def stream_generate(*args, **kwargs):
    for response in inner(*args, **kwargs):
        print("[token]", response.token, file=sys.stderr)
        yield response
generate.stream_generate = stream_generate
sys.exit(cli.main(sys.argv[1:]))
"""


def run(*args, cache, code=None):
    """``mtp-splitk ARGS`` in a subprocess (``code``: a script run with ARGS instead)."""
    env = dict(os.environ, MTP_SPLITK_CACHE=str(cache))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("MTP_SPLITK", None)
    program = ["-m", "mtp_splitk.cli"] if code is None else ["-c", code]
    return subprocess.run(
        [sys.executable, *program, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_lines(stderr):
    # transformers may warn about unknown model types on stderr; ours is the last line
    return [l for l in stderr.splitlines() if l.startswith("mtp-splitk: error:")]


def tokens(result):
    """The token ids a RECORD_TOKENS run generated."""
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    return [int(l.split()[1]) for l in lines if l.startswith("[token] ")]


def stats_lines(stdout):
    """--stats' lines as {"Speculation": "...", ...}."""
    return dict(
        line[len("[stats] ") :].split(": ", 1)
        for line in stdout.splitlines()
        if line.startswith("[stats] ")
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache with the default pair already built (the first-run test builds its own)."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get(cli.CACHE_ENV)
    os.environ[cli.CACHE_ENV] = str(path)
    try:
        cli.default_models()
    finally:
        if old is None:
            del os.environ[cli.CACHE_ENV]
        else:
            os.environ[cli.CACHE_ENV] = old
    return path


@pytest.fixture
def in_cache(cache, monkeypatch):
    monkeypatch.setenv(cli.CACHE_ENV, str(cache))
    return cache


# -- end to end ----------------------------------------------------------------------------


def test_default_generate_with_stats_on_a_fresh_machine(tmp_path):
    cache = tmp_path / "fresh-cache"
    first = run("generate", "--stats", "--max-tokens", "40", cache=cache)
    assert first.returncode == 0, first.stderr
    assert "building the synthetic demo models" in first.stderr
    stats = stats_lines(first.stdout)
    assert stats["Prompt"].endswith("tokens-per-sec")
    assert stats["Generation"].startswith("40 tokens,")
    rate = float(re.search(r"acceptance rate ([\d.]+)%", stats["Speculation"]).group(1))
    assert 20 < rate < 100  # the layer-skip draft agrees often, not always
    steps = int(re.match(r"(\d+) steps", stats["Speculation"]).group(1))
    assert 10 <= steps < 40  # fewer target passes than tokens
    assert re.match(r"[\d.]+ ms mean, [\d.]+ ms median \(4 rows\)", stats["Verify step"])
    histogram = stats["Accepted drafts per step (drafts:steps)"]
    assert sum(int(n) for n in re.findall(r"\d+:(\d+)", histogram)) == steps
    assert "==========" in first.stdout  # mlx-lm's own verbose output

    again = run("generate", "--max-tokens", "5", "--verbose", "False", cache=cache)
    assert again.returncode == 0, again.stderr
    assert "building" not in again.stderr  # built once
    assert "[stats]" not in again.stdout
    assert again.stdout.strip()


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
    steps, drafted, accepted = speculation(stats_lines(mtp.stdout))
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
    assert f"tiny-mtp-{cli.MTP_FAMILY}-" in result.stderr
    stats = stats_lines(result.stdout)
    assert stats["Generation"].startswith("16 tokens,")
    steps, drafted, accepted = speculation(stats)
    assert drafted > 0 and steps + accepted == 16
    histogram = stats["Accepted drafts per step (drafts:steps)"]
    assert sum(int(n) for n in re.findall(r"\d+:(\d+)", histogram)) == steps
    assert re.fullmatch(
        r"[\d.]+ ms mean \([\d.]+ rows mean; timed by the MTP loop, which keeps no median\)",
        stats["Verify step"],
    )


def test_mtp_on_a_model_without_mtp_weights_is_one_line_and_exit_2(cache, tmp_path):
    model = synthetic.write_model(tmp_path / "m", cli.MTP_FAMILY)
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
    ours = cli.build_parser()._subparsers._group_actions[0].choices["generate"]
    theirs = setup_arg_parser()
    flags = lambda p: {s for a in p._actions for s in a.option_strings}  # noqa: E731
    assert flags(theirs) <= flags(ours)
    assert {"--split-k", "--stats", "--mtp", "--num-draft-tokens"} <= flags(ours)
    args = ours.parse_args(["--kv-bits", "8", "--draft-model", "d", "--split-k", "off"])
    assert (args.kv_bits, args.draft_model, args.split_k) == (8, "d", 0)


def test_parse_split_k():
    assert cli.parse_split_k("auto") is None
    assert cli.parse_split_k("OFF") == 0
    assert cli.parse_split_k("0") == 0
    assert cli.parse_split_k("8") == 8
    for bad in ("3", "-4", "32", "", "fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_split_k(bad)


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
    target, draft = cli.default_models()
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
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    reference = seen.pop("reference")
    assert seen == {"patched": True, "split": 4, "k": 2, "head": True}
    assert not patch.is_enabled() and plan.forced_split() is None  # restored
    assert len(reference) == 12  # no eos: every step is 2 drafts + 1 token
    stats = stats_lines(out)
    assert stats["Speculation"] == (
        "4 steps, 8 drafted, 8 accepted (acceptance rate 100.0%), 3.00 tokens/step"
    )
    assert stats["Accepted drafts per step (drafts:steps)"] == "0:0 1:0 2:4"
    assert re.fullmatch(
        r"[\d.]+ ms mean \(3\.00 rows mean; timed by the MTP loop, which keeps no median\)",
        stats["Verify step"],
    )


def test_recorder_statistics():
    rec = cli.Recorder()
    flags = [
        True,
        True,
        False,
        False,
        True,
        False,
        True,
    ]  # steps: 2, 0, 1, then 1 at the end
    for i, f in enumerate(flags):
        rec.add(GenerationResponse("", 0, None, f, 5, 100.0, i + 1, 50.0, 0.0))
    # 4 prompt tokens prefilled in two calls, then one verify call per step
    rec.calls = [(3, 0.5), (1, 0.5), (3, 0.002), (3, 0.004), (3, 0.003), (2, 0.001)]
    assert rec.accepted_per_step() == [2, 0, 1, 1]
    assert rec.verify_calls() == rec.calls[2:]
    text = rec.summary(speculative=True)
    assert (
        "Speculation: 4 steps, 7 drafted, 4 accepted (acceptance rate 57.1%), 1.75 tokens/step"
        in text
    )
    assert "Accepted drafts per step (drafts:steps): 0:1 1:2 2:1" in text
    assert "Verify step: 2.50 ms mean, 2.50 ms median (3 rows)" in text
    assert "Generation: 7 tokens, 50.000 tokens-per-sec" in text
    assert "Speculation: none" in cli.Recorder().summary(speculative=False)


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
