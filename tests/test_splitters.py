"""Starting splitters: a failure says why, in one line, from nbdkit's own words."""

from __future__ import annotations

import pytest

from agent.source import splitters


def test_a_splitter_that_cannot_start_says_why(tmp_path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    paths = splitters.SplitterPaths.for_disk(str(tmp_path), "abc")
    with pytest.raises(splitters.SplitterError) as err:
        splitters.start(paths, "abc", str(disk), str(tmp_path / "agent.sock"), "g", "vda",
                        queue_bytes=-1)
    assert "not a positive integer" in str(err.value)
    assert splitters.running_pid(paths, "abc") is None


def test_socket_paths_too_long_are_refused(tmp_path) -> None:
    paths = splitters.SplitterPaths.for_disk(str(tmp_path / ("x" * 120)), "abc")
    with pytest.raises(splitters.SplitterError, match="longer than"):
        splitters.start(paths, "abc", "/dev/null", "/nonexistent", "g", "vda", 1 << 20)


def test_start_and_stop_a_splitter(tmp_path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    paths = splitters.SplitterPaths.for_disk(str(tmp_path), "abc")
    pid = splitters.start(paths, "abc", str(disk), str(tmp_path / "agent.sock"), "g", "vda",
                          1 << 20)
    assert splitters.running_pid(paths, "abc") == pid
    assert splitters.start(paths, "abc", str(disk), str(tmp_path / "agent.sock"), "g", "vda",
                           1 << 20) == pid  # already running: the same one
    assert splitters.stop(paths, "abc") is True
    assert splitters.running_pid(paths, "abc") is None
    assert splitters.stop(paths, "abc") is False
    assert '"clean":true' in (tmp_path / "disks" / "abc.state.json").read_text()


def _fake_nbdkit(tmp_path, monkeypatch, script: str) -> None:
    fake = tmp_path / "nbdkit"
    fake.write_text("#!/bin/sh\n" + script + "\n")
    fake.chmod(0o755)
    monkeypatch.setattr(splitters, "nbdkit_binary", lambda: str(fake))


def test_an_nbdkit_that_hangs_at_start_is_given_up(tmp_path, monkeypatch) -> None:
    _fake_nbdkit(tmp_path, monkeypatch, "exec sleep 30")
    monkeypatch.setattr(splitters, "START_TIMEOUT", 0.5)
    paths = splitters.SplitterPaths.for_disk(str(tmp_path), "abc")
    with pytest.raises(splitters.SplitterError, match=r"did not start within 0\.5 s; see "):
        splitters.start(paths, "abc", "/dev/null", "/nonexistent", "g", "vda", 1 << 20)


def test_an_nbdkit_that_writes_no_pid_file_is_reported(tmp_path, monkeypatch) -> None:
    _fake_nbdkit(tmp_path, monkeypatch, "exit 0")
    monkeypatch.setattr(splitters, "PIDFILE_TIMEOUT", 0.2)
    paths = splitters.SplitterPaths.for_disk(str(tmp_path), "abc")
    with pytest.raises(splitters.SplitterError, match="started but wrote no pid file"):
        splitters.start(paths, "abc", "/dev/null", "/nonexistent", "g", "vda", 1 << 20)


def test_without_nbdkit_the_error_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(splitters.shutil, "which", lambda name: None)
    with pytest.raises(splitters.SplitterError, match="apt-get install nbdkit"):
        splitters.nbdkit_binary()


async def test_the_splitters_socket_is_for_root_only(tmp_path) -> None:
    """Another local user cannot connect to the agent's splitter socket and pose as a
    splitter: it is made 0600 before it listens."""
    import os
    import stat as stat_

    from agent.source import intake

    path = str(tmp_path / "splitter.sock")
    (tmp_path / "splitter.sock").write_bytes(b"")  # a stale file at the name is replaced
    listener = await intake.bind(path)
    try:
        mode = os.stat(path).st_mode
        assert stat_.S_ISSOCK(mode) and stat_.S_IMODE(mode) == 0o600
    finally:
        await listener.aclose()
