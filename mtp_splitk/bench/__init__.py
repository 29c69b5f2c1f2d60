# Copyright © 2026 mtp_splitk contributors

"""Benchmark tooling: harnesses and the drafters they drive.

:mod:`.e2e` (``mtp-splitk bench e2e``; its measurements as tasks in
:mod:`.tasks`) and :mod:`.tp` (``mtp-splitk bench tp``; ranks on one machine
by :mod:`.ring`) run on :mod:`.harness` (deadline, progress, median runs,
results), :mod:`.measure` (one model's measurements), :mod:`.models` (the
synthetic models, cached), :mod:`.drafters` and :mod:`.timing` (the op
timers of ``scripts/``); :mod:`.report` renders the markdown and the plots.
:mod:`.kernels` (the kernels against MLX's ops, one weight shape at a time)
is shared by ``scripts/bench_kernels.py``, ``bench_moe.py``, ``bench_chain.py``
and :mod:`.tune` (``mtp-splitk tune``: the user's own tuning table);
:mod:`.serve` drives ``mlx_lm.server`` under load (``tests/test_serve.py``,
``scripts/bench_serve.py``).
"""
