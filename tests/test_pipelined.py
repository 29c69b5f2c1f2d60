# Copyright © 2026 mtp_splitk contributors

"""The overlapped loop (mtp_splitk.speculative.pipelined) and its
device-offset KV cache, against mlx-lm's own plain greedy decoding."""

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mtp_splitk import patch, synthetic
from mtp_splitk.bench.drafters import AcceptanceControlledDrafter
from mtp_splitk.speculative import DraftModelDrafter, Stats, speculative_generate_step
from mtp_splitk.speculative.device_cache import DeviceKVCache
from mtp_splitk.speculative.pipelined import pipelined_generate_step

VOCAB = synthetic.TINY_VOCAB
PROMPT = mx.array([3, 14, 15, 92, 65, 35, 89, 79, 32, 38], mx.uint32)
KV_FAMILIES = ["llama", "qwen3", "qwen3_moe", "deepseek_v3", "mixtral", "mimo"]
HYBRID_FAMILIES = ["qwen3_next", "qwen3_5"]  # Gated DeltaNet layers (recurrent.py)
SYNC_FAMILIES = ["gpt_oss"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(family, float32=False):
        if (family, float32) not in cache:
            path = tmp_path_factory.mktemp(family) / "model"
            model, tokenizer = load(str(synthetic.write_model(path, family, "tiny")))
            if float32:
                model.set_dtype(mx.float32)
            cache[family, float32] = model, tokenizer
        return cache[family, float32]

    return get


def plain(model, n, prompt=PROMPT, **kwargs):
    return [t for t, _ in generate_step(prompt, model, max_tokens=n, **kwargs)]


def run(model, drafter, n, k, prompt=PROMPT, **kwargs):
    stats = kwargs.pop("stats", Stats())
    out = pipelined_generate_step(
        prompt, model, drafter, num_draft_tokens=k, max_tokens=n, stats=stats, **kwargs
    )
    return [t for t, _, _ in out], stats


def small_buckets(monkeypatch, rows=8):
    monkeypatch.setattr(DeviceKVCache, "step", rows)


# -- the cache ------------------------------------------------------------------------------


def test_device_cache_mask_is_mlx_lms_causal_mask_over_the_live_rows():
    kv = KVCache()
    keys = mx.random.normal((1, 2, 300, 8))
    kv.update_and_fetch(keys, keys)
    c = DeviceKVCache.from_cache(kv)
    c.reserve(300 + 5)
    assert c.capacity == 512
    mask = c.make_mask(5)
    assert mask.shape == (5, 512)
    ref = create_causal_mask(5, offset=300)
    assert mx.array_equal(mask[:, :305], ref) and not mask[:, 305:].any()
    got_k, _ = c.update_and_fetch(keys[:, :, :5], keys[:, :, :5])
    assert mx.array_equal(got_k[:, :, :300], keys) and mx.array_equal(got_k[:, :, 300:305], keys[:, :, :5])
    # The offset moves only when told, by a lazy amount.
    assert c.offset.item() == 300
    c.advance(mx.array(3))
    back = c.to_kv_cache(c.offset.item())
    assert back.offset == 303 and mx.array_equal(back.keys[:, :, 300:], keys[:, :, :3])


def test_an_additive_mask_is_the_bool_mask_as_mlx_converts_it():
    kv = KVCache()
    keys = mx.random.normal((1, 2, 300, 8)).astype(mx.bfloat16)
    kv.update_and_fetch(keys, keys)
    c = DeviceKVCache.from_cache(kv, 305)
    visible = c.make_mask(5)
    c.additive = True
    mask = c.make_mask(5)
    assert visible.dtype == mx.bool_ and mask.dtype == mx.bfloat16
    assert mx.array_equal(mask == 0, visible) and mx.all(mx.isinf(mask) == ~visible).item()
    q = mx.random.normal((1, 4, 5, 8)).astype(mx.bfloat16)
    k, v = c.update_and_fetch(keys[:, :, :5], keys[:, :, :5])
    attend = lambda m: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=m)
    assert mx.array_equal(attend(mask), attend(visible))


@pytest.mark.parametrize("family", KV_FAMILIES + HYBRID_FAMILIES)
def test_only_attention_that_reads_the_mask_as_a_bool_keeps_it(family, models):
    """DeepSeek-V3's MLA applies the mask with mx.where: an additive one would
    invert it there. Every other family hands it to mlx-lm's attention."""
    from mtp_splitk.speculative.device_cache import takes_additive_masks

    model, _ = models(family)
    assert takes_additive_masks(model) == (family != "deepseek_v3")


def test_device_cache_grows_without_losing_rows():
    c = DeviceKVCache()
    c.reserve(4)
    x = mx.random.normal((1, 1, 3, 4))
    c.update_and_fetch(x, x)
    assert c.capacity == DeviceKVCache.step
    c.reserve(DeviceKVCache.step + 1)
    assert c.capacity == 2 * DeviceKVCache.step and mx.array_equal(c.keys[:, :, :3], x)


# -- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("family", KV_FAMILIES)
def test_greedy_output_is_plain_greedy(family, patched, models):
    model, _ = models(family)  # bfloat16, DeepSeek-V3's MLA included (verify_rows.py)
    expected = plain(model, 40)
    with patch.enabled(patched):
        same, stats = run(model, DraftModelDrafter(model), 40, 4)
        steered, steered_stats = run(
            model, AcceptanceControlledDrafter(expected, 0.6, VOCAB), 40, 3
        )
    assert same == expected and steered == expected
    # The target as its own draft model is always right.
    assert stats.accepted == stats.drafted and stats.steps == 8
    assert 0 < steered_stats.accepted < steered_stats.drafted and steered_stats.overlapped


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrid_models_greedy_output_is_plain_greedy(family, patched, models):
    """Gated DeltaNet layers in the overlapped loop: every row's state kept,
    the accepted one chosen on the device; k from 1 to past what is left."""
    model, _ = models(family)
    expected = plain(model, 40)
    with patch.enabled(patched):
        for k, p in ((1, 0.8), (3, 0.6), (6, 0.9)):
            out, stats = run(model, AcceptanceControlledDrafter(expected, p, VOCAB), 40, k)
            assert out == expected, (k, p)
            assert stats.overlapped and 0 < stats.accepted < stats.drafted


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_a_hybrids_attention_buckets_grow_in_the_middle_of_a_run(family, models, monkeypatch):
    small_buckets(monkeypatch)
    model, _ = models(family)
    expected = plain(model, 60)
    out, stats = run(model, AcceptanceControlledDrafter(expected, 0.7, VOCAB), 60, 4)
    assert out == expected and stats.steps > 10


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_a_hybrid_cache_left_mid_step_continues_as_plain_decoding(family, models):
    """Stopped inside a step, the caller's cache (recurrent states included)
    holds the prompt and every token handed out but the last: plain decoding
    from it continues the plain greedy text."""
    model, _ = models(family)
    expected = plain(model, 30)
    for stop in (5, 6, 9):
        cache = make_prompt_cache(model)
        out = []
        drafter = AcceptanceControlledDrafter(expected, 0.7, VOCAB, seed=stop)
        for item in pipelined_generate_step(
            PROMPT, model, drafter, prompt_cache=cache, num_draft_tokens=3, max_tokens=30
        ):
            out.append(item[0])
            if len(out) == stop:
                break
        assert out == expected[:stop]
        rest = plain(model, 30 - stop, prompt=mx.array(out[-1:], mx.uint32), prompt_cache=cache)
        assert out + rest == expected, stop


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_a_hybrid_one_token_prompt_and_a_reused_cache(family, models):
    """No prefill (empty recurrent states at the first verify pass), and a
    second call continuing from the cache the first one left."""
    model, _ = models(family)
    one = mx.array([42], mx.uint32)
    expected = plain(model, 20, prompt=one)
    out, _ = run(model, AcceptanceControlledDrafter(expected, 0.7, VOCAB), 20, 3, prompt=one)
    assert out == expected
    expected = plain(model, 30)
    cache = make_prompt_cache(model)
    first, _ = run(model, AcceptanceControlledDrafter(expected, 0.7, VOCAB), 12, 3, prompt_cache=cache)
    second, _ = run(model, AcceptanceControlledDrafter(expected[12:], 0.7, VOCAB), 18, 3,
                    prompt=mx.array(first[-1:], mx.uint32), prompt_cache=cache)
    assert first + second == expected


@pytest.mark.parametrize("family", SYNC_FAMILIES)
def test_caches_it_cannot_take_keep_the_synchronous_loop(family, models):
    model, _ = models(family)
    expected = plain(model, 20)
    stats = Stats()
    drafter = AcceptanceControlledDrafter(expected, 0.6, VOCAB)
    out = speculative_generate_step(PROMPT, model, drafter, num_draft_tokens=3, max_tokens=20, stats=stats)
    assert [t for t, _, _ in out] == expected
    assert not stats.overlapped and "caches" in stats.overlap_off
    with pytest.raises(ValueError, match="cannot run"):
        run(model, drafter, 20, 3)


def test_a_draft_model_that_differs_rolls_back_exactly(tmp_path):
    target_path, draft_path = synthetic.write_pair(tmp_path / "pair")
    model, _ = load(str(target_path))
    draft, _ = load(str(draft_path))
    expected = plain(model, 60)
    out, stats = run(model, DraftModelDrafter(draft), 60, 3)
    assert out == expected and stats.overlapped


def test_bfloat16_standard_attention_is_exact(models):
    """One-row (decode) and several-row (verify) attention agree here: the
    verify rows reproduce plain decoding in bfloat16."""
    model, _ = models("llama")
    assert model.model.layers[0].self_attn.q_proj.scales.dtype == mx.bfloat16
    expected = plain(model, 64)
    drafter = AcceptanceControlledDrafter(expected, 0.8, VOCAB, seed=3)
    out, stats = run(model, drafter, 64, 5)
    assert out == expected and stats.accepted > 0


# -- where a generation ends ------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7])
def test_stops_at_exactly_max_tokens_even_with_k_larger_than_what_is_left(n, models):
    model, _ = models("qwen3")
    out, _ = run(model, DraftModelDrafter(model), n, 5)
    assert out == plain(model, n)


def test_a_cache_left_mid_step_holds_everything_but_the_last_token(models):
    """A consumer that stops inside a step (at EOS, say) leaves the caller's
    cache at the prompt plus every token handed out but the last, as plain
    KVCaches, though the next step was already on the device."""
    model, _ = models("llama", float32=True)
    expected = list(generate_step(PROMPT, model, max_tokens=30))
    cache = make_prompt_cache(model)
    out = []
    for item in pipelined_generate_step(
        PROMPT, model, DraftModelDrafter(model), prompt_cache=cache, num_draft_tokens=4, max_tokens=30
    ):
        out.append(item[0])
        if len(out) == 7:  # the 2nd accepted draft of the 2nd step
            break
    assert out == [t for t, _ in expected[:7]]
    assert all(type(c) is KVCache and c.offset == PROMPT.size + 6 for c in cache)
    logits = model(mx.array([[out[-1]]]), cache=cache)[0, -1]
    assert mx.allclose(logits - mx.logsumexp(logits), expected[7][1], atol=1e-4)


def test_a_prompt_cache_is_reused_across_calls(models):
    model, _ = models("qwen3")
    expected = plain(model, 30)
    cache = make_prompt_cache(model)
    first, _ = run(model, DraftModelDrafter(model), 12, 3, prompt_cache=cache)
    # Continue from the cache: the last emitted token is the next prompt.
    second, _ = run(model, DraftModelDrafter(model), 18, 3, prompt=mx.array(first[-1:], mx.uint32), prompt_cache=cache)
    assert first == expected[:12] and second == expected[12:30]


@pytest.mark.parametrize("k", [2, 5])
def test_buckets_grow_in_the_middle_of_a_run(k, models, monkeypatch, tmp_path):
    """Small buckets, so that the target's and the draft model's caches grow
    many times while steps are in flight (MLX's dynamic slicing does not
    clamp: a write past the buffer would corrupt memory, not raise)."""
    small_buckets(monkeypatch)
    model, _ = models("mixtral")
    expected = plain(model, 80)
    out, stats = run(model, AcceptanceControlledDrafter(expected, 0.7, VOCAB), 80, k)
    assert out == expected and stats.steps > 10
    target_path, draft_path = synthetic.write_pair(tmp_path / "pair")
    target, _ = load(str(target_path))
    draft, _ = load(str(draft_path))
    expected = plain(target, 80)
    out, stats = run(target, DraftModelDrafter(draft), 80, k)
    assert out == expected and stats.steps > 10


def test_a_reused_prompt_cache_is_reserved_for_from_its_own_length(models, monkeypatch):
    """The second call's rows go after the first call's: room is made from
    the cache's length, not the new prompt's (MLX's dynamic slice writes do
    not clamp, so too little room would corrupt memory, not raise)."""
    small_buckets(monkeypatch)
    written = []
    update = DeviceKVCache.update_and_fetch

    def checked(self, keys, values):  # reads the offset: a sync, in a test only
        written.append(self.offset.item() + keys.shape[2] <= self.capacity)
        return update(self, keys, values)

    monkeypatch.setattr(DeviceKVCache, "update_and_fetch", checked)
    model, _ = models("llama")
    expected = plain(model, 60)
    cache = make_prompt_cache(model)
    first, _ = run(model, AcceptanceControlledDrafter(expected, 0.7, VOCAB), 30, 4, prompt_cache=cache)
    second, _ = run(model, AcceptanceControlledDrafter(expected[30:], 0.7, VOCAB), 30, 4,
                    prompt=mx.array(first[-1:], mx.uint32), prompt_cache=cache)
    assert first + second == expected and written and all(written)


def test_a_one_token_prompt(models):
    model, _ = models("qwen3_moe")
    prompt = mx.array([42], mx.uint32)
    out, _ = run(model, DraftModelDrafter(model), 12, 3, prompt=prompt)
    assert out == plain(model, 12, prompt=prompt)


# -- no host sync per step ----------------------------------------------------------------


def test_the_next_step_is_queued_before_a_step_is_read(models):
    """When a step's first token reaches the consumer, the drafter has
    already proposed for the step after it: that step was built and queued
    from lazy arrays, before the host read this step's verdict."""
    model, _ = models("llama")
    expected = plain(model, 24)
    proposals = []

    class Counting(AcceptanceControlledDrafter):
        def propose(self, verdict, k, distribution):
            proposals.append(1)
            return super().propose(verdict, k, distribution)

    seen = []
    for token, _, from_draft in pipelined_generate_step(
        PROMPT, model, Counting(expected, 0.5, VOCAB), num_draft_tokens=2, max_tokens=24
    ):
        if not from_draft:
            seen.append(len(proposals))  # proposals made when this step ended
    # Step n (counted from 1) is read after step n+1's proposal: n + 1 of them
    # by its last token (the final step builds none past max_tokens).
    assert seen[:-1] == [n + 1 for n in range(1, len(seen))]


# -- verify rows on the decode rows' path ------------------------------------------------


def test_deepseek_v3_verify_rows_take_the_one_row_path_only_within_a_generation(models):
    import ast
    import inspect
    import textwrap

    from mlx_lm.models import deepseek_v3

    from mtp_splitk.speculative import verify_rows

    original = ast.parse(textwrap.dedent(inspect.getsource(deepseek_v3.DeepseekV3Attention.__call__)))
    ours = ast.parse(textwrap.dedent(inspect.getsource(verify_rows._deepseek_v3_attention_call)))

    class OneRow(ast.NodeTransformer):  # `L == 1` -> `L <= ABSORBED_ROWS`
        def visit_Compare(self, node):
            if ast.unparse(node) == "L == 1":
                return ast.parse("L <= ABSORBED_ROWS", mode="eval").body
            return node

    def body(tree):
        return [ast.dump(n) for n in tree.body[0].body]

    assert body(OneRow().visit(original)) == body(ours)
    model, _ = models("deepseek_v3")
    attention = type(model.model.layers[0].self_attn)
    steps = pipelined_generate_step(PROMPT, model, DraftModelDrafter(model), num_draft_tokens=3, max_tokens=8)
    next(steps)
    assert type(model.model.layers[0].self_attn) is verify_rows._AbsorbedDeepseekV3Attention
    steps.close()
    assert type(model.model.layers[0].self_attn) is attention is deepseek_v3.DeepseekV3Attention


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_the_swapped_gated_deltanet_call_is_mlx_lms(family, models):
    """The swapped layer's call (recurrent.py's copy of mlx-lm's) computes
    mlx-lm's outputs, and, committed at every row count, mlx-lm's states after
    that many rows: a change to mlx-lm's method that the copy misses fails here."""
    from mlx_lm.models.cache import ArraysCache

    from mtp_splitk.speculative import recurrent

    model, _ = models(family)
    layer = next(l for l in model.layers if l.is_linear)
    gdn = layer.linear_attn
    dim = layer.input_layernorm.weight.shape[0]
    prefix = (mx.random.normal((1, 3, dim)) * 0.5).astype(mx.bfloat16)
    rows = (mx.random.normal((1, 5, dim)) * 0.5).astype(mx.bfloat16)
    start = ArraysCache(2)
    gdn(prefix, None, start)
    for kept in range(1, 6):
        theirs = ArraysCache(2)
        theirs.cache = list(start.cache)
        reference = gdn(rows[:, :kept], None, theirs)  # mlx-lm's call on the kept rows
        ours = recurrent.DeviceArraysCache(start, 3)
        undo = recurrent.swap_layers(model)
        try:
            out = gdn(rows, None, ours)
        finally:
            undo()
        ours.commit(mx.array(kept, mx.int32))
        assert mx.array_equal(out[:, :kept], reference).item(), kept
        for a, b in zip(ours.cache, theirs.cache):
            assert mx.array_equal(a, b).item(), kept


# -- one-row passes on CUDA (one_row.py) --------------------------------------------------


def test_compiled_draft_passes_as_two_rows_are_plain_greedy(models, monkeypatch):
    """The draft model's one-row passes taken as two rows (FORCE: CUDA's path on
    the CPU) inside the compiled proposals (compile_step)."""
    from mtp_splitk.speculative import one_row

    monkeypatch.setattr(one_row, "FORCE", True)
    model, _ = models("qwen3")
    out, stats = run(model, DraftModelDrafter(model), 30, 3, compile_step=True)
    assert out == plain(model, 30) and stats.compiled_steps >= stats.steps - 1


def test_a_one_row_pass_over_the_device_cache_goes_as_two_rows(monkeypatch):
    """Where it applies (CUDA; FORCE here), a one-row call over a DeviceKVCache with a
    mask reaches MLX's attention as that row twice with the mask's row twice, and
    returns the first: the one-row result; other calls reach it as they are."""
    from mtp_splitk.speculative import one_row

    cache = DeviceKVCache()
    cache.additive = True
    keys = mx.random.normal((1, 2, 5, 8)).astype(mx.bfloat16)
    cache.update_and_fetch(keys, keys)
    cache.advance(5)
    k, v = cache.update_and_fetch(keys[:, :, :1], keys[:, :, :1])
    mask = cache.make_mask(1)
    q = mx.random.normal((1, 4, 1, 8)).astype(mx.bfloat16)
    expected = one_row._original(q, k, v, cache=cache, scale=0.3, mask=mask)
    rows = []

    def spy(queries, keys, values, cache, scale, mask, sinks=None):
        rows.append((queries.shape[2], None if mask is None else mask.shape[-2]))
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks)

    monkeypatch.setattr(one_row, "_original", spy)
    monkeypatch.setattr(one_row, "FORCE", True)
    out = one_row.scaled_dot_product_attention(q, k, v, cache, 0.3, mask)
    assert rows == [(2, 2)] and out.shape == expected.shape
    assert mx.allclose(out.astype(mx.float32), expected.astype(mx.float32), atol=1e-2).item()
    one_row.scaled_dot_product_attention(mx.concatenate([q, q], axis=2), k, v, cache, 0.3, mask)
    one_row.scaled_dot_product_attention(q, k, v, KVCache(), 0.3, None)
    assert rows[1:] == [(2, 1), (1, None)]  # several rows, or another cache: unchanged
    monkeypatch.setattr(one_row, "FORCE", False)
    one_row.scaled_dot_product_attention(q, k, v, cache, 0.3, mask)
    assert rows[3:] == [(1, 1)]  # the CPU: mlx-lm's call


def test_a_draft_model_through_the_two_row_path_is_plain_greedy(tmp_path, monkeypatch):
    """The draft model's one-row passes take the two-row path (FORCE); the output is
    plain greedy, and the model modules get mlx-lm's attention back on uninstall."""
    from mlx_lm.models import base, llama

    from mtp_splitk.speculative import one_row

    target_path, draft_path = synthetic.write_pair(tmp_path / "pair")
    model, _ = load(str(target_path))
    draft, _ = load(str(draft_path))
    expected = plain(model, 40)
    baseline, base_stats = run(model, DraftModelDrafter(draft), 40, 3)
    calls = []
    original = one_row._original

    def counting(queries, *args, **kwargs):
        calls.append(queries.shape[2])
        return original(queries, *args, **kwargs)

    monkeypatch.setattr(one_row, "_original", counting)
    monkeypatch.setattr(one_row, "FORCE", True)
    out, stats = run(model, DraftModelDrafter(draft), 40, 3)
    assert out == expected == baseline and stats.overlapped
    assert llama.scaled_dot_product_attention is one_row.scaled_dot_product_attention
    assert calls.count(2) >= 3 * stats.steps  # every draft pass of every layer, as two rows
    monkeypatch.setattr(one_row, "_original", original)
    one_row.uninstall()
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention is original


def test_the_host_split_puts_each_delay_where_it_was_spent(models, monkeypatch):
    """Stats' build / submit / wait: a drafter slow in Python shows in build,
    a slow mx.async_eval in submit, and neither in the other; the three
    together fit within the generation's wall time."""
    import time

    model, _ = models("llama")
    drafter = DraftModelDrafter(model)
    propose, async_eval = drafter.propose, mx.async_eval

    def slow_propose(*args, **kwargs):
        time.sleep(0.01)
        return propose(*args, **kwargs)

    def slow_async_eval(*args):
        time.sleep(0.05)
        return async_eval(*args)

    monkeypatch.setattr(drafter, "propose", slow_propose)
    monkeypatch.setattr(mx, "async_eval", slow_async_eval)
    out, stats = run(model, drafter, 12, 2)
    assert out == plain(model, 12)
    built = stats.steps - 1  # the last step read builds no step after it
    assert stats.build_time >= 0.01 * built and stats.submit_time >= 0.05 * built
    assert stats.build_time < 0.04 * built  # the submits' 0.05 s are not in it
    assert stats.build_time + stats.submit_time + stats.wait_time <= stats.generation_time
    assert "submit" in stats.summary()


# -- the target's part of a step through mx.compile ------------------------------------------


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("family", KV_FAMILIES)
def test_compiled_steps_are_plain_greedy_across_bucket_growth(family, patched, models, monkeypatch):
    small_buckets(monkeypatch)  # 8-row buckets: traced again as the caches grow
    model, _ = models(family)
    with patch.enabled(patched):
        out, stats = run(model, DraftModelDrafter(model), 24, 3, compile_step=True)
        assert out == plain(model, 24)
    assert stats.overlapped and stats.steps > 1 and stats.compiled_steps >= stats.steps - 1


def test_the_step_is_compiled_by_default_when_the_patch_is_on(models):
    """compile_step=None: a dense model's step compiled patched (where it measured faster),
    not unpatched."""
    model, _ = models("llama")
    for patched in (False, True):
        with patch.enabled(patched):
            out, stats = run(model, DraftModelDrafter(model), 12, 2)
        assert out == plain(model, 12)
        assert (stats.compiled_steps > 0) == patched


def test_a_compiled_step_is_replayed_not_rebuilt(models, monkeypatch):
    """The target's forward of k+1 rows and the draft model's passes run in
    Python once a cache capacity (the traces), not once a step."""
    model, _ = models("llama")
    expected = plain(model, 40)
    inner = type(model.model).__call__
    rows = []

    def counted(self, inputs, *args, **kwargs):
        rows.append(inputs.shape[-1])
        return inner(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model.model), "__call__", counted)
    runs = {}
    for compile_step in (False, True):
        rows.clear()
        out, stats = run(model, DraftModelDrafter(model), 40, 2, compile_step=compile_step)
        assert out == expected
        runs[compile_step] = stats.steps, rows.count(3), rows.count(1) + rows.count(2)
    (steps, target, draft), (_, target_compiled, draft_compiled) = runs[False], runs[True]
    assert target == steps and target_compiled == 1  # one 256-row bucket: one trace
    assert draft >= 2 * steps and draft_compiled <= 2 + 4  # start()'s passes, then one trace


def test_compiled_sampling_draws_what_the_uncompiled_loop_draws(models):
    """Speculative sampling inside the compiled step takes MLX's global random
    state in and out: a seeded run gives the uncompiled run's tokens."""
    from mtp_splitk.speculative import make_distribution

    model, _ = models("qwen3")
    runs = []
    for compile_step in (False, True):
        mx.random.seed(7)
        out, stats = run(model, DraftModelDrafter(model), 24, 3, distribution=make_distribution(1.0),
                         compile_step=compile_step)
        runs.append(out)
    assert runs[0] == runs[1] and len(runs[0]) == 24
    mx.random.seed(8)
    assert run(model, DraftModelDrafter(model), 24, 3, distribution=make_distribution(1.0),
               compile_step=True)[0] != runs[0]  # the seed matters: the draws are not frozen in the trace


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrids_compiled_steps_are_plain_greedy_and_replayed(family, patched, models, monkeypatch):
    """Under compile_step a hybrid's step goes through mx.compile with its Gated
    DeltaNet candidates passed in and out: plain greedy tokens at every acceptance,
    across 8-row buckets, the layers traced a few times (their candidates filling
    two passes, the buckets growing), not once a step; compiled by default."""
    from mlx_lm.models import qwen3_5, qwen3_next

    from mtp_splitk.speculative import recurrent

    small_buckets(monkeypatch)
    model, _ = models(family)
    expected = plain(model, 40)
    layer = {"qwen3_next": qwen3_next.Qwen3NextGatedDeltaNet, "qwen3_5": qwen3_5.GatedDeltaNet}[family]
    swapped = recurrent._SWAPS[layer]
    calls = []
    monkeypatch.setattr(swapped, "__call__", lambda self, *a, **k: (calls.append(1), recurrent._verify_call(self, *a, **k))[1])
    with patch.enabled(patched):
        for p in (0.0, 0.8, 1.0):
            calls.clear()
            out, stats = run(model, AcceptanceControlledDrafter(expected, p, VOCAB), 40, 3, compile_step=True)
            assert out == expected and stats.overlapped and stats.compiled_steps >= stats.steps - 1, p
            layers = sum(hasattr(m, "A_log") for _, m in model.named_modules())
            assert len(calls) <= 8 * layers < stats.steps * layers, (p, len(calls))
        for compile_step, compiled in ((None, True), (False, False)):  # the default compiles, patched or not
            out, stats = run(model, AcceptanceControlledDrafter(expected, 0.8, VOCAB), 16, 3, compile_step=compile_step)
            assert out == expected[:16] and (stats.compiled_steps > 0) == compiled


# -- plain decoding at k = 0 (speculative.decode) -------------------------------------------


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("family", KV_FAMILIES + HYBRID_FAMILIES + SYNC_FAMILIES)
def test_plain_decode_at_k0_is_mlx_lms_plain_decode(family, patched, models, monkeypatch):
    """The plugin's plain decode yields generate_step's (token, logprobs), compiled
    where the overlapped loop takes the model (across 8-row buckets, hybrids too), else through
    generate_step itself (gpt-oss's rotating caches)."""
    from mtp_splitk.speculative.decode import decode_generate_step

    small_buckets(monkeypatch)
    model, _ = models(family)
    expected = list(generate_step(PROMPT, model, max_tokens=24))
    stats = Stats()
    with patch.enabled(patched):
        out = list(decode_generate_step(PROMPT, model, max_tokens=24, stats=stats))
    assert [t for t, _ in out] == [t for t, _ in expected]
    assert all(isinstance(t, int) and lp.shape == (VOCAB,) for t, lp in out)
    assert mx.allclose(out[5][1], expected[5][1], atol=1e-4).item()
    assert stats.overlapped == (family not in SYNC_FAMILIES)
    assert (stats.compiled_steps >= stats.steps - 1 > 0) == (family not in SYNC_FAMILIES)


def test_plain_decode_hands_what_the_loop_cannot_take_to_generate_step(models):
    from mlx_lm.sample_utils import make_logits_processors

    from mtp_splitk.speculative.decode import decode_generate_step, fallback_reason

    model, _ = models("llama")
    cache = make_prompt_cache(model)
    assert fallback_reason(model, cache, {"kv_group_size": 64, "logits_processors": []}) is None
    assert fallback_reason(model, cache, {"kv_bits": 4}) == "kv_bits set"
    assert fallback_reason(model, cache, {"max_kv_size": 16}) == "max_kv_size set"
    processors = make_logits_processors(repetition_penalty=1.3)
    for options in ({"logits_processors": processors}, {"max_kv_size": 12}):
        stats = Stats()
        out = [t for t, _ in decode_generate_step(PROMPT, model, max_tokens=16, stats=stats, **options)]
        assert out == plain(model, 16, **options) and not stats.overlapped, options


def test_plain_decode_reuses_a_prompt_cache_and_stops_at_max_tokens(models):
    from mtp_splitk.speculative.decode import decode_generate_step

    model, _ = models("qwen3")
    expected = plain(model, 20)
    cache = make_prompt_cache(model)
    first = [t for t, _ in decode_generate_step(PROMPT, model, max_tokens=7, prompt_cache=cache)]
    assert first == expected[:7] and cache[0].offset == PROMPT.size + 6  # the last token not yet fed
    rest = [t for t, _ in decode_generate_step(mx.array(first[-1:], mx.uint32), model, max_tokens=13,
                                               prompt_cache=cache)]
    assert first + rest == expected
