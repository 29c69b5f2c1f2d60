# Copyright © 2026 mtp_splitk contributors

"""The overlapped loop on the GPU: the same tokens at every acceptance.

On the CPU the loop's output is plain greedy decoding's (tests/test_pipelined.py).
On the GPU a verify row need not round as a decode row does (other kernels,
other M), so the loop is held to what the benchmark holds it to: at every
acceptance it emits the tokens it emits when every draft is right (p = 1).
Which rows a step rejects must not change how any position is computed;
run 12b's slotted cache broke that (rejected rows moved the live keys to
other slots; likely cause, not isolated: cuDNN's attention rounds by key
tile), which only a GPU run showed.
"""

import mlx.core as mx
import pytest
from mlx_lm import load

from mtp_splitk import patch, synthetic
from mtp_splitk.bench.drafters import AcceptanceControlledDrafter
from mtp_splitk.speculative.pipelined import pipelined_generate_step

pytestmark = pytest.mark.gpu
K = 4
TOKENS = 96


def _loop(model, reference, p, prompt, compile_step=False):
    drafter = AcceptanceControlledDrafter(reference + [0] * (K + 1), p, synthetic.TINY_VOCAB, seed=K)
    steps = pipelined_generate_step(prompt, model, drafter, num_draft_tokens=K, max_tokens=TOKENS,
                                    compile_step=compile_step)
    return [t for t, _, _ in steps]


def _reference(model, prompt):
    """The loop's own tokens: a first pass, re-recorded at p = 1 until it
    reproduces itself, as the benchmark does."""
    reference = _loop(model, [0] * TOKENS, 0.0, prompt)
    for _ in range(3):
        again = _loop(model, reference, 1.0, prompt)
        if again == reference:
            break
        reference = again
    return reference


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
def test_gpu_overlapped_loop_emits_the_same_tokens_at_every_acceptance(tmp_path, patched):
    model, _ = load(str(synthetic.write_model(tmp_path / "model", "llama", "small")))
    # A prompt long enough that attention spans several of cuDNN's key tiles.
    prompt = (mx.arange(300, dtype=mx.uint32) * 7 + 3) % synthetic.TINY_VOCAB
    with patch.enabled(patched):
        reference = _reference(model, prompt)
        assert _loop(model, reference, 1.0, prompt) == reference
        for p in (0.3, 0.7):
            assert _loop(model, reference, p, prompt) == reference, p


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("family", ["llama", "qwen3_next"])
def test_gpu_compiled_steps_emit_the_uncompiled_loops_tokens(tmp_path, family, patched):
    """compile_step on CUDA (MLX's fused elementwise kernels, the split-K kernels
    inside a compiled graph; a hybrid's Gated DeltaNet candidate states in and out of
    the trace): at p = 1 and below, the tokens the loop emits uncompiled."""
    model, _ = load(str(synthetic.write_model(tmp_path / "model", family, "small")))
    prompt = (mx.arange(300, dtype=mx.uint32) * 7 + 3) % synthetic.TINY_VOCAB
    with patch.enabled(patched):
        reference = _reference(model, prompt)
        for p in (1.0, 0.5):
            assert _loop(model, reference, p, prompt, compile_step=True) == reference, p


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
def test_gpu_compiled_plain_decode_emits_the_uncompiled_loops_tokens(tmp_path, patched):
    """The plugin's plain decode (the overlapped loop at k = 0) compiled on CUDA: the
    tokens of the same loop uncompiled, across a bucket's growth (300 + 96 rows)."""
    from mtp_splitk.speculative.decode import decode_generate_step
    from mtp_splitk.speculative.stats import Stats

    model, _ = load(str(synthetic.write_model(tmp_path / "model", "llama", "small")))
    prompt = (mx.arange(300, dtype=mx.uint32) * 7 + 3) % synthetic.TINY_VOCAB
    runs = []
    with patch.enabled(patched):
        for compile_step in (False, True):
            stats = Stats()
            steps = decode_generate_step(prompt, model, max_tokens=TOKENS, compile_step=compile_step, stats=stats)
            runs.append([t for t, _ in steps])
            assert stats.overlapped and (stats.compiled_steps > 0) == compile_step
    assert runs[0] == runs[1] and len(runs[0]) == TOKENS

