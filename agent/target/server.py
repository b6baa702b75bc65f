"""The receiving half of an agent: accepts source agents and keeps their groups' journals.

One connection carries one group. A session is HELLO/WELCOME, OPEN/OPENED (the target
answers with what it already holds durably, so the source resends only what is missing),
then BATCH frames, each answered by an ACK once its records are durable in the journal. Any
frame that does not hold together ends the connection with an ERROR frame and a log line;
``TargetGroup.accept`` checks a whole batch before it writes any of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any, Dict, List, Optional, Tuple

import trio

from formats.localwire import KIND_WRITE

from .. import checkpoints
from ..errors import Conflict, NotFound
from ..pairing import Refused, Trust
from ..protocol import batch, frames
from ..protocol.stream import FrameStream, keepalive, race
from . import seeds as seed
from .group import NoConsistentState, SizeMismatch, TargetGroup
from .journal import JournalCorrupt
from .views import Views

log = logging.getLogger("ferry.target")

PROTOCOL = 1
HANDSHAKE_TIMEOUT = 10.0
RECEIVE_AHEAD = 4                     # frames read and checked ahead of the journal
GROUP_COMMIT_BYTES = 16 * 1024 * 1024  # at most this much data in one journal append
MAINTAIN_INTERVAL = 1.0  # promotion of what aged out of the window, without batches
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class TargetSite:
    def __init__(self, data_dir: str, site: str, trust: Optional[Trust] = None) -> None:
        self.root = os.path.join(data_dir, "target")
        self.site = site
        self.trust = trust  # None: plain TCP only (unit tests)
        self.handshake_timeout = HANDSHAKE_TIMEOUT
        os.makedirs(self.root, exist_ok=True)
        self.groups: Dict[str, TargetGroup] = {}
        self._owners: Dict[str, trio.CancelScope] = {}
        self._sessions: Dict[str, Dict[str, Any]] = {}
        self._locks: Dict[str, trio.Lock] = {}
        self.broken: Dict[str, str] = {}
        self.views = Views(data_dir)

    def load(self) -> None:
        """Open every group this site already holds (restore works without a source)."""
        for name in sorted(os.listdir(self.root)):
            meta_path = os.path.join(self.root, name, "meta.json")
            if not os.path.exists(meta_path):
                continue
            try:
                with open(meta_path) as f:
                    meta = json.load(f)
                disks = [(d["name"], d["size"]) for d in meta.get("disks", [])]
                self.groups[name] = TargetGroup(os.path.join(self.root, name), name, disks,
                                                protection=meta.get("protection"))
            except (OSError, ValueError, KeyError, TypeError, JournalCorrupt) as e:
                # One damaged group must not keep the others (or the agent) down.
                log.error("group %s cannot be opened and is not served: %s: %s",
                          name, type(e).__name__, e)
                self.broken[name] = "%s: %s" % (type(e).__name__, e)
                continue
            log.info("holding group %s (%d disks)", name, len(disks))
            if self.groups[name].failover is not None:
                self.views.serve_live(self.groups[name])

    def close(self) -> None:
        self.views.close_all(self.groups)
        for group in self.groups.values():
            group.close()
        self.groups.clear()

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[List[Any]] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._maintain)
            task_status.started(listeners)
            await trio.serve_listeners(self._handle, listeners)

    async def _maintain(self) -> None:
        while True:
            await trio.sleep(MAINTAIN_INTERVAL)
            for name, group in list(self.groups.items()):
                try:
                    await trio.to_thread.run_sync(group.maintain)
                except OSError as e:
                    log.error("group %s: promotion failed: %s", name, e)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = "%s:%s" % stream.socket.getpeername()[:2]
        except OSError:
            peer = "?"
        try:
            keepalive(stream)
        except OSError:
            pass
        group_name: Optional[str] = None
        scope = trio.CancelScope()
        fs = FrameStream(stream, peer)
        try:
            with trio.move_on_after(self.handshake_timeout) as handshake:
                paired: Optional[bytes] = None
                is_tls = False
                if self.trust is not None:
                    conn, paired, is_tls = await self.trust.accept(stream, peer)
                    fs = FrameStream(conn, peer)
                ftype, hello = await fs.receive()
                if ftype == frames.T_PAIR and self.trust is not None:
                    await self.trust.answer_pair(fs, hello, fs.stream, is_tls, peer)
                    return
                if ftype != frames.T_HELLO:
                    raise frames.ProtocolError("expected HELLO, got %s" % frames.TYPE_NAMES[ftype])
                if is_tls and paired is None:
                    await fs.send_error(frames.E_UNPAIRED, "this site is not paired with yours; "
                                        "pair them first (ferry pair-token, ferry pair)")
                    raise Refused("refusing %s: TLS without a paired site's certificate" % peer)
                if frames.field(hello, "protocol", int) != PROTOCOL:
                    raise frames.ProtocolError("protocol %r, this agent speaks %d"
                                             % (hello.get("protocol"), PROTOCOL))
                await fs.send(frames.T_WELCOME, {"protocol": PROTOCOL, "site": self.site})
                opened = await fs.expect(frames.T_OPEN)
            if handshake.cancelled_caught:
                raise frames.ProtocolError("no handshake within %g s" % self.handshake_timeout)
            group_name, disks, protection = _parse_open(opened)
            limits = _parse_limits(opened)
            seeds = _parse_seeds(opened)
            if opened.get("probe"):
                # protect asks whether it may: answer, change nothing.
                try:
                    durable = self._probe(group_name, disks, protection)
                except SizeMismatch as e:
                    log.error("refusing group %s from %s: %s", group_name, peer, e)
                    await fs.send_error(frames.E_SIZE_MISMATCH, str(e))
                    return
                await self._check_seeds(group_name, disks, protection, seeds)
                await fs.send(frames.T_OPENED, {"group": group_name, "durable": durable})
                return
            with scope:
                try:
                    held = self.groups.get(group_name)
                    if held is not None:
                        _check_disks(held, disks)  # a refused source leaves the session be
                    await self._check_seeds(group_name, disks, protection, seeds)
                    self._take_over(group_name, scope)
                    group = await self._open_group(group_name, disks, protection, seeds)
                    if limits is not None:
                        await trio.to_thread.run_sync(group.set_limits, *limits)
                except SizeMismatch as e:
                    log.error("refusing group %s from %s: %s", group_name, peer, e)
                    await fs.send_error(frames.E_SIZE_MISMATCH, str(e))
                    return
                if group.failover is not None:
                    log.warning("refusing group %s from %s: it failed over here", group_name,
                                peer)
                    await fs.send_error(frames.E_BAD_GROUP, "group %s failed over on the target "
                                        "site; it takes no more changes" % group_name)
                    return
                durable_now, seeded = await trio.to_thread.run_sync(group.seed_frames)
                opened_body: Dict[str, Any] = {"group": group_name,
                                               "durable": [list(d) for d in durable_now]}
                seeded = seeded if seeds is not None else []  # a source that reads them
                if seeded:
                    opened_body["seed_frames"] = len(seeded)
                await fs.send(frames.T_OPENED, opened_body)
                for disk, chunk, first, digests, touched in seeded:
                    await fs.send(frames.T_SEED, {"group": group_name, "disk": disk,
                                                "chunk": chunk, "first": first,
                                                "digests": digests, "touched": touched})
                log.info("replicating group %s from %s", group_name, peer)
                self._sessions[group_name] = {"peer": peer, "batches": 0, "records": 0,
                                              "bytes": 0}
                await self._receive_batches(fs, group)
        except Refused as e:
            log.warning("%s", e)
        except frames.RemoteError as e:
            log.warning("source %s ended the session: %s: %s", peer, e.code, e)
        except frames.ProtocolError as e:
            log.error("dropping connection from %s: %s (no replica was touched)", peer, e)
            await fs.send_error(frames.E_PROTOCOL, str(e))
        except seed.SeedError as e:
            log.error("refusing group %s from %s: %s", group_name, peer, e)
            await fs.send_error(frames.E_BAD_SEED, str(e))
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
                ConnectionError) as e:
            log.info("connection from %s ended: %s", peer, e or type(e).__name__)
        except OSError as e:
            log.error("group %s: storage error: %s", group_name, e)
            await fs.send_error(frames.E_STORAGE, str(e))
        except Exception as e:
            # A damaged group (unreadable metadata, a corrupt journal) or a bug: this
            # session ends, the agent and every other group go on.
            log.exception("group %s: session from %s failed", group_name, peer)
            await fs.send_error(frames.E_STORAGE, "%s: %s" % (type(e).__name__, e))
        finally:
            if group_name is not None and self._owners.get(group_name) is scope:
                del self._owners[group_name]
                self._sessions.pop(group_name, None)
            await fs.aclose()

    def _take_over(self, name: str, scope: trio.CancelScope) -> None:
        """A new session for a group replaces an older one (the source reconnected)."""
        old = self._owners.get(name)
        if old is not None:
            old.cancel()
        self._owners[name] = scope

    def _probe(self, name: str, disks: List[Tuple[str, int]], protection: str) -> list:
        """What OPEN would answer, without opening or changing anything."""
        group = self.groups.get(name)
        if group is None:
            return [[0, 0] for _ in disks]
        _check_disks(group, disks)
        if group.protection != protection:
            return [[0, 0] for _ in disks]
        return [list(d) for d in group.durable()]

    async def _check_seeds(self, name: str, disks: List[Tuple[str, int]], protection: str,
                           seeds: Optional[Dict[str, str]]) -> None:
        """Refuse (seed.SeedError) seeds that cannot start this group's replicas: the
        group must be new here, each seed readable and of its disk's size."""
        held = self.groups.get(name)
        if not seeds or (held is not None and held.protection == protection):
            return  # nothing to adopt, or adopted when the group was made
        if held is not None or name in self.broken:
            raise seed.SeedError("site B already holds group %s%s: a seed starts a new group "
                                 "only (protect without --preseeded, or move target/%s aside "
                                 "on site B)" % (name, " (and cannot open it: %s)"
                                                 % self.broken[name] if held is None else "",
                                                 name))
        sizes = dict(disks)
        for dname, path in sorted(seeds.items()):
            if dname not in sizes:
                raise seed.SeedError("a seed for disk %s, which group %s does not have"
                                     % (dname, name))
            await trio.to_thread.run_sync(seed.check_file, path, sizes[dname])

    async def _open_group(self, name: str, disks: List[Tuple[str, int]],
                          protection: str, seeds: Optional[Dict[str, str]] = None
                          ) -> TargetGroup:
        lock = self._locks.setdefault(name, trio.Lock())
        async with lock:
            group = self.groups.get(name)
            if group is not None:
                _check_disks(group, disks)  # before anything changes
            if group is not None and group.protection == protection:
                return group
            if group is not None:
                self.groups.pop(name)
                await trio.to_thread.run_sync(group.close)
            elif seeds:
                await self._check_seeds(name, disks, protection, seeds)
                await trio.to_thread.run_sync(_adopt, os.path.join(self.root, name), name,
                                              disks, seeds)
            group = await trio.to_thread.run_sync(
                lambda: TargetGroup(os.path.join(self.root, name), name, disks,
                                    protection=protection))
            self.groups[name] = group
            return group

    async def _receive_batches(self, fs: FrameStream, group: TargetGroup) -> None:
        """Two stages: one task reads and checks frames ahead, the other journals what has
        arrived, several frames in one append and one fdatasync when they queue up (group
        commit), and acks them with one ACK (acks are cumulative)."""
        session = self._sessions[group.name]
        send_ch, recv_ch = trio.open_memory_channel[Tuple[List[Any], List[Any], int]](
            RECEIVE_AHEAD)

        async def read() -> None:
            # The channel stays open when this fails: the writer is then cancelled by
            # race() and the session ends with this task's error, not EndOfChannel.
            while True:
                ftype, body = await fs.receive()
                if ftype != frames.T_BATCH:
                    raise frames.ProtocolError("expected BATCH, got %s"
                                             % frames.TYPE_NAMES[ftype])
                if frames.field(body, "group", str) != group.name:
                    raise frames.ProtocolError("BATCH for group %r on a session of group %r"
                                             % (body.get("group"), group.name))
                records = batch.decode_batch(body)
                raw = body.get("checkpoints", [])
                if not isinstance(raw, list) or len(raw) > frames.MAX_DISKS * 16:
                    raise frames.ProtocolError("bad checkpoints list")
                cps = [checkpoints.parse_wire(c, len(group.disks)) for c in raw]
                wall_ns, mono_ns = (frames.field(body, "wall_ns", int),
                                    frames.field(body, "mono_ns", int))
                for c in cps:  # the source's wall time of each cut, by this frame's clocks
                    c.wall_ns = wall_ns - (mono_ns - c.time_ns)
                nbytes = sum(r.length for r in records if r.kind == KIND_WRITE)
                await send_ch.send((records, cps, nbytes))

        async def write() -> None:
            while True:
                got = [await recv_ch.receive()]
                size = got[0][2]
                while size < GROUP_COMMIT_BYTES:
                    try:
                        got.append(recv_ch.receive_nowait())
                    except trio.WouldBlock:
                        break
                    size += got[-1][2]
                records = [r for f in got for r in f[0]]
                cps = [c for f in got for c in f[1]]
                _fresh, ids = await trio.to_thread.run_sync(group.accept, records, cps)
                session["batches"] += len(got)
                session["records"] += len(records)
                session["bytes"] += size
                ack: Dict[str, Any] = {"group": group.name,
                                       "durable": [list(d) for d in group.durable()]}
                if ids:
                    ack["checkpoints"] = ids
                await fs.send(frames.T_ACK, ack)

        await race(read, write)

    # -- requests from the API -----------------------------------------------------------

    def group(self, name: str) -> TargetGroup:
        g = self.groups.get(name)
        if g is None:
            raise NotFound("group %s is not replicated to this site" % name)
        return g

    async def restore(self, group: str, disk: str, dest: str, ref: Optional[str] = None,
                      at_wall_ns: Optional[int] = None) -> Dict[str, Any]:
        g = self.group(group)
        if disk not in [d.name for d in g.disks]:
            raise NotFound("group %s has no disk %s (it has %s)"
                              % (group, disk, ", ".join(d.name for d in g.disks)))
        try:
            return await trio.to_thread.run_sync(_restore, g, disk, dest, ref, at_wall_ns)
        except (NoConsistentState, checkpoints.CheckpointError) as e:
            raise NotFound(str(e)) from None

    def checkpoints(self, group: str) -> List[Dict[str, Any]]:
        return self.group(group).list_checkpoints()

    async def open_view(self, group: str, ref: Optional[str], at_wall_ns: Optional[int],
                        test: bool = False) -> Dict[str, Any]:
        g = self.group(group)
        try:
            return await trio.to_thread.run_sync(self.views.open, g, ref, at_wall_ns, test)
        except (NoConsistentState, checkpoints.CheckpointError) as e:
            raise NotFound(str(e)) from None

    async def close_view(self, vid: str) -> Dict[str, Any]:
        return await trio.to_thread.run_sync(self.views.close, vid, self.groups)

    async def failover_live(self, group: str, ref: Optional[str],
                            at_wall_ns: Optional[int]) -> Dict[str, Any]:
        g = self.group(group)
        owner = self._owners.get(group)
        if owner is not None:
            owner.cancel()  # the source's session ends; a new one is refused
        try:
            result = await trio.to_thread.run_sync(g.failover_live, ref, at_wall_ns)
        except (NoConsistentState, checkpoints.CheckpointError) as e:
            raise NotFound(str(e)) from None
        view = await trio.to_thread.run_sync(self.views.serve_live, g)
        return dict(view, failover=result)

    async def stop_test(self, group: str) -> Dict[str, Any]:
        self.group(group)
        view = self.views.test_of(group)
        if view is None:
            raise NotFound("group %s has no test failover running" % group)
        return await self.close_view(view.id)

    def status(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {name: {"error": err, "connected": False, "disks": {},
                                      "journal_bytes": 0}
                               for name, err in self.broken.items()}
        for name, g in self.groups.items():
            st = g.status()
            st["source"] = self._sessions.get(name)
            st["connected"] = name in self._sessions
            test = self.views.test_of(name)
            st["test"] = test.to_json() if test else None
            st["views"] = self.views.of_group(name)
            out[name] = st
        return out


def _check_disks(group: TargetGroup, disks: List[Tuple[str, int]]) -> None:
    held = [(d.name, d.size) for d in group.disks]
    if held != disks:
        raise SizeMismatch("group %s holds disks %s here; the source sent %s" % (
            group.name, ", ".join("%s (%d bytes)" % d for d in held),
            ", ".join("%s (%d bytes)" % d for d in disks)))


def _restore(group: TargetGroup, disk: str, dest: str, ref: Optional[str],
             at_wall_ns: Optional[int]) -> Dict[str, Any]:
    dest = os.path.abspath(dest)
    if os.path.exists(dest):
        raise Conflict("%s already exists; restore writes a new file" % dest)
    if not os.path.isdir(os.path.dirname(dest)):
        raise NotFound("directory %s does not exist" % os.path.dirname(dest))
    return group.restore(disk, dest, ref, at_wall_ns)


def _adopt(directory: str, group: str, disks: List[Tuple[str, int]],
           seeds: Dict[str, str]) -> None:
    """Start a new group's replicas from the admin's seed files (agent/target/seeds.py)."""
    sizes = dict(disks)
    os.makedirs(os.path.join(directory, "replicas"), exist_ok=True)
    for dname, path in sorted(seeds.items()):
        started = time.monotonic()
        m = seed.adopt(path, os.path.join(directory, "replicas", dname + ".img"), sizes[dname])
        seed.save_digests(directory, dname, m)  # only once its replica is whole
        log.info("group %s: disk %s starts from the seed %s (%d bytes adopted in %.1f s)",
                 group, dname, path, sizes[dname], time.monotonic() - started)


def _parse_seeds(body: dict) -> Optional[Dict[str, str]]:
    """OPEN's optional ``seeds``: {disk name: path of a seed file on this site}. Its
    presence also says that the source reads SEED frames."""
    if "seeds" not in body:
        return None
    raw = frames.field(body, "seeds", dict)
    for dname, path in raw.items():
        if not isinstance(path, str) or not 0 < len(path) <= 4096 or "\0" in path:
            raise frames.ProtocolError("bad seed path for disk %r" % (dname,))
    return dict(raw)


def _parse_limits(body: dict) -> Optional[Tuple[float, int]]:
    """The group's history window and journal limit from OPEN (optional keys)."""
    if "history_s" not in body and "journal_max" not in body:
        return None
    history = frames.field(body, "history_s", int)
    limit = frames.field(body, "journal_max", int)
    if not 0 < history < 1 << 40 or not 0 < limit < 1 << 62:
        raise frames.ProtocolError("bad history_s or journal_max")
    return float(history), limit


def _parse_open(body: dict) -> Tuple[str, List[Tuple[str, int]], str]:
    name = frames.name_field(body, "group")
    if not NAME_RE.match(name):
        raise frames.ProtocolError("bad group name %r" % name)
    protection = frames.field(body, "protection", str)
    disks_raw = frames.field(body, "disks", list)
    if not 1 <= len(disks_raw) <= frames.MAX_DISKS:
        raise frames.ProtocolError("a group has 1 to %d disks, not %d"
                                 % (frames.MAX_DISKS, len(disks_raw)))
    disks = []
    for d in disks_raw:
        if not isinstance(d, dict):
            raise frames.ProtocolError("disk entry is not a map")
        dname = frames.name_field(d, "name")
        if not NAME_RE.match(dname):
            raise frames.ProtocolError("bad disk name %r" % dname)
        size = frames.field(d, "size", int)
        if not 0 < size < 1 << 56:
            raise frames.ProtocolError("disk %s has a bad size %d" % (dname, size))
        disks.append((dname, size))
    if len({d[0] for d in disks}) != len(disks):
        raise frames.ProtocolError("disk names repeat")
    return name, disks, protection
