"""Peers that have not authenticated cost site B a small, bounded budget (docs/security.md).

Frames before HELLO are refused from their header when they announce more than
MAX_FIRST_FRAME, and decoded under small limits; the gate bounds how many connections may be
unauthenticated at once, overall and per address; and against real agents paired over TLS,
40 connections without a client certificate and 40 with an unpaired one, each announcing a
maximal frame, and a few hundred half-open connections leave B's peak RSS within the stated
budget and the replicating group identical.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import msgpack
import pytest
import xxhash
import zstandard
from conftest import Lab
from test_faults import Writer, check_identical

from agent import tls
from agent.protocol import frames
from agent.protocol.session import NEED_DATA, TargetSession
from agent.target import preauth

MiB = 1024 * 1024
# What docs/security.md promises: unauthenticated peers, whatever they send, raise site B's
# peak RSS by at most this over what replication alone uses.
PREAUTH_BUDGET = 32 * MiB
SIZE = 64 * MiB
HALF_OPEN = int(os.environ.get("FERRY_TEST_HALF_OPEN", "300"))


def header(ftype: int, length: int, flags: int = 0, checksum: int = 0) -> bytes:
    return frames.HEADER.pack(frames.MAGIC, frames.WIRE_VERSION, ftype, flags, length, 0,
                              checksum)


def frame(ftype: int, body: bytes, flags: int = 0) -> bytes:
    return header(ftype, len(body), flags, xxhash.xxh3_64_intdigest(body)) + body


# -- the session and the codec alone -----------------------------------------------------

def feed(session: TargetSession, data: bytes) -> Any:
    """Bytes to a session as a driver gives them (never more than it wants); its event."""
    while True:
        take = session.wanted()
        session.receive_data(data[:take])
        data = data[take:]
        event = session.next_event()
        if event is not NEED_DATA or not data:
            return event


def test_a_maximal_frame_before_hello_is_refused_at_its_header() -> None:
    session = TargetSession()
    session.receive_data(header(frames.T_HELLO, frames.MAX_FRAME))
    with pytest.raises(frames.ProtocolError, match="over the limit of %d"
                       % frames.MAX_FIRST_FRAME):
        session.next_event()
    # Nothing of the body was asked for: the header was all that was read.
    assert session.pending_length == 0


def test_a_first_frame_just_within_the_limit_is_read() -> None:
    session = TargetSession()
    session.receive_data(header(frames.T_HELLO, frames.MAX_FIRST_FRAME))
    assert session.next_event() is NEED_DATA
    assert session.wanted() == frames.MAX_FIRST_FRAME


def test_a_zstd_bomb_before_hello_is_refused() -> None:
    inflated = msgpack.packb({"protocol": 1, "site": "x" * (frames.MAX_FIRST_FRAME * 4)})
    body = zstandard.ZstdCompressor().compress(inflated)
    assert len(body) < frames.MAX_FIRST_FRAME
    session = TargetSession()
    with pytest.raises(frames.ProtocolError, match="decompresses past the limit"):
        feed(session, frame(frames.T_HELLO, body, frames.F_ZSTD))


@pytest.mark.parametrize("obj", [
    [[] for _ in range(1000)],                          # many small objects
    {"protocol": 1, "site": "s", "x": list(range(17))},
    {str(i): i for i in range(17)},
    {"protocol": 1, "site": "s" * (8 * 1024 + 1)},
    {"protocol": 1, "site": "s", "mac": b"m" * 1025},
])
def test_a_first_frame_is_decoded_under_small_limits(obj) -> None:
    session = TargetSession()
    with pytest.raises(frames.ProtocolError, match=r"bad msgpack body|not a map"):
        feed(session, frame(frames.T_HELLO, msgpack.packb(obj, use_bin_type=True)))


def test_a_pair_frame_fits_the_first_frame_limits(tmp_path: Path) -> None:
    """The largest pre-authentication message (PAIR, with a real certificate) is taken."""
    identity = tls.load_identity(str(tmp_path), "a-site-with-a-long-name-" + "x" * 40)
    from agent.protocol import messages
    pair = messages.Pair("1a2b3c4d", "site", identity.cert_pem, b"m" * 32)
    body = frames.pack(pair.body())
    assert len(body) < frames.MAX_FIRST_FRAME
    session = TargetSession()
    assert feed(session, frame(frames.T_PAIR, body)) == pair


# -- the gate alone ------------------------------------------------------------------------

def test_the_gate_bounds_each_address_and_all() -> None:
    gate = preauth.Gate(total=5, per_address=2)
    a1, a2 = gate.enter("a"), gate.enter("a")
    assert a1 and a2 and gate.enter("a") is None
    b1, b2, c1 = gate.enter("b"), gate.enter("b"), gate.enter("c")
    assert b1 and b2 and c1
    assert gate.enter("d") is None  # 5 held overall
    assert gate.statistics()["refused"] == 2 and gate.count == 5
    a1.release()
    a1.release()  # twice is once
    assert gate.count == 4 and gate.held["a"] == 1
    assert gate.enter("d") is not None and gate.enter("e") is None
    for t in (a2, b1, b2, c1):
        t.release()
    assert gate.held == {"d": 1}


# -- real agents, paired over TLS ------------------------------------------------------------

def _status_kib(pid: int, field: str) -> int:
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError("no %s for pid %d" % (field, pid))


def _reset_peak(pid: int) -> None:
    """VmHWM back to the current RSS (proc(5), clear_refs "5")."""
    Path("/proc/%d/clear_refs" % pid).write_text("5")


def _peak_over(pid: int, seconds: float, during: Optional[Callable[[], Any]] = None
               ) -> Tuple[int, Any]:
    """B's peak RSS (bytes) over ``during`` and ``seconds`` after it."""
    _reset_peak(pid)
    result = during() if during is not None else None
    time.sleep(seconds)
    return _status_kib(pid, "VmHWM") * 1024, result


def _attack(address: Tuple[str, int], ctx: ssl.SSLContext) -> str:
    """One unauthenticated TLS connection announcing a maximal frame and sending its body
    until refused; what became of it."""
    raw = socket.create_connection(address, timeout=30)
    try:
        conn = ctx.wrap_socket(raw, server_hostname=tls.SNI)
    except (ssl.SSLError, OSError) as e:
        raw.close()
        return "handshake: %s" % type(e).__name__
    sent = 0
    try:
        conn.sendall(header(frames.T_HELLO, frames.MAX_FRAME))
        chunk = b"\0" * MiB
        conn.settimeout(5)
        while sent < frames.MAX_FRAME:
            conn.sendall(chunk)
            sent += len(chunk)
        return "sent %d bytes" % sent
    except (ssl.SSLError, OSError) as e:
        err: Optional[str] = None
        try:
            conn.settimeout(5)
            data = conn.recv(65536)
            if len(data) >= frames.HEADER.size:
                length = struct.unpack_from("<I", data, 8)[0]
                err = msgpack.unpackb(data[24:24 + length]).get("message")
        except (ssl.SSLError, OSError, ValueError):
            pass
        return "refused after %d bytes: %s" % (sent, err or type(e).__name__)
    finally:
        conn.close()


def _unpaired_context(tmp_path: Path, with_cert: bool) -> ssl.SSLContext:
    ctx = tls.pairing_context()
    if with_cert:
        identity = tls.load_identity(str(tmp_path / "stranger"), "stranger")
        ctx.load_cert_chain(identity.cert_path, identity.key_path)
    return ctx


@pytest.fixture
def replicating(tls_lab: Lab):
    lab = tls_lab
    lab.b.start()
    lab.a.start()
    lab.a.pair_with(lab.b)
    disk = lab.image("vda.img", SIZE)
    uri = lab.a.ferry("protect", "g1", "--disk", "vda=%s" % disk, "--target",
                      lab.b.address).stdout.split("\t")[1].strip()
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    writer = Writer(uri, 7)
    writer.start()
    yield lab, disk, writer
    writer.finish()


def test_unauthenticated_tls_peers_stay_within_the_budget(replicating, tmp_path: Path
                                                          ) -> None:
    lab, disk, writer = replicating
    pid = lab.b.proc.pid
    b_addr = ("127.0.0.1", lab.b.port)
    alone, _ = _peak_over(pid, 8)
    contexts = [_unpaired_context(tmp_path, False)] * 40 + \
        [_unpaired_context(tmp_path, True)] * 40

    def attack():
        with ThreadPoolExecutor(len(contexts)) as pool:
            return list(pool.map(lambda c: _attack(b_addr, c), contexts))
    attacked, outcomes = _peak_over(pid, 2, attack)
    # Not one connection had its maximal frame taken; those the gate let in were told why.
    assert not [o for o in outcomes if o.startswith("sent")], outcomes
    assert any("over the limit of %d" % frames.MAX_FIRST_FRAME in o for o in outcomes), \
        outcomes
    print("B peak RSS: alone %.1f MiB, attacked %.1f MiB; outcomes %s"
          % (alone / MiB, attacked / MiB, sorted({o[:60] for o in outcomes})))
    assert attacked <= alone + PREAUTH_BUDGET, (
        "B's peak RSS %d MiB under attack, %d MiB with replication alone"
        % (attacked // MiB, alone // MiB))
    # The worst a stranger can make B hold: every slot with a first frame short of one byte.
    holders: List[ssl.SSLSocket] = []

    def hold():
        for _ in range(40):
            try:
                conn = contexts[0].wrap_socket(socket.create_connection(b_addr, timeout=10),
                                               server_hostname=tls.SNI)
                conn.sendall(header(frames.T_HELLO, frames.MAX_FIRST_FRAME)
                             + os.urandom(frames.MAX_FIRST_FRAME - 1))
                holders.append(conn)
            except (ssl.SSLError, OSError):
                pass  # over the gate's bound: closed at once
    try:
        held, _ = _peak_over(pid, 2, hold)
    finally:
        for conn in holders:
            conn.close()
    print("B peak RSS with %d connections holding a first frame: %.1f MiB"
          % (len(holders), held / MiB))
    assert 1 <= len(holders) <= preauth.MAX_UNAUTHENTICATED_PER_ADDRESS + 1
    assert held <= alone + PREAUTH_BUDGET
    writer.finish()
    check_identical(lab, disk)
    assert lab.b.proc.poll() is None


def test_half_open_connections_are_capped(replicating) -> None:
    lab, disk, writer = replicating
    pid = lab.b.proc.pid
    fds_before = len(os.listdir("/proc/%d/fd" % pid))
    socks: List[socket.socket] = []
    try:
        for _ in range(HALF_OPEN):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", lab.b.port))
            except BlockingIOError:
                pass
            socks.append(s)
        time.sleep(3)  # B accepts them all and closes those over the bound at once
        fds_during = len(os.listdir("/proc/%d/fd" % pid))
        open_ = 0
        for s in socks:
            try:
                open_ += s.recv(1) != b""
            except BlockingIOError:
                open_ += 1  # still held by B, waiting for a word
            except OSError:
                pass
        cap = preauth.MAX_UNAUTHENTICATED_PER_ADDRESS
        assert open_ <= cap, "%d of %d half-open connections held" % (open_, HALF_OPEN)
        assert open_ >= 1  # the gate admits some: it does not shut the port
        assert fds_during <= fds_before + cap + 8, (fds_before, fds_during)
        assert "connection(s) (the latest from" in lab.b.log.read_text()
    finally:
        for s in socks:
            s.close()
    writer.finish()
    check_identical(lab, disk)
    # The slots come back: a new pairing-free probe of B's port is admitted again.
    time.sleep(1)
    assert _attack(("127.0.0.1", lab.b.port), tls.pairing_context()).startswith("refused")
