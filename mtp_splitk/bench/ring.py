# Copyright © 2026 mtp_splitk contributors

"""Ranks on this machine: ``n`` processes of a ring group over 127.0.0.1,
what ``mlx.launch --backend ring -n N`` does, with free ports and each
rank's exit status kept (the tensor-parallel test and ``bench tp --smoke``)."""

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def free_ports(count: int) -> List[int]:
    """Ports the kernel reports free on 127.0.0.1 (held open together so
    that they differ; another program could still take one before a rank
    binds it, which shows as that rank's connection error)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class RankFailure(RuntimeError):
    """A rank exited with an error or the ranks ran past their time."""


def launch_local(
    command: Sequence[str],
    n: int = 2,
    timeout: float = 120.0,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[str] = None,
) -> List[str]:
    """Run ``command`` as ``n`` ranks of a ring group on 127.0.0.1.

    Each rank gets ``MLX_RANK`` and ``MLX_HOSTFILE`` (a JSON list of one
    ``ip:port`` list per rank), as ``mlx.launch --backend ring`` sets them,
    so ``mx.distributed.init(backend="ring")`` in the command connects them.
    Unlike ``mlx.launch`` (fixed starting port; exit status 0 when a rank
    fails) this picks free ports and raises :class:`RankFailure`, with every
    rank's output, when a rank fails or ``timeout`` seconds pass (the ranks
    are then killed). Returns each rank's output (stdout and stderr).
    """
    with tempfile.TemporaryDirectory(prefix="mtp-splitk-ring-") as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
        base = dict(os.environ if env is None else env)
        # The ranks decide for themselves when to patch.
        base.pop("MTP_SPLITK", None)
        logs = [open(Path(tmp) / f"rank{r}.log", "w+") for r in range(n)]
        procs = [
            subprocess.Popen(
                list(command),
                env={**base, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
                stdout=logs[r],
                stderr=subprocess.STDOUT,
                cwd=cwd,
            )
            for r in range(n)
        ]
        end = time.monotonic() + timeout
        timed_out = False
        try:
            # A rank that fails leaves the others waiting on it in a
            # collective: stop everyone as soon as one exits non-zero.
            while any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    break
                if time.monotonic() > end:
                    timed_out = True
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    codes = [p.returncode for p in procs]
    if timed_out or any(codes):
        what = f"timed out after {timeout:.0f} s" if timed_out else f"exit codes {codes}"
        report = "\n".join(
            f"--- rank {r} (exit {c}) ---\n{o[-4000:]}"
            for r, (c, o) in enumerate(zip(codes, outputs))
        )
        raise RankFailure(f"{n} ring ranks of {' '.join(command)}: {what}\n{report}")
    return outputs
