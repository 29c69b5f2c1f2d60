# Copyright © 2026 mtp_splitk contributors

"""``mlx_lm.server`` under load, patched (``MTP_SPLITK=1``) and not: start it
on 127.0.0.1, send a bounded number of concurrent greedy completion
requests over loopback, stop it. Batched decode puts M = 2..8 rows through
the quantized matmuls, the kernels' shapes. Used by ``tests/test_serve.py``
(completion and equal answers on the CPU) and ``scripts/bench_serve.py``
(requests/s and tokens/s on a GPU)."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .ring import free_ports

PROMPTS = [
    "Speculative decoding drafts a few tokens",
    "The verify pass runs the target on every draft",
    "Split-K kernels stream the weights once",
    "A tiny synthetic model has random weights",
    "Batched decode puts several rows through each matmul",
    "Greedy answers are the same with and without the patch",
    "Loopback requests never leave the machine",
    "The server batches the requests that arrive together",
]


@dataclass
class Server:
    """A running ``mlx_lm.server``: its process, port and log file."""

    process: subprocess.Popen
    port: int
    log: Path
    patched: bool

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start(model: str, log: Path, patched: bool, args: List[str] = (), env=None) -> Server:
    """``python -m mlx_lm.server --model MODEL`` on 127.0.0.1 and a free port,
    stdout and stderr into ``log``; ``MTP_SPLITK=1`` in its environment when
    ``patched`` (and removed otherwise)."""
    port = free_ports(1)[0]
    env = dict(os.environ if env is None else env)
    env.pop("MTP_SPLITK", None)
    if patched:
        env["MTP_SPLITK"] = "1"
    command = [sys.executable, "-m", "mlx_lm.server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), *args]
    out = open(log, "w")
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    out.close()
    return Server(process, port, Path(log), patched)


def wait_ready(server: Server, timeout: float) -> None:
    """Until ``/health`` answers ok; raises RuntimeError (with the log) if the
    server exits or the time runs out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.process.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited ({server.process.returncode}):\n"
                               f"{server.log_text()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as r:
                if json.loads(r.read()).get("status") == "ok":
                    return
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"mlx_lm.server not ready after {timeout:.0f} s:\n{server.log_text()}")


def stop(server: Server, timeout: float = 10) -> None:
    """Terminate the server (its process only), killing it if it lingers."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout)


@dataclass
class Answer:
    prompt: str
    text: Optional[str] = None
    tokens: int = 0
    seconds: float = 0.0
    error: Optional[str] = None
    finish_reason: Optional[str] = None


def complete(server: Server, prompt: str, max_tokens: int, timeout: float) -> Answer:
    """One greedy (temperature 0) ``/v1/completions`` request."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0})
    request = urllib.request.Request(f"{server.url}/v1/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    tic = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            reply = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        return Answer(prompt, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - tic)
    choice = reply["choices"][0]
    return Answer(prompt, choice["text"], reply.get("usage", {}).get("completion_tokens", 0),
                  time.perf_counter() - tic, finish_reason=choice.get("finish_reason"))


@dataclass
class Load:
    """What one burst of concurrent requests gave."""

    answers: List[Answer] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(a.tokens for a in self.answers)

    def summary(self) -> Dict:
        done = [a for a in self.answers if a.error is None]
        return {"requests": len(self.answers), "completed": len(done),
                "seconds": self.seconds, "requests_per_s": len(done) / self.seconds,
                "tokens": self.tokens, "tokens_per_s": self.tokens / self.seconds,
                "mean_latency_s": sum(a.seconds for a in done) / max(len(done), 1)}


def burst(server: Server, prompts: List[str], max_tokens: int, concurrency: int,
          timeout: float) -> Load:
    """Every prompt sent, ``concurrency`` at a time, each within ``timeout``."""
    tic = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda p: complete(server, p, max_tokens, timeout), prompts))
    return Load(answers, time.perf_counter() - tic)


def problems(log: str) -> List[str]:
    """The lines of a server log that report an error or a traceback."""
    return [line for line in log.splitlines()
            if "Traceback" in line or "ERROR" in line or "Error:" in line or "Exception" in line]
