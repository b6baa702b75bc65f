"""The watcher: samples the agent's status every ``INTERVAL`` and turns each change into an
event (events.py), each alert transition (alerts.py) into an event, a log line at the
alert's journald priority, and a run of the hooks; it also keeps what the dashboard and the
metrics derive over time (RPO over the last hour, rates, delivered progress and ETA).

It reads only the status document, so it knows nothing of the engine's insides.

Hooks: every executable regular file in the hooks directory (``/etc/ferry/hooks.d``) owned
by root and writable by nobody else, run in name order with the alert (or its clearing) as
one JSON object on stdin, at most ``HOOK_TIMEOUT`` seconds each.

On an ``anomaly`` alert the watcher first cuts a checkpoint tagged
``anomaly-<disk>-<event id>`` and names, as ``restore_point``, the newest checkpoint made
before the anomalous writes began: the point to go back to.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections import deque
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional, Tuple

import trio

from formats.durable import write_atomic

from .alerts import Alerts
from .errors import FerryError
from .events import EventLog
from .metrics import LINK_DOWN, link_up

log = logging.getLogger("ferry.alerts")

INTERVAL = 0.5
HOOK_TIMEOUT = 30.0
RPO_EVERY = 5.0          # one RPO point per group every 5 s ...
RPO_POINTS = 720         # ... for the last hour
RATE_WINDOW = 10.0
SYNCING = ("initial-sync", "resyncing")
BACKLOG = 4 << 20        # a backlog this large is followed like a sync


WARN_STATES = ("error", "fenced", "source-io-error", "splitter-down", "journal-full")


class Watcher:
    def __init__(self, status: Callable[[], Dict[str, Any]], events: EventLog,
                 alerts: Alerts, hooks_dir: Optional[str] = None,
                 checkpoint: Optional[Callable[..., Any]] = None,
                 checkpoints: Optional[Callable[[str], List[Dict[str, Any]]]] = None,
                 settings_path: Optional[str] = None,
                 status_async: Optional[Callable[[], Awaitable[Dict[str, Any]]]] = None
                 ) -> None:
        self.status = status
        self.status_async = status_async
        self.events = events
        self.alerts = alerts
        self.hooks_dir = hooks_dir
        self.checkpoint = checkpoint
        self.checkpoints = checkpoints
        self.settings_path = settings_path
        self.hook_failures = 0
        self.hook_runs = 0
        self._prev: Optional[Dict[str, Any]] = None
        self._rpo: Dict[str, Deque[Tuple[float, float]]] = {}
        self._rpo_at: Dict[str, float] = {}
        self._rpo_peak: Dict[str, float] = {}
        self._counters: Dict[str, Deque[Tuple[float, int, Dict[str, int]]]] = {}
        self._ratio: Dict[str, Deque[Tuple[float, int, int]]] = {}
        self._sync: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self._seen_checkpoints: Dict[str, Deque[str]] = {}
        self._nursery: Optional[trio.Nursery] = None
        self.load_settings()

    # -- settings (per group alert thresholds, kept beside the agent's state) ----------------

    def load_settings(self) -> None:
        if not self.settings_path:
            return
        try:
            with open(self.settings_path) as f:
                obj = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.error("cannot read %s: %s; alert settings start empty", self.settings_path, e)
            return
        self.alerts.rpo = {str(k): float(v) for k, v in obj.get("rpo", {}).items()}

    def set_rpo_alert(self, group: str, seconds: Optional[float]) -> Dict[str, Any]:
        if seconds:
            self.alerts.rpo[group] = seconds
        else:
            self.alerts.rpo.pop(group, None)
        if self.settings_path:
            write_atomic(self.settings_path, json.dumps(
                {"rpo": self.alerts.rpo}, sort_keys=True, allow_nan=False).encode())
        return {"group": group, "rpo_alert": self.alerts.rpo.get(group)}

    # -- the task --------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.events.emit("agent", change="started")
            task_status.started()
            while True:
                try:
                    st = await self.status_async() if self.status_async else self.status()
                    self.sample(time.time(), st)
                except RuntimeError as e:  # a dict changed under the worker thread: next time
                    log.warning("status sample skipped: %s", e)
                except Exception:  # a bug here must not stop the agent: say so, go on
                    log.exception("the watcher failed to sample the status")
                await trio.sleep(INTERVAL)

    def sample(self, now: float, st: Dict[str, Any]) -> None:
        prev = self._prev
        self._prev = st
        self._track(st, now)
        if prev is not None:
            self._diff(prev, st)
        for change, alert in self.alerts.update(st, now):
            if change == "raised" and alert["alert"] == "anomaly" and self._nursery:
                self._nursery.start_soon(self._anomaly, alert)
            else:
                self._announce(change, alert)

    # -- events from differences -----------------------------------------------------------

    def _diff(self, old: Dict[str, Any], new: Dict[str, Any]) -> None:
        emit = self.events.emit
        og, ng = old["groups"], new["groups"]
        for g in sorted(set(og) - set(ng)):
            emit("group", group=g, side="source", change="unprotected")
        for g, gs in sorted(ng.items()):
            before = og.get(g)
            if before is None:
                # First sight: what already happened since the group appeared is told too.
                emit("group", group=g, side="source", change="protected", state=gs["state"])
                if gs["state"] in LINK_DOWN and gs["state"] not in ("connecting", "paused"):
                    emit("link", "warning", group=g, side="source", change="down",
                         target=gs["target"], error=gs["error"])
                for d, ds in sorted(gs["disks"].items()):
                    if ds["state"] in SYNCING:
                        emit("resync", group=g, disk=d, change="start", sync=ds["state"],
                             dirty_bytes=ds["dirty_bytes"])
                continue
            if before["state"] != gs["state"]:
                emit("group", "warning" if gs["state"] in WARN_STATES else "info",
                     group=g, side="source", change="state", old=before["state"],
                     new=gs["state"], error=gs["error"])
            if ((gs.get("fenced") or {}).get("split_brain")
                    and not (before.get("fenced") or {}).get("split_brain")):
                emit("split-brain", "error", group=g, side="source",
                     **gs["fenced"]["split_brain"])
            if link_up(before) != link_up(gs):
                emit("link", "info" if link_up(gs) else "warning", group=g, side="source",
                     change="up" if link_up(gs) else "down", target=gs["target"],
                     error=gs["error"])
            if gs.get("checkpoints_made") != before.get("checkpoints_made"):
                for c in self._new_user_checkpoints(g, gs):
                    emit("checkpoint", group=g, side="source", checkpoint=c["id"],
                         type=c["kind"], tag=c.get("tag"), wall_ns=c["wall_ns"])
            for d, ds in sorted(gs["disks"].items()):
                bd = before["disks"].get(d)
                if bd is None or bd["state"] == ds["state"]:
                    continue
                emit("disk", group=g, disk=d, change="state", old=bd["state"], new=ds["state"])
                if ds["state"] in SYNCING and bd["state"] not in SYNCING:
                    emit("resync", group=g, disk=d, change="start", sync=ds["state"],
                         dirty_bytes=ds["dirty_bytes"])
                elif bd["state"] in SYNCING and ds["state"] not in SYNCING:
                    emit("resync", group=g, disk=d, change="end" if ds["state"] ==
                         "replicating" else "interrupted", sync=bd["state"], now=ds["state"])
                elif bd["state"] == "bitmap" and ds["state"] == "replicating":
                    # A resync shorter than a sample: both ends, as soon as it is known.
                    for change in ("start", "end"):
                        emit("resync", group=g, disk=d, change=change, sync="resyncing",
                             between_samples=True)
        orr, nr = old["replicas"], new["replicas"]
        for g, r in sorted(nr.items()):
            before = orr.get(g)
            if before is None:
                emit("group", group=g, side="target", change="replica-created")
                continue
            if bool(before.get("connected")) != bool(r.get("connected")):
                emit("link", "info" if r.get("connected") else "warning", group=g,
                     side="target", change="up" if r.get("connected") else "down")
            newest, was = r.get("newest_checkpoint"), before.get("newest_checkpoint")
            if newest and newest.get("kind") != "auto" and (not was or was["id"] != newest["id"]):
                emit("checkpoint", group=g, side="target", checkpoint=newest["id"],
                     type=newest.get("kind"), tag=newest.get("tag"),
                     wall_ns=newest.get("wall_ns"))
            # A test failover's start and stop are told by the target site as they happen
            # (TargetSite.notify): one may open and close between two samples.
            if len(r.get("damage") or ()) > len(before.get("damage") or ()):
                for d in (r.get("damage") or [])[len(before.get("damage") or ()):]:
                    emit("journal", "error", group=g, side="target", change="damaged",
                         damage=d)
            if r.get("state") != before.get("state") and "state" in r:
                emit("group", "error" if r["state"] in ("journal-damaged", "storage-error")
                     else "info",
                     group=g, side="target", change="state", old=before.get("state"),
                     new=r["state"])
            if r.get("failover") and not before.get("failover"):
                emit("failover", "warning", group=g, mode="live", change="started",
                     checkpoint=r["failover"].get("checkpoint"))
        for g in sorted(set(orr) - set(nr)):
            emit("group", group=g, side="target", change="replica-removed")

    def _new_user_checkpoints(self, group: str, gs: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Checkpoints a user (or an alert) cut since the last sample. Automatic ones, every
        second or so, are not events: the metrics count them."""
        try:
            made = self.checkpoints(group) if self.checkpoints else [gs["last_checkpoint"]]
        except FerryError:
            return []
        seen = self._seen_checkpoints.setdefault(group, deque(maxlen=1000))
        new = [c for c in made if c and c["kind"] != "auto" and c["id"] not in seen]
        seen.extend(c["id"] for c in new)
        return new

    # -- alerts ----------------------------------------------------------------------------

    def journal_refused(self, group: str, side: str, message: str) -> None:
        """Site B's journal refused a write of ``group`` (its file system is full), told by
        ``side`` where it happened: the alert is raised now, not at the next sample."""
        for change, alert in self.alerts.refused(group, side, message, time.time()):
            self._announce(change, alert)

    def journal_resumed(self, group: str, side: str) -> None:
        """The journal of ``group`` took writes again after ``journal_refused``."""
        for change, alert in self.alerts.resumed(group, side, time.time()):
            self._announce(change, alert)

    def _announce(self, change: str, alert: Dict[str, Any]) -> None:
        severity = alert["severity"] if change == "raised" else "info"
        event = self.events.emit("alert", severity, change=change,
                                 **{k: v for k, v in alert.items() if k != "severity"},
                                 alert_severity=alert["severity"])
        level = {"warning": logging.WARNING, "error": logging.ERROR}[alert["severity"]] \
            if change == "raised" else logging.INFO
        log.log(level, "ALERT %s %s: %s", alert["alert"], change, alert["message"])
        if self._nursery is not None and self.hooks_dir:
            self._nursery.start_soon(self._hooks, event)

    async def _anomaly(self, alert: Dict[str, Any]) -> None:
        """Cut the tagged checkpoint and name the point before the writes began, then
        announce the alert."""
        group, disk = alert["group"], alert["anomaly_disk"]
        if self.checkpoints is not None:
            try:
                before = [c for c in self.checkpoints(group)
                          if c["wall_ns"] < alert["window_start"] * 1e9 and c.get("acked")]
                alert["restore_point"] = before[-1]["id"] if before else None
            except FerryError as e:
                log.warning("anomaly on %s: cannot list its checkpoints: %s", group, e)
        if self.checkpoint is not None:
            tag = "anomaly-%s-%d" % (disk, self.events.last_id + 1)
            try:
                made = await self.checkpoint(group, tag, 10.0)
                alert["checkpoint"] = made["id"]
                alert["checkpoint_tag"] = tag
            except FerryError as e:
                alert["checkpoint_error"] = str(e)
                log.warning("anomaly on %s: cannot cut checkpoint %s: %s", group, tag, e)
        self._announce("raised", alert)

    def hooks(self) -> List[str]:
        """The hook programs to run, in name order; unsafe ones are skipped with a warning."""
        if not self.hooks_dir:
            return []
        try:
            names = sorted(os.listdir(self.hooks_dir))
        except FileNotFoundError:
            return []
        except OSError as e:
            log.warning("cannot list hooks in %s: %s", self.hooks_dir, e)
            return []
        out = []
        for name in names:
            path = os.path.join(self.hooks_dir, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111 or name.startswith("."):
                continue
            if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
                log.warning("hook %s skipped: it must be ours (or root's) and writable by "
                            "nobody else", path)
                continue
            out.append(path)
        return out

    async def _hooks(self, event: Dict[str, Any]) -> None:
        data = (json.dumps(event, sort_keys=True) + "\n").encode()
        for path in self.hooks():
            self.hook_runs += 1
            try:
                with trio.fail_after(HOOK_TIMEOUT):
                    proc = await trio.run_process([path], stdin=data, check=False,
                                                  capture_stdout=True, capture_stderr=True)
            except trio.TooSlowError:
                self.hook_failures += 1
                log.warning("hook %s did not finish in %g s: killed", path, HOOK_TIMEOUT)
                continue
            except OSError as e:
                self.hook_failures += 1
                log.warning("hook %s cannot run: %s", path, e)
                continue
            if proc.returncode != 0:
                self.hook_failures += 1
                log.warning("hook %s failed (exit %d): %s", path, proc.returncode,
                            proc.stderr.decode(errors="replace").strip()[-300:])

    # -- what is derived over time -----------------------------------------------------------

    def _track(self, st: Dict[str, Any], now: float) -> None:
        for g, gs in st["groups"].items():
            # Each point is the worst RPO of its RPO_EVERY seconds, not one sample of them.
            peak = max(self._rpo_peak.get(g, 0.0), gs["rpo_seconds"])
            if now - self._rpo_at.get(g, 0.0) >= RPO_EVERY:
                self._rpo_at[g] = now
                self._rpo.setdefault(g, deque(maxlen=RPO_POINTS)).append((round(now, 1), peak))
                peak = 0.0
            self._rpo_peak[g] = peak
            shipped = {d: ds["bytes_shipped"] for d, ds in gs["disks"].items()}
            q = self._counters.setdefault(g, deque())
            q.append((now, gs["bytes_sent"], shipped))
            while len(q) > 2 and q[1][0] <= now - RATE_WINDOW:
                q.popleft()
            r = self._ratio.setdefault(g, deque())
            r.append((now, gs["bytes_sent"], sum(shipped.values())))
            while len(r) > 2 and r[1][0] <= now - 60:
                r.popleft()
            for d, ds in gs["disks"].items():
                self._track_sync(g, d, ds, now)
        for g in [g for g in self._counters if g not in st["groups"]]:
            for table in (self._counters, self._ratio, self._rpo, self._rpo_at, self._rpo_peak):
                table.pop(g, None)

    def _track_sync(self, g: str, d: str, ds: Dict[str, Any], now: float) -> None:
        """Progress by bytes site B has acked, not by bytes read back (which runs ahead by a
        whole queue). The backlog is what site B still lacks: the queue (not acked) plus
        the dirty map (not read yet). An episode starts with a sync or a backlog of
        ``BACKLOG`` bytes and ends when the backlog is gone; its total is the largest
        backlog seen, and the part delivered is that less the backlog now."""
        key = (g, d)
        backlog = ds["bytes_queued"] + ds["dirty_bytes"]
        s = self._sync.get(key)
        if s is None:
            if ds["state"] not in SYNCING and backlog < BACKLOG:
                return
            s = self._sync[key] = {"total": backlog, "rate": None, "at": now,
                                   "delivered": 0.0}
        elif backlog == 0 and ds["state"] not in SYNCING:
            del self._sync[key]
            return
        s["total"] = max(s["total"], backlog)
        delivered = s["total"] - backlog
        dt = now - s["at"]
        if dt >= 1.0:
            inst = max(0.0, delivered - s["delivered"]) / dt
            s["rate"] = inst if s["rate"] is None else 0.7 * s["rate"] + 0.3 * inst
            s["at"], s["delivered"] = now, delivered
        s["progress"] = round(delivered / s["total"], 4) if s["total"] else 0.0
        s["done"] = delivered
        s["eta"] = round(backlog / s["rate"], 1) if s["rate"] else None

    def progress(self, group: str, disk: str) -> Optional[Dict[str, Any]]:
        s = self._sync.get((group, disk))
        if s is None or "progress" not in s:
            return None
        return {"progress": s["progress"], "eta_seconds": s["eta"],
                "delivered_bytes": int(s["done"]), "total_bytes": int(s["total"])}

    def rates(self) -> Dict[str, Dict[str, Any]]:
        out = {}
        for g, q in self._counters.items():
            (t0, sent0, shipped0), (t1, sent1, shipped1) = q[0], q[-1]
            dt = t1 - t0
            r = self._ratio[g]
            shipped = r[-1][2] - r[0][2]
            out[g] = {
                "sent_bps": round((sent1 - sent0) / dt, 1) if dt > 0 else 0.0,
                "disks": {d: round((n - shipped0.get(d, 0)) / dt, 1) if dt > 0 else 0.0
                          for d, n in shipped1.items()},
                "compression_ratio": round((r[-1][1] - r[0][1]) / shipped, 3)
                if shipped > 0 else None}
        return out

    def alerts_document(self) -> Dict[str, Any]:
        return {"active": self.alerts.active(), "rpo_alert": dict(self.alerts.rpo),
                "link_down_alert": self.alerts.link_down_s,
                "hooks": self.hooks(), "hook_runs": self.hook_runs,
                "hook_failures": self.hook_failures}

    def rpo_history(self, group: str) -> List[Tuple[float, float]]:
        return list(self._rpo.get(group, ()))
