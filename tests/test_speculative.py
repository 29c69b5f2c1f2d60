# Copyright © 2026 mtp_splitk contributors

"""The speculative loop: exactness, rollback, sampling, drafters, statistics."""

import importlib.util

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors

from mtp_splitk import synthetic
from mtp_splitk.bench.drafters import AcceptanceControlledDrafter, ReferenceSteering
from mtp_splitk.mtp import MTPDrafter, load
from mtp_splitk.speculative import (
    DraftModelDrafter,
    Rollback,
    Stats,
    TargetParts,
    layers_started_early,
    make_distribution,
    overlap,
    speculative_accept,
    speculative_generate_step,
    stream_generate,
)
from mtp_splitk.speculative.loop import num_drafts
from mtp_splitk.speculative.sampling import judge
from mtp_splitk.synthetic import mtp_weights, write_mtp_model

FAMILIES = ["deepseek_v3", "glm4_moe", "qwen3_next", "qwen3_5", "mimo"]
HYBRID = ["qwen3_next", "qwen3_5"]
PROMPT = mx.array([5, 17, 99, 3, 250, 8, 11, 42, 7], mx.uint32)
VOCAB = 384  # the synthetic writer's tiny vocabulary


# GLM-4.5's layout is DeepSeek-V3's on a GQA attention; the synthetic writer
# has no GLM-4.5 yet, so its lower-level pieces write one here.
GLM4_MOE = {
    "model_type": "glm4_moe",
    "architectures": ["Glm4MoeForCausalLM"],
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 64,
    "max_position_embeddings": 4096,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "partial_rotary_factor": 0.5,
    "attention_bias": True,
    "use_qk_norm": False,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def write_glm4_moe(path, seed):
    from mlx_lm.utils import get_total_parameters

    mx.random.seed(seed)
    model, config = synthetic.lazy_model(dict(GLM4_MOE), synthetic.DEFAULT_QUANTIZATION)
    tensors = synthetic.evaluated_tensors(model) + [
        synthetic.tensor_from_array(k, v)
        for k, v in mtp_weights(config, seed=seed).items()
    ]
    return synthetic.write_directory(path, config, tensors, get_total_parameters(model))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """(family, seed, float32) -> (model, head, tokenizer), written once."""
    cache = {}

    def get(family, seed=0, float32=False):
        key = (family, seed, float32)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{family}{seed}") / "model"
            if family == "glm4_moe":
                path = write_glm4_moe(path, seed)
            else:
                path = write_mtp_model(path, family, seed=seed)
            model, head, tokenizer = load(path)
            if float32:
                # The tiny models are bfloat16; in float32 a verify row and a
                # decode row agree to rounding, so logits can be compared.
                model.set_dtype(mx.float32)
                head.set_dtype(mx.float32)
            cache[key] = model, head, tokenizer
        return cache[key]

    return get


def plain(model, prompt=PROMPT, n=24, **kwargs):
    """mlx-lm's own decoding loop: [(token, logprobs)]."""
    return list(generate_step(prompt, model, max_tokens=n, **kwargs))


def tokens(items):
    return [item[0] for item in items]


def speculate(model, drafter, prompt=PROMPT, n=24, **kwargs):
    return list(
        speculative_generate_step(prompt, model, drafter, max_tokens=n, **kwargs)
    )


class Steered(ReferenceSteering, MTPDrafter):
    """An MTP drafter whose head runs as usual (its cache, its self-fed
    hidden chain) but whose proposals are the reference continuation with
    probability ``p``: random heads are never right, and the accept paths of
    the drafter need accepted drafts."""

    def __init__(self, model, head, reference, p, seed=0):
        super().__init__(model, head, reference=reference, acceptance=p, seed=seed)


def test_glm4_moe_target_parts_compute_the_models_logits(loaded):
    model, head, _ = loaded("glm4_moe")
    parts = TargetParts(model)
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert mx.array_equal(parts.logits(parts.hidden(x)), model(x))
    assert head.eh_proj.bits == 4 and not head.mask_as_array


# -- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_mtp_with_compiled_steps_is_plain_decoding(family, loaded, monkeypatch):
    """compile_step traces the head's proposals too (MTPDrafter names its device
    state); the tokens stay plain greedy decoding's, and the head's Python runs
    once a trace, not once a step."""
    model, head, _ = loaded(family)
    expected = tokens(plain(model, n=32))
    calls = []
    inner = type(head).__call__
    monkeypatch.setattr(type(head), "__call__", lambda self, *a, **kw: calls.append(1) or inner(self, *a, **kw))
    stats = Stats()
    out = speculate(model, MTPDrafter(model, head), n=32, num_draft_tokens=3, stats=stats, compile_step=True)
    assert tokens(out) == expected and stats.overlapped
    assert len(calls) <= 10 < 3 * stats.steps  # start()'s calls and two traces; 3 a step uncompiled


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sync"])
@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_mtp_is_token_identical_to_plain_decoding(family, patched, overlap, loaded):
    if patched and importlib.util.find_spec("mtp_splitk.patch") is None:
        pytest.skip("mtp_splitk.patch (enable/disable) is not in this checkout yet")
    # In bfloat16, every family (DeepSeek-V3's verify rows take its one-row
    # MLA path: speculative/verify_rows.py).
    model, head, _ = loaded(family)
    expected = tokens(plain(model, n=32))
    if patched:
        from mtp_splitk import patch

        patch.enable()
    try:
        unsteered = speculate(
            model, MTPDrafter(model, head), n=32, num_draft_tokens=3, overlap=overlap
        )
        stats = Stats()
        drafter = Steered(model, head, expected, p=0.7)
        steered = speculate(
            model, drafter, n=32, num_draft_tokens=3, stats=stats, overlap=overlap
        )
    finally:
        if patched:
            patch.disable()
    assert tokens(unsteered) == expected
    assert tokens(steered) == expected
    assert stats.accepted > 0 and stats.rejected > 0
    # Hybrid caches (Gated DeltaNet) too take the overlapped loop (recurrent.py).
    assert stats.overlapped == overlap


@pytest.mark.parametrize("family", FAMILIES)
def test_rollback_is_exact(family, loaded):
    """Every position's logprobs equal plain decoding's, including the rows
    right after rejected drafts (which the caches must have forgotten) and,
    for hybrid models, after the recurrent state was restored and replayed."""
    model, _, _ = loaded(family, float32=True)
    expected = plain(model, n=40)
    drafter = AcceptanceControlledDrafter(tokens(expected), 0.5, VOCAB, seed=3)
    stats = Stats()
    out = speculate(model, drafter, n=40, num_draft_tokens=4, stats=stats)
    assert tokens(out) == tokens(expected)
    assert stats.rejected >= 5 and stats.accepted >= 5  # both paths exercised
    for (_, want), (_, got, _) in zip(expected, out):
        assert mx.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_5"])
def test_submitting_verify_passes_in_pieces_changes_no_value(family, loaded, monkeypatch):
    """submit_every starts layers early; the logprobs of every position and
    the rollbacks are those of the pass submitted whole."""
    model, head, _ = loaded(family, float32=True)
    expected = plain(model, n=24)
    started = []
    real_call = overlap._Started.__call__
    monkeypatch.setattr(overlap._Started, "__call__",
                        lambda self, *a, **k: (started.append(self.layer), real_call(self, *a, **k))[1])
    layers_before = list(model.model.layers)
    outs = {}
    for every in (0, 1, 2):
        started.clear()
        drafter = AcceptanceControlledDrafter(tokens(expected), 0.5, VOCAB, seed=3)
        stats = Stats()
        outs[every] = speculate(model, drafter, n=24, num_draft_tokens=3, stats=stats, submit_every=every)
        # Every `every`-th layer but the last, once per pass: one a step, and
        # for hybrid models the passes that re-feed tokens after a rollback.
        chosen = [layers_before[i] for i in range(every - 1, len(layers_before) - 1, every)] if every else []
        passes = len(started) // len(chosen) if chosen else 0
        assert started == chosen * passes
        assert passes >= stats.steps if chosen else not started
        assert stats.rejected > 0
    assert [type(layer) for layer in model.model.layers] == [type(layer) for layer in layers_before]
    assert all(a is b for a, b in zip(model.model.layers, layers_before))
    for every in (1, 2):
        assert tokens(outs[every]) == tokens(expected)
        for (_, want, _), (_, got, _) in zip(outs[0], outs[every]):
            assert mx.array_equal(got, want)


def test_layers_started_early_leaves_other_models_alone():
    class NoLayers:
        pass

    model = NoLayers()
    with layers_started_early(model, 2):
        pass
    assert vars(model) == {}


@pytest.mark.parametrize("family", HYBRID)
def test_hybrid_draft_model_rolls_back_its_recurrent_state(family, loaded):
    model, _, _ = loaded(family)
    draft_model, _, _ = loaded(family, seed=1)  # same vocabulary, other weights
    expected = tokens(plain(model, n=32))
    stats = Stats()
    out = speculate(
        model, DraftModelDrafter(draft_model), n=32, num_draft_tokens=3, stats=stats
    )
    assert tokens(out) == expected
    assert stats.rejected > 0


def test_a_perfect_draft_model_is_always_accepted(loaded):
    model, _, _ = loaded("qwen3_5")
    stats = Stats()
    out = speculate(
        model, DraftModelDrafter(model), n=25, num_draft_tokens=4, stats=stats
    )
    assert tokens(out) == tokens(plain(model, n=25))
    assert stats.accepted == stats.drafted and stats.steps == 5


def test_mtp_cache_matches_a_from_scratch_head(loaded):
    """The head's cache, trimmed after self-fed drafts and caught up with the
    target's hidden states, gives each step's first draft the logits a fresh
    head computes over all (hidden, next token) pairs of the sequence."""
    model, head, _ = loaded("qwen3_next", float32=True)
    firsts = []

    class Recording(Steered):
        def draft(self, y, n, distribution):
            self.first = True
            return super().draft(y, n, distribution)

    reference = tokens(plain(model, n=16))
    drafter = Recording(model, head, reference, p=0.7)
    logits = drafter.parts.logits

    def recording_logits(hidden):
        out = logits(hidden)
        if drafter.first:
            firsts.append(out[0])
            drafter.first = False
        return out

    drafter.parts.logits = recording_logits
    # The synchronous loop's drafts (draft(); the overlapped loop proposes on the device).
    out = speculate(model, drafter, n=16, num_draft_tokens=3, overlap=False)
    sequence = mx.concatenate([PROMPT, mx.array(tokens(out), mx.uint32)])

    # From scratch: row i of `fresh` is the pair (h_i, t_{i+1}).
    hidden = drafter.parts.hidden(sequence[None])
    fresh = logits(head(hidden[:, :-1], drafter.parts.embed(sequence[None, 1:])))[0]
    # The first draft of a step with y = t_s comes from the pair (h_{s-1}, t_s).
    s = PROMPT.size - 1
    starts = []
    for emitted in _steps(out):
        starts.append(s)
        s += emitted
    # (the last step may draft nothing: one token was left)
    assert len(firsts) >= len(starts) - 1 and max(_steps(out)) > 2
    for start, first in zip(starts, firsts):
        assert mx.allclose(first, fresh[start - 1], atol=1e-4, rtol=1e-4)


def _steps(out):
    """Tokens emitted per step: accepted drafts, then the target's token."""
    counts, current = [], 0
    for _, _, from_draft in out:
        current += 1
        if not from_draft:
            counts.append(current)
            current = 0
    return counts


# -- sampling -------------------------------------------------------------------------------


def test_speculative_accept_samples_the_target_distribution():
    """Whatever the draft distribution, the first token out of one step is
    distributed as p (the defining property of speculative sampling)."""
    mx.random.seed(0)
    V, n, trials = 5, 2, 4000
    p = mx.log(mx.array([[0.4, 0.3, 0.15, 0.1, 0.05]] * (n + 1)))
    q = mx.log(mx.array([[0.05, 0.1, 0.15, 0.3, 0.4]] * n))
    counts = np.zeros(V)
    accepted_first = 0
    for _ in range(trials):
        drafts = mx.random.categorical(q)
        num, token = speculative_accept(p, q, drafts)
        num = num.item()
        first = drafts[0].item() if num > 0 else token.item()
        counts[first] += 1
        accepted_first += num > 0
    target = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    assert np.abs(counts / trials - target).max() < 0.03
    # Acceptance of the first draft is sum_x min(p, q) = 0.45.
    assert abs(accepted_first / trials - 0.45) < 0.03


def test_judge_keeps_drafts_while_they_match_the_targets_picks():
    """mlx-lm's rule: (accepted drafts, the pick of the row after them)."""
    assert judge(mx.array([5, 7, 9]), [5, 7]) == (2, 9)  # all accepted: the bonus
    assert judge(mx.array([5, 8, 9]), [5, 7]) == (1, 8)  # the correction
    assert judge(mx.array([4, 7, 9]), [5, 7]) == (0, 4)  # no match after a miss
    assert judge(mx.array([3]), []) == (0, 3)


def test_judge_reads_speculative_accepts_verdict():
    """Point-mass distributions make speculative sampling deterministic."""

    def one_hot(tokens):
        return mx.where(mx.arange(8)[None] == mx.array(tokens)[:, None], 0.0, -mx.inf)

    q, drafts = one_hot([2, 3]), mx.array([2, 3])
    # p agrees with both drafts: both accepted, the bonus comes from p's last row.
    assert judge(speculative_accept(one_hot([2, 3, 4]), q, drafts), [2, 3]) == (2, 4)
    # p puts no mass on the second draft: it is replaced by p's own token.
    assert judge(speculative_accept(one_hot([2, 1, 4]), q, drafts), [2, 3]) == (1, 1)


@pytest.mark.parametrize("family", ["mimo", "qwen3_next"])
def test_sampling_with_a_fixed_seed_is_reproducible(family, loaded):
    model, head, _ = loaded(family)
    distribution = make_distribution(0.9, top_k=50)

    def run(seed):
        mx.random.seed(seed)
        stats = Stats()
        drafter = Steered(model, head, [], p=0.0)
        out = speculate(model, drafter, n=20, distribution=distribution, stats=stats)
        return tokens(out)

    first, again, other = run(11), run(11), run(12)
    assert first == again
    assert first != other
    assert len(first) == 20


def test_sampling_keeps_drafts_the_target_would_sample(loaded):
    """With a draft model equal to the target, p == q and speculative
    sampling accepts every draft."""
    model, _, _ = loaded("qwen3_5", float32=True)
    mx.random.seed(0)
    stats = Stats()
    speculate(
        model,
        DraftModelDrafter(model),
        n=21,
        num_draft_tokens=4,
        distribution=make_distribution(1.0),
        stats=stats,
    )
    assert stats.drafted > 0 and stats.accepted == stats.drafted


def test_sampler_and_distribution_are_exclusive(loaded):
    model, head, _ = loaded("mimo")
    with pytest.raises(ValueError, match="either a sampler"):
        speculate(
            model,
            MTPDrafter(model, head),
            sampler=lambda x: mx.argmax(x, axis=-1),
            distribution=make_distribution(1.0),
        )


# -- the acceptance-controlled drafter --------------------------------------------------------


@pytest.mark.parametrize("acceptance", [0.3, 0.8])
def test_acceptance_controlled_drafter_hits_its_rate(acceptance, loaded):
    model, _, _ = loaded("mimo")
    k, n = 4, 160
    reference = AcceptanceControlledDrafter.record(model, PROMPT, n)
    stats = Stats()
    drafter = AcceptanceControlledDrafter(reference, acceptance, VOCAB, seed=7)
    out = speculate(model, drafter, n=n, num_draft_tokens=k, stats=stats)
    assert tokens(out) == reference
    assert abs(stats.per_token_acceptance - acceptance) < 0.08
    a = acceptance
    expected_rate = (a - a ** (k + 1)) / ((1 - a) * k)
    assert abs(stats.acceptance_rate - expected_rate) < 0.08


# -- statistics, streaming, caches -------------------------------------------------------------


def test_stats_add_up(loaded):
    model, _, _ = loaded("qwen3_next")
    reference = tokens(plain(model, n=30))
    stats = Stats()
    drafter = AcceptanceControlledDrafter(reference, 0.6, VOCAB, seed=1)
    # The synchronous loop: it times each verify pass and replays rows of hybrids.
    out = speculate(model, drafter, n=30, num_draft_tokens=3, stats=stats, overlap=False)
    assert stats.generation_tokens == len(out) == 30
    assert stats.steps == len(stats.accepted_per_step)
    assert stats.accepted == sum(stats.accepted_per_step)
    assert stats.accepted == sum(from_draft for _, _, from_draft in out)
    assert stats.steps == sum(not from_draft for _, _, from_draft in out)
    assert stats.accepted + stats.rejected <= stats.drafted
    assert stats.acceptance_rate == stats.accepted / stats.drafted
    assert stats.prompt_tokens == PROMPT.size and stats.prompt_tps > 0
    assert 0 < stats.verify_time < stats.generation_time and stats.generation_tps > 0
    # Hybrid: deferred replays make verify passes longer than k + 1 rows.
    assert stats.verify_rows > stats.steps + stats.drafted
    assert "tokens-per-sec" in stats.summary()


def test_stream_generate_matches_mlx_lms(loaded):
    model, head, tokenizer = loaded("qwen3_5")
    prompt = "Speculative decoding drafts a few tokens"
    expected = list(mlx_stream_generate(model, tokenizer, prompt, max_tokens=20))
    stats = Stats()
    reference = tokens(plain(model, mx.array(tokenizer.encode(prompt)), n=20))
    drafter = Steered(model, head, reference, p=0.8)
    out = list(
        stream_generate(model, tokenizer, prompt, drafter, max_tokens=20, stats=stats)
    )
    assert "".join(r.text for r in out) == "".join(r.text for r in expected)
    assert [r.token for r in out] == [r.token for r in expected]
    assert out[-1].finish_reason == expected[-1].finish_reason
    assert any(r.from_draft for r in out) and stats.accepted > 0


@pytest.mark.parametrize("family", ["mimo", "qwen3_next"])
def test_prompt_cache_holds_everything_but_the_last_token(family, loaded):
    """Stopping mid-step (a consumer break) leaves the caller's cache at the
    prompt plus every token handed out but the last, trimmed or (hybrid)
    restored and replayed, so generation can resume from it."""
    model, _, _ = loaded(family, float32=True)
    expected = plain(model, n=30)
    reference = tokens(expected)
    cache = make_prompt_cache(model)
    drafter = AcceptanceControlledDrafter(reference, 1.0, VOCAB)
    out = []
    for item in speculative_generate_step(
        PROMPT, model, drafter, prompt_cache=cache, num_draft_tokens=4, max_tokens=30
    ):
        out.append(item)
        if len(out) == 7:  # the 2nd accepted draft of the 2nd step
            break
    assert tokens(out) == reference[:7]
    assert cache[-1].offset == PROMPT.size + 6
    logits = model(mx.array([[out[-1][0]]]), cache=cache)[0, -1]
    want = expected[7][1]
    assert mx.allclose(logits - mx.logsumexp(logits), want, atol=1e-4)


def test_logits_processors_see_the_verified_context(loaded):
    model, head, _ = loaded("mimo")
    processors = make_logits_processors(
        repetition_penalty=1.5, repetition_context_size=8
    )
    expected = tokens(plain(model, n=24, logits_processors=processors))
    assert expected != tokens(plain(model, n=24))  # the penalty matters
    drafter = Steered(model, head, expected, p=0.7)
    stats = Stats()
    out = speculate(
        model,
        drafter,
        n=24,
        logits_processors=processors,
        num_draft_tokens=3,
        stats=stats,
    )
    assert tokens(out) == expected and stats.accepted > 0


def test_rollback_follows_cache_entries_replaced_mid_step():
    """kv_bits swaps a cache's KVCache entries for QuantizedKVCache ones
    part-way through a generation (inside the verify call); the rollback must
    trim the entry now in the list. (The tiny models' head_dim of 16 is too
    narrow for MLX's KV quantization, so this drives Rollback directly.)"""
    cache = [KVCache()]
    keys = mx.zeros((1, 2, 10, 64))
    cache[0].update_and_fetch(keys, keys)
    rollback = Rollback(cache, forward=None, max_pending=4)
    rollback.begin(mx.arange(4, dtype=mx.uint32))
    cache[0].update_and_fetch(keys[:, :, :4], keys[:, :, :4])
    cache[0] = cache[0].to_quantized(group_size=32, bits=8)
    rollback.keep(1, [0, 1, 2, 3])
    assert isinstance(cache[0], QuantizedKVCache) and cache[0].offset == 11


def test_num_drafts_leaves_room_for_the_targets_token():
    """A step emits its accepted drafts and one token of the target's, so
    after e of max_tokens tokens it drafts at most max_tokens - e - 1."""
    counts = [num_drafts(emitted, 3, 10) for emitted in (0, 6, 7, 8, 9, 10)]
    assert counts == [3, 3, 2, 1, 0, 0]
    assert num_drafts(10_000, 3, -1) == 3  # no limit
    assert num_drafts(0, 0, 10) == 0


@pytest.mark.parametrize("prompt", [[42], [5, 17]])
def test_short_prompts_and_one_token(prompt, loaded):
    model, head, _ = loaded("qwen3_next")
    prompt = mx.array(prompt, mx.uint32)
    expected = tokens(plain(model, prompt, n=10))
    assert tokens(speculate(model, MTPDrafter(model, head), prompt, n=10)) == expected
    assert (
        tokens(speculate(model, MTPDrafter(model, head), prompt, n=1)) == expected[:1]
    )


@pytest.mark.parametrize("p", [0.6, 0.8, 0.9])
def test_acceptance_controlled_drafter_is_unbiased(p):
    """Judged greedily against its own reference, the drafter's per-token
    acceptance converges to p (a benchmark run's 256 tokens can land a few
    points off: that is its seeded stream, which this does not hide)."""
    reference = list(range(20000))
    drafter = AcceptanceControlledDrafter(reference, p, 1 << 20, seed=4)
    stats = Stats()
    position = 0
    while position + 5 < len(reference):
        proposals = drafter.draft(None, 4, None)[0].tolist()
        accepted, _ = judge(mx.array(reference[position : position + 5]), proposals)
        stats.record_step(4, accepted, 5)
        drafter.accept(mx.array(reference[position : position + accepted + 1]), None)
        position += accepted + 1
    assert abs(stats.per_token_acceptance - p) < 0.015
