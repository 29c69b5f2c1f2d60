# Copyright © 2026 mtp_splitk contributors

"""Gated DeltaNet's recurrence (Qwen3-Next, Qwen3.5): a pass's rows in one launch.

On CUDA mlx-lm runs ``gated_delta_update`` as a Python loop of compiled ops and
reductions per row (its recurrence kernel is Metal's only), and the overlapped
loop's verify pass runs it once per row to keep every row's state. With the
patch on, where the planner takes the shape (``plan.plan_gated_delta``),
:func:`rows` runs all of a pass's rows in one launch of kernels/gated_delta.cu
and returns every row's state, and :func:`enable` sends mlx-lm's own
``gated_delta_update`` of qwen3_next and qwen3_5 to the same kernel, so that a
decode step's row and a verify pass's row are the same arithmetic (the kernel
computes T rows in one launch exactly as T launches of one row). Elsewhere, and
for masked, bounded or negative-eigenvalue variants, and with
``MTP_SPLITK_GATED_DELTA=0``: mlx-lm's function.
"""

import mlx.core as mx
from mlx_lm.models import qwen3_5, qwen3_next
from mlx_lm.models.gated_delta import compute_g, gated_delta_update

from . import launch
from . import plan as planner

_MODULES = (qwen3_next, qwen3_5)  # the models that call gated_delta_update by this name
_enabled = False


def _planned(q, v, mask, use_kernel: bool, lower_bound=None, allow_neg_eigval=False) -> bool:
    if not (_enabled and use_kernel) or mask is not None or lower_bound is not None or allow_neg_eigval:
        return False
    _, _, Hk, dk = q.shape
    return planner.plan_gated_delta(Hk, v.shape[-2], dk, q.dtype, planner.current_device())


def _launch(q, k, v, a, b, A_log, dt_bias, state, all_states: bool):
    """gated_delta_update's gate and beta, then the kernel: (y, states)."""
    beta = mx.sigmoid(b)
    g = compute_g(A_log, a, dt_bias).astype(mx.float32)  # float32 already: no op
    if state is None:
        B, _, _, dk = q.shape
        state = mx.zeros((B, *v.shape[-2:], dk), dtype=mx.float32)
    return launch.gated_delta(q, k, v, g, beta, state.astype(mx.float32), all_states)


def update(q, k, v, a, b, A_log, dt_bias, state=None, mask=None, *, use_kernel=True, lower_bound=None,
           allow_neg_eigval=False):
    """mlx-lm's ``gated_delta_update``, the kernel where it is planned: (y, final state)."""
    if _planned(q, v, mask, use_kernel, lower_bound, allow_neg_eigval):
        y, states = _launch(q, k, v, a, b, A_log, dt_bias, state, all_states=False)
        return y, states[0]
    return gated_delta_update(q, k, v, a, b, A_log, dt_bias, state, mask, use_kernel=use_kernel,
                              lower_bound=lower_bound, allow_neg_eigval=allow_neg_eigval)


def rows(q, k, v, a, b, A_log, dt_bias, state, use_kernel: bool = True):
    """A pass's S rows with the state after each kept: (y [B, S, Hv, Dv], states
    [S, B, Hv, Dv, Dk]). The kernel where it is planned, else mlx-lm's
    ``gated_delta_update`` one row at a time (a decode step's own arithmetic)."""
    if _planned(q, v, None, use_kernel):
        return _launch(q, k, v, a, b, A_log, dt_bias, state, all_states=True)
    outs, states = [], []
    for t in range(q.shape[1]):
        row = slice(t, t + 1)
        out, state = gated_delta_update(q[:, row], k[:, row], v[:, row], a[:, row], b[:, row],
                                        A_log, dt_bias, state, None, use_kernel=use_kernel)
        outs.append(out)
        states.append(state)
    return mx.concatenate(outs, axis=1), mx.stack(states)


_originals = {}  # module -> the gated_delta_update enable() replaced


def enable() -> None:
    """Route qwen3_next's and qwen3_5's ``gated_delta_update`` through :func:`update`
    (patch.enable() calls this, under its lock). Calling it again changes nothing."""
    global _enabled
    for module in _MODULES:
        if module not in _originals:
            _originals[module] = module.gated_delta_update
            module.gated_delta_update = update
    _enabled = True


def disable() -> None:
    """Put back the functions :func:`enable` replaced (the same objects)."""
    global _enabled
    for module, original in _originals.items():
        module.gated_delta_update = original
    _originals.clear()
    _enabled = False
