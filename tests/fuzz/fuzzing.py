"""Fuzz targets and a mutation engine, for ``make fuzz`` (``run.py``) and the short run and
regression seeds in ``test_fuzz.py``.

Each target takes bytes and may only end in the errors that its input's owner documents
(``ALLOWED``): anything else is a crash, kept as a file under ``crashes/`` to become a
regression seed (``seeds/``). Targets:

- ``site``: bytes fed to a target session after a handshake, and to a fresh one (frames:
  header, checksum, msgpack body, ``messages.*.parse``);
- ``site-body``: the bytes as the msgpack body of a frame of each type with a valid header
  and checksum (reaches the parsers behind the checksum);
- ``localwire``: the splitter's local wire (header, records, ack, JSON payloads);
- ``http``: an API request body (``request.parse_body``) and, once it parses, every field
  reader the routes use on it.

Mutations: flip a bit, set a byte, insert or delete a run, duplicate a run, splice two
inputs, truncate, interesting integers at a random place, random bytes.
"""

from __future__ import annotations

import os
import random
import struct
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import xxhash  # noqa: E402

from agent.api import request  # noqa: E402
from agent.checkpoints import Checkpoint  # noqa: E402
from agent.errors import FerryError, RemoteProtocolError  # noqa: E402
from agent.protocol import frames, messages  # noqa: E402
from agent.protocol.pair import ConnectionPair, feed  # noqa: E402
from agent.protocol.session import SourceSession, TargetSession  # noqa: E402
from formats import localwire as lw  # noqa: E402

HERE = Path(__file__).resolve().parent
SEEDS = HERE / "seeds"
CRASHES = HERE / "crashes"

DISKS = (("vda", 1 << 20), ("vdb", 2 << 20))
OPEN = messages.Open("g1", "p" * 32, DISKS, limits=(3600, 1 << 30))


def frame_of(msg: messages.Message) -> bytes:
    return frames.Codec().encode(msg.TYPE, msg.body())


def _streaming_target() -> TargetSession:
    pair = ConnectionPair()
    pair.source_sends(messages.Hello("site-a"))
    pair.target_sends(messages.Welcome("B"))
    pair.source_sends(OPEN)
    pair.target_sends(messages.Opened("g1", ((0, 0), (3, 7))))
    return pair.target


def _rec(seq: int, data: bytes = b"x" * 512) -> lw.Record:
    return lw.Record(seq, 10 + seq, 4096 * seq, len(data), 1, lw.KIND_WRITE, 0, data)


def site_seeds() -> List[bytes]:
    cp = Checkpoint("c1", 5, "auto", None, [(1, 1), (0, 0)])
    msgs = [messages.Hello("a"), messages.Welcome("b"), OPEN,
            messages.Open("g1", "p", DISKS, True, verify=(1, 1 << 20, 0, 2)),
            messages.Opened("g1", ((0, 0), (0, 0))),
            messages.Opened("g1", ((0, 0), (0, 0)), 0, b"d" * 16, (1, 2)),
            messages.Seed("g1", 0, 1 << 20, 0, b"d" * 16, b"\0"),
            messages.Batch("g1", [(0, _rec(1)), (1, _rec(2, b""))], 1, 1, [cp]),
            messages.Ack("g1", ((1, 1), (0, 0)), ("c1",)),
            messages.Error("x", "y"), messages.Pair("t", "s", "c", b"m"),
            messages.Paired("s", b"m")]
    return [frame_of(m) for m in msgs]


def localwire_seeds() -> List[bytes]:
    recs = [_rec(1), lw.Record(2, 5, 0, 4096, 1, lw.KIND_ZERO, 0, None)]
    out = [b"".join(lw.pack_records(recs, 7)), lw.pack_ack(3, 9),
           lw.pack_json(lw.MSG_HELLO, {"disk_id": "d", "gen": 1, "size": 4096})]
    return out


def http_seeds() -> List[bytes]:
    return [b'{"disk": "vda", "ranges": [[0, 4096]]}', b'{"name": "g", "target": "h:1", '
            b'"disks": [{"name": "a", "path": "/x"}], "bandwidth": 5, "history_s": 60}',
            b'{"timeout": 1.5, "tag": "t", "checkpoint": "c", "at_ns": 5}',
            b'{"address": "[::1]:4005", "token": "x", "chunk": 4096, "repair": true}', b"{}"]


ALLOWED_SITE = (RemoteProtocolError, frames.RemoteError, EOFError)


def target_site(data: bytes) -> None:
    for session in (_streaming_target(), TargetSession()):
        try:
            feed(session, data)
        except ALLOWED_SITE:
            pass
    src = SourceSession()
    src.send(messages.Hello("a"))
    try:
        feed(src, data)
    except ALLOWED_SITE:
        pass


FRAME_TYPES = sorted(frames.TYPE_NAMES)


def target_site_body(data: bytes) -> None:
    """Under one frame type (from the input's hash): to a streaming target, and to a new
    one (HELLO or PAIR first)."""
    ftype = FRAME_TYPES[xxhash.xxh3_64_intdigest(data) % len(FRAME_TYPES)]
    frame = frames.HEADER.pack(frames.MAGIC, frames.WIRE_VERSION, ftype, 0, len(data), 0,
                               xxhash.xxh3_64_intdigest(data)) + data
    for session in (_streaming_target(), TargetSession()):
        try:
            feed(session, frame)
        except ALLOWED_SITE:
            pass


def target_localwire(data: bytes) -> None:
    try:
        if len(data) >= lw.HEADER.size:
            lw.unpack_header(data[:lw.HEADER.size])
    except lw.ProtocolError:
        pass
    for fn in (lw.unpack_records, lw.unpack_ack, lw.unpack_json):
        try:
            fn(data)
        except lw.ProtocolError:
            pass


READERS: List[Tuple[str, Callable]] = [
    ("disk", lambda b: request.name_of(b, "disk")),
    ("ranges", request.ranges_of),
    ("timeout", lambda b: request.seconds_of(b, "timeout", 1.0)),
    ("bandwidth", request.bandwidth_of),
    ("point", request.point_of),
    ("tag", request.tag_of),
    ("address", lambda b: request.address_of(b, "address")),
    ("to", lambda b: request.path_of(b, "to")),
    ("chunk", lambda b: request.int_of(b, "chunk", 4096, 1 << 26, 1 << 20)),
    ("repair", lambda b: request.bool_of(b, "repair")),
]


def target_http(data: bytes) -> None:
    try:
        body = request.parse_body(data)
    except FerryError as e:
        _one_line(e)
        return
    for _name, reader in READERS:
        try:
            reader(body)
        except FerryError as e:
            _one_line(e)


def _one_line(e: Exception) -> None:
    text = str(e)
    if not text.strip() or "\n" in text:
        raise AssertionError("error %s is not one line: %r" % (type(e).__name__, text))


TARGETS: Dict[str, Tuple[Callable[[bytes], None], Callable[[], List[bytes]]]] = {
    "site": (target_site, site_seeds),
    "site-body": (target_site_body, lambda: [frames.pack(m) for m in (
        {"group": "g1", "durable": [[1, 1], [0, 0]]}, {"code": "x", "message": "y"},
        {"group": "g1", "disk": 0, "chunk": 1 << 20, "first": 0, "digests": b"d" * 16,
         "touched": b"\0"})]),
    "localwire": (target_localwire, localwire_seeds),
    "http": (target_http, http_seeds),
}

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
               (1 << 63) - 1, (1 << 64) - 1]


def mutate(rng: random.Random, data: bytes, corpus: List[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        op = rng.randrange(9)
        n = len(buf)
        if op == 0 and n:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:
            i = rng.randrange(n + 1)
            buf[i:i] = os.urandom(rng.choice((1, 2, 4, 8, 32)))
        elif op == 3 and n:
            i = rng.randrange(n)
            del buf[i:i + rng.choice((1, 2, 4, 16, 64))]
        elif op == 4 and n:
            i = rng.randrange(n)
            j = min(n, i + rng.choice((1, 4, 16, 256)))
            buf[i:i] = buf[i:j]
        elif op == 5:
            other = rng.choice(corpus)
            i, j = rng.randrange(n + 1), rng.randrange(len(other) + 1)
            buf = buf[:i] + other[j:]
        elif op == 6 and n:
            del buf[rng.randrange(n):]
        elif op == 7 and n >= 8:
            i = rng.randrange(n - 7)
            size, fmt = rng.choice(((1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q"), (4, ">I")))
            v = rng.choice(INTERESTING) & ((1 << (8 * size)) - 1)
            buf[i:i + size] = struct.pack(fmt, v)
        else:
            buf = bytearray(os.urandom(rng.randrange(64)))
    return bytes(buf)


def stored(target: str) -> List[bytes]:
    """The regression seeds kept for ``target`` (seeds/ and crashes/)."""
    out = []
    for d in (SEEDS, CRASHES):
        for p in sorted(d.glob("%s-*.bin" % target)):
            out.append(p.read_bytes())
    return out


def run(target: str, inputs: int, seed: int, keep_crashes: bool = True
        ) -> Tuple[int, List[str]]:
    """``inputs`` mutated inputs through ``target``; (inputs run, crash descriptions)."""
    fn, seeds = TARGETS[target]
    corpus = seeds() + stored(target)
    rng = random.Random(seed)
    crashes: List[str] = []
    for data in corpus:
        _one(fn, target, data, crashes, keep_crashes)
    for _ in range(inputs):
        _one(fn, target, mutate(rng, rng.choice(corpus), corpus), crashes, keep_crashes)
    return inputs + len(corpus), crashes


def _one(fn: Callable[[bytes], None], target: str, data: bytes, crashes: List[str],
         keep: bool) -> None:
    try:
        fn(data)
    except Exception as e:
        name = "%s-%s.bin" % (target, xxhash.xxh3_64_hexdigest(data))
        if keep:
            CRASHES.mkdir(exist_ok=True)
            (CRASHES / name).write_bytes(data)
        crashes.append("%s: %s: %s" % (name, type(e).__name__, str(e)[:200]))
