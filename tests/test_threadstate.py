"""nbd_plugin/threadstate.py in a real nbdkit: the thread states pinned on a connection's
worker threads are freed once those threads end, so a client that reconnects again and
again (a VM's NBD client after every link drop, a backup tool) keeps being served on the
fast path, and the process does not keep a thread state per thread it ever had."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict, Iterator

import nbd
import pytest

from nbd_plugin import threadstate

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "tests" / "plugins" / "pinning.py"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    sock, pidfile = tmp_path / "sock", tmp_path / "pid"
    subprocess.run(["nbdkit", "-U", str(sock), "-P", str(pidfile), "--threads", "16",
                    "python", str(PLUGIN), "repo=%s" % REPO], check=True)
    try:
        yield "nbd+unix:///?socket=%s" % sock
    finally:
        subprocess.run(["kill", pidfile.read_text().strip()], check=False)


def counters(h: nbd.NBD) -> Dict[str, int]:
    return {k: int(v) for k, v in (w.split("=") for w in h.pread(64, 0).decode().split())}


def busy(h: nbd.NBD) -> None:
    """Requests in flight on many of the connection's worker threads at once."""
    for _ in range(8):
        for i in range(16):
            h.aio_pread(nbd.Buffer(4096), (i + 1) * 4096)
        while h.aio_in_flight() > 0:
            h.poll(-1)


def test_ended_threads_give_their_states_back(server: str) -> None:
    if not threadstate._reaps():
        pytest.skip("thread states are freed on CPython %d.%d to %d.%d only"
                    % (*threadstate.REAP_VERSIONS[0], *threadstate.REAP_VERSIONS[1]))
    for _ in range(30):  # 30 connections of 16 worker threads: 480 threads in all
        h = nbd.NBD()
        h.connect_uri(server)
        busy(h)
        h.shutdown()
    h = nbd.NBD()
    h.connect_uri(server)
    busy(h)
    c = counters(h)
    # More threads were pinned than the bound below: without freeing, every one of them
    # would still hold its state (and past MAX_PINNED, new threads would not be pinned).
    assert c["pinned"] + c["reaped"] > threadstate.REAP_AT + 32, c
    assert c["reaped"] > 0 and c["pinned"] <= threadstate.REAP_AT + 16, c
    assert c["states"] <= threadstate.REAP_AT + 32, c
    # Freed states are not used again: the server still answers on every thread.
    busy(h)
    assert counters(h)["pinned"] <= threadstate.REAP_AT + 16
    h.shutdown()
