"""The session protocol in memory: both ends joined by a ConnectionPair, no sockets.

Every transition of the tables, every refusal, and a fuzzer that throws arbitrary bytes and
arbitrary (well-formed but misplaced) frames at both ends: the only outcomes allowed are a
message, NEED_DATA, or a ProtocolError / RemoteError / EOFError, never anything else.
"""

from __future__ import annotations

import struct
from typing import Optional

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.checkpoints import Checkpoint
from agent.errors import LocalProtocolError, RemoteProtocolError
from agent.protocol import cursor, frames, messages
from agent.protocol.pair import ConnectionPair, feed
from agent.protocol.session import NEED_DATA, SourceSession, State, TargetSession
from formats.localwire import KIND_WRITE, Record

DISKS = (("vda", 1 << 20), ("vdb", 2 << 20))
OPEN = messages.Open("g1", "p" * 32, DISKS, limits=(3600, 1 << 30))


def handshake(pair: ConnectionPair, opened: Optional[messages.Opened] = None) -> None:
    (hello,) = pair.source_sends(messages.Hello("site-a"))
    assert isinstance(hello, messages.Hello) and hello.site == "site-a"
    (welcome,) = pair.target_sends(messages.Welcome("B"))
    assert welcome.site == "B" and pair.source.state is State.WELCOMED
    (got,) = pair.source_sends(OPEN)
    assert got == OPEN
    assert pair.target.context == messages.Context("g1", 2)
    got_opened = pair.target_sends(opened or messages.Opened("g1", ((0, 0), (3, 7))))
    assert got_opened[0].durable == (opened.durable if opened else ((0, 0), (3, 7)))


def rec(seq: int, data: bytes = b"x" * 512, disk: int = 0) -> tuple:
    return disk, Record(seq, 10 + seq, 4096 * seq, len(data), 1, KIND_WRITE, 0, data)


def test_a_whole_session() -> None:
    pair = ConnectionPair()
    handshake(pair)
    assert pair.source.state is State.STREAMING and pair.target.state is State.STREAMING
    cp = Checkpoint("c1", 99, "user", "before upgrade", [(1, 2), (0, 0)])
    batch = messages.Batch("g1", [rec(1), rec(2)], 1000, 100, [cp])
    (got,) = pair.source_sends(batch)
    assert [(r.disk, r.seq, r.data) for r in got.records] == [(0, 1, b"x" * 512),
                                                               (0, 2, b"x" * 512)]
    assert got.checkpoints[0].cut == [(1, 2), (0, 0)]
    assert got.checkpoints[0].wall_ns == 1000 - (100 - 99)  # the source's wall time
    (ack,) = pair.target_sends(messages.Ack("g1", ((1, 2), (0, 0)), ("c1",)))
    assert ack.durable == ((1, 2), (0, 0)) and ack.checkpoints == ("c1",)
    assert pair.source.bytes_sent == pair.target.bytes_received > 0


def test_compressed_batches_round_trip() -> None:
    pair = ConnectionPair()
    handshake(pair)
    data = b"compressible " * 4000
    frame = pair.source.send(messages.Batch("g1", [rec(1, data)], 1, 1), compress=True)
    assert len(frame) < len(data) // 4
    (got,) = feed(pair.target, frame)
    assert got.records[0].data == data


def test_seed_frames_come_between_opened_and_the_stream() -> None:
    pair = ConnectionPair()
    pair.source_sends(messages.Hello("a"))
    pair.target_sends(messages.Welcome("B"))
    pair.source_sends(OPEN)
    seed = messages.Seed("g1", 1, 1 << 20, 0, b"d" * 32, b"\0\0")
    got = pair.target_sends(messages.Opened("g1", ((0, 0), (0, 0)), seed_frames=2), seed)
    assert pair.source.state is State.SEEDING and pair.target.state is State.SEEDING
    with pytest.raises(LocalProtocolError):  # the target owes a SEED, not an ACK
        pair.target.send(messages.Ack("g1", ((0, 0), (0, 0))))
    got += pair.target_sends(seed)
    assert [type(m) for m in got] == [messages.Opened, messages.Seed, messages.Seed]
    assert pair.source.state is State.STREAMING and pair.target.state is State.STREAMING


def test_a_probe_ends_at_opened() -> None:
    pair = ConnectionPair()
    pair.source_sends(messages.Hello("a"))
    pair.target_sends(messages.Welcome("B"))
    pair.source_sends(messages.Open("g1", "p", DISKS, probe=True))
    pair.target_sends(messages.Opened("g1", ((0, 0), (0, 0))))
    assert pair.source.state is State.DONE and pair.target.state is State.DONE
    with pytest.raises(LocalProtocolError):
        pair.source.send(messages.Batch("g1", [], 1, 1))


def test_pairing_is_its_own_short_session() -> None:
    pair = ConnectionPair()
    (got,) = pair.source_sends(messages.Pair("1a2b3c4d", "A", "PEM", b"m" * 32))
    assert isinstance(got, messages.Pair) and pair.target.state is State.PAIR_RECEIVED
    pair.target_sends(messages.Paired("B", b"n" * 32))
    assert pair.source.state is State.DONE


def test_an_error_closes_the_session_both_ways() -> None:
    pair = ConnectionPair()
    pair.source_sends(messages.Hello("a"))
    frame = pair.target.send(messages.Error(frames.E_UNPAIRED, "pair first"))
    assert pair.target.state is State.CLOSED
    with pytest.raises(frames.RemoteError) as e:
        feed(pair.source, frame)
    assert e.value.code == frames.E_UNPAIRED and pair.source.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        pair.source.send(messages.Error("x", "after the end"))


@pytest.mark.parametrize("sender, msg", [
    ("source", messages.Batch("g1", [], 1, 1)),        # before the handshake
    ("source", messages.Open("g1", "p", DISKS)),      # before HELLO
    ("target", messages.Welcome("B")),                # before HELLO arrived
    ("target", messages.Ack("g1", ((0, 0), (0, 0)))),
])
def test_sending_out_of_turn_is_a_local_error(sender: str, msg: messages.Message) -> None:
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError):
        getattr(pair, sender).send(msg)


def frame_of(msg: messages.Message) -> bytes:
    return frames.Codec().encode(msg.TYPE, msg.body())


@pytest.mark.parametrize("msg", [
    messages.Open("g1", "p", DISKS),                  # OPEN before HELLO
    messages.Batch("g1", [], 1, 1),
    messages.Welcome("x"),                            # the target's own frame
])
def test_receiving_out_of_turn_is_the_peers_error(msg: messages.Message) -> None:
    with pytest.raises(RemoteProtocolError):
        feed(TargetSession(), frame_of(msg))


def test_bodies_are_checked_against_the_session() -> None:
    pair = ConnectionPair()
    handshake(pair)
    bad = [
        messages.Batch("g2", [rec(1)], 1, 1),                    # another group
        messages.Batch("g1", [rec(1, disk=5)], 1, 1),            # no such disk
        messages.Batch("g1", [], 1, 1, [Checkpoint("c", 1, "auto", None, [(1, 1)])]),
    ]
    for msg in bad:
        with pytest.raises(RemoteProtocolError):
            feed(_streaming_target(), frame_of(msg))
    with pytest.raises(RemoteProtocolError):  # ACK for 3 disks of a 2-disk group
        feed(pair.source, frame_of(messages.Ack("g1", ((0, 0),) * 3)))


def _streaming_target() -> TargetSession:
    pair = ConnectionPair()
    handshake(pair)
    return pair.target


@pytest.mark.parametrize("body, why", [
    ({"protocol": 2, "site": "a"}, "protocol 2"),
    ({"site": "a"}, "missing field"),
    ({"protocol": True, "site": "a"}, "wrong type"),
])
def test_hello_is_checked(body: dict, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        feed(TargetSession(), frames.Codec().encode(frames.T_HELLO, body))


@pytest.mark.parametrize("change, why", [
    ({"group": "../etc"}, "not a valid name"),
    ({"group": "g\n"}, "not a valid name"),
    ({"disks": []}, "1 to 64 disks"),
    ({"disks": [{"name": "a", "size": 0}]}, "bad size"),
    ({"disks": [{"name": "a", "size": 1}, {"name": "a", "size": 1}]}, "given twice"),
    ({"disks": ["a"]}, "not a map"),
    ({"history_s": 0, "journal_max": 1}, "out of range"),
    ({"journal_max": "1"}, "wrong type"),
    ({"seeds": {"a": "x\0y"}}, "bad seed path"),
])
def test_open_is_checked(change: dict, why: str) -> None:
    session = TargetSession()
    feed(session, frame_of(messages.Hello("a")))
    session.send(messages.Welcome("B"))
    body = dict(OPEN.body(), **change)
    with pytest.raises(RemoteProtocolError, match=why):
        feed(session, frames.Codec().encode(frames.T_OPEN, body))


def test_a_frame_can_arrive_a_byte_at_a_time_and_eof_is_said() -> None:
    session = TargetSession()
    frame = frame_of(messages.Hello("site-a"))
    for b in frame[:-1]:
        session.receive_data(bytes([b]))
        assert session.next_event() is NEED_DATA
    session.receive_data(frame[-1:])
    assert isinstance(session.next_event(), messages.Hello)
    session.receive_data(b"")
    with pytest.raises(EOFError):
        session.next_event()
    with pytest.raises(LocalProtocolError):  # a driver that reads too much is a bug
        session.receive_data(b"\0" * (frames.HEADER.size + 1))


def test_cursor_rules() -> None:
    c = cursor.Cursor((3, 7))
    assert c.step(3, 7) is cursor.Step.DUPLICATE and c.step(2, 99) is cursor.Step.DUPLICATE
    assert c.step(3, 9) is cursor.Step.GAP and c.step(4, 2) is cursor.Step.GAP
    assert c.take(4, 1) is cursor.Step.NEXT and c.point == (4, 1)
    assert c.take(4, 2) is cursor.Step.NEXT and c.take(4, 2) is cursor.Step.DUPLICATE


# -- fuzzing ----------------------------------------------------------------------------------

ALLOWED = (RemoteProtocolError, frames.RemoteError, EOFError)


def _valid_frames() -> list:
    cp = Checkpoint("c1", 5, "auto", None, [(1, 1), (0, 0)])
    msgs = [messages.Hello("a"), messages.Welcome("b"), OPEN,
            messages.Opened("g1", ((0, 0), (0, 0))),
            messages.Seed("g1", 0, 1 << 20, 0, b"d" * 16, b"\0"),
            messages.Batch("g1", [rec(1)], 1, 1, [cp]),
            messages.Ack("g1", ((1, 1), (0, 0)), ("c1",)),
            messages.Error("x", "y"), messages.Pair("t", "s", "c", b"m"),
            messages.Paired("s", b"m")]
    return [frame_of(m) for m in msgs]


VALID = _valid_frames()


def _drive(session, data: bytes) -> None:
    try:
        feed(session, data)
    except ALLOWED:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(VALID), st.binary(max_size=64)), max_size=8),
       st.sampled_from(["source", "target", "streaming"]))
def test_fuzz_sessions_take_only_what_is_legal(chunks: list, who: str) -> None:
    session = {"source": SourceSession, "target": TargetSession}.get(who, _streaming_target)()
    if who == "source":
        session.send(messages.Hello("a"))
    _drive(session, b"".join(chunks))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID), st.integers(0, 200), st.integers(0, 255))
def test_fuzz_a_flipped_byte_is_refused_or_harmless(frame: bytes, pos: int, value: int) -> None:
    data = bytearray(frame)
    data[pos % len(data)] = value
    _drive(_streaming_target(), bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.one_of(
    st.integers(-(1 << 63), (1 << 64) - 1), st.text(max_size=20), st.binary(max_size=40),
    st.booleans(), st.none(),
    st.lists(st.integers(0, 1 << 40), max_size=3)), max_size=8),
    st.sampled_from(sorted(frames.TYPE_NAMES)))
def test_fuzz_arbitrary_bodies(body: dict, ftype: int) -> None:
    """Any map under any frame type, with a valid header and checksum."""
    packed = frames.pack(body)
    frame = frames.HEADER.pack(frames.MAGIC, frames.WIRE_VERSION, ftype, 0, len(packed), 0,
                               xxhash.xxh3_64_intdigest(packed)) + packed
    _drive(_streaming_target(), frame)
    target = TargetSession()
    _drive(target, frame)


def test_header_limits_are_enforced_before_the_body_is_read() -> None:
    header = frames.HEADER.pack(frames.MAGIC, frames.WIRE_VERSION, frames.T_BATCH, 0,
                                frames.MAX_FRAME + 1, 0, 0)
    session = TargetSession()
    session.receive_data(header)
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        session.next_event()
    assert struct.calcsize("<4sBBHIIQ") == frames.HEADER.size


def test_a_strangers_first_frame_is_small() -> None:
    """Before HELLO or PAIR, a frame over MAX_FIRST_FRAME is refused from its header alone,
    so an unauthenticated peer never makes the target hold a large body."""
    header = frames.HEADER.pack(frames.MAGIC, frames.WIRE_VERSION, frames.T_HELLO, 0,
                                frames.MAX_FIRST_FRAME + 1, 0, 0)
    session = TargetSession()
    session.receive_data(header)
    with pytest.raises(RemoteProtocolError, match="over the limit of %d" % frames.MAX_FIRST_FRAME):
        session.next_event()
    pair = ConnectionPair()
    handshake(pair)  # after the handshake the usual limit holds
    assert pair.target.max_frame() == frames.MAX_FRAME
    big = messages.Batch("g1", [rec(1, b"y" * (frames.MAX_FIRST_FRAME * 2))], 1, 1)
    (got,) = pair.source_sends(big)
    assert len(got.records[0].data) == frames.MAX_FIRST_FRAME * 2


@pytest.mark.parametrize("body, why", [
    ({"group": "g1", "durable": [[0, 0], [0, 0]], "seed_frames": -1}, "bad seed_frames"),
    ({"group": "g1", "durable": [[0, 0], [0, 0]], "seed_frames": True}, "bad seed_frames"),
    ({"group": "g1", "durable": [[0, 0], [0, -1]]}, "bad durable entry"),
    ({"group": "g2", "durable": [[0, 0], [0, 0]]}, "group"),
])
def test_opened_is_checked(body: dict, why: str) -> None:
    session = SourceSession()
    session.send(messages.Hello("a"))
    feed(session, frame_of(messages.Welcome("B")))
    session.send(OPEN)
    with pytest.raises(RemoteProtocolError, match=why):
        feed(session, frames.Codec().encode(frames.T_OPENED, body))


def test_ack_checkpoints_are_checked() -> None:
    pair = ConnectionPair()
    handshake(pair)
    body = {"group": "g1", "durable": [[0, 0], [0, 0]], "checkpoints": "c1"}
    with pytest.raises(RemoteProtocolError, match="bad checkpoints list in ACK"):
        feed(pair.source, frames.Codec().encode(frames.T_ACK, body))
