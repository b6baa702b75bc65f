"""Every message of the site-to-site protocol, parsed and checked once.

A message is a frozen dataclass with ``TYPE`` (its frame type), ``body()`` (the msgpack map
it is sent as) and ``parse(body, ctx)`` (the map as received, every field checked against
the limits and against what the session already knows: the group, its number of disks).
A body that does not hold together raises ``frames.ProtocolError`` (a RemoteProtocolError)
and nothing of it is used. The fields are documented in docs/wire.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from formats.images import REPLICA_FORMATS
from formats.records import KIND_WRITE, JRecord, Point

from ..checkpoints import Checkpoint, parse_wire
from . import batch, frames
from .frames import ProtocolError

PROTOCOL = 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_PATH = 4096
MAX_SIZE = 1 << 56            # a disk's size in bytes
MAX_HISTORY = 1 << 40         # seconds
MAX_JOURNAL = 1 << 62         # bytes
MAX_CHECKPOINTS = frames.MAX_DISKS * 16   # in one BATCH
MAX_SEED_CHUNK = 64 * 1024 * 1024
MAX_VERIFY_CHUNKS = 65536     # chunks one probe may ask digests of (ferry verify)
VERIFY_DIGEST = 8             # xxh3_64 of each chunk


@dataclass(frozen=True)
class Context:
    """What a session knows when a body arrives: the group's name and disk count."""
    group: Optional[str] = None
    ndisks: int = 0


def _name(obj: dict, key: str) -> str:
    value = frames.name_field(obj, key)
    if not NAME_RE.fullmatch(value):
        raise ProtocolError("bad %s name %r" % (key, value))
    return value


def _int(obj: dict, key: str, low: int, high: int) -> int:
    value = frames.field(obj, key, int)
    if not low <= value < high:
        raise ProtocolError("field %r out of range: %d" % (key, value))
    return value


def _points(obj: dict, key: str, ndisks: int) -> List[Point]:
    raw = frames.field(obj, key, list)
    if len(raw) != ndisks:
        raise ProtocolError("%s list of %d disks for a group of %d" % (key, len(raw), ndisks))
    out = []
    for d in raw:
        if not (isinstance(d, list) and len(d) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 64
                for x in d)):
            raise ProtocolError("bad %s entry %r" % (key, d))
        out.append((d[0], d[1]))
    return out


def _group(obj: dict, ctx: Context) -> str:
    name = frames.field(obj, "group", str)
    if ctx.group is not None and name != ctx.group:
        raise ProtocolError("a frame for group %r on a session of group %r"
                            % (name[:frames.MAX_NAME], ctx.group))
    return name


class Message:
    TYPE: ClassVar[int]

    def body(self) -> Dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def parse(cls, body: dict, ctx: Context) -> Message:
        raise NotImplementedError


@dataclass(frozen=True)
class Hello(Message):
    TYPE: ClassVar[int] = frames.T_HELLO
    site: str
    protocol: int = PROTOCOL

    def body(self) -> Dict[str, Any]:
        return {"protocol": self.protocol, "site": self.site}

    @classmethod
    def parse(cls, body: dict, ctx: Context) -> Hello:
        protocol = frames.field(body, "protocol", int)
        if protocol != PROTOCOL:
            raise ProtocolError("protocol %r, this agent speaks %d" % (protocol, PROTOCOL))
        site = body.get("site", "")
        return cls(site if isinstance(site, str) else "", protocol)


@dataclass(frozen=True)
class Welcome(Message):
    TYPE: ClassVar[int] = frames.T_WELCOME
    site: str
    protocol: int = PROTOCOL

    def body(self) -> Dict[str, Any]:
        return {"protocol": self.protocol, "site": self.site}

    @classmethod
    def parse(cls, body: dict, ctx: Context) -> Welcome:
        site, protocol = body.get("site", ""), body.get("protocol", PROTOCOL)
        return cls(site if isinstance(site, str) else "",
                   protocol if isinstance(protocol, int) else PROTOCOL)


@dataclass(frozen=True)
class Open(Message):
    """A group and its disks (name, size) in group order; a disk's place is its index."""
    TYPE: ClassVar[int] = frames.T_OPEN
    group: str
    protection: str
    disks: Tuple[Tuple[str, int], ...]
    probe: bool = False
    limits: Optional[Tuple[int, int]] = None       # (history_s, journal_max)
    seeds: Optional[Dict[str, str]] = None         # disk -> a seed file on site B
    # ferry verify (a probe only): (disk, chunk size, first chunk, chunks) to hash
    verify: Optional[Tuple[int, int, int, int]] = None
    held: Optional[int] = None                     # bytes written the target never acked
    domains: Optional[Tuple[Dict[str, Any], ...]] = None  # agent/domains/travel.py
    reserve: bool = False                          # --journal-reserve (sent only when set)
    replica_format: str = "raw"                    # --replica-format (sent unless raw)

    def body(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"group": self.group, "protection": self.protection,
                               "probe": self.probe,
                               "disks": [{"name": n, "size": s} for n, s in self.disks]}
        if self.limits is not None:
            out["history_s"], out["journal_max"] = self.limits
        if self.seeds is not None:
            out["seeds"] = dict(self.seeds)
        if self.verify is not None:
            out["verify"] = dict(zip(("disk", "chunk", "first", "count"), self.verify))
        if self.held is not None:
            out["held"] = self.held
        if self.domains is not None:
            out["domains"] = [dict(d) for d in self.domains]
        if self.reserve:
            out["journal_reserve"] = True
        if self.replica_format != "raw":
            out["replica_format"] = self.replica_format
        return out

    @classmethod
    def parse(cls, body: dict, ctx: Context) -> Open:
        group = _name(body, "group")
        protection = frames.field(body, "protection", str)
        raw = frames.field(body, "disks", list)
        if not 1 <= len(raw) <= frames.MAX_DISKS:
            raise ProtocolError("a group has 1 to %d disks, not %d"
                                % (frames.MAX_DISKS, len(raw)))
        disks = []
        for d in raw:
            if not isinstance(d, dict):
                raise ProtocolError("disk entry is not a map")
            name = _name(d, "name")
            size = frames.field(d, "size", int)
            if not 0 < size < MAX_SIZE:
                raise ProtocolError("disk %s has a bad size %d" % (name, size))
            disks.append((name, size))
        if len({n for n, _ in disks}) != len(disks):
            raise ProtocolError("a disk name is given twice")
        limits = None
        if "history_s" in body or "journal_max" in body:
            limits = (_int(body, "history_s", 1, MAX_HISTORY),
                      _int(body, "journal_max", 1, MAX_JOURNAL))
        seeds = None
        if "seeds" in body:
            raw_seeds = frames.field(body, "seeds", dict)
            for dname, path in raw_seeds.items():
                if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH or "\0" in path:
                    raise ProtocolError("bad seed path for disk %r" % (dname,))
            seeds = dict(raw_seeds)
        probe = bool(body.get("probe"))
        verify = _verify(body, disks) if "verify" in body else None
        if verify is not None and not probe:
            raise ProtocolError("verify is asked in a probe only")
        held = _int(body, "held", 0, MAX_SIZE * frames.MAX_DISKS) if "held" in body else None
        domains = None
        if "domains" in body:
            domains = _domains(frames.field(body, "domains", list), {n for n, _ in disks})
        reserve = frames.field(body, "journal_reserve", bool) if "journal_reserve" in body \
            else False
        if reserve and limits is None:
            raise ProtocolError("journal_reserve without journal_max")
        replica_format = frames.field(body, "replica_format", str) \
            if "replica_format" in body else "raw"
        if replica_format not in REPLICA_FORMATS:
            raise ProtocolError("replica_format %r is not one of %s"
                                % (replica_format[:20], ", ".join(REPLICA_FORMATS)))
        return cls(group, protection, tuple(disks), probe, limits, seeds, verify, held,
                   domains, reserve, replica_format)


def _verify(body: dict, disks: List[Tuple[str, int]]) -> Tuple[int, int, int, int]:
    """OPEN's ``verify``: a disk of the group, a power-of-two chunk of 4 KiB to 64 MiB, and
    at most MAX_VERIFY_CHUNKS chunks within the disk."""
    raw = frames.field(body, "verify", dict)
    disk = _int(raw, "disk", 0, len(disks))
    chunk = _int(raw, "chunk", 4096, MAX_SEED_CHUNK + 1)
    if chunk & (chunk - 1):
        raise ProtocolError("verify chunk %d is not a power of two" % chunk)
    total = -(-disks[disk][1] // chunk)
    first = _int(raw, "first", 0, total)
    count = _int(raw, "count", 1, MAX_VERIFY_CHUNKS + 1)
    if first + count > total:
        raise ProtocolError("verify chunks [%d, +%d) past the end of disk %s (%d chunks)"
                            % (first, count, disks[disk][0], total))
    return disk, chunk, first, count


MAX_DOMAINS = 32
MAX_DOMAIN_XML = 256 * 1024


def _domains(raw: list, disk_names: set) -> Tuple[Dict[str, Any], ...]:
    """OPEN's ``domains``: each {name, xml, disks: {target dev: a disk of the group}}, the
    libvirt domains the group was protected by (``agent/domains/travel.py``)."""
    if not 1 <= len(raw) <= MAX_DOMAINS:
        raise ProtocolError("a group has 1 to %d domains, not %d" % (MAX_DOMAINS, len(raw)))
    out = []
    for d in raw:
        if not isinstance(d, dict):
            raise ProtocolError("domain entry is not a map")
        name, xml, devs = d.get("name"), d.get("xml"), d.get("disks")
        if not isinstance(name, str) or not 0 < len(name) <= 200 or "\0" in name:
            raise ProtocolError("bad domain name %r" % (str(name)[:64],))
        if not isinstance(xml, str) or not 0 < len(xml) <= MAX_DOMAIN_XML:
            raise ProtocolError("domain %s: its definition is not 1 to %d characters"
                                % (name, MAX_DOMAIN_XML))
        if not isinstance(devs, dict) or not devs or not all(
                isinstance(k, str) and 0 < len(k) <= 32 and v in disk_names
                for k, v in devs.items()):
            raise ProtocolError("domain %s: its disks must name disks of the group" % name)
        out.append({"name": name, "xml": xml, "disks": dict(devs)})
    return tuple(out)


@dataclass(frozen=True)
class Opened(Message):
    """What site B holds of each disk (newest journaled point), and how many SEEDs follow."""
    TYPE: ClassVar[int] = frames.T_OPENED
    group: str
    durable: Tuple[Point, ...]
    seed_frames: int = 0
    # a verify probe's answer: the chunks' digests (VERIFY_DIGEST bytes each) and the
    # point of the disk they were taken at; None where site B holds no such replica
    digests: Optional[bytes] = None
    at: Optional[Point] = None

    def body(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"group": self.group, "durable": [list(d) for d in self.durable]}
        if self.seed_frames:
            out["seed_frames"] = self.seed_frames
        if self.digests is not None and self.at is not None:
            out["verify"] = {"digests": self.digests, "at": list(self.at)}
        return out

    @classmethod
    def parse(cls, body: dict, ctx: Context) -> Opened:
        n = body.get("seed_frames", 0)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 1 << 20:
            raise ProtocolError("bad seed_frames %r" % (n,))
        digests, at = None, None
        if "verify" in body:
            raw = frames.field(body, "verify", dict)
            digests = frames.field(raw, "digests", bytes)
            if len(digests) % VERIFY_DIGEST or len(digests) > MAX_VERIFY_CHUNKS * VERIFY_DIGEST:
                raise ProtocolError("verify digests of %d bytes" % len(digests))
            at = _points({"at": [raw.get("at")]}, "at", 1)[0]
        return cls(_group(body, ctx), tuple(_points(body, "durable", ctx.ndisks)), n,
                   digests, at)


@dataclass(frozen=True)
class Seed(Message):
    """Digests of a pre-seeded disk's chunks and which of them records have touched."""
    TYPE: ClassVar[int] = frames.T_SEED
    group: str
    disk: int
    chunk: int
    first: int
    digests: bytes
    touched: bytes

    def body(self) -> Dict[str, Any]:
        return {"group": self.group, "disk": self.disk, "chunk": self.chunk,
                "first": self.first, "digests": self.digests, "touched": self.touched}

    @classmethod
    def parse(cls, body: dict, ctx: Context) -> Seed:
        disk = frames.field(body, "disk", int)
        chunk = frames.field(body, "chunk", int)
        if not 0 <= disk < ctx.ndisks or not 0 < chunk <= MAX_SEED_CHUNK:
            raise ProtocolError("SEED frame for disk %d, chunk %d" % (disk, chunk))
        return cls(_group(body, ctx), disk, chunk, _int(body, "first", 0, 1 << 48),
                   frames.field(body, "digests", bytes), frames.field(body, "touched", bytes))


@dataclass(frozen=True)
class Batch(Message):
    """Change records (disk index, JRecord) and the checkpoints whose cut they complete.

    As sent, ``records`` are (disk, localwire.Record) pairs; as received, JRecords.
    """
    TYPE: ClassVar[int] = frames.T_BATCH
    group: str
    records: List[Any]
    wall_ns: int
    mono_ns: int
    checkpoints: List[Checkpoint] = field(default_factory=list)
    wire_checkpoints: Optional[List[Dict[str, Any]]] = None

    def body(self) -> Dict[str, Any]:
        cps = self.wire_checkpoints if self.wire_checkpoints is not None else \
            [c.to_wire() for c in self.checkpoints]
        return batch.encode_batch(self.group, self.records, self.wall_ns, self.mono_ns, cps)

    def frame(self, codec: frames.Codec, compress: bool = True) -> frames.Frame:
        """This batch's frame, as ``codec.encode(TYPE, body(), compress)`` would make it,
        with one copy of the records' data instead of three."""
        cps = self.wire_checkpoints if self.wire_checkpoints is not None else \
            [c.to_wire() for c in self.checkpoints]
        fields, data = batch.batch_parts(self.group, self.records, self.wall_ns,
                                         self.mono_ns, cps)
        return codec.encode_with_bin(self.TYPE, fields, "data", data, compress)

    @classmethod
    def parse(cls, body: dict, ctx: Context) -> Batch:
        group = _group(body, ctx)
        records: List[JRecord] = batch.decode_batch(body)
        for r in records:
            if r.disk >= ctx.ndisks:
                raise ProtocolError("record for disk %d; group %s has %d disks"
                                    % (r.disk, group, ctx.ndisks))
        raw = body.get("checkpoints", [])
        if not isinstance(raw, list) or len(raw) > MAX_CHECKPOINTS:
            raise ProtocolError("bad checkpoints list")
        cps = [parse_wire(c, ctx.ndisks) for c in raw]
        wall_ns = frames.field(body, "wall_ns", int)
        mono_ns = frames.field(body, "mono_ns", int)
        for c in cps:  # the source's wall time of each cut, by this frame's clocks
            c.wall_ns = wall_ns - (mono_ns - c.time_ns)
        return cls(group, records, wall_ns, mono_ns, cps)

    @property
    def data_bytes(self) -> int:
        """Bytes of write data the batch carries (SEEDED digests not counted)."""
        return sum(r.length for r in self.records if r.kind == KIND_WRITE)


MAX_REPAIRS = 4096  # ranges one ACK may ask to have sent again

Repair = Tuple[int, int, int]  # (disk index, offset, length)


@dataclass(frozen=True)
class Ack(Message):
    """Site B holds each disk durably up to ``durable``, and these checkpoints; ``repair``
    asks the source to read these ranges of its disks again and send them (B found its copy
    of them damaged or missing): an optional field, which a source that does not know it
    ignores."""
    TYPE: ClassVar[int] = frames.T_ACK
    group: str
    durable: Tuple[Point, ...]
    checkpoints: Tuple[str, ...] = ()
    repair: Tuple[Repair, ...] = ()

    def body(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"group": self.group, "durable": [list(d) for d in self.durable]}
        if self.checkpoints:
            out["checkpoints"] = list(self.checkpoints)
        if self.repair:
            out["repair"] = [list(r) for r in self.repair]
        return out

    @classmethod
    def parse(cls, body: dict, ctx: Context) -> Ack:
        ids = body.get("checkpoints", [])
        if not isinstance(ids, list) or len(ids) > MAX_CHECKPOINTS * 64:
            raise ProtocolError("bad checkpoints list in ACK")
        raw = body.get("repair", [])
        if not isinstance(raw, list) or len(raw) > MAX_REPAIRS:
            raise ProtocolError("bad repair list in ACK")
        repair = []
        for r in raw:
            if not (isinstance(r, list) and len(r) == 3 and all(
                    isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 63
                    for x in r) and r[0] < ctx.ndisks and r[2] > 0):
                raise ProtocolError("bad repair entry %r in ACK" % (r,))
            repair.append((r[0], r[1], r[2]))
        return cls(_group(body, ctx), tuple(_points(body, "durable", ctx.ndisks)),
                   tuple(i for i in ids if isinstance(i, str)), tuple(repair))


@dataclass(frozen=True)
class Error(Message):
    """The sender refuses and closes: ``code`` (frames.E_*) says why for programs."""
    TYPE: ClassVar[int] = frames.T_ERROR
    code: str
    message: str

    def body(self) -> Dict[str, Any]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def parse(cls, body: dict, ctx: Context) -> Error:
        return cls(str(body.get("code", ""))[:64], str(body.get("message", ""))[:4096])


@dataclass(frozen=True)
class Pair(Message):
    """Pair with this token (over TLS without a client certificate): agent/pairing.py."""
    TYPE: ClassVar[int] = frames.T_PAIR
    token: str
    site: str
    cert: str
    mac: bytes

    def body(self) -> Dict[str, Any]:
        return {"token": self.token, "site": self.site, "cert": self.cert, "mac": self.mac}

    @classmethod
    def parse(cls, body: dict, ctx: Context) -> Pair:
        return cls(frames.field(body, "token", str)[:64], frames.field(body, "site", str),
                   frames.field(body, "cert", str), frames.field(body, "mac", bytes))


@dataclass(frozen=True)
class Paired(Message):
    TYPE: ClassVar[int] = frames.T_PAIRED
    site: str
    mac: bytes

    def body(self) -> Dict[str, Any]:
        return {"site": self.site, "mac": self.mac}

    @classmethod
    def parse(cls, body: dict, ctx: Context) -> Paired:
        return cls(frames.field(body, "site", str), frames.field(body, "mac", bytes))


BY_TYPE: Dict[int, type] = {m.TYPE: m for m in (Hello, Welcome, Open, Opened, Seed, Batch, Ack,
                                                Error, Pair, Paired)}
assert set(BY_TYPE) == set(frames.TYPE_NAMES)


def parse(ftype: int, body: dict, ctx: Context) -> Message:
    """The message of a frame of type ``ftype`` (frames.decode_header checked the type)."""
    cls: Any = BY_TYPE[ftype]
    msg: Message = cls.parse(body, ctx)
    return msg
