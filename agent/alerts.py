"""Alerts: rules over successive status snapshots, without I/O.

``Alerts.update(status, now)`` returns what changed: ``("raised", alert)`` or
``("cleared", alert)``; the watcher (watch.py) turns those into events, log lines, metrics and
hook runs. An alert is ``{"alert", "group", "disk"?, "severity", "message", "since", ...}``;
one per (alert, group, disk) at a time; a change of severity is raised again.

    alert             when                                                      severity
    rpo               group RPO above its --rpo-alert (twice above: error)      warning/error
    history           the journal limit keeps under 85% / 75% of the window     warning/error
                      (Zerto's thresholds)
    journal-full      journal at 90% of its limit (cleared under 85%)           warning
                      or site B's file system refused a write: raised at once   error
                      by ``refused`` where the refusal happens (never missed
                      between two samples), cleared by ``resumed`` (the source:
                      the next ack) or, on site B, by the first status with no
                      storage error
    link-down         no live session with the target for longer than N s      error
    splitter-restart  a disk's splitter went away or came back with a new       warning
                      generation (cleared once the disk replicates again)
    anomaly           a disk's writes turned incompressible at volume while     error
                      its own history compressed well (encryption, ransomware)
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Tuple

from .metrics import link_up

SPLITTER_START = 10.0   # seconds a splitter may take to come up before it is an alert
HISTORY_WARNING = 0.85
HISTORY_ERROR = 0.75
JOURNAL_FULL = 0.90
JOURNAL_CLEAR = 0.85
REFUSED_HOLD = 1.0      # s: a refusal on site B is not cleared by a status older than this

# The anomaly detector: over the last WINDOW seconds, the frame bytes sent for a group over
# the write bytes shipped (1.0: nothing compressed). A window with at least ACTIVE bytes
# shipped counts; it is incompressible at INCOMPRESSIBLE or more. The alert needs BASELINE
# earlier active windows whose mean ratio was at most COMPRESSIBLE, and MIN_BYTES in the
# window; it clears after CLEAR_AFTER compressible active windows in a row.
WINDOW = 4.0
ACTIVE = 1 << 20
MIN_BYTES = 8 << 20
INCOMPRESSIBLE = 0.85
COMPRESSIBLE = 0.6
BASELINE = 3
CLEAR_AFTER = 3

Transition = Tuple[str, Dict[str, Any]]


@dataclass
class Detector:
    """One group's write stream: is it suddenly incompressible?"""

    samples: Deque[Tuple[float, int, Dict[str, int]]] = field(default_factory=deque)
    baseline: Optional[float] = None      # mean ratio of the active windows seen so far
    baseline_n: int = 0
    last_counted: float = 0.0
    firing: bool = False
    calm: int = 0

    def feed(self, now: float, sent: int, shipped: Dict[str, int]
             ) -> Optional[Dict[str, Any]]:
        """One sample of the counters; the window's figures once it is active, else None."""
        self.samples.append((now, sent, dict(shipped)))
        while len(self.samples) > 2 and self.samples[1][0] <= now - WINDOW:
            self.samples.popleft()
        t0, sent0, shipped0 = self.samples[0]
        if now - t0 < WINDOW * 0.75 or sent < sent0:   # too short, or the agent restarted
            return None
        by_disk = {d: n - shipped0.get(d, 0) for d, n in shipped.items()}
        written = sum(max(0, n) for n in by_disk.values())
        if written < ACTIVE:
            return None
        ratio = (sent - sent0) / written
        return {"ratio": round(ratio, 3), "bytes": written, "window_start": t0,
                "disk": max(by_disk, key=lambda d: by_disk[d])}

    def judge(self, now: float, window: Optional[Dict[str, Any]]) -> Optional[str]:
        """"raise", "clear" or None for this window; windows overlap, so each one counts
        towards the baseline and the calm only once per WINDOW."""
        if window is None:
            return None
        if not self.firing:
            if (window["bytes"] >= MIN_BYTES and window["ratio"] >= INCOMPRESSIBLE
                    and self.baseline_n >= BASELINE and self.baseline is not None
                    and self.baseline <= COMPRESSIBLE):
                self.firing, self.calm = True, 0
                return "raise"
            if now - self.last_counted >= WINDOW and window["ratio"] < INCOMPRESSIBLE:
                self.last_counted = now
                n = self.baseline_n
                self.baseline = window["ratio"] if self.baseline is None else (
                    (self.baseline * min(n, 20) + window["ratio"]) / (min(n, 20) + 1))
                self.baseline_n += 1
            return None
        if now - self.last_counted >= WINDOW:
            self.last_counted = now
            self.calm = self.calm + 1 if window["ratio"] <= COMPRESSIBLE else 0
            if self.calm >= CLEAR_AFTER:
                self.firing = False
                return "clear"
        return None


class Alerts:
    """The alert rules of one agent. ``rpo`` holds each group's --rpo-alert (seconds)."""

    def __init__(self, link_down_s: float = 60.0) -> None:
        self.link_down_s = link_down_s
        self.rpo: Dict[str, float] = {}
        self._active: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
        self.raised: Counter = Counter()
        self.detectors: Dict[str, Detector] = {}
        self._down_since: Dict[str, float] = {}
        self._generations: Dict[Tuple[str, str], int] = {}
        self._splitter_down: Dict[Tuple[str, str], float] = {}
        # (group, side) -> [first, latest] refusal of the journal since it last took writes
        self._refused: Dict[Tuple[str, str], List[float]] = {}

    def refused(self, group: str, side: str, message: str, now: float) -> List[Transition]:
        """The journal of ``group`` refused a write (site B's file system is full), seen by
        ``side`` ("source" or "target") as it happened: raise ``journal-full`` now."""
        out: List[Transition] = []
        times = self._refused.setdefault((group, side), [now, now])
        times[1] = now
        self._set(out, now, "journal-full", group, "error", message, side=side,
                  refused_since=times[0])
        return out

    def resumed(self, group: str, side: str, now: float) -> List[Transition]:
        """The journal of ``group`` takes writes again: clear what ``refused`` raised."""
        out: List[Transition] = []
        if self._refused.pop((group, side), None) is not None:
            self._set(out, now, "journal-full", group, None)
        return out

    def active(self) -> List[Dict[str, Any]]:
        return [dict(a) for a in self._active.values()]

    def _set(self, out: List[Transition], now: float, name: str, group: str,
             severity: Optional[str], message: str = "", disk: str = "", **extra: Any) -> None:
        """Raise (severity given) or clear (None) one alert, noting only changes."""
        key = (name, group, disk)
        old = self._active.get(key)
        if severity is None:
            if old is not None:
                del self._active[key]
                out.append(("cleared", dict(old, cleared=now)))
            return
        if old is not None and old["severity"] == severity:
            return
        alert = {"alert": name, "group": group, "severity": severity, "message": message,
                 "since": old["since"] if old else now, **({"disk": disk} if disk else {}),
                 **extra}
        self._active[key] = alert
        self.raised[name] += 1
        out.append(("raised", dict(alert)))

    def update(self, status: Dict[str, Any], now: float) -> List[Transition]:
        out: List[Transition] = []
        groups, replicas = status["groups"], status["replicas"]
        for g, gs in groups.items():
            self._source(out, now, g, gs)
        for g, r in replicas.items():
            self._replica(out, now, g, r)
        for key in [k for k in self._active if k[1] not in groups and k[1] not in replicas]:
            self._set(out, now, key[0], key[1], None, disk=key[2])  # the group is gone
        for gone in [k for k in self._refused if k[0] not in groups and k[0] not in replicas]:
            del self._refused[gone]
        for g in [g for g in self.detectors if g not in groups]:
            del self.detectors[g]
        return out

    def _source(self, out: List[Transition], now: float, g: str, gs: Dict[str, Any]) -> None:
        limit = self.rpo.get(g)
        rpo = gs["rpo_seconds"]
        if limit:
            severity = None if rpo <= limit else "error" if rpo > 2 * limit else "warning"
            self._set(out, now, "rpo", g, severity, "RPO of group %s is %.1f s, over its "
                      "alert of %g s" % (g, rpo, limit), rpo_seconds=rpo, limit=limit)
        else:
            self._set(out, now, "rpo", g, None)
        if link_up(gs):
            self._down_since.pop(g, None)
            self._set(out, now, "link-down", g, None)
        else:
            since = self._down_since.setdefault(g, now)
            if now - since >= self.link_down_s:
                self._set(out, now, "link-down", g, "error", "group %s has had no live "
                          "session with its target %s for %.0f s (%s)" % (
                              g, gs["target"], now - since, gs["error"] or gs["state"]),
                          down_since=since)
        for d, ds in gs["disks"].items():
            gen = ds["generation"]
            before = self._generations.get((g, d))
            self._generations[(g, d)] = gen or before or 0
            if ds["state"] == "splitter-down":
                # One that ran and went away, or one that has not come up for a while (a
                # splitter that is starting, at protect or agent start, is not an alert).
                since = self._splitter_down.setdefault((g, d), now)
                if before or now - since >= SPLITTER_START:
                    self._set(out, now, "splitter-restart", g, "warning", "the splitter of "
                              "%s/%s is not running" % (g, d), disk=d)
                continue
            self._splitter_down.pop((g, d), None)
            if before and gen and gen != before:
                self._set(out, now, "splitter-restart", g, "warning", "the splitter of %s/%s "
                          "restarted (generation %d, was %d)" % (g, d, gen, before), disk=d)
            elif ds["state"] == "replicating":
                self._set(out, now, "splitter-restart", g, None, disk=d)
        det = self.detectors.setdefault(g, Detector())
        window = det.feed(now, gs["bytes_sent"],
                          {d: ds["bytes_shipped"] for d, ds in gs["disks"].items()})
        verdict = det.judge(now, window)
        if verdict == "raise" and window is not None:
            self._set(out, now, "anomaly", g, "error", "the writes of %s/%s turned "
                      "incompressible: %.1f MiB in %.0f s sent at %.0f%% of their size (this "
                      "group's writes usually go at %.0f%%): encryption or ransomware?" % (
                          g, window["disk"], window["bytes"] / 2**20, WINDOW,
                          100 * window["ratio"], 100 * (det.baseline or 0)),
                      disk="", anomaly_disk=window["disk"], ratio=window["ratio"],
                      baseline=round(det.baseline or 0, 3),
                      window_start=window["window_start"])
        elif verdict == "clear":
            self._set(out, now, "anomaly", g, None)

    def _replica(self, out: List[Transition], now: float, g: str, r: Dict[str, Any]) -> None:
        if "checkpoints" not in r:
            return
        window, covered = r["history_s"], r["history_covered_s"]
        severity = None
        if r["history_short"] and window:
            part = covered / window
            severity = "error" if part < HISTORY_ERROR else "warning" \
                if part < HISTORY_WARNING else None
        self._set(out, now, "history", g, severity, "group %s keeps %.0f s of its %.0f s "
                  "history (journal limit)" % (g, covered, window),
                  covered_s=covered, history_s=window)
        times = self._refused.get((g, "target"))
        if times is not None:
            # An append worked since it was refused; a status asked for before the refusal
            # (a sample in flight when it came) is not evidence of that.
            if r.get("storage_error") is None and now - times[1] >= REFUSED_HOLD:
                out.extend(self.resumed(g, "target", now))
            return
        used = r["journal_bytes"] / r["journal_max"] if r.get("journal_max") else 0.0
        key = ("journal-full", g, "")
        if used >= JOURNAL_FULL or (key in self._active and used >= JOURNAL_CLEAR):
            self._set(out, now, "journal-full", g, "warning", "the journal of %s is at %.0f%% "
                      "of its limit" % (g, 100 * used), used=round(used, 3))
        else:
            self._set(out, now, "journal-full", g, None)
