# Copyright © 2026 mtp_splitk contributors

"""What every benchmark run needs: a deadline, progress on stderr, the median
of repeated runs, a run's facts, and a results document rewritten as
measurements come in (so a time-boxed run keeps what it measured)."""

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx_lm

from .. import plan


class Deadline:
    """Skips work once ``seconds`` have passed (a time-boxed GPU session)."""

    def __init__(self, seconds: Optional[float]):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


class Progress:
    """A progress bar on stderr: measurements done of those planned, the
    elapsed time and what runs now."""

    WIDTH = 24

    def __init__(self, total: int, stream=None):
        self.total = total
        self.done = 0
        self.stopped = False
        self.stream = stream or sys.stderr
        self.start = time.monotonic()

    def step(self, deadline: Deadline, message: str) -> bool:
        """Announce the next measurement; False once the deadline passed."""
        if deadline.passed():
            if not self.stopped:
                print(
                    f"Deadline passed: skipping the last {self.total - self.done} of "
                    f"{self.total} measurements.",
                    file=self.stream,
                    flush=True,
                )
            self.stopped = True
            return False
        self.done += 1
        filled = self.WIDTH * (self.done - 1) // max(self.total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        print(
            f"[{bar}] {self.done}/{self.total} {time.monotonic() - self.start:6.0f}s  {message}",
            file=self.stream,
            flush=True,
        )
        return True

    def finish(self) -> None:
        print(
            f"Done: {self.done}/{self.total} measurements in "
            f"{time.monotonic() - self.start:.0f}s.",
            file=self.stream,
            flush=True,
        )


class ByteProgress:
    """Bytes written so far (a ``progress(done, total)`` callback of the
    synthetic writer), on stderr: one updating line on a terminal, a line per
    10% otherwise."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream = label, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.shown = -1
        self.tic = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        step = percent if self.tty else percent // 10 * 10
        if step == self.shown:
            return
        self.shown = step
        unit, scale = ("GiB", 2**30) if total >= 2**30 else ("MiB", 2**20)
        text = (
            f"{self.label}: {done / scale:.2f} / {total / scale:.2f} {unit} "
            f"({percent}%, {time.perf_counter() - self.tic:.0f} s)"
        )
        end = "\n" if not self.tty or done >= total else ""
        print(("\r" if self.tty else "") + text, end=end, file=self.stream, flush=True)


def median_run(run: Callable[[], Dict], repeats: int, warmup: bool = True) -> Dict:
    """The run whose tokens/s (``"tps"``) is the median of ``repeats``, after
    one warm-up run (first use of a variant compiles its kernels)."""
    if warmup:
        run()
    results = sorted((run() for _ in range(max(1, repeats))), key=lambda r: r["tps"])
    best = dict(results[len(results) // 2])
    best["tps_all"] = [r["tps"] for r in results]
    return best


def device_meta() -> Dict:
    """The facts of this run: device, versions, tuning table, command, date."""
    device = plan.current_device()
    return {
        "device": device.name,
        "backend": device.backend,
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "python": platform.python_version(),
        "tuning_table": bool(plan.load_tuning(device.name)),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def host_probe(ops: int = 256, reps: int = 5) -> Dict[str, float]:
    """µs an op to build and to evaluate a chain of tiny dependent adds on the
    default device (medians): how fast this process's host builds and submits
    work, which the patched path leans on more than MLX's (run 21: one of two
    processes ran the patched loop at half speed while MLX's figures held)."""
    build, run = [], []
    for i in range(reps + 1):  # the first is a warm-up
        y = mx.zeros((8,))
        mx.eval(y)
        t0 = time.perf_counter()
        for _ in range(ops):
            y = y + 1
        t1 = time.perf_counter()
        mx.eval(y)
        if i:
            build.append((t1 - t0) / ops * 1e6)
            run.append((time.perf_counter() - t1) / ops * 1e6)
    return {"build_us_per_op": round(statistics.median(build), 3), "eval_us_per_op": round(statistics.median(run), 3)}


class Results:
    """A benchmark's JSON document and its markdown (``render(doc)``),
    rewritten after every measurement as <out>/<name>.json and .md; with
    ``write=False`` (ranks other than 0) it stays in memory."""

    def __init__(
        self,
        out: Path,
        meta: Dict,
        name: str,
        render: Callable[[Dict], str],
        write: bool = True,
    ):
        self.out = Path(out)
        self.name = name
        self.render = render
        self.write = write
        self.doc = {"meta": meta, "models": {}}
        if write:
            self.out.mkdir(parents=True, exist_ok=True)

    def put(self, model: str, section: str, key, value) -> None:
        value = json.loads(json.dumps(value))  # as it will read back (string keys)
        self.doc["models"].setdefault(model, {}).setdefault(section, {})[str(key)] = value
        self.save()

    def save(self) -> None:
        if not self.write:
            return
        with open(self.out / f"{self.name}.json", "w") as f:
            json.dump(self.doc, f, indent=1)
        with open(self.out / f"{self.name}.md", "w") as f:
            f.write(self.render(self.doc))
