"""The end-to-end benchmark harness in its CPU smoke mode: it runs, and its
numbers are consistent (no speed is asserted: this is a CPU)."""

import argparse
import json

import mlx.core as mx
import pytest

from mtp_splitk import cli
from mtp_splitk.bench import e2e
from mtp_splitk.bench.drafters import AcceptanceControlledDrafter
from mtp_splitk.bench.models import MODELS
from mtp_splitk.speculative.loop import num_drafts
from mtp_splitk.speculative.sampling import judge


def smoke_args(tmp_path, **overrides):
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    args = parser.parse_args(
        ["--smoke", "--out", str(tmp_path / "out"), "--model-dir", str(tmp_path / "models"),
         "--repeats", "1", "--max-tokens", "20", "--acceptance", "0,0.8,1",
         "--num-draft-tokens", "3"]
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module")
def smoke_doc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    doc = e2e.run(smoke_args(tmp))
    return doc, tmp / "out"


def test_smoke_run_is_complete_and_written(smoke_doc):
    doc, out = smoke_doc
    assert doc["meta"]["complete"] is True
    assert json.loads((out / "bench_e2e.json").read_text()) == doc
    md = (out / "bench_e2e.md").read_text()
    for heading in ("## tiny-llama", "acceptance-controlled drafter", "draft model", "MTP head",
                    "Verify step", "breakdown"):
        assert heading in md
    models = doc["models"]
    assert set(models) == {"tiny-llama", "qwen3_next-tiny-mtp"}
    assert set(models["tiny-llama"]["plain"]) == {"mlx", "patched"}
    # 3 acceptances x 2 patch states x 2 loops (overlapped, synchronous).
    assert len(models["tiny-llama"]["acceptance"]) == 3 * 2 * 2
    assert set(models["tiny-llama"]["verify_ms"]["patched"]) == {"1", "3", "5"}


def test_smoke_numbers_are_consistent(smoke_doc):
    doc, _ = smoke_doc
    for name, model in doc["models"].items():
        for label, r in model["plain"].items():
            assert r["tps"] > 0 and r["prompt_tps"] > 0
        for section in ("acceptance", "draft", "mtp"):
            for key, r in model.get(section, {}).items():
                assert r["tps"] > 0, key
                assert 0 <= r["accepted"] <= r["drafted"], key
                assert 0 <= r["acceptance_rate"] <= r["per_token_acceptance"] <= 1, key
                assert r["tokens_per_step"] >= 1, key
                # The overlapped loop waits for no verdict, so it times none.
                assert (r["verify_ms"] == 0) if r["overlapped"] else (r["verify_ms"] > 0), key
                # The hybrid MTP model (Gated DeltaNet) keeps the synchronous loop.
                assert r["overlapped"] == (key.endswith("overlap") and "qwen3_next" not in name)
                assert r["step_ms"] > 0, key
                if section == "acceptance" and r["overlapped"]:
                    assert r["host_build_ms"] > 0 and r["device_ms"] > 0, key
        for times in model.get("verify_ms", {}).values():
            assert all(t > 0 for t in times.values())


def test_acceptance_controlled_drafter_hits_its_rate(smoke_doc):
    """On the CPU the loop reproduces greedy decoding exactly, so the drafter
    proposing the recorded continuation is accepted at p = 1 and never at p = 0."""
    runs = smoke_doc[0]["models"]["tiny-llama"]["acceptance"]
    for label in ("mlx", "patched"):
        for loop in ("overlap", "sync"):
            always = runs[f"{label} p=1.0 k=3 {loop}"]
            never = runs[f"{label} p=0.0 k=3 {loop}"]
            assert always["matches_plain"] and never["matches_plain"]
            assert always["matches_reference"] and never["matches_reference"]
            # the plain continuation already was the verify path's
            assert always["reference_passes"] == 1
            assert always["accepted"] == always["drafted"] > 0
            assert never["accepted"] == 0 and never["drafted"] > 0
            assert never["tokens_per_step"] == 1
    census = runs["patched p=0.8 k=3 overlap"]["matmuls"]
    assert census["mlx"] > 0 and census["splitk"] == 0  # the CPU: every matmul on MLX's path


def test_deadline_skips_and_says_so(tmp_path, capsys):
    doc = e2e.run(smoke_args(tmp_path, deadline=0.0, no_draft=True, no_mtp=True))
    assert doc["meta"]["complete"] is False
    assert "Deadline passed" in capsys.readouterr().err
    assert all("plain" not in m for m in doc["models"].values())


def test_cli_reaches_the_harness_and_rejects_bad_input(capsys):
    assert cli.main(["bench", "e2e", "--models", "gpt-9"]) == 2
    assert "unknown model(s) ['gpt-9']" in capsys.readouterr().err
    assert cli.main(["bench", "e2e", "--acceptance", "1.5"]) == 2
    assert "--acceptance values must be in [0, 1]" in capsys.readouterr().err


def _replay(p, k, vocab_size, max_tokens):
    """The speculative loop's (steps, accepted) when the target always emits
    the reference: only the drafter's seeded stream decides them. The loop's
    own draft count and verdict reading are used, with the reference as the
    target's picks."""
    reference = list(range(max_tokens + k + 1))
    drafter = AcceptanceControlledDrafter(reference, p, vocab_size, seed=k)
    steps = accepted = emitted = 0
    while emitted < max_tokens:
        n = num_drafts(emitted, k, max_tokens)
        proposals = drafter.draft(None, n, None)[0].tolist()
        picks = mx.array(reference[emitted : emitted + n + 1])
        a, _ = judge(picks, proposals)
        drafter.accept(mx.array(reference[emitted : emitted + a + 1]), None)
        steps, accepted, emitted = steps + 1, accepted + a, emitted + a + 1
    return steps, accepted


@pytest.mark.parametrize("run", ["e2e_run4/bench_e2e.json", "e2e_run5/llama/bench_e2e.json",
                                 "e2e_run5/qwen/bench_e2e.json"])
def test_recorded_acceptance_runs_replay_from_the_drafter_alone(run):
    """Every recorded GPU acceptance run that reproduced its reference took
    exactly the steps and accepted drafts its drafter's seeded stream gives,
    so the measured per-token acceptance (a few points off p in some runs)
    is that stream's luck, not the loop's doing."""
    import re
    from pathlib import Path

    from mtp_splitk import synthetic

    doc = json.loads((Path(__file__).parent.parent / "benchmarks" / "h200" / run).read_text())
    checked = 0
    for name, model in doc["models"].items():
        family, size = MODELS[name][:2]
        vocab = synthetic.model_config(family, size)["vocab_size"]
        for key, r in model.get("acceptance", {}).items():
            p, k = re.search(r"p=([\d.]+) k=(\d+)", key).groups()
            assert r["matches_reference"], key
            assert _replay(float(p), int(k), vocab, doc["meta"]["max_tokens"]) == (r["steps"], r["accepted"]), key
            checked += 1
    assert checked >= 2
