# Copyright © 2026 mtp_splitk contributors

"""The end-to-end benchmark's measurements as tasks (:mod:`.e2e` runs them):
for one target model, plain decoding, the acceptance-controlled grid, the
verify latency, the breakdown and the draft-model runs; for an MTP model,
plain decoding, the MTP head steered to known acceptances and the head on its
own. Each task measures unpatched and patched (:data:`.measure.STATES`) and
records both in the results."""

import sys
from typing import Callable, Dict, List, Tuple

from mlx_lm import load

from .. import mtp, patch
from ..mtp import MTPDrafter
from ..speculative import DraftModelDrafter
from .drafters import AcceptanceControlledDrafter, SteeredMTPDrafter
from .harness import median_run
from .measure import (
    LOOPS,
    STATES,
    breakdown,
    matmul_census,
    plain_decode,
    prompt_tokens,
    speculative_decode,
    step_split_ms,
    verify_latency,
)


def _strip(result: Dict) -> Dict:
    return {k: v for k, v in result.items() if k != "tokens"}


# A task is (message, fn): one measurement, both patch states inside it, so
# that a run cut short by its deadline keeps complete comparisons. The
# headline measurements of every model come first, the rest of the grid after.
Task = Tuple[str, Callable[[], None]]
KEY = (4, 0.8)  # the (k, p) the targets are stated at


def _recorded(tokens, drafter_for, decode, passes: int = 3):
    """(reference, passes): ``decode(drafter_for(tokens))`` re-run on its own
    output until it reproduces it (at most ``passes`` times), starting from
    plain decoding's ``tokens``: the verify path's own greedy continuation."""
    for n in range(1, passes + 1):
        emitted = decode(drafter_for(tokens))["tokens"]
        if emitted == tokens:
            return tokens, n
        tokens = emitted
    return tokens, passes


def _run_key(label: str, run: str, loop: str) -> str:
    # "patched p=0.8 k=4 overlap": the loop variant last (measure.LOOPS).
    return f"{label} {run} {loop}"


def _as_recorded(run: Dict, reference: List[int], where: str):
    """Whether the run emitted its reference (then p is the acceptance it
    ran at); a warning line where it did not."""
    run["matches_reference"] = run["tokens"] == reference
    if not run["matches_reference"]:
        print(f"warning: {where} did not reproduce its p = 1 reference: it ran at another "
              "acceptance than p", file=sys.stderr, flush=True)


def model_tasks(
    name,
    path,
    results,
    *,
    max_tokens,
    repeats,
    acceptances,
    draft_tokens,
    draft_path,
    verify_ms,
    loops=LOOPS,
) -> Tuple[List[Task], List[Task]]:
    """(headline tasks, the rest) for one target model."""
    loaded = {}
    plain_tokens = {}

    def target():
        if "model" not in loaded:
            loaded["model"], tokenizer = load(str(path))
            loaded["prompt"] = prompt_tokens(tokenizer)
            results.put(name, "info", "path", str(path))
            results.put(name, "info", "prompt_tokens", loaded["prompt"].size)
        return loaded["model"], loaded["prompt"]

    def plain():
        model, prompt = target()
        plain_tokens.update(plain_both(name, model, prompt, results, max_tokens, repeats))

    references = {}

    def reference(label, k, loop):
        """The target's greedy continuation as this loop's verify path computes it.

        A verify row can round differently from a decode row (other kernels,
        other M), and random weights have near-ties: where plain decoding and
        the loop part, a reference taken from plain decoding goes stale and
        the measured acceptance falls below p. So the reference is re-recorded
        by the loop itself at p = 1 with the same k (which emits the target's
        own verify-path tokens whatever it is proposed), until it reproduces
        itself; per loop, since their verify paths differ (the synchronous one
        drafts fewer near ``max_tokens``: other M, other kernels). These runs
        also warm the loop up (first use compiles).
        """
        model, prompt = target()
        if (label, k, loop) not in references:
            references[label, k, loop] = _recorded(
                plain_tokens[label],
                lambda tokens: AcceptanceControlledDrafter(
                    tokens + [0] * (k + 1), 1.0, model.args.vocab_size
                ),
                lambda drafter: speculative_decode(model, prompt, drafter, k, max_tokens, loop),
            )
        return references[label, k, loop]

    def acceptance(k, p):
        model, prompt = target()
        for label, on in STATES:
            with patch.enabled(on):
                census = matmul_census(model, k + 1) if on else None
                for loop in loops:
                    tokens, passes = reference(label, k, loop)
                    drafter = AcceptanceControlledDrafter(
                        tokens + [0] * (k + 1), p, model.args.vocab_size, seed=k
                    )
                    run = median_run(
                        lambda: speculative_decode(model, prompt, drafter, k, max_tokens, loop),
                        repeats,
                        warmup=False,
                    )
                    if loop in ("overlap", "compiled"):
                        run.update(step_split_ms(model, prompt, drafter, k, compile_step=loop == "compiled"))
                    run["matmuls"] = census
                    _as_recorded(run, tokens, f"{name} {label} p={p} k={k} {loop}")
                    run["matches_plain"] = run["tokens"] == plain_tokens[label]
                    run["reference_passes"] = passes
                    results.put(
                        name, "acceptance", _run_key(label, f"p={p} k={k}", loop), _strip(run)
                    )

    def verify():
        model, _ = target()
        for label, on in STATES:
            with patch.enabled(on):
                results.put(name, "verify_ms", label, verify_latency(model, verify_ms, 64, 5))

    def parts(M):
        model, _ = target()
        for label, on in STATES:
            with patch.enabled(on):
                results.put(name, "breakdown", f"{label} M={M}", breakdown(model, M, 64, 5))

    def draft(k, warmup):
        model, prompt = target()
        if "draft" not in loaded:
            loaded["draft"], _ = load(str(draft_path))
        for label, on in STATES:
            with patch.enabled(on):
                for loop in loops:
                    run = median_run(
                        lambda: speculative_decode(
                            model, prompt, DraftModelDrafter(loaded["draft"]), k, max_tokens, loop
                        ),
                        repeats,
                        warmup=warmup,
                    )
                    results.put(name, "draft", _run_key(label, f"k={k}", loop), _strip(run))

    grid = [(k, p) for k in draft_tokens for p in acceptances]
    key = KEY if KEY in grid else grid[0]
    k_key = key[0]
    head = [
        (f"{name}: plain decode", plain),
        (f"{name}: p={key[1]} k={key[0]}", lambda: acceptance(*key)),
        (f"{name}: breakdown M={k_key + 1}", lambda: parts(k_key + 1)),
    ]
    rest = [
        (f"{name}: p={p} k={k}", lambda k=k, p=p: acceptance(k, p))
        for k, p in grid
        if (k, p) != key
    ]
    rest += [
        (f"{name}: verify latency M={verify_ms[0]}..{verify_ms[-1]}", verify),
        (f"{name}: breakdown M=1", lambda: parts(1)),
    ]
    if draft_path is not None:
        rest += [
            (f"{name}: draft model k={k}", lambda k=k, i=i: draft(k, warmup=i == 0))
            for i, k in enumerate(draft_tokens)
        ]
    return head, rest


MTP_KEY = (3, 0.8)  # the (k, p) of the MTP target


def mtp_tasks(
    name,
    path,
    results,
    *,
    max_tokens,
    repeats,
    draft_tokens,
    acceptances=(),
    mtp_draft_tokens=(),
    loops=LOOPS,
) -> List[Task]:
    """Tasks for a model with an MTP head: plain decode; the head steered to
    each acceptance of ``acceptances`` for each k of ``mtp_draft_tokens``
    (:class:`~.drafters.SteeredMTPDrafter`: the head's real cost at a known
    acceptance), keys like "patched mtp p=0.8 k=3 overlap"; the head on its
    own for each k of ``draft_tokens`` ("patched k=3 overlap"; a random
    head's proposals are almost never accepted)."""
    loaded = {}
    plain_tokens = {}

    def target():
        if not loaded:
            loaded["model"], loaded["head"], tokenizer = mtp.load(str(path))
            loaded["prompt"] = prompt_tokens(tokenizer)
            results.put(name, "info", "path", str(path))
            results.put(name, "info", "prompt_tokens", loaded["prompt"].size)
        return loaded["model"], loaded["head"], loaded["prompt"]

    def plain():
        model, _, prompt = target()
        plain_tokens.update(plain_both(name, model, prompt, results, max_tokens, repeats))

    references = {}

    def reference(label, k, loop):
        """As the acceptance runs' reference (:func:`model_tasks`): the loop
        itself, the head steered at p = 1, re-recorded until it reproduces
        itself; the head runs in these passes as in the measured ones."""
        model, head, prompt = target()
        if (label, k, loop) not in references:
            references[label, k, loop] = _recorded(
                plain_tokens[label],
                lambda tokens: SteeredMTPDrafter(model, head, tokens, 1.0),
                lambda drafter: speculative_decode(model, prompt, drafter, k, max_tokens, loop),
            )
        return references[label, k, loop]

    def steered(k, p):
        model, head, prompt = target()
        for label, on in STATES:
            with patch.enabled(on):
                census = matmul_census(model, k + 1) if on else None
                for loop in loops:
                    tokens, passes = reference(label, k, loop)

                    def drafter():
                        return SteeredMTPDrafter(model, head, tokens, p, seed=k)

                    run = median_run(
                        lambda: speculative_decode(model, prompt, drafter(), k, max_tokens, loop),
                        repeats,
                        warmup=False,
                    )
                    # A loop the caches refuse runs synchronously: "overlapped"
                    # False and "overlap_off" say so in the results.
                    if run["overlapped"]:
                        run.update(step_split_ms(model, prompt, drafter(), k, compile_step=loop == "compiled"))
                    run["matmuls"] = census
                    _as_recorded(run, tokens, f"{name} {label} p={p} k={k} {loop}")
                    run["matches_plain"] = run["tokens"] == plain_tokens[label]
                    run["reference_passes"] = passes
                    key = _run_key(label, f"mtp p={p} k={k}", loop)
                    results.put(name, "mtp", key, _strip(run))

    def speculate(k, warmup):
        model, head, prompt = target()
        for label, on in STATES:
            with patch.enabled(on):
                for loop in loops:
                    run = median_run(
                        lambda: speculative_decode(
                            model, prompt, MTPDrafter(model, head), k, max_tokens, loop
                        ),
                        repeats,
                        warmup=warmup,
                    )
                    run["matches_plain"] = run["tokens"] == plain_tokens[label]
                    results.put(name, "mtp", _run_key(label, f"k={k}", loop), _strip(run))

    def parts(M):
        model, _, _ = target()
        for label, on in STATES:
            with patch.enabled(on):
                results.put(name, "breakdown", f"{label} M={M}", breakdown(model, M, 64, 5))

    grid = [(k, p) for k in mtp_draft_tokens for p in acceptances]
    grid.sort(key=lambda kp: kp != MTP_KEY)  # the headline first
    headline = [(f"{name}: MTP steered p={p} k={k}", lambda k=k, p=p: steered(k, p)) for k, p in grid]
    return (
        [(f"{name}: plain decode", plain)]
        + headline[:1]
        + [(f"{name}: breakdown M={MTP_KEY[0] + 1}", lambda: parts(MTP_KEY[0] + 1))]
        + headline[1:]
        + [
            (f"{name}: MTP k={k}", lambda k=k, i=i: speculate(k, warmup=i == 0))
            for i, k in enumerate(draft_tokens)
        ]
    )


def plain_both(name, model, prompt, results, max_tokens, repeats) -> Dict[str, List[int]]:
    """Plain decode unpatched and patched, mlx-lm's loop and the plugin's compiled
    one (``<state> compiled``, with whether its tokens are mlx-lm's), recorded;
    each state's tokens from mlx-lm's loop."""
    tokens = {}
    for compiled in (False, True):
        for label, on in STATES:
            with patch.enabled(on):
                run = median_run(lambda: plain_decode(model, prompt, max_tokens, compiled), repeats)
            if compiled:
                run["matches_plain"] = run["tokens"] == tokens[label]
                label += " compiled"
            else:
                tokens[label] = run["tokens"]
            results.put(name, "plain", label, _strip(run))
    return tokens
