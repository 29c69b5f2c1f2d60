# Copyright © 2026 mtp_splitk contributors

"""``MTP_SPLITK=1``: run the stock mlx-lm (``mlx_lm.generate``, ``python -m
mlx_lm generate``, the server, scripts) with the patch enabled.

Installing the package puts ``mtp_splitk_autoload.pth`` into site-packages
(see ``_autoload_build``). Python runs its one line at every start-up; the
line reads the environment variable and only when it is ``1`` runs this file
and calls :func:`install`. Without the variable nothing of mtp_splitk runs,
so other programs pay nothing.

A ``.pth`` line runs while ``site`` is still adding directories to sys.path:
mlx may not be importable yet (a venv with system site-packages adds those
after its own). So the ``.pth`` runs this file by path, not as a submodule
(that would import ``mtp_splitk/__init__`` and with it mlx), and this file
imports nothing but the standard library. :func:`install` waits for the
program's own ``import mlx_lm`` and enables the patch right after it, then
says so in one line on stderr.
"""

import importlib.abc
import importlib.util
import os
import sys
import threading

ENV_VAR = "MTP_SPLITK"


def _enable():
    # Absolute imports: this file also runs outside its package (see the docstring).
    patch = sys.modules.get("mtp_splitk.patch")
    if patch is not None and not hasattr(patch, "enable"):
        # mtp_splitk.patch is importing mlx_lm itself (mtp_splitk.enable() came
        # before any mlx_lm import): a half-run module cannot enable yet, so it
        # does at its end.
        patch._ENABLE_WHEN_LOADED = describe
        return
    from mtp_splitk.mtp.loading import drop_mtp_keys_on_load
    from mtp_splitk.patch import enable

    _force_split()
    enable()
    # The stock tools then load a checkpoint with MTP tensors in its shards
    # as the target alone (their strict load would refuse the extra keys).
    drop_mtp_keys_on_load()
    print(describe(), file=sys.stderr)


SPLIT_VAR = "MTP_SPLITK_SPLIT"  # auto | off | N: the split policy, as generate's --split-k


def _force_split():
    from mtp_splitk import plan

    text = os.environ.get(SPLIT_VAR)
    if text is None:
        return
    try:
        plan.set_split(plan.parse_split(text))
    except ValueError as e:
        print(f"mtp_splitk: {SPLIT_VAR} ignored: {e}", file=sys.stderr)


def describe() -> str:
    """The stderr line: the device the planner sees, the tuning table it reads
    (the user's from ``mtp-splitk tune`` before the shipped one) and a forced split."""
    from mtp_splitk import plan

    # Uncached: asked during `import mlx_lm`, before the program may change its
    # default device, which the planner must then see.
    device = getattr(plan.current_device, "__wrapped__", plan.current_device)()
    paths = [plan.user_tuning_path(device.name),
             os.path.join(plan.TUNING_DIR, plan.tuning_key(device.name) + ".json")]
    path = next((p for p in paths if os.path.exists(p)), None)
    table = f"tuning table {path}" if path else "no table: kernels off"
    forced = plan.forced_split()
    if forced == 0:
        table = f"kernels off ({SPLIT_VAR}=off)"
    elif forced is not None:
        table = f"split-K forced to {forced} warps for M <= 64 ({SPLIT_VAR})"
    device = f"{device.name} ({device.backend})"
    return f"mtp_splitk: {ENV_VAR}=1, mlx-lm patched; device {device}, {table}"


class _EnableAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``mlx_lm`` is imported it lets the other
    finders find it, and makes the loader enable the patch after the package
    has run. It stays until then: ``python -m mlx_lm`` asks for the spec once
    without loading it (runpy checks it is a package), then imports it."""

    def __init__(self):
        self._finding = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "mlx_lm" or getattr(self._finding, "on", False):
            return None
        self._finding.on = True  # importlib.util.find_spec below asks this finder too
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding.on = False
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_enable(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
                _enable()

        # The loader instance belongs to this one spec, so shadowing its
        # method touches nothing else.
        spec.loader.exec_module = exec_then_enable
        return spec


def install() -> None:
    """Enable the patch now if mlx_lm is loaded, else right after it is."""
    if "mlx_lm" in sys.modules:
        _enable()
    # By name: each .pth that runs this file (two installs) defines the class anew.
    elif not any(type(f).__name__ == _EnableAfterImport.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _EnableAfterImport())
