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
                    "Verify step", "breakdown", "Host probe"):
        assert heading in md
    probes = doc["meta"]["host_probe"]  # the host's speed at the start and the end
    assert len(probes) == 2 and all(p["build_us_per_op"] > 0 and p["eval_us_per_op"] > 0 for p in probes)
    models = doc["models"]
    assert set(models) == {"tiny-llama", "qwen3_next-tiny-mtp"}
    plain = models["tiny-llama"]["plain"]
    assert set(plain) == {"mlx", "patched", "mlx compiled", "patched compiled"}
    # The compiled k = 0 rows: every step compiled, on the CPU mlx-lm's tokens.
    assert all(plain[f"{s} compiled"]["matches_plain"] for s in ("mlx", "patched"))
    assert plain["patched compiled"]["compiled_steps"] == plain["patched compiled"]["steps"] > 0
    # The plain rows show every repeat behind the median, as recorded.
    mlx = models["tiny-llama"]["plain"]["mlx"]
    each = " / ".join(f"{t:.0f}" for t in mlx["tps_all"])
    assert f"| mlx | {mlx['tps']:.1f} | {each} |" in md
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
                # The hybrid MTP model (Gated DeltaNet) too (speculative/recurrent.py).
                assert r["overlapped"] == key.endswith("overlap")
                assert r["step_ms"] > 0, key
                if section == "acceptance" and r["overlapped"]:
                    assert r["host_build_ms"] > 0 and r["chain_eval_ms"] > 0, key
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


def test_smoke_defaults_run_every_task_in_seconds(tmp_path, capsys):
    """`bench e2e --smoke` as a user types it: every task once, in seconds,
    and the results' path said at the end."""
    import time

    out = tmp_path / "out"
    tic = time.perf_counter()
    assert cli.main(["bench", "e2e", "--smoke", "--out", str(out),
                     "--model-dir", str(tmp_path / "models")]) == 0
    seconds = time.perf_counter() - tic
    assert seconds < 60, seconds  # ~5 s on 2 cores; it was ~150-300 s
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == (
        f"Results: {out.resolve() / 'bench_e2e.json'} and {out.resolve() / 'bench_e2e.md'}"
    )
    doc = json.loads((out / "bench_e2e.json").read_text())
    assert doc["meta"]["complete"] and doc["meta"]["max_tokens"] == e2e.SMOKE["max_tokens"]
    llama, mtp = doc["models"]["tiny-llama"], doc["models"]["qwen3_next-tiny-mtp"]
    assert set(llama) == {"info", "plain", "acceptance", "breakdown", "verify_ms", "draft"}
    assert set(mtp) == {"info", "plain", "mtp", "breakdown"}
    # one (p, k), both loops, both patch states; breakdown at M = 1 and k + 1
    assert sorted(llama["acceptance"]) == sorted(
        f"{s} p=0.8 k=2 {loop}" for s in ("mlx", "patched") for loop in ("overlap", "sync")
    )
    assert {k.split()[1] for k in llama["breakdown"]} == {"M=1", "M=3"}
    runs = {f"{s} k=2 {loop}" for s in ("mlx", "patched") for loop in ("overlap", "sync")}
    assert set(llama["draft"]) == runs and runs <= set(mtp["mtp"])


def test_own_model_directory(tmp_path, capsys):
    from mtp_splitk.bench import models

    target, draft = models.smoke_pair(tmp_path / "models")
    mtp_model = models.model_dir(tmp_path / "models", "qwen3_5", "tiny", mtp=True)
    args = ["bench", "e2e", "--model-path", str(target), "--draft-path", str(draft),
            "--mtp-path", str(mtp_model), "--out", str(tmp_path / "out"), "--max-tokens", "8",
            "--repeats", "1", "--acceptance", "1", "--num-draft-tokens", "2", "--loops", "sync"]
    assert cli.main(args) == 0
    assert "Writing synthetic models" not in capsys.readouterr().err  # none needed
    doc = json.loads((tmp_path / "out" / "bench_e2e.json").read_text())
    assert set(doc["models"]) == {"target", f"{mtp_model.name}-mtp"}
    mine = doc["models"]["target"]
    assert mine["info"]["path"] == str(target)
    assert set(mine["draft"]) == {"mlx k=2 sync", "patched k=2 sync"}
    assert mine["acceptance"]["patched p=1.0 k=2 sync"]["acceptance_rate"] == 1.0
    assert cli.main(["bench", "e2e", "--draft-path", str(draft)]) == 2
    assert "--draft-path is the draft of --model-path" in capsys.readouterr().err
    assert cli.main(["bench", "e2e", "--model-path", str(tmp_path / "nope")]) == 2
    assert "--model-path " + str(tmp_path / "nope") + ": model directory not found" in (
        capsys.readouterr().err
    )


def test_disk_is_announced_and_checked_before_writing(tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    from mtp_splitk import synthetic
    from mtp_splitk.bench import models

    # The estimate is what the writer stores: a tiny model's tensors, summed.
    written = synthetic.write_model(tmp_path / "tiny", "qwen3_moe")
    stored = sum(v.nbytes for f in written.glob("model*.safetensors")
                 for v in mx.load(str(f)).values())
    assert models.model_bytes("qwen3_moe", "tiny") == stored
    # The real shapes, 4-bit g64: Llama-3-8B's ~4.5 GB, Qwen3-30B-A3B's ~17 GB.
    assert 4.3e9 < models.model_bytes("llama", "llama3-8b") < 4.8e9
    assert 16e9 < models.model_bytes("qwen3_moe", "qwen3-30b-a3b") < 18e9

    writes = []
    monkeypatch.setattr(models, "model_dir", lambda *a, **k: writes.append(a))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(models.shutil, "disk_usage", lambda path: usage(0, 0, 2**30))
    assert cli.main(["bench", "e2e", "--models", "llama3-8b", "--model-dir",
                     str(tmp_path / "bench"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"Writing synthetic models into {tmp_path / 'bench'}, ~4.9 GiB in all (1.0 GiB free)" in err
    assert "llama llama3-8b (4.2 GiB), llama llama3.2-1b (663 MiB)" in err
    assert "mtp-splitk: error: not enough disk" in err and writes == []


def test_help_names_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "e2e", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 256; with --smoke 16)", "(default: 3; with --smoke 1)",
                    "(default: 0.6,0.8,0.9; with --smoke 0.8)", "(default: overlap,sync)",
                    "(default: benchmarks/e2e)"):
        assert default in text, default


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


def _steered_replay(p, k, max_tokens):
    """(steps, accepted) of the synchronous loop when the drafter's own
    proposals are never right: only ReferenceSteering's seeded draws (one per
    reference position, seed k) decide which proposals are the reference's."""
    import numpy as np

    steer = (np.random.default_rng(k).random(max_tokens) < p).tolist()
    steps = accepted = emitted = 0
    while emitted < max_tokens:
        n = num_drafts(emitted, k, max_tokens)
        a = 0
        while a < n and steer[emitted + a]:
            a += 1
        steps, accepted, emitted = steps + 1, accepted + a, emitted + a + 1
    return steps, accepted


def test_steered_mtp_runs_pay_the_head_at_a_known_acceptance(smoke_doc):
    """The MTP head steered to p (SteeredMTPDrafter) in the smoke: every
    (state, p, k, loop) recorded; the loop emits plain greedy decoding; at
    p = 0 the steering changes nothing (the head's own runs, step for step);
    the random head is never right on its own, so each run's steps and
    accepted drafts are exactly those the seeded steering draws give. The
    hybrid model's runs asked for the overlapped loop say they ran the
    synchronous one, and why."""
    doc = smoke_doc[0]
    runs = doc["models"]["qwen3_next-tiny-mtp"]["mtp"]
    max_tokens = doc["meta"]["max_tokens"]
    steered = {k for k in runs if " mtp " in k}
    assert steered == {
        f"{s} mtp p={p} k=3 {loop}"
        for s in ("mlx", "patched")
        for p in (0.0, 0.8, 1.0)
        for loop in ("overlap", "sync")
    }
    for key in steered:
        r = runs[key]
        state, _, p, _, loop = key.split()
        assert r["matches_reference"] and r["matches_plain"] and r["reference_passes"] == 1, key
        assert (r["steps"], r["accepted"]) == _steered_replay(float(p[2:]), 3, max_tokens), key
        assert r["overlapped"] == (loop == "overlap") and not r["overlap_off"], key
        assert (r["matmuls"] is not None) == (state == "patched"), key
        own = runs[f"{state} k=3 {loop}"]  # the head unsteered
        assert own["accepted"] == 0
        if p == "p=0.0":
            assert (r["steps"], r["drafted"]) == (own["steps"], own["drafted"]), key
    always = runs["patched mtp p=1.0 k=3 sync"]
    assert always["accepted"] == always["drafted"] > 0
    md = (smoke_doc[1] / "bench_e2e.md").read_text().splitlines()
    row = next(line for line in md if line.startswith("| patched mtp p=0.8 k=3 overlap |"))
    assert "| overlapped |" in row  # the hybrid model in the overlapped loop


def test_mtp_tasks_put_the_headline_first():
    """The issue's MTP target (k = 3, p = 0.8) runs right after plain decode,
    so a run cut by its deadline has it; then the rest of the k x p grid,
    then the head on its own. Nothing is loaded to list them."""
    from mtp_splitk.bench.tasks import mtp_tasks

    tasks = mtp_tasks("m", "/nonexistent", None, max_tokens=8, repeats=1, draft_tokens=[2, 4],
                      acceptances=e2e.ACCEPTANCES, mtp_draft_tokens=e2e.MTP_DRAFT_TOKENS)
    names = [message for message, _ in tasks]
    # Then where the headline's verify pass spends its time.
    assert names[:3] == ["m: plain decode", "m: MTP steered p=0.8 k=3", "m: breakdown M=4"]
    assert len(names) == 1 + 4 * 3 + 1 + 2 and names[-2:] == ["m: MTP k=2", "m: MTP k=4"]
    assert sorted(names[1:2] + names[3:14]) == sorted(
        f"m: MTP steered p={p} k={k}" for k in (1, 2, 3, 4) for p in (0.6, 0.8, 0.9)
    )


def test_mtp_model_choice_and_its_disk(tmp_path, monkeypatch, capsys):
    """--mtp-model picks the MTP model by name; the Qwen3-Next-80B-A3B
    12-layer cut at 5 bits is announced with its size and refused without
    the disk, before anything is written; bad names and k are errors."""
    from collections import namedtuple

    from mtp_splitk.bench import models

    spec = models.mtp_spec("qwen3-next-80b-a3b-12l")
    assert spec == ("qwen3_next", "qwen3-next-80b-a3b-12l", True, 5)
    assert 14.5e9 < models.model_bytes(*spec) < 16e9  # 12 of 48 layers + head, 5-bit
    assert 55e9 < models.model_bytes(*models.mtp_spec("qwen3-next-80b-a3b")) < 57e9
    writes = []
    monkeypatch.setattr(models, "mtp_model_dir", lambda *a, **k: writes.append(a))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(models.shutil, "disk_usage", lambda path: usage(0, 0, 8 << 30))
    args = ["bench", "e2e", "--models=", "--no-draft", "--mtp-model", "qwen3-next-80b-a3b-12l",
            "--model-dir", str(tmp_path / "bench"), "--out", str(tmp_path / "out")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "qwen3_next qwen3-next-80b-a3b-12l 5-bit + MTP (14.2 GiB)" in err
    assert "not enough disk" in err and writes == []
    assert cli.main(["bench", "e2e", "--mtp-model", "gpt-9-mtp"]) == 2
    assert "unknown MTP model(s) ['gpt-9-mtp']" in capsys.readouterr().err
    assert cli.main(["bench", "e2e", "--mtp-draft-tokens", "0"]) == 2
    assert "--mtp-draft-tokens values must be >= 1" in capsys.readouterr().err


def test_breakdown_times_gated_deltanet_layers_of_hybrids(tmp_path):
    """A hybrid's forward splits into attention (its full-attention layers),
    Gated DeltaNet (its linear layers), MoE, LM head; a dense model has no
    GDN part."""
    from mlx_lm import load

    from mtp_splitk import synthetic
    from mtp_splitk.bench.measure import breakdown

    hybrid, _ = load(str(synthetic.write_model(tmp_path / "h", "qwen3_next", "tiny")))
    parts = breakdown(hybrid, 4, 16, 2)
    assert list(parts) == ["attention", "gdn", "mlp", "lm_head", "forward", "rest"]
    assert all(parts[k] > 0 for k in ("attention", "gdn", "mlp", "lm_head", "forward"))
    dense, _ = load(str(synthetic.write_model(tmp_path / "d", "llama", "tiny")))
    assert "gdn" not in breakdown(dense, 4, 16, 2)
