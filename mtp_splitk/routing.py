# Copyright © 2026 mtp_splitk contributors

"""The methods ``patch.enable()`` installs: a router around each copy.

A layer's first call with a given input runs the copy (through
``mtp_splitk.ops``) and remembers on the layer what the ops did with it.
Later calls of that input that MLX takes go straight to the original method
(MLX's own code: the same computation, without the ops' host cost); those
the kernel takes go straight to the kernel op where the router has a
``direct`` builder (QuantizedLinear's), else run the copy. The routes are
forgotten when the planner's inputs change (its device, the split policy,
``ops.clear_cache()``), and inside ``ops.recording()`` every call runs the
copy.
"""

import functools

from . import ops, plan as planner

_ROUTES = "_mtp_splitk_routes"  # on a layer: (device, split, ops.generation, {input: MLX took it})
# An input is its shapes and x's item size, not its dtype (hashing and comparing
# mx.Dtype objects costs more than the rest of a route): the planner treats
# bfloat16 and float16 alike, and no other valid dtype shares their sizes.
_MAX_ROUTES = 64  # inputs remembered per layer (prefill lengths vary)


def routes(layer, attribute: str, limit: int) -> dict:
    """The decisions remembered on ``layer`` under ``attribute``: a dict,
    emptied when the planner's inputs change (device, split policy,
    ``ops.clear_cache()``) or when it holds ``limit`` entries."""
    device, split, generation = planner.current_device(), planner.forced_split(), ops.generation
    state = layer.__dict__.get(attribute)
    if (
        state is None
        or state[0] is not device
        or state[1] != split
        or state[2] != generation
        or len(state[3]) >= limit
    ):
        state = (device, split, generation, {})
        # Not Module.__setattr__, which would file a tuple among the parameters.
        object.__setattr__(layer, attribute, state)
    return state[3]


def _first_call(layer, key, copy, *args, direct=None):
    """Run the copy through the ops and remember what took the call: True
    (MLX's op), a direct call of the kernel op (``direct(layer, call, *args)``),
    or False (the copy)."""
    if ops._recording is not None:  # a recorded call goes through the ops, every time
        return copy(layer, *args)
    remembered = routes(layer, _ROUTES, _MAX_ROUTES)
    with ops.recording() as calls:
        out = copy(layer, *args)
    if len(calls) == 1:  # another thread's calls in the block leave it unknown
        call = calls[0]
        fast = direct(layer, call, *args) if direct is not None and call.kernel is not None else None
        remembered[key] = call.plan is None or fast or False
    return out


def router(original, copy, direct=None):
    """The installed method for ``copy(self, x)``: the original method for the
    inputs MLX's op took before (the same computation, minus the ops' host
    cost), the direct kernel call ``direct`` built for those the kernel took
    (:func:`_first_call`), else the copy. Only the planner's inputs are
    checked: a stale route costs speed, never a result, since the original
    is MLX's own code and a direct call checks what its kernel op was built
    for."""

    @functools.wraps(copy)
    def routed(self, x):
        try:
            device, split, generation, routes = self._mtp_splitk_routes
        except AttributeError:
            return _first_call(self, (x.shape, x.itemsize), copy, x, direct=direct)
        if (
            ops._recording is None
            and device is planner.current_device()
            and split == planner.forced_split()
            and generation == ops.generation
        ):
            route = routes.get((x.shape, x.itemsize))
            if route is True:
                return original(self, x)
            if route is False:
                return copy(self, x)
            if route is not None:
                return route(self, x)
        return _first_call(self, (x.shape, x.itemsize), copy, x, direct=direct)

    routed.original = original
    return routed


def switch_router(original, copy):
    """:func:`router` for QuantizedSwitchLinear's ``(self, x, indices, sorted_indices)``."""

    @functools.wraps(copy)
    def routed(self, x, indices, sorted_indices=False):
        key = (x.shape, x.itemsize, indices.shape)
        try:
            device, split, generation, routes = self._mtp_splitk_routes
        except AttributeError:
            return _first_call(self, key, copy, x, indices, sorted_indices)
        if (
            ops._recording is None
            and device is planner.current_device()
            and split == planner.forced_split()
            and generation == ops.generation
        ):
            mlx = routes.get(key)
            if mlx:
                return original(self, x, indices, sorted_indices)
            if mlx is not None:
                return copy(self, x, indices, sorted_indices)
        return _first_call(self, key, copy, x, indices, sorted_indices)

    routed.original = original
    return routed


def multi_router(original, copy):
    """:func:`router` for QuantizedMultiLinear's ``(self, x, transpose)``."""

    @functools.wraps(copy)
    def routed(self, x, transpose=True):
        key = (x.shape, x.itemsize, transpose)
        try:
            device, split, generation, routes = self._mtp_splitk_routes
        except AttributeError:
            return _first_call(self, key, copy, x, transpose)
        if (
            ops._recording is None
            and device is planner.current_device()
            and split == planner.forced_split()
            and generation == ops.generation
        ):
            mlx = routes.get(key)
            if mlx:
                return original(self, x, transpose)
            if mlx is not None:
                return copy(self, x, transpose)
        return _first_call(self, key, copy, x, transpose)

    routed.original = original
    return routed
