"""The control plane answers under load (issue 18): the store's group rows asked on every
status call come from a copy that every change replaces, and memory taken for a burst is
given back. The latency and memory figures themselves are ``bench/control_plane.py``'s."""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from agent import memory
from agent.store import PeerRow, Store


def test_groups_come_from_a_copy_that_every_change_replaces(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    assert s.groups() == []
    s.add_group("g1", "127.0.0.1:4005", 1 << 20, [("vda", "/x/vda.img", 4096)], "p1")
    first = s.groups()
    assert [g.name for g in first] == ["g1"] and first[0].settings == {}
    assert s.groups() == first and s.groups() is not s.groups()  # a list of its own
    s.set_settings("g1", {"bandwidth": 5})
    assert s.groups()[0].settings == {"bandwidth": 5}
    s.add_group("g0", "127.0.0.1:4005", 1 << 20, [], "p1")
    assert [g.name for g in s.groups()] == ["g0", "g1"]
    s.remove_group("g1")
    assert [g.name for g in s.groups()] == ["g0"]
    s.close()
    s = Store(str(tmp_path))  # what the copy said is what the database holds
    assert [g.name for g in s.groups()] == ["g0"]
    s.close()


def test_peers_come_from_a_copy_that_every_change_replaces(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    assert s.peers() == []
    s.add_peer(PeerRow("f1", "b", "10.0.0.2:4005", "cert1", 1.0))
    assert [p.fingerprint for p in s.peers()] == ["f1"]
    old = s.add_peer(PeerRow("f2", "b", "10.0.0.2:4005", "cert2", 2.0))  # b's new key
    assert [p.fingerprint for p in old] == ["f1"]
    assert [p.fingerprint for p in s.peers()] == ["f2"]
    assert s.remove_peer("b") == 1 and s.peers() == []
    s.close()


def test_memory_grown_is_trimmed_and_the_base_follows_it_down(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="ferry.memory")
    held = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(memory.give_back, 0.05, 1 << 20)
            held.append(bytearray(32 << 20))  # touched: resident
            for _ in range(600):  # up to 30 s: the machine is shared
                if "gave back" in caplog.text:
                    break
                await trio.sleep(0.05)
            assert "gave back" in caplog.text
            held.clear()
            await trio.sleep(0.2)  # smaller now: the base follows
            n.cancel_scope.cancel()

    trio.run(main)
    assert memory.rss_bytes() > 0 and memory.trim()


def test_without_malloc_trim_nothing_is_done(monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ferry.memory")
    monkeypatch.setattr(memory, "_libc", False)
    assert memory.trim() is False
    trio.run(memory.give_back)  # returns at once
    assert "no malloc_trim here" in caplog.text
