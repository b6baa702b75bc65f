"""The receiving half of an agent: accepts source agents and keeps their groups' journals.

One connection carries one group. A session is HELLO/WELCOME, OPEN/OPENED (the target
answers with what it already holds durably, so the source resends only what is missing),
then BATCH frames, each answered by an ACK once its records are durable in the journal. Any
frame that does not hold together ends the connection with an ERROR frame and a log line;
``TargetGroup.accept`` checks a whole batch before it writes any of it.

Here: the accept loop and the handshake (``_handshake``: HELLO/WELCOME, then OPEN), the
opening of a session (``_session``: OPENED and SEED frames), and the requests of the API.
The bodies are read in ``messages.py``, the batches taken in by ``intake.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import trio

from .. import checkpoints
from ..checkpoints import iso
from ..disks import Policy
from ..errors import Conflict, Invalid, NotFound, StorageError
from ..pairing import Refused, Trust
from ..protocol import frames, messages
from ..protocol.session import TargetSession
from ..protocol.stream import SessionStream, keepalive
from . import failback, intake, meta, preauth, reserve, splitbrain, volume
from . import seeds as seed
from .group import NoConsistentState, SizeMismatch, TargetGroup, check_disks
from .journal import journal_kinds
from .mounts import Mounts
from .repairs import Repairs
from .reserve import ReserveError
from .restore import check_dest, restore_as
from .scrubber import Scrubber
from .verify import point_digests
from .views import Views

log = logging.getLogger("ferry.target")

HANDSHAKE_TIMEOUT = 10.0  # a new connection's time to authenticate (TLS, HELLO) and OPEN
REFUSAL_LOG_INTERVAL = 10.0
MAINTAIN_INTERVAL = 1.0  # promotion of what aged out of the window, without batches


class TargetSite:
    def __init__(self, data_dir: str, site: str, trust: Optional[Trust] = None,
                 policy: Optional[Policy] = None) -> None:
        self.root = os.path.join(data_dir, "target")
        self.policy = policy if policy is not None else Policy(data_dir)
        self.site = site
        self.trust = trust  # None: plain TCP only (unit tests)
        self.handshake_timeout = HANDSHAKE_TIMEOUT
        self.gate = preauth.Gate()
        self._refusals_logged_at = -REFUSAL_LOG_INTERVAL
        self._refusals_logged = 0
        os.makedirs(self.root, exist_ok=True)
        self.groups: Dict[str, TargetGroup] = {}
        self._owners: Dict[str, trio.CancelScope] = {}
        self._sessions: Dict[str, Dict[str, Any]] = {}
        self._locks: Dict[str, trio.Lock] = {}
        self.broken: Dict[str, str] = {}
        self.views = Views(data_dir)
        self.repairs = Repairs()
        # Events told as they happen (the agent's EventLog.emit), not found by comparing two
        # status samples: a test failover may open and close between them.
        self.notify: Callable[..., Any] = lambda *args, **fields: None
        # (group, side, message): the journal refused a write (Watcher.journal_refused)
        self.journal_refused: Callable[[str, str, str], Any] = lambda *args: None
        self.scrubs: Dict[str, Dict[str, Any]] = {}  # the last scrub of each group
        self.fenced_disks: Optional[failback.FencedDisks] = None  # set by the agent
        self.retire_source: Optional[Callable[[str], Awaitable[Any]]] = None  # and this
        self.scrubber = Scrubber(lambda: self.groups, self.repairs.request,
                                 self.scrubs.__setitem__)
        self.mounts = Mounts(
            data_dir, lambda name, ref, at: self.views.open(self.group(name), ref, at, False),
            lambda vid: self.views.close(vid, self.groups))

    def load(self) -> None:
        """Open every group this site already holds (restore works without a source)."""
        data_dir = os.path.dirname(self.root)
        unmounted = volume.mount_all(data_dir, self.root)  # journals on their own devices
        for name, why in unmounted.items():
            self.broken[name] = why
            log.error("group %s cannot be opened and is not served: %s", name, why)
        try:
            volumes = volume.load(data_dir)
        except (OSError, ValueError):
            volumes = {}  # (mount_all said so)
        for name in sorted(os.listdir(self.root)):
            directory = os.path.join(self.root, name)
            if name in unmounted:
                continue
            if not os.path.exists(meta.path(directory)):
                if name in volumes:
                    continue  # a journal volume given, the group not protected yet
                if any(os.path.isdir(os.path.join(directory, d))
                       for d in ("journal", "replicas")):
                    self.broken[name] = "%s is missing; `ferry repair %s --rebuild-meta` " \
                        "rebuilds it from the journal and the replicas" % (
                            meta.path(directory), name)
                    log.error("group %s cannot be opened and is not served: %s", name,
                              self.broken[name])
                continue  # not a group
            try:
                group = TargetGroup.reopen(os.path.join(self.root, name), name,
                                           pins=self.views.pins_of(name))
            except (OSError, ValueError, KeyError, TypeError, StorageError) as e:
                # One damaged group must not keep the others (or the agent) down.
                log.error("group %s cannot be opened and is not served: %s: %s",
                          name, type(e).__name__, e)
                self.broken[name] = "%s: %s%s" % (
                    type(e).__name__, e, "; `ferry repair %s --rebuild-meta` rebuilds it from "
                    "the journal and the replicas" % name
                    if isinstance(e, StorageError) and getattr(e, "path", "") ==
                    meta.path(os.path.join(self.root, name)) else "")
                continue
            if group is None:
                continue  # its meta.json went meanwhile
            self.groups[name] = group
            log.info("holding group %s (%d disks)", name, len(group.disks))
        self.views.adopt(self.groups)  # views left running; live disks served

    def close(self) -> None:
        self.mounts.close_all()  # mounts end with the agent (mounts.py); their views too
        self.views.release()  # other exports outlive the agent (views.py)
        for group in self.groups.values():
            group.close()
        self.groups.clear()

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[List[Any]] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._maintain)
            nursery.start_soon(self.scrubber.run)
            task_status.started(listeners)
            await trio.serve_listeners(self._handle, listeners)

    async def _maintain(self) -> None:
        while True:
            await trio.sleep(MAINTAIN_INTERVAL)
            await trio.to_thread.run_sync(self.views.watch, self.groups)
            for name, group in list(self.groups.items()):
                try:
                    await trio.to_thread.run_sync(group.maintain)
                    self._ask_repairs(name, await trio.to_thread.run_sync(group.asks))
                except OSError as e:
                    log.error("group %s: promotion failed: %s", name, e)

    def _ask_repairs(self, name: str, asks: List[Tuple[int, List[Tuple[int, int]]]]) -> None:
        """Journal damage found: ask the source for its disk ranges again (repairs.py)."""
        g = self.groups.get(name)
        for disk, ranges in asks:
            self.repairs.request(name, disk, ranges)
            if g is not None:
                log.warning("group %s: journal damage: asked the source for %d range(s) of "
                            "%s again (%d bytes)", name, len(ranges), g.disks[disk].name,
                            sum(n for _o, n in ranges))

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            address, port = stream.socket.getpeername()[:2]
            peer = "%s:%s" % (address, port)
        except OSError:
            address = peer = "?"
        ticket = self.gate.enter(address)
        if ticket is None:  # over a bound of connections not yet authenticated: close now
            self._refused(peer)
            await stream.aclose()
            return
        try:
            await self._handle_admitted(stream, peer, ticket)
        finally:
            ticket.release()

    def _refused(self, peer: str) -> None:
        """Log refusals at most every REFUSAL_LOG_INTERVAL s: a flood must not flood the log."""
        now = trio.current_time()
        if now - self._refusals_logged_at >= REFUSAL_LOG_INTERVAL:
            gate = self.gate
            log.warning("refused %d connection(s) (the latest from %s): at most %d connections "
                        "may be unauthenticated, %d from one address",
                        gate.refused - self._refusals_logged, peer, gate.total,
                        gate.per_address)
            self._refusals_logged_at, self._refusals_logged = now, gate.refused

    async def _handle_admitted(self, stream: trio.SocketStream, peer: str,
                               ticket: preauth.Ticket) -> None:
        try:
            keepalive(stream)
        except OSError:
            pass
        group_name: Optional[str] = None
        scope = trio.CancelScope()
        fs = SessionStream(stream, peer, TargetSession())
        try:
            with trio.move_on_after(self.handshake_timeout) as handshake:
                paired: Optional[bytes] = None
                is_tls = False
                if self.trust is not None:
                    conn, paired, is_tls = await self.trust.accept(stream, peer)
                    fs = SessionStream(conn, peer, TargetSession())
                opened = await self._handshake(fs, paired, is_tls, peer, ticket)
            if handshake.cancelled_caught:
                raise frames.ProtocolError("no handshake within %g s" % self.handshake_timeout)
            if opened is None:
                return  # a pairing request, answered
            group_name, disks, protection = opened.group, list(opened.disks), opened.protection
            limits = (float(opened.limits[0]), opened.limits[1]) if opened.limits else None
            seeds = opened.seeds
            if opened.probe:
                if opened.reserve and not await self._reserve_fits(fs, opened):
                    return
                await self._answer_probe(fs, peer, group_name, disks, protection, seeds,
                                         opened.verify)
                return
            with scope:
                await self._session(fs, peer, scope, group_name, disks, protection, limits,
                                    seeds, opened.held or 0, opened.domains, opened.reserve,
                                    opened.replica_format)
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
        except ReserveError as e:
            log.error("refusing group %s from %s: %s", group_name, peer, e)
            await fs.send_error(frames.E_JOURNAL_RESERVE, str(e))
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
                ConnectionError) as e:
            log.info("connection from %s ended: %s", peer, e or type(e).__name__)
        except OSError as e:
            if not await self._full(fs, group_name, e):
                log.error("group %s: storage error: %s", group_name, e)
                await fs.send_error(frames.E_STORAGE, str(e))
        except Exception as e:
            # A damaged group (unreadable metadata, a corrupt journal) or a bug: this
            # session ends, the agent and every other group go on.
            if not await self._full(fs, group_name, e):
                log.exception("group %s: session from %s failed", group_name, peer)
                await fs.send_error(frames.E_STORAGE, "%s: %s" % (type(e).__name__, e))
        finally:
            if group_name is not None and self._owners.get(group_name) is scope:
                del self._owners[group_name]
                self._sessions.pop(group_name, None)
            await fs.aclose()

    async def _full(self, fs: SessionStream, group: Optional[str], e: Exception) -> bool:
        """A full file system (ENOSPC, EDQUOT) ends the session as ``journal-full``: what
        could not be written was not acknowledged (the journal cuts a failed append back),
        and the source sends it again once a session opens. True if it was that."""
        if getattr(e, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
            return False
        log.error("group %s: journal full: site B's file system has no space: %s; "
                  "nothing unwritten was acknowledged, the source keeps it until space "
                  "is freed", group, e)
        message = "group %s: site B's file system is full (%s); free space there, " \
            "replication resumes by itself" % (group, getattr(e, "strerror", None) or e)
        self.journal_refused(group or "?", "target", message)
        await fs.send_error(frames.E_JOURNAL_FULL, message)
        return True

    async def _handshake(self, fs: SessionStream, paired: Optional[bytes], is_tls: bool,
                         peer: str, ticket: preauth.Ticket) -> Optional[messages.Open]:
        """HELLO/WELCOME, then the OPEN; None when the peer asked to pair instead
        (answered here). The session admits only HELLO or PAIR first, in a frame of at most
        MAX_FIRST_FRAME bytes; once a paired peer's HELLO is in, the connection is
        authenticated and gives back its slot of the gate."""
        first = await fs.receive()
        if isinstance(first, messages.Pair):
            if self.trust is None:
                raise frames.ProtocolError("this site does not pair (plain TCP only)")
            await self.trust.answer_pair(fs, first, is_tls, peer)
            return None
        if is_tls and paired is None:
            await fs.send_error(frames.E_UNPAIRED, "this site is not paired with yours; "
                                "pair them first (ferry pair-token, ferry pair)")
            raise Refused("refusing %s: TLS without a paired site's certificate" % peer)
        ticket.release()  # authenticated: a paired certificate (or --insecure) and a HELLO
        fs.authenticated = True
        await fs.send(messages.Welcome(self.site))
        return await fs.expect(messages.Open)

    async def _reserve_fits(self, fs: SessionStream, opened: messages.Open) -> bool:
        """A probe asking for a journal reserve: refuse it (ERROR ``journal-reserve``, the
        numbers) when the file system cannot hold it; nothing is allocated here."""
        assert opened.limits is not None  # messages.Open.parse
        try:
            await trio.to_thread.run_sync(
                reserve.check, opened.group, os.path.join(self.root, opened.group, "journal"),
                opened.limits[1])
        except ReserveError as e:
            log.error("refusing group %s: %s", opened.group, e)
            await fs.send_error(frames.E_JOURNAL_RESERVE, str(e))
            return False
        return True

    async def _answer_probe(self, fs: SessionStream, peer: str, name: str,
                            disks: List[Tuple[str, int]], protection: str,
                            seeds: Optional[Dict[str, str]],
                            verify: Optional[Tuple[int, int, int, int]] = None) -> None:
        """protect asks whether it may: answer, change nothing. ``ferry verify`` asks the
        same way, for digests of chunks of a disk (``target/verify.py``)."""
        try:
            durable = self._probe(name, disks, protection)
        except SizeMismatch as e:
            log.error("refusing group %s from %s: %s", name, peer, e)
            await fs.send_error(frames.E_SIZE_MISMATCH, str(e))
            return
        points = tuple((d[0], d[1]) for d in durable)
        group = self.groups.get(name)
        if verify is not None:
            if group is None or group.protection != protection:
                await fs.send(messages.Opened(name, points))  # no such replica here
                return
            try:
                digests, at = await trio.to_thread.run_sync(point_digests, group, *verify)
            except StorageError as e:  # a damaged record in the way: named, not hashed
                log.error("group %s: verify for %s refused: %s", name, peer, e)
                await fs.send_error(frames.E_STORAGE, str(e))
                return
            await fs.send(messages.Opened(name, points, 0, digests, at))
            return
        await self._check_seeds(name, disks, protection, seeds)
        await fs.send(messages.Opened(name, points))

    async def _session(self, fs: SessionStream, peer: str, scope: trio.CancelScope,
                       group_name: str, disks: List[Tuple[str, int]], protection: str,
                       limits: Optional[Tuple[float, int]],
                       seeds: Optional[Dict[str, str]], a_held: int = 0,
                       domains: Optional[Tuple[Dict[str, Any], ...]] = None,
                       journal_reserve: bool = False, replica_format: str = "raw") -> None:
        """OPENED (and the SEED frames) for an OPEN, then the batches until it ends
        (``a_held``: the bytes the source holds unacked; split brain if failed over;
        ``domains``: the group's libvirt domains, kept for a failover)."""
        try:
            held = self.groups.get(group_name)
            if held is not None and held.protection == protection and held.grows(disks):
                await trio.to_thread.run_sync(held.grow, disks)  # ferry resize on A
            if held is not None:
                _check_disks(held, disks)  # a refused source leaves the session be
            await self._check_seeds(group_name, disks, protection, seeds)
            self._take_over(group_name, scope)
            group = await self._open_group(group_name, disks, protection, seeds)
            if limits is not None:
                await trio.to_thread.run_sync(group.set_limits, *limits)
            if journal_reserve:  # ReserveError ends the session (ERROR journal-reserve)
                await trio.to_thread.run_sync(group.set_reserve)
            # qcow2 or VMDK images over the replicas (wrappers.py); never fails the session
            await trio.to_thread.run_sync(group.set_replica_format, replica_format)
            if domains is not None:  # the VMs a failover starts here (agent/domains/)
                from ..domains import travel  # not at import: domains imports source
                await trio.to_thread.run_sync(travel.save, group.directory, domains)
        except SizeMismatch as e:
            log.error("refusing group %s from %s: %s", group_name, peer, e)
            await fs.send_error(frames.E_SIZE_MISMATCH, str(e))
            return
        if group.failover is not None:
            sb = await trio.to_thread.run_sync(splitbrain.note, group, peer, a_held)
            if sb is not None:
                self.notify("split-brain", "error", group=group_name, side="target",
                            a_unreplicated_bytes=sb["a_unreplicated_bytes"],
                            b_live_written=sb["b_live_written"])
            log.warning("refusing group %s from %s: it failed over here", group_name, peer)
            await fs.send_error(frames.E_FAILED_OVER, failed_over_message(group))
            return
        durable_now, seeded = await trio.to_thread.run_sync(group.seed_frames)
        seeded = seeded if seeds is not None else []  # a source that reads them
        await fs.send(messages.Opened(group_name, tuple(durable_now), len(seeded)))
        for disk, chunk, first, digests, touched in seeded:
            await fs.send(messages.Seed(group_name, disk, chunk, first, digests, touched))
        log.info("replicating group %s from %s", group_name, peer)
        session = {"peer": peer, "batches": 0, "records": 0, "bytes": 0}
        self._sessions[group_name] = session

        async def on_move(cid: str) -> None:
            # The source asked for this (ferry move): live at the checkpoint, this session
            # ends, and the source's next contact is answered failed-over.
            if self._owners.get(group_name) is scope:
                del self._owners[group_name]
            with trio.CancelScope(shield=True):
                await self.failover_live(group_name, cid, None)
            log.warning("group %s MOVED here from %s: live at checkpoint %s",
                        group_name, peer, cid)

        await intake.receive(fs, group, session, on_move,
                             lambda: self.repairs.take(group_name))

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
        if held is not None and failback.turning(held.failover, seeds):
            failback.resolve(name, disks, self.fenced_disks)
            return
        if held is not None or name in self.broken:
            raise seed.SeedError("site B already holds group %s%s: a seed starts a new group "
                                 "only (protect without --preseeded, or move target/%s aside "
                                 "on site B)" % (name, " (and cannot open it: %s)"
                                                 % self.broken[name] if held is None else "",
                                                 name))
        if failback.wanted(seeds):
            failback.resolve(name, disks, self.fenced_disks)
            return
        sizes = dict(disks)
        for dname, path in sorted(seeds.items()):
            if dname not in sizes:
                raise seed.SeedError("a seed for disk %s, which group %s does not have"
                                     % (dname, name))
            await trio.to_thread.run_sync(seed.check_file, path, sizes[dname], self.policy)

    async def _open_group(self, name: str, disks: List[Tuple[str, int]],
                          protection: str, seeds: Optional[Dict[str, str]] = None
                          ) -> TargetGroup:
        lock = self._locks.setdefault(name, trio.Lock())
        async with lock:
            if name in self.broken:
                raise StorageError("group %s cannot be opened on site B: %s"
                                   % (name, self.broken[name]))
            group = self.groups.get(name)
            if group is not None:
                _check_disks(group, disks)  # before anything changes
            if group is not None and group.protection == protection:
                return group
            directory = os.path.join(self.root, name)
            fenced = self.fenced_disks
            turned = group is not None and failback.turning(group.failover, seeds)
            if group is not None:
                self.groups.pop(name)
                await trio.to_thread.run_sync(group.close)
            if turned:  # failback's return leg: this site's live disks become the replicas
                await trio.to_thread.run_sync(failback.clear, directory)
            if turned or (group is None and seeds and failback.wanted(seeds)):
                await self._check_seeds(name, disks, protection, seeds)
                await trio.to_thread.run_sync(lambda: failback.adopt(
                    directory, name, disks, failback.resolve(name, disks, fenced, keep=True)))
            elif seeds and group is None:
                await self._check_seeds(name, disks, protection, seeds)
                await trio.to_thread.run_sync(seed.adopt_group, os.path.join(self.root, name),
                                              name, disks, seeds, self.policy)
            group = await trio.to_thread.run_sync(
                lambda: TargetGroup(os.path.join(self.root, name), name, disks,
                                    protection=protection))
            self.groups[name] = group
        if turned and self.retire_source is not None:
            await self.retire_source(name)  # its splitters served the live disks
            await trio.to_thread.run_sync(failback.forget_sockets, self.views.root, name)
        return group

    # -- requests from the API -----------------------------------------------------------

    def group(self, name: str) -> TargetGroup:
        g = self.groups.get(name)
        if g is None and name in self.broken:
            raise StorageError("group %s cannot be opened on this site: %s"
                               % (name, self.broken[name]))
        if g is None:
            raise NotFound("group %s is not replicated to this site" % name)
        return g

    async def rebuild_meta(self, name: str, order: Optional[List[str]]) -> Dict[str, Any]:
        """Make a group's meta.json again from its journal and replicas (meta.rebuild),
        open the group and bring its replicas to a known point (``settle``)."""
        directory = os.path.join(self.root, name)
        if name in self.groups:
            raise Conflict("group %s is open here: its %s holds; nothing to rebuild"
                           % (name, meta.path(directory)))
        if name not in self.broken:
            raise NotFound("group %s is not held on this site" % name)
        lock = self._locks.setdefault(name, trio.Lock())
        async with lock:
            def work() -> TargetGroup:
                meta.rebuild(directory, name, order, journal_kinds(directory, name))
                g = TargetGroup.reopen(directory, name, pins=self.views.pins_of(name))
                assert g is not None
                g.settle()
                return g

            try:
                group = await trio.to_thread.run_sync(work)
            except OSError as e:
                raise StorageError("cannot rebuild %s: %s" % (meta.path(directory), e),
                                   e.filename, e.errno) from None
            self.groups[name] = group
            self.broken.pop(name, None)
        log.warning("group %s: %s rebuilt from the journal and the replicas (disks %s); "
                    "the next session from the source gives its protection", name,
                    meta.path(directory), ", ".join(d.name for d in group.disks))
        return {"group": name, "file": meta.path(directory),
                "disks": [d.name for d in group.disks], "state": group.state.value}

    async def restore(self, group: str, disk: str, dest: str, ref: Optional[str] = None,
                      at_wall_ns: Optional[int] = None, fmt: Optional[str] = None,
                      subformat: Optional[str] = None, compress: bool = False
                      ) -> Dict[str, Any]:
        g = self.group(group)
        if disk not in [d.name for d in g.disks]:
            raise NotFound("group %s has no disk %s (it has %s)"
                              % (group, disk, ", ".join(d.name for d in g.disks)))
        if fmt is not None:  # an image format: through a view and qemu-img (restore_as)
            return await self._restore_as(g, disk, dest, ref, at_wall_ns, fmt, subformat,
                                          compress)
        try:
            return await trio.to_thread.run_sync(_restore, g, disk, dest, ref, at_wall_ns,
                                                 self.policy)
        except (NoConsistentState, checkpoints.CheckpointError) as e:
            raise NotFound(str(e)) from None

    async def _restore_as(self, g: TargetGroup, disk: str, dest: str, ref: Optional[str],
                          at_wall_ns: Optional[int], fmt: str, subformat: Optional[str],
                          compress: bool) -> Dict[str, Any]:
        """``restore`` into an image of format ``fmt``: a view of the group at the point,
        read by ``qemu-img convert`` (``restore.restore_as``), closed whatever happens."""
        real = check_dest(dest, self.policy)
        view = await self.open_view(g.name, ref, at_wall_ns)
        try:
            spec = os.path.join(self.views.views[view["id"]].directory, disk + ".json")
            st = next(d for d in g.disks if d.name == disk)
            what = "restore of group %s disk %s to %s" % (g.name, disk, real)
            gen, seq = await trio.to_thread.run_sync(
                _restore_view, spec, g.replica_path(disk), view["disks"][disk], real, what,
                fmt, subformat, compress)
        finally:
            await self.close_view(view["id"])
        return {"group": g.name, "disk": disk, "to": real, "size": st.size, "gen": gen,
                "seq": seq, "format": fmt, "subformat": subformat, "compress": compress,
                "checkpoint": view["checkpoint"]}

    def checkpoints(self, group: str) -> List[Dict[str, Any]]:
        return self.group(group).list_checkpoints()

    async def journal_volume(self, group: str, device: str, journal_max: int
                             ) -> Dict[str, Any]:
        """Give ``group`` (not protected here yet) a journal on ``device`` (volume.py)."""
        if group in self.groups or group in self.broken:
            raise Conflict("group %s has a journal here already; a journal volume is given "
                           "before the group is protected" % group)
        return await trio.to_thread.run_sync(
            volume.give, os.path.dirname(self.root), os.path.join(self.root, group), group,
            device, journal_max, self.policy)

    async def release_journal_volume(self, group: str) -> Dict[str, Any]:
        """Unmount and forget ``group``'s journal volume: only for a group not held here."""
        directory = os.path.join(self.root, group)

        def release() -> Dict[str, Any]:
            if group in self.groups or os.path.exists(meta.path(directory)):
                raise Conflict("group %s is held on this site (its replica and journal); a "
                               "journal volume is given back only for a group this site "
                               "does not hold" % group)
            return volume.release(os.path.dirname(self.root), directory, group)
        released = await trio.to_thread.run_sync(release)
        self.broken.pop(group, None)
        return released

    async def open_view(self, group: str, ref: Optional[str], at_wall_ns: Optional[int],
                        test: bool = False, overlays: Optional[Dict[str, str]] = None
                        ) -> Dict[str, Any]:
        g = self.group(group)
        if overlays:  # {disk: new qcow2 file}, checked as a restore's destination
            names = [d.name for d in g.disks]
            for disk in overlays:
                if disk not in names:
                    raise NotFound("group %s has no disk %s (it has %s)"
                                   % (group, disk, ", ".join(names)))
            overlays = {d: check_dest(p, self.policy) for d, p in overlays.items()}
            if len(set(overlays.values())) < len(overlays):
                raise Invalid("overlays of group %s: one file named for two disks" % group)
        try:
            view = await trio.to_thread.run_sync(self.views.open, g, ref, at_wall_ns, test,
                                                 overlays)
        except (NoConsistentState, checkpoints.CheckpointError) as e:
            raise NotFound(str(e)) from None
        if test:
            self.notify("failover", group=group, mode="test", change="started",
                        view=view["id"])
        return view

    async def close_view(self, vid: str) -> Dict[str, Any]:
        view = await trio.to_thread.run_sync(self.views.close, vid, self.groups)
        if view.get("test"):
            self.notify("failover", group=view["group"], mode="test", change="stopped",
                        view=vid)
        return view

    async def failover_live(self, group: str, ref: Optional[str],
                            at_wall_ns: Optional[int]) -> Dict[str, Any]:
        g = self.group(group)
        owner = self._owners.get(group)
        if owner is not None:
            owner.cancel()  # the source's session ends; a new one is refused
        try:  # the group's live copies are held while they are made (disks.Policy.occupy)
            live = self.policy.name_key(os.path.join(g.directory, "live"))
            with self.policy.occupy([live], "failover of group %s" % group, group=group):
                result = await trio.to_thread.run_sync(g.failover_live, ref, at_wall_ns)
        except (NoConsistentState, checkpoints.CheckpointError) as e:
            raise NotFound(str(e)) from None
        view = await trio.to_thread.run_sync(self.views.serve_live, g)
        return dict(view, failover=result)

    async def mount(self, group: str, disk: str, directory: str, ref: Optional[str],
                    at_wall_ns: Optional[int]) -> Dict[str, Any]:
        """A point of ``disk`` mounted read-only under ``directory`` (mounts.py)."""
        self.group(group)
        try:
            return await trio.to_thread.run_sync(self.mounts.mount, group, disk, directory,
                                                 ref, at_wall_ns)
        except (NoConsistentState, checkpoints.CheckpointError) as e:
            raise NotFound(str(e)) from None

    def repair(self, group: str, disk: str, ranges: Optional[List[Tuple[int, int]]]
               ) -> Dict[str, Any]:
        """Ask the source to send these ranges of ``disk`` again (default: all of it)."""
        g = self.group(group)
        index = g.index_of(disk)
        size = g.disks[index].size
        ranges = check_ranges(ranges, size, "disk %s of group %s" % (disk, group))
        self.repairs.request(group, index, ranges)
        log.warning("group %s: asked the source for %d range(s) of %s again (%d bytes)",
                    group, len(ranges), disk, sum(n for _o, n in ranges))
        return {"group": group, "disk": disk, "ranges": [list(r) for r in ranges],
                "bytes": sum(n for _o, n in ranges), "queued": self.repairs.pending(group),
                "connected": group in self._sessions}

    async def scrub(self, group: str, disk: Optional[str] = None) -> Dict[str, Any]:
        """Check each replica of ``group`` (or ``disk``) against its chunk digests
        (digests.py); damaged chunks are asked of the source again (repairs.py)."""
        g = self.group(group)
        indexes = [g.index_of(disk)] if disk is not None else list(range(len(g.disks)))
        out: Dict[str, Any] = {}
        for i in indexes:
            name = g.disks[i].name
            try:
                found = await trio.to_thread.run_sync(g.digests[i].scrub, g.fds[i], g._lock)
            except OSError as e:
                raise StorageError("scrub of %s failed: %s" % (
                    g.replica_path(name), e.strerror or e), g.replica_path(name),
                    e.errno) from None
            damaged = list(found["damaged"])  # type: ignore[call-overload]
            if damaged:
                self.repairs.request(group, i, damaged)
                log.error("group %s: scrub found %d damaged range(s) in the replica of %s "
                          "(%s); asked the source for them again", group, len(damaged), name,
                          ", ".join("%d+%d" % r for r in damaged[:8]))
            out[name] = {"checked_chunks": found["checked"],
                         "baseline_chunks": found["baseline"],
                         "damaged": [list(r) for r in damaged]}
        result = {"group": group, "disks": out, "time": time.time(),
                  "repair_asked": any(d["damaged"] for d in out.values())}
        self.scrubs[group] = result
        return result

    async def umount(self, directory: str) -> Dict[str, Any]:
        return await trio.to_thread.run_sync(self.mounts.umount, directory)

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
            st["mounts"] = self.mounts.of_group(name)
            st["last_scrub"] = self.scrubs.get(name)
            running = self.scrubber.running.get(name)
            st["scrubbing"] = dict(running, disks=dict(running["disks"])) if running else None
            st["repairs_queued"] = self.repairs.pending(name)
            out[name] = st
        return out


def _check_disks(group: TargetGroup, disks: List[Tuple[str, int]]) -> None:
    check_disks(group.name, [(d.name, d.size) for d in group.disks], disks)


def _restore(group: TargetGroup, disk: str, dest: str, ref: Optional[str],
             at_wall_ns: Optional[int], policy: Policy) -> Dict[str, Any]:
    """A restore holds its destination's name while it runs (disks.Policy.occupy): a second
    restore to it, or a failover writing there, is refused naming this one."""
    real = check_dest(dest, policy)
    what = "restore of group %s disk %s to %s" % (group.name, disk, dest)
    with policy.occupy([policy.name_key(real)], what):
        return group.restore(disk, real, ref, at_wall_ns)


def _restore_view(spec: str, replica: str, uri: str, dest: str, what: str, fmt: str,
                  subformat: Optional[str], compress: bool) -> Tuple[int, int]:
    """``restore_as`` from a view's disk; the (generation, sequence) the view shows."""
    with open(spec) as f:
        gen, seq = json.load(f)["upto"]
    allocated = os.stat(replica).st_blocks * 512  # the total restore_progress counts
    restore_as(uri, dest, what, fmt, subformat, compress, allocated)
    return int(gen), int(seq)


def failed_over_message(group: TargetGroup) -> str:
    """Why a failed-over group refuses its source, for the source's status (it fences)."""
    record = group.failover or {}
    c = record.get("checkpoint")
    when = iso(int(record.get("wall_ns", 0))) if record.get("wall_ns") else "an unknown time"
    return ("group %s failed over live on site B at %s (%s); site A must not write to it: "
            "its writes are refused until the failover is rolled back or the group fails "
            "back" % (group.name, when, "checkpoint %s" % c["id"] if c else
                      "its newest consistent state"))


def check_ranges(ranges: Optional[List[Tuple[int, int]]], size: int, what: str
                 ) -> List[Tuple[int, int]]:
    """``ranges`` (default: the whole disk), each non-empty and within ``size`` bytes."""
    if ranges is None:
        return [(0, size)]
    if not ranges:
        raise Invalid("no ranges given")
    for offset, length in ranges:
        if offset < 0 or length <= 0 or offset + length > size:
            raise Invalid("range %d+%d is not within %s (%d bytes)"
                          % (offset, length, what, size))
    return list(ranges)
