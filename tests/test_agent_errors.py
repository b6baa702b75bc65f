"""The agent's own failure paths: a port already taken, a destination the agent cannot write."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from conftest import Lab

from lab.sites import FERRY, REPO, free_port

MiB = 1024 * 1024


def test_agent_refuses_to_start_on_a_taken_port(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([*FERRY, "agent", "--data", str(tmp_path / "d"), "--listen",
                               "127.0.0.1:%d" % port, "--api", "127.0.0.1:%d" % free_port(),
                               "--insecure"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ferry: error: agent cannot start:") and "in use" in last, last


def test_agent_refuses_a_bad_listen_address(tmp_path) -> None:
    proc = subprocess.run([*FERRY, "agent", "--data", str(tmp_path / "d"), "--listen",
                           "127.0.0.1:99999"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "port must be a number from 1 to 65535" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory unwritable "
                    "for root: chattr +i")
def test_a_destination_the_agent_cannot_write_is_refused_with_the_reason(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    sites.protect("g1", disk)
    sites.a.ferry("wait", "g1", "--synced")
    locked = sites.work / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable attribute")
    try:
        proc = sites.b.ferry("restore", "g1", "--disk", "vda", "--to",
                             str(locked / "r.img"), check=False)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    # A destination the agent may not write is the request's fault (400), not a 500.
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Operation not permitted" in proc.stderr \
        and str(locked / "r.img") in proc.stderr, proc.stderr
    assert "request failed" not in sites.b.log.read_text()
    assert os.listdir(locked) == []
