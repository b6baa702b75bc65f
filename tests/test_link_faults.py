"""The link between the sites cut, stalled, flapping, slow and corrupting, through a fault
proxy of our own: the writer sees no error and no stall, the replica ends identical."""

from __future__ import annotations

import datetime
import os
import time
from typing import Iterator

import pytest
from conftest import Lab
from test_faults import SIZE, Writer, check_identical, wait_for

from lab.proxy import FaultProxy


@pytest.fixture
def linked(sites: Lab) -> Iterator[tuple]:
    """Sites A and B, with A's replication to B going through a fault proxy."""
    host, port = sites.b.address.rsplit(":", 1)
    with FaultProxy((host, int(port))) as proxy:
        yield sites, proxy


def protect_through(lab: Lab, proxy: FaultProxy) -> tuple:
    disk = lab.image("vda.img", SIZE)
    out = lab.a.ferry("protect", "g1", "--disk", "vda=%s" % disk, "--target",
                      proxy.address).stdout
    return disk, out.split("\t")[1].strip()


def assert_no_stall(writer: Writer) -> None:
    # What a VM would notice: one write that waited for the link. Generous on purpose:
    # it is a behaviour check (the VM never waits for site B), not a speed target.
    assert writer.max_latency < 2.0, "a write took %.2f s" % writer.max_latency


def test_link_cut_for_seconds_during_a_burst(linked) -> None:
    lab, proxy = linked
    disk, uri = protect_through(lab, proxy)
    writer = Writer(uri, 11)
    writer.start()
    time.sleep(1)
    proxy.cut()
    wait_for(lambda: lab.a.status("g1")["groups"]["g1"]["state"] != "replicating",
             what="the source to see the cut")
    time.sleep(4)
    proxy.heal()
    time.sleep(2)
    writer.finish()
    assert_no_stall(writer)
    check_identical(lab, disk)


def test_flapping_link(linked) -> None:
    lab, proxy = linked
    disk, uri = protect_through(lab, proxy)
    writer = Writer(uri, 12)
    writer.start()
    for _ in range(8):
        time.sleep(0.5)
        proxy.cut()
        time.sleep(0.5)
        proxy.heal()
    writer.finish()
    assert_no_stall(writer)
    assert proxy.connections >= 3
    check_identical(lab, disk)


def test_stalled_link_then_healed(linked) -> None:
    """A black hole: nothing is refused, nothing moves. The writer goes on regardless."""
    lab, proxy = linked
    disk, uri = protect_through(lab, proxy)
    writer = Writer(uri, 13)
    writer.start()
    time.sleep(1)
    proxy.stall()
    time.sleep(5)
    proxy.heal()
    writer.finish()
    assert_no_stall(writer)
    check_identical(lab, disk)


def test_slow_and_delayed_link(linked) -> None:
    lab, proxy = linked
    proxy.throttle(1_000_000)
    proxy.delay(0.05)
    disk, uri = protect_through(lab, proxy)
    writer = Writer(uri, 14)
    writer.start()
    time.sleep(4)
    writer.finish()
    assert_no_stall(writer)
    st = lab.a.status("g1")["groups"]["g1"]["disks"]["vda"]
    assert st["bytes_queued"] + st["dirty_bytes"] > 0, "the slow link should have a backlog"
    proxy.heal()
    check_identical(lab, disk)


def test_corrupted_frames_are_refused_and_resent(linked) -> None:
    lab, proxy = linked
    disk, uri = protect_through(lab, proxy)
    lab.a.ferry("wait", "g1", "--synced")
    writer = Writer(uri, 15)
    writer.start()
    time.sleep(1)
    proxy.corrupt(3)
    time.sleep(2)
    writer.finish()
    assert_no_stall(writer)
    check_identical(lab, disk)
    # The flipped byte went one way or the other: whichever side read it said so.
    logs = lab.a.log.read_text() + lab.b.log.read_text()
    assert "fails its checksum" in logs, "no side noticed the corruption"


def test_frozen_relay_is_detected_and_the_link_reconnects(linked) -> None:
    """The relay's TCP stack answers but nothing moves: an idle link's ping gets no ACK, so
    the link shows down with the cause within the stall timeout (15 s by default), and comes
    back by itself once the relay moves again."""
    lab, proxy = linked
    disk, uri = protect_through(lab, proxy)
    lab.a.ferry("wait", "g1", "--synced")
    link = lab.a.status("g1")["groups"]["g1"]["link"]
    assert link["state"] == "connected" and link["cause"] is None, link
    assert lab.a.status("g1")["groups"]["g1"]["settings"]["stall_timeout"] == 15.0
    proxy.stall()
    stalled_at = time.monotonic()
    wait_for(lambda: lab.a.status("g1")["groups"]["g1"]["link"]["state"] == "down",
             what="the frozen relay to be noticed", timeout=60)
    took = time.monotonic() - stalled_at
    link = lab.a.status("g1")["groups"]["g1"]["link"]
    assert "stalled" in link["cause"], link
    since = datetime.datetime.fromisoformat(link["since"])
    assert abs(since.timestamp() - time.time()) < 60, link
    # Not before the timeout: an idle link is only pinged every third of it.
    assert took > 10, "a link down after %.1f s of silence" % took
    proxy.heal()
    wait_for(lambda: lab.a.status("g1")["groups"]["g1"]["link"]["state"] == "connected",
             what="the link to come back", timeout=60)
    writer = Writer(uri, 16)
    writer.start()
    time.sleep(1)
    writer.finish()
    check_identical(lab, disk)


def test_tcp_bytes_acked_reads_the_kernel_counter() -> None:
    import socket

    from agent.source.shipper import tcp_bytes_acked

    class Holder:
        def __init__(self, sock: socket.socket) -> None:
            self.socket = sock

    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    try:
        before = tcp_bytes_acked(Holder(client))
        assert before is not None
        client.sendall(b"x" * 100_000)
        wait_for(lambda: tcp_bytes_acked(Holder(client)) >= before + 100_000,
                 what="the kernel to count the acknowledged bytes")
        a, b = socket.socketpair()
        assert tcp_bytes_acked(Holder(a)) is None  # not TCP
        assert tcp_bytes_acked(object()) is None   # no socket at all
        a.close()
        b.close()
    finally:
        for s in (client, peer, server):
            s.close()


def test_a_disk_is_replicating_only_once_site_b_holds_it_consistent(linked) -> None:
    """Honest states: A has read the whole disk into its queue long before a slow link
    has carried it; the disk says initial-sync until site B holds a consistent replica."""
    lab, proxy = linked
    proxy.throttle(4_000_000)
    disk = lab.image("vda.img", 24 * 1024 * 1024)
    with open(disk, "r+b") as f:
        f.write(os.urandom(24 * 1024 * 1024))
    lab.a.ferry("protect", "g1", "--disk", "vda=%s" % disk, "--target", proxy.address)
    seen = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        d = lab.a.status("g1")["groups"]["g1"]["disks"]["vda"]
        seen.add((d["state"], d["bytes_queued"] > 0 and d["dirty_bytes"] == 0))
        if d["state"] == "replicating":
            b = lab.b.status()["replicas"]["g1"]["disks"]["vda"]
            assert b["ever_consistent"], (d, b)
            break
        time.sleep(0.05)
    else:
        raise AssertionError("never replicating: %s" % seen)
    # The case this is about was met: everything read, nothing dirty, still initial-sync.
    assert ("initial-sync", True) in seen, seen
    proxy.heal()
    check_identical(lab, disk)
