"""`mtp-splitk generate` / `synthesize`: end to end in subprocesses, seams in process."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx_lm
import pytest
from mlx_lm.generate import GenerationResponse, generate_step, setup_arg_parser

from mtp_splitk import cli, patch, plan, synthetic

REPO = Path(__file__).resolve().parents[1]


def run(*args, cache):
    env = dict(os.environ, MTP_SPLITK_CACHE=str(cache))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("MTP_SPLITK", None)
    return subprocess.run(
        [sys.executable, "-m", "mtp_splitk.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_lines(result):
    # transformers may warn about unknown model types on stderr; ours is the last line
    return [l for l in result.stderr.splitlines() if l.startswith("mtp-splitk: error:")]


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
    stats = dict(
        line[len("[stats] ") :].split(": ", 1)
        for line in first.stdout.splitlines()
        if line.startswith("[stats] ")
    )
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
    lines = error_lines(result)
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == lines[0]


def test_draft_with_another_vocabulary_is_refused(cache, tmp_path):
    draft = synthetic.write_model(tmp_path / "draft", "llama", vocab_size=320)
    result = run("generate", "--draft-model", str(draft), cache=cache)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert error_lines(result) == [
        "mtp-splitk: error: Draft model tokenizer does not match model tokenizer."
    ]


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
    if not hasattr(__import__("mtp_splitk.mtp").mtp, "generate_step"):
        assert cli.main(["generate", "--mtp"]) == 2
        assert "--mtp: MTP decoding is not available yet" in capsys.readouterr().err


def test_mtp_flag_routes_mlx_lm_speculative_branch(in_cache, monkeypatch, capsys):
    """--mtp hands the token loop to mtp_splitk.mtp.generate_step inside
    mlx-lm's own stream_generate, patched and with the requested split."""
    import mtp_splitk.mtp

    seen = {}

    def fake_generate_step(prompt, model, stream=None, num_draft_tokens=3, **kwargs):
        seen.update(
            patched=patch.is_enabled(), split=plan.forced_split(), k=num_draft_tokens
        )
        for i, (token, logprobs) in enumerate(generate_step(prompt, model, **kwargs)):
            yield token, logprobs, i % 3 != 2  # two "accepted drafts" per step

    monkeypatch.setattr(mtp_splitk.mtp, "generate_step", fake_generate_step, raising=False)
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
    assert seen == {"patched": True, "split": 4, "k": 2}
    assert not patch.is_enabled() and plan.forced_split() is None  # restored
    assert "Accepted drafts per step (drafts:steps): 0:0 1:0 2:4" in out


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
