# Copyright © 2026 mtp_splitk contributors

"""``mlx_lm.server`` under a bounded loopback load, with ``MTP_SPLITK=1``
and without: every request completes, the patched server's greedy answers
are the unpatched server's, and neither log reports an error."""

import time

from mtp_splitk import synthetic
from mtp_splitk.bench import serve

REQUESTS = 8  # concurrent: batched decode puts several rows through each matmul
MAX_TOKENS = 16


def test_patched_server_answers_as_the_unpatched_one(tmp_path):
    target, _ = synthetic.write_pair(tmp_path / "pair")
    tic = time.perf_counter()
    servers = [serve.start(str(target), tmp_path / f"{label}.log", patched)
               for label, patched in (("mlx", False), ("patched", True))]
    try:
        for server in servers:
            serve.wait_ready(server, timeout=60)
        loads = [serve.burst(s, serve.PROMPTS[:REQUESTS], MAX_TOKENS, REQUESTS, timeout=60)
                 for s in servers]
    finally:
        for server in servers:
            serve.stop(server)
    seconds = time.perf_counter() - tic
    unpatched, patched = loads
    for load in loads:
        assert [a.error for a in load.answers] == [None] * REQUESTS
        assert all(a.text and a.tokens > 0 for a in load.answers)
    assert [a.text for a in patched.answers] == [a.text for a in unpatched.answers]
    logs = [s.log_text() for s in servers]
    assert not serve.problems(logs[0]) and not serve.problems(logs[1]), logs
    # The patch was on in the one server only (the autoload's stderr line).
    assert "mtp_splitk:" not in logs[0] and "mtp_splitk:" in logs[1]
    assert all(s.process.returncode is not None for s in servers)  # stopped
    assert seconds < 60, seconds
