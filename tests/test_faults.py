"""Faults that must not hurt the writer: every time the writer sees no error, and the
replica ends identical to the source."""

from __future__ import annotations

import random
import socket
import threading
import time
from typing import List, Optional

import nbd
import pytest
from conftest import Lab, first_difference, same_bytes

from agent.protocol import batch, frames

MiB = 1024 * 1024
SIZE = 64 * MiB


class Writer(threading.Thread):
    """Writes random blocks through the splitter until stopped; keeps every error."""

    def __init__(self, uri: str, seed: int, size: int = SIZE) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.rng = random.Random(seed)
        self.size = size
        self.errors: List[BaseException] = []
        self.writes = 0
        self.max_latency = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            while not self._halt.is_set():
                length = self.rng.choice([4096, 16384, 65536])
                offset = self.rng.randrange(0, self.size - length, 4096)
                t = time.monotonic()
                h.pwrite(self.rng.randbytes(length), offset)
                if self.writes % 50 == 0:
                    h.flush()
                self.max_latency = max(self.max_latency, time.monotonic() - t)
                self.writes += 1
                time.sleep(0.001)
            h.flush()
            h.shutdown()
        except BaseException as e:  # the test reads it
            self.errors.append(e)

    def finish(self) -> None:
        self._halt.set()
        self.join(30)
        assert not self.is_alive(), "writer hung"
        assert self.errors == [], self.errors
        assert self.writes > 50


def wait_for(predicate, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting for " + what)


def check_identical(lab: Lab, disk, group: str = "g1", name: str = "vda") -> None:
    lab.a.ferry("wait", group, "--synced", "--timeout", "120")
    restored = lab.restore(group, name)
    assert same_bytes(disk, restored), first_difference(disk, restored)


def test_target_down_from_the_start(lab: Lab) -> None:
    lab.a.start()
    disk = lab.image("vda.img", SIZE)
    proc = lab.a.ferry("protect", "g1", "--disk", "vda=%s" % disk, "--target", lab.b.address,
                       "--allow-unreachable")
    uri = proc.stdout.split("\t")[1].strip()
    writer = Writer(uri, 1)
    writer.start()
    wait_for(lambda: lab.a.status("g1")["groups"]["g1"]["state"] in
             ("target-unreachable", "bitmap"), what="target-unreachable state")
    time.sleep(2)
    lab.b.start()
    time.sleep(2)
    writer.finish()
    check_identical(lab, disk)


def test_target_killed_mid_run_and_restarted(sites: Lab) -> None:
    disk = sites.image("vda.img", SIZE)
    uri = sites.protect("g1", disk)["vda"]
    writer = Writer(uri, 2)
    writer.start()
    time.sleep(2)
    sites.b.kill()
    wait_for(lambda: sites.a.status("g1")["groups"]["g1"]["state"] != "replicating",
             what="the source to notice")
    time.sleep(2)
    sites.b.start()
    time.sleep(2)
    writer.finish()
    check_identical(sites, disk)


def test_source_agent_killed_mid_run_and_restarted(sites: Lab) -> None:
    disk = sites.image("vda.img", SIZE)
    uri = sites.protect("g1", disk)["vda"]
    writer = Writer(uri, 3)
    writer.start()
    time.sleep(2)
    pids = sites.a.splitter_pids()
    sites.a.kill()
    time.sleep(2)
    assert sites.a.splitter_pids() == pids, "the splitter must outlive its agent"
    sites.a.start()
    time.sleep(2)
    writer.finish()
    check_identical(sites, disk)
    assert sites.a.splitter_pids() == pids


def test_full_queue_spills_to_dirty_map_and_resyncs(lab: Lab) -> None:
    lab.a.start()
    disk = lab.image("vda.img", SIZE)
    proc = lab.a.ferry("protect", "g1", "--disk", "vda=%s" % disk, "--target", lab.b.address,
                       "--allow-unreachable", "--queue", "1M")
    uri = proc.stdout.split("\t")[1].strip()
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(4)
    for _ in range(400):
        h.pwrite(rng.randbytes(65536), rng.randrange(0, SIZE - 65536, 4096))
    h.flush()
    wait_for(lambda: lab.a.status("g1")["groups"]["g1"]["disks"]["vda"]["dirty_bytes"] > 0,
             what="dirty bytes")
    d = lab.a.status("g1")["groups"]["g1"]["disks"]["vda"]
    assert d["state"] == "bitmap"
    assert d["bytes_queued"] <= 1 * MiB
    assert d["dirty_ranges"] > 0
    assert d["dirty_coarsened_bytes"] == 0  # 400 ranges are far from the map's budget
    lab.b.start()
    # Writes go on during the resync.
    for _ in range(200):
        h.pwrite(rng.randbytes(4096), rng.randrange(0, SIZE - 4096, 4096))
    h.flush()
    h.shutdown()
    check_identical(lab, disk)
    d = lab.a.status("g1")["groups"]["g1"]["disks"]["vda"]
    assert d["dirty_bytes"] == 0
    assert d["resync_bytes"] > 0
    assert d["state"] == "replicating"


def test_splitter_killed_resyncs_only_its_active_extents(sites: Lab) -> None:
    """kill -9 of nbdkit with writes unacked: the agent restarts it, and only the extents
    in its activity log are resynced, not the whole disk."""
    size = 256 * MiB
    disk = sites.image("vda.img", size)
    uri = sites.protect("g1", disk)["vda"]
    sites.a.ferry("wait", "g1", "--synced")
    # The initial sync touched every extent; idle, cold extents leave the activity log
    # after 5 s (nbd_plugin/link.py ACTIVITY_IDLE).
    time.sleep(7)
    gen = sites.a.status("g1")["groups"]["g1"]["disks"]["vda"]["generation"]
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(5)
    for _ in range(64):  # all within the first 16 MiB: at most 4 extents of 4 MiB
        h.pwrite(rng.randbytes(65536), rng.randrange(0, 16 * MiB - 65536, 4096))
    h.flush()
    sites.a.kill_splitters()  # most likely with records not acked yet: an unclean stop
    del h
    wait_for(lambda: sites.a.status("g1")["groups"]["g1"]["disks"]["vda"]["generation"] > gen,
             what="the agent to restart the splitter")
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"after" * 1000, 0)
    h.flush()
    h.shutdown()
    check_identical(sites, disk)
    log = "".join(p.read_text() for p in (sites.a.data / "disks").glob("*.log"))
    assert "did not stop cleanly: resync of" in log and "active extents" in log, log[-2000:]
    resynced = sites.a.status("g1")["groups"]["g1"]["disks"]["vda"]["resync_bytes"]
    assert 0 < resynced <= 16 * MiB, "resynced %d bytes of a %d-byte disk" % (resynced, size)


def _session(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _read_frame(sock: socket.socket, codec: frames.Codec) -> Optional[tuple]:
    buf = b""
    while len(buf) < frames.HEADER.size:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    header = codec.decode_header(buf[:frames.HEADER.size])
    body = buf[frames.HEADER.size:]
    while len(body) < header.length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return header.type, codec.decode_body(header, body[:header.length])


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",      # not a Ferry peer
    b"\0" * 24,                                         # bad magic
    b"FRY\x01\x09" + b"\0" * 19,                         # wrong version
    b"FRY\x01\x01\x01\0\0\xff\xff\xff\x7f" + b"\0" * 12,  # over-long frame
    b"FRY\x01",                                         # a stalled header: handshake timeout
])
def test_target_drops_garbage_and_keeps_serving(sites: Lab, garbage: bytes) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    sites.protect("g1", disk)
    sites.a.ferry("wait", "g1", "--synced")
    with _session(sites.b.address) as s:
        s.sendall(garbage)
        s.settimeout(30)
        try:
            while s.recv(65536):
                pass  # an ERROR frame, then the close
        except ConnectionResetError:
            pass  # closed with our garbage unread: also a close
    log = sites.b.log.read_text()
    assert "dropping connection from" in log
    h = nbd.NBD()
    h.connect_uri(sites.a.status("g1")["groups"]["g1"]["disks"]["vda"]["nbd_uri"])
    h.pwrite(b"z" * 4096, 8192)
    h.flush()
    h.shutdown()
    check_identical(sites, disk)


def test_out_of_bounds_batch_touches_no_replica(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    sites.protect("g1", disk)
    sites.a.ferry("wait", "g1", "--synced")
    replica = sites.b.data / "target" / "g1" / "replicas" / "vda.img"
    before = replica.read_bytes()
    protection = sites.b.api("GET", "/v1/status")["replicas"]["g1"]
    assert protection["disks"]["vda"]["consistent"]
    codec = frames.Codec()
    # Pretend to be the source, on a session of our own: a batch whose record lies past
    # the end of the disk, after a good one.
    from formats.localwire import KIND_WRITE, Record

    meta = (sites.b.data / "target" / "g1" / "meta.json").read_text()
    import json as _json

    prot = _json.loads(meta)["protection"]
    durable = protection["disks"]["vda"]
    gen, seq = durable["durable_gen"], durable["durable_seq"]
    good = Record(seq + 1, 0, 0, 4096, gen, KIND_WRITE, 0, b"g" * 4096)
    bad = Record(seq + 2, 0, 8 * MiB - 1024, 4096, gen, KIND_WRITE, 0, b"b" * 4096)
    with _session(sites.b.address) as s:
        s.sendall(codec.encode(frames.T_HELLO, {"protocol": 1, "site": "evil"}))
        assert _read_frame(s, codec)[0] == frames.T_WELCOME
        s.sendall(codec.encode(frames.T_OPEN, {"group": "g1", "protection": prot, "probe": False,
                                             "disks": [{"name": "vda", "size": 8 * MiB}]}))
        assert _read_frame(s, codec)[0] == frames.T_OPENED
        s.sendall(codec.encode(frames.T_BATCH, batch.encode_batch("g1", [(0, good), (0, bad)],
                                                               0, 0)))
        ftype, body = _read_frame(s, codec)
        assert ftype == frames.T_ERROR
        assert body["code"] == frames.E_PROTOCOL
        assert "outside disk" in body["message"]
    assert replica.read_bytes() == before
    assert "no replica was touched" in sites.b.log.read_text()


def test_more_dataless_records_than_a_frame_holds(lab: Lab) -> None:
    """70,000 zero requests queue while site B is down; they go in several frames."""
    lab.a.start()
    disk = lab.image("vda.img", 512 * MiB)
    with open(disk, "r+b") as f:
        f.write(b"\xff" * MiB)
    proc = lab.a.ferry("protect", "g1", "--disk", "vda=%s" % disk, "--target", lab.b.address,
                       "--allow-unreachable")
    uri = proc.stdout.split("\t")[1].strip()
    h = nbd.NBD()
    h.connect_uri(uri)
    for i in range(70_000):
        h.aio_zero(4096, (i * 8192) % (512 * MiB - 4096))
        if h.aio_in_flight() >= 64:
            h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.flush()
    h.shutdown()
    lab.b.start()
    check_identical(lab, disk)


def test_a_damaged_group_on_site_b_fails_its_session_not_the_agent(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    sites.protect("g1", disk)
    sites.a.ferry("wait", "g1", "--synced")
    sites.b.stop()
    (sites.b.data / "target" / "g1" / "meta.json").write_text("{ not json")
    sites.b.start()
    assert "cannot be opened" in sites.b.log.read_text()
    wait_for(lambda: sites.a.status("g1")["groups"]["g1"]["state"] == "target-storage-error",
             what="the source to show the target's storage error")
    assert sites.b.proc is not None and sites.b.proc.poll() is None, "site B's agent died"
    st = sites.b.status()["replicas"]["g1"]
    assert "JSONDecodeError" in st["error"] or "Expecting" in st["error"]
    assert "session from" in sites.b.log.read_text()


def test_site_b_that_lost_a_group_is_an_error_with_advice(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    uri = sites.protect("g1", disk)["vda"]
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"x" * 65536, 0)
    h.flush()
    sites.a.ferry("wait", "g1", "--synced")
    sites.b.stop()
    import shutil

    shutil.rmtree(sites.b.data / "target" / "g1")
    sites.b.start()
    h.pwrite(b"y" * 4096, 65536)
    h.flush()
    h.shutdown()
    wait_for(lambda: sites.a.status("g1")["groups"]["g1"]["state"] == "error",
             what="an error state")
    d = sites.a.status("g1")["groups"]["g1"]["disks"]["vda"]
    assert "unprotect" in d["error"]
    # The advice works.
    sites.a.ferry("unprotect", "g1")
    sites.protect("g1", disk)
    check_identical(sites, disk)


def test_a_corrupt_batch_mid_session_is_a_protocol_error(sites: Lab) -> None:
    """A BATCH that fails its checksum, read ahead of the journal, ends the session with
    ERROR protocol (not a storage error from the journaling task it stops)."""
    import json as _json

    from formats.localwire import KIND_WRITE, Record

    disk = sites.image("vda.img", 8 * MiB)
    sites.protect("g1", disk)
    sites.a.ferry("wait", "g1", "--synced")
    sites.a.ferry("pause", "g1")  # our session is the only one
    prot = _json.loads((sites.b.data / "target" / "g1" / "meta.json").read_text())["protection"]
    durable = sites.b.api("GET", "/v1/status")["replicas"]["g1"]["disks"]["vda"]
    gen, seq = durable["durable_gen"], durable["durable_seq"]
    codec = frames.Codec()
    for attempt in range(5):  # whatever the two tasks' timing, the same answer
        with _session(sites.b.address) as s:
            s.sendall(codec.encode(frames.T_HELLO, {"protocol": 1, "site": "flaky-link"}))
            assert _read_frame(s, codec)[0] == frames.T_WELCOME
            s.sendall(codec.encode(frames.T_OPEN, {"group": "g1", "protection": prot,
                                                 "probe": False,
                                                 "disks": [{"name": "vda", "size": 8 * MiB}]}))
            assert _read_frame(s, codec)[0] == frames.T_OPENED
            rec = Record(seq + 1, 0, 0, 4096, gen, KIND_WRITE, 0, bytes([attempt]) * 4096)
            frame = bytearray(codec.encode(frames.T_BATCH, batch.encode_batch("g1", [(0, rec)],
                                                                          0, 0)))
            frame[-100] ^= 0xFF  # a flipped byte in the body
            s.sendall(bytes(frame))
            ftype, body = _read_frame(s, codec)
        assert ftype == frames.T_ERROR
        assert body["code"] == frames.E_PROTOCOL and "checksum" in body["message"], body
    assert "EndOfChannel" not in sites.b.log.read_text()


def test_site_b_killed_at_random_points_of_apply_loses_no_acked_batch(sites: Lab) -> None:
    """kill -9 of B five times at random moments while it journals and applies (a 1 s
    history promotes all the time): after each restart B still holds everything it had
    acknowledged to A, and the oracle passes the end point of both disks."""
    from lab.oracle import OracleWriter, check

    disks = [sites.image("vda.img", 8 * MiB), sites.image("vdb.img", 8 * MiB)]
    uris = sites.protect("g1", *disks, extra=("--history", "1s"))
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    writer = OracleWriter(uris, 8 * MiB, seed=31, blocks=1024, pause=0.002)
    writer.start()
    rng = random.Random(31)
    kills = []
    try:
        for _ in range(5):
            time.sleep(rng.uniform(0.3, 1.5))
            sites.b.kill()
            acked = {n: (d["last_acked_gen"], d["last_acked_seq"])
                     for n, d in sites.a.status("g1")["groups"]["g1"]["disks"].items()}
            sites.b.start()
            held = {n: (d["durable_gen"], d["durable_seq"])
                    for n, d in sites.b.status()["replicas"]["g1"]["disks"].items()}
            for name in acked:
                assert held[name] >= acked[name], (name, held, acked)
            kills.append((writer.log.acked, acked))
    finally:
        barrier = writer.finish()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    images = {n: str(sites.restore("g1", n)) for n in ("vda", "vdb")}
    v = check(images, writer.log, barrier)
    assert v.prefix == writer.log.acked, v
    print("\nkill -9 of B x%d at writes %s: 0 acked batches lost, oracle prefix %d of %d"
          % (len(kills), [k[0] for k in kills], v.prefix, writer.log.acked))


def test_the_same_disk_twice_in_one_protect_is_one_clear_4xx(sites: Lab) -> None:
    """Under two names, by two paths (a symlink): one line naming the disk, a 4xx, nothing
    protected, no traceback in the agent's log."""
    import os

    from agent.errors import RequestError

    disk = sites.image("vda.img", 8 * MiB)
    link = sites.work / "alias.img"
    os.symlink(disk, link)
    for second in (disk, link):
        proc = sites.a.ferry("protect", "g1", "--disk", "a=%s" % disk, "--disk",
                             "b=%s" % second, "--target", sites.b.address, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1, proc
        assert lines[0].startswith("ferry: error: disk b: ") and "same disk" in lines[0], lines
        with pytest.raises(RequestError, match="same disk"):
            sites.a.api("POST", "/v1/groups", {
                "name": "g1", "target": sites.b.address,
                "disks": [{"name": "a", "path": str(disk)}, {"name": "b", "path": str(second)}]})
    assert sites.a.status()["groups"] == {}
    assert "Traceback" not in sites.a.log.read_text()
