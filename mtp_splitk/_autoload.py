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
program's own ``import mlx_lm`` and enables the patch right after it.
"""

import importlib.abc
import importlib.util
import sys

ENV_VAR = "MTP_SPLITK"


def _enable():
    # Absolute: this file also runs outside its package (see the docstring).
    from mtp_splitk.patch import enable

    enable()


class _EnableAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``mlx_lm`` is first imported it lets the
    other finders find it, and makes the loader enable the patch after the
    package has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "mlx_lm":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_enable(module):
            exec_module(module)
            _enable()

        # The loader instance belongs to this one spec, so shadowing its
        # method touches nothing else.
        spec.loader.exec_module = exec_then_enable
        return spec


def install() -> None:
    """Enable the patch now if mlx_lm is loaded, else right after it is."""
    if "mlx_lm" in sys.modules:
        _enable()
    elif not any(isinstance(f, _EnableAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _EnableAfterImport())
