"""The splitter's link thread (nbd_plugin/link.py) outlives a bug of its own: it logs the
error and connects again, and the disk keeps being replicated."""

from __future__ import annotations

import socket
import threading
import time
from typing import List

from nbd_plugin import link
from nbd_plugin.changelog import ChangeLog


def test_a_bug_in_a_session_is_logged_and_the_link_connects_again(tmp_path, monkeypatch
                                                                   ) -> None:
    path = str(tmp_path / "agent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    accepted: List[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    lines: List[str] = []
    monkeypatch.setattr(link, "log", lines.append)
    monkeypatch.setattr(link, "RETRY_INTERVAL", 0.05)
    sessions: List[int] = []
    second = threading.Event()

    def serve(sock: socket.socket) -> None:
        sessions.append(sock.fileno())
        if len(sessions) == 1:
            raise KeyError("a bug")
        second.set()
        while not lk._stop.is_set():
            time.sleep(0.01)

    lk = link.Link(ChangeLog(1, 1 << 20), None, path, {})  # type: ignore[arg-type]
    monkeypatch.setattr(lk, "_serve", serve)
    lk.start()
    try:
        assert second.wait(5), "the link did not connect again after the error"
    finally:
        lk.stop()
        server.close()
        for conn in accepted:
            conn.close()
    assert "link thread error, reconnecting: KeyError: 'a bug'" in lines
    assert len(accepted) >= 2
    assert not lk.connected
