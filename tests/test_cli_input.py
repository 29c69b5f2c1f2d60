# Copyright © 2026 mtp_splitk contributors

"""Bad input to ``mtp-splitk generate`` and to examples/mtp_generate.py: one
``...: error: ...`` line naming the flag or file, exit status 2, never a
traceback; and the inputs mlx-lm accepts (``--max-tokens -1``, a prompt
cache file) keep mlx-lm's meaning with mtp_splitk's loop."""

import importlib.util
import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from _cli import cache, error_lines, in_cache, run  # noqa: F401 (fixtures)
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache

from mtp_splitk import cli, synthetic
from mtp_splitk.commands import generate
from mtp_splitk.synthetic import write_mtp_model

REPO = Path(__file__).resolve().parents[1]

# The CLI with mlx-lm's stream_generate cut after LIMIT responses, each token
# id printed: a run with no token limit of its own that still ends.
CUT_AFTER = """
import importlib, sys
from mtp_splitk import cli
generate = importlib.import_module("mlx_lm.generate")
inner = generate.stream_generate
def stream_generate(*args, **kwargs):
    for i, response in enumerate(inner(*args, **kwargs)):
        if i == {limit}:
            return
        print("[token]", response.token, file=sys.stderr)
        yield response
generate.stream_generate = stream_generate
sys.exit(cli.main(sys.argv[1:]))
"""


def one_error(capsys, argv) -> str:
    """The single error line of ``mtp-splitk ARGV`` run in process (exit 2)."""
    assert cli.main(argv) == 2, argv
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    return lines[0][len("mtp-splitk: error: ") :]


def broken_copy(tmp_path, source, config_text):
    """A copy of model directory ``source`` with config.json replaced."""
    path = tmp_path / "broken"
    shutil.copytree(source, path)
    (path / "config.json").write_text(config_text)
    return path


def test_bad_numbers_and_flags_name_the_flag(in_cache, capsys):
    for argv, message in [
        (["--max-tokens", "0"], "argument --max-tokens/-m: expected a positive number of "
         "tokens, or -1 for no limit; got 0"),
        (["-m", "-5"], "or -1 for no limit; got -5"),
        (["--num-draft-tokens", "-1"], "argument --num-draft-tokens: expected 0 or more; got -1"),
        (["--chat-template-config", "{enable_thinking: true}"],
         "argument --chat-template-config: not valid JSON (Expecting property name enclosed "
         "in double quotes at column 2): '{enable_thinking: true}'"),
        (["--chat-template-config", "[1, 2]"],
         "argument --chat-template-config: expected a JSON object of apply_chat_template "
         "keyword arguments; got '[1, 2]'"),
    ]:
        assert message in one_error(capsys, ["generate", *argv])


def test_prompt_cache_file_errors_name_the_flag(in_cache, tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert one_error(capsys, ["generate", "--prompt-cache-file", str(missing)]) == (
        f"--prompt-cache-file {missing}: file not found"
    )
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    message = one_error(capsys, ["generate", "--prompt-cache-file", str(garbage)])
    assert message.startswith(f"--prompt-cache-file {garbage}: not a prompt cache file (")
    bare = tmp_path / "bare.safetensors"  # safetensors, but not mlx_lm.cache_prompt's
    mx.save_safetensors(str(bare), {"a": mx.zeros(2)})
    message = one_error(capsys, ["generate", "--prompt-cache-file", str(bare)])
    assert message.startswith(f"--prompt-cache-file {bare}: not a prompt cache file (")


def test_corrupt_config_names_the_file_and_the_place(in_cache, tmp_path, capsys):
    target, draft = generate.default_models()
    text = (target / "config.json").read_text()
    broken = broken_copy(tmp_path, target, text.replace(",", "", 1))
    line, column = _place_of_first_comma(text)
    assert one_error(capsys, ["generate", "--model", str(broken)]) == (
        f"--model {broken}: {broken / 'config.json'} is not valid JSON: Expecting ',' "
        f"delimiter at line {line}, column {column}"
    )
    assert one_error(capsys, ["generate", "--draft-model", str(broken)]).startswith(
        f"--draft-model {broken}: {broken / 'config.json'} is not valid JSON"
    )
    (broken / "config.json").write_text("[1]")
    assert one_error(capsys, ["generate", "--model", str(broken)]) == (
        f"--model {broken}: {broken / 'config.json'} holds a JSON list, not an object"
    )
    (broken / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert one_error(capsys, ["generate", "--model", str(broken)]) == (
        f'--model {broken}: {broken / "config.json"} has no "model_type" (the architecture '
        "mlx-lm loads)"
    )
    assert one_error(capsys, ["convert", "--hf-path", str(broken)]).startswith(
        f"--hf-path {broken}: {broken / 'config.json'} has no \"model_type\""
    )


def _place_of_first_comma(text):
    """(line, column) where JSON decoding of ``text`` without its first comma fails."""
    try:
        json.loads(text.replace(",", "", 1))
    except json.JSONDecodeError as e:
        return e.lineno, e.colno
    raise AssertionError("still valid JSON")


def test_no_token_limit_with_a_draft_model(cache):
    """--max-tokens -1 is mlx-lm's "no limit": the speculative run goes past
    mlx-lm's default of 256 tokens (mlx-lm's own loop fails on it:
    "[concatenate] No arrays provided for concatenation")."""
    result = run("generate", "--max-tokens", "-1", "--verbose", "False", "--stats", cache=cache,
                 code=CUT_AFTER.format(limit=300))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    generated = [l for l in result.stderr.splitlines() if l.startswith("[token] ")]
    assert len(generated) == 300
    assert "[stats] Loop: overlapped" in result.stderr


def test_prompt_cache_file_with_a_draft_model(in_cache, tmp_path, capsys):
    """A prompt cache file of mlx_lm.cache_prompt's kind (the target's cache
    and the model in its metadata) with a draft model: the greedy text is the
    plain text after the same cache."""
    target, draft = generate.default_models()
    model, tokenizer = load(str(target))
    prompt_cache = make_prompt_cache(model)
    model(mx.array(tokenizer.encode("A cached system prompt."))[None], cache=prompt_cache)
    file = tmp_path / "prompt.safetensors"
    save_prompt_cache(str(file), prompt_cache, {"model": str(target), "tokenizer_config": "{}"})
    args = ["generate", "--prompt-cache-file", str(file), "-m", "12", "--verbose", "False"]
    assert cli.main(args) == 0
    plain = capsys.readouterr().out
    assert cli.main([*args, "--draft-model", str(draft)]) == 0
    assert capsys.readouterr().out == plain and plain.strip()


# -- examples/mtp_generate.py --------------------------------------------------------------


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("mtp_generate", REPO / "examples/mtp_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_errors_are_one_line(example, in_cache, tmp_path, capsys):
    moe = synthetic.write_model(tmp_path / "qwen3_moe", "qwen3_moe")  # no MTP layout
    plain_qwen = synthetic.write_model(tmp_path / "qwen", "qwen3_next")
    target, _ = generate.default_models()
    broken = broken_copy(tmp_path, target, "{")
    for argv, message in [
        (["--model", str(tmp_path / "nope")], f"--model {tmp_path / 'nope'}: model directory "
         "not found"),
        (["--model", str(broken)], f"{broken / 'config.json'} is not valid JSON"),
        (["--model", str(moe)], "No multi-token-prediction layout is known for model type "
         "'qwen3_moe'"),
        (["--model", str(plain_qwen)], f"No multi-token-prediction weights in {plain_qwen}"),
        (["--family", "gpt9"], "argument --family: invalid choice: 'gpt9'"),
        (["--acceptance", "1.5"], "argument --acceptance: expected a rate in [0, 1]; got 1.5"),
        (["--max-tokens", "0"], "argument --max-tokens: expected 1 or more; got 0"),
        (["--num-draft-tokens", "-2"], "argument --num-draft-tokens: expected 0 or more; got -2"),
        (["--temp", "-1"], "argument --temp: expected 0 or more; got -1.0"),
        (["--max-tokens", "x"], "argument --max-tokens: invalid int value: 'x'"),
    ]:
        assert example.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mtp_generate.py: error: "), (argv, err)
        assert message in err[0], (argv, err)


def test_example_leaves_no_temporary_directory(example, tmp_path, monkeypatch, capsys):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert example.main(["--max-tokens", "4"]) == 0
    assert "Greedy output identical to plain decoding: True" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_example_runs_on_a_converted_model(example, tmp_path, capsys):
    model = write_mtp_model(tmp_path / "m", "qwen3_5")
    assert example.main(["--model", str(model), "--max-tokens", "6"]) == 0
    assert "Greedy output identical to plain decoding: True" in capsys.readouterr().out
