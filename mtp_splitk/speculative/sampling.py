# Copyright © 2026 mtp_splitk contributors

"""Acceptance rules: which drafts a verify pass keeps, and the token after them.

- ``distribution=None`` (the loop's default): mlx-lm's rule. The target picks
  a token per row with ``sampler`` (greedy by default) and drafts are
  accepted while they equal the target's picks. With greedy sampling the
  output is token-identical to plain greedy decoding. With a random sampler
  every emitted token is still a sample from the target (the draft only
  decides how many rows are usable), at the acceptance rate ``p(d)``.
- ``distribution=make_distribution(temp, ...)``: standard speculative
  sampling (Leviathan et al. 2023, Chen et al. 2023): drafts are sampled from
  the drafter's distribution ``q``, accepted with probability
  ``min(1, p(d) / q(d))``; the first rejected row is resampled from
  ``norm(max(p - q, 0))``; after a full acceptance the bonus token comes
  from ``p``. The output is distributed exactly as sampling from ``p``, with
  a higher acceptance rate than mlx-lm's rule.

Either rule gives a *verdict* on the device (:func:`speculative_accept`, or
the sampler's picks); :func:`judge` reads it on the host.
"""

from typing import Callable, Sequence, Tuple, Union

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

#: ``logprobs -> logprobs``: the distribution drafts are sampled from and
#: accepted against (see :func:`make_distribution`).
Distribution = Callable[[mx.array], mx.array]


def make_distribution(
    temp: float,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
) -> Distribution:
    """``logprobs -> logprobs`` of the distribution that
    ``mlx_lm.sample_utils.make_sampler`` with the same arguments samples from
    (same filters, same order, then the temperature). XTC is left out: it
    randomises the distribution itself, so it has no ``p`` to accept against.
    """
    if temp <= 0:
        raise ValueError(
            "Speculative sampling needs temp > 0; use the default greedy rule "
            "(distribution=None) for temp 0."
        )

    def distribution(logprobs: mx.array) -> mx.array:
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p != 0.0:
            logprobs = apply_min_p(logprobs, min_p, min_tokens_to_keep)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        logits = logprobs * (1 / temp)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    return distribution


def speculative_accept(
    p_logprobs: mx.array, q_logprobs: mx.array, drafts: mx.array
) -> Tuple[mx.array, mx.array]:
    """Standard speculative sampling for one step, on the device.

    Args:
        p_logprobs: (n+1, V) target distribution per row.
        q_logprobs: (n, V) distribution each draft was sampled from.
        drafts: (n,) draft tokens.

    Returns:
        (number of accepted drafts, next token) as scalar arrays; the next
        token is the resampled correction or, if all were accepted, the bonus.
    """
    n = drafts.size
    if n == 0:
        return mx.array(0), mx.random.categorical(p_logprobs[0])
    p = mx.exp(p_logprobs)
    q = mx.exp(q_logprobs)
    rows = mx.arange(n)
    p_d, q_d = p[rows, drafts], q[rows, drafts]
    # Accept with probability min(1, p/q), without dividing.
    accepted = mx.random.uniform(shape=(n,)) * q_d <= p_d
    num_accepted = mx.cumprod(accepted.astype(mx.int32)).sum()
    residual = mx.maximum(p[:n] - q, 0)
    total = residual.sum(axis=-1, keepdims=True)
    # p <= q everywhere means p == q: nothing left over, sample from p.
    residual = mx.where(total > 0, residual / mx.maximum(total, 1e-30), p[:n])
    choices = mx.concatenate([residual, p[n:]], axis=0)
    samples = mx.random.categorical(mx.log(choices))
    return num_accepted, samples[num_accepted]


def judge(
    verdict: Union[mx.array, Tuple[mx.array, mx.array]], drafts: Sequence[int]
) -> Tuple[int, int]:
    """A verify pass's outcome on the host: (accepted drafts, the target's token).

    Args:
        verdict: under mlx-lm's rule, the target's pick for each of the
          ``n+1`` rows, an (n+1,) array: drafts are accepted while they equal
          the picks, and the token is the pick of the row after the last
          accepted draft (a correction, or the bonus token). Under speculative
          sampling, the pair :func:`speculative_accept` returns.
        drafts: the ``n`` draft tokens that were verified.

    For example picks ``[5, 7, 9]`` against drafts ``[5, 7]`` give ``(2, 9)``;
    picks ``[5, 8, 9]`` give ``(1, 8)``.
    """
    if isinstance(verdict, tuple):
        num_accepted, token = verdict
        return num_accepted.item(), token.item()
    targets = verdict.tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return accepted, targets[accepted]
