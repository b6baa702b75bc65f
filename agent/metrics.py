"""Prometheus metrics, with ``prometheus-client``: read from the status document at scrape
time (a custom collector; no global mutable metrics), plus what the watcher derives (rates,
compression, alerts, events). docs/operations.md lists every family.
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .watch import Watcher

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Every state a group or disk can be in (source.GROUP_STATE_ORDER and ``replicating``).
STATES = ("error", "fenced", "source-io-error", "splitter-down", "target-unpaired",
          "target-unreachable", "target-error", "target-storage-error", "connecting",
          "paused", "bitmap", "initial-sync", "resyncing", "replicating")

DISK_COUNTERS = (("bytes_written", "Bytes of guest writes, zeroes and trims since nbdkit "
                  "started"),
                 ("bytes_shipped", "Write data bytes put into batches for the target"),
                 ("records_shipped", "Write records put into batches for the target"),
                 ("resync_bytes", "Bytes read back by resyncs since nbdkit started"),
                 ("resync_skipped_bytes", "Resync bytes the target's seed already held"),
                 ("io_errors", "Failed reads, writes, zeroes, trims and flushes on the disk "
                  "since nbdkit started"))
DISK_GAUGES = (("bytes_queued", "Bytes in the splitter's queue (not acked yet)"),
               ("queue_limit", "Bound of the splitter's queue in bytes"),
               ("dirty_bytes", "Bytes in the dirty map"))


# A source group whose shipper has no live session with its target.
LINK_DOWN = ("connecting", "target-unpaired", "target-unreachable", "target-error",
             "target-storage-error", "paused", "fenced")


def link_up(group: Dict[str, Any]) -> bool:
    """A protected group (status document) has a live session with its target."""
    return group["error"] is None and group["state"] not in LINK_DOWN and not (
        group["disks"] and all(d["state"] in (*LINK_DOWN, "bitmap")
                               for d in group["disks"].values()))


class StatusCollector(Collector):
    """One scrape: the status document now, and the watcher's figures."""

    def __init__(self, status: Callable[[], Dict[str, Any]], watcher: Optional[Watcher],
                 version: str) -> None:
        self.status = status
        self.watcher = watcher
        self.version = version

    def collect(self) -> Iterator[Metric]:
        st = self.status()
        yield from self._build(st)
        yield from self._source(st["groups"])
        yield from self._target(st["replicas"])
        if self.watcher is not None:
            yield from self._derived(self.watcher)

    def _build(self, st: Dict[str, Any]) -> Iterator[Metric]:
        info = GaugeMetricFamily("ferry_build_info", "Ferry's version, as a label",
                                 labels=["version", "python", "site"])
        info.add_metric([self.version, platform.python_version(), st["site"]], 1)
        yield info
        up = GaugeMetricFamily("ferry_uptime_seconds", "Seconds since the agent started")
        up.add_metric([], st["uptime_seconds"])
        yield up

    def _source(self, groups: Dict[str, Any]) -> Iterator[Metric]:
        gstate = GaugeMetricFamily("ferry_group_state", "1 for the state a protected group is "
                                   "in, 0 for the others", labels=["group", "state"])
        dstate = GaugeMetricFamily("ferry_disk_state", "1 for the state a protected disk is "
                                   "in, 0 for the others", labels=["group", "disk", "state"])
        rpo = GaugeMetricFamily("ferry_rpo_seconds", "Replication lag of a disk",
                                labels=["group", "disk"])
        grpo = GaugeMetricFamily("ferry_group_rpo_seconds", "Replication lag of a group (its "
                                 "worst disk)", labels=["group"])
        link = GaugeMetricFamily("ferry_link_up", "1 while the group has a live session with "
                                 "its target", labels=["group"])
        sent = CounterMetricFamily("ferry_group_bytes_sent", "Frame bytes sent to the target, "
                                   "after compression", labels=["group"])
        unacked = GaugeMetricFamily("ferry_checkpoints_unacked", "Checkpoints cut on the "
                                    "source, not yet journaled by the target", labels=["group"])
        counters = {k: CounterMetricFamily("ferry_" + k, h, labels=["group", "disk"])
                    for k, h in DISK_COUNTERS}
        gauges = {k: GaugeMetricFamily("ferry_" + k + ("_bytes" if k == "queue_limit" else ""),
                                       h, labels=["group", "disk"]) for k, h in DISK_GAUGES}
        progress = GaugeMetricFamily("ferry_resync_progress", "Part of a running resync or "
                                     "initial sync delivered to the target, 0 to 1",
                                     labels=["group", "disk"])
        for g, gs in sorted(groups.items()):
            for s in STATES:
                gstate.add_metric([g, s], int(gs["state"] == s))
            grpo.add_metric([g], gs["rpo_seconds"])
            link.add_metric([g], int(link_up(gs)))
            sent.add_metric([g], gs["bytes_sent"])
            unacked.add_metric([g], gs["checkpoints_unacked"])
            for d, ds in sorted(gs["disks"].items()):
                for s in STATES:
                    dstate.add_metric([g, d, s], int(ds["state"] == s))
                rpo.add_metric([g, d], ds["rpo_seconds"])
                for k, fam in counters.items():
                    fam.add_metric([g, d], ds[k])
                for k, gfam in gauges.items():
                    gfam.add_metric([g, d], ds[k])
                p = self.watcher.progress(g, d) if self.watcher else None
                if p is not None:
                    progress.add_metric([g, d], p["progress"])
        yield from (gstate, dstate, rpo, grpo, link, sent, unacked, *counters.values(),
                    *gauges.values(), progress)

    def _target(self, replicas: Dict[str, Any]) -> Iterator[Metric]:
        fams: Dict[str, GaugeMetricFamily] = {}

        def gauge(name: str, help_: str, group: str, value: float) -> None:
            if name not in fams:
                fams[name] = GaugeMetricFamily("ferry_" + name, help_, labels=["group"])
            fams[name].add_metric([group], value)

        for g, r in sorted(replicas.items()):
            gauge("replica_connected", "1 while a source session for the group is open", g,
                  int(bool(r.get("connected"))))
            gauge("journal_bytes", "Journal size on the target", g, r.get("journal_bytes", 0))
            if "checkpoints" not in r:
                continue
            gauge("journal_max_bytes", "The journal's configured limit", g, r["journal_max"])
            gauge("history_covered_seconds", "History the target's journal covers", g,
                  r["history_covered_s"])
            gauge("history_configured_seconds", "History the group is configured to keep",
                  g, r["history_s"])
            gauge("history_short", "1 when the journal limit keeps less than the configured "
                  "history", g, int(r["history_short"]))
            gauge("checkpoints", "Checkpoints held in the target's window", g,
                  r["checkpoints"])
            gauge("views_open", "Views and test failovers open", g, r.get("views_open", 0))
            gauge("journal_damaged", "1 while the target's journal of the group holds "
                  "damaged records (status: damage)", g,
                  int(r.get("state") == "journal-damaged"))
            gauge("journal_damage_ranges", "Damaged stretches of the group's journal", g,
                  len(r.get("damage") or ()))
        yield from fams.values()

    def _derived(self, w: Watcher) -> Iterator[Metric]:
        ratio = GaugeMetricFamily("ferry_compression_ratio", "Frame bytes sent over write "
                                  "bytes shipped, over the last minute (1: incompressible)",
                                  labels=["group"])
        rate = GaugeMetricFamily("ferry_group_sent_bytes_per_second", "Frame bytes sent to "
                                 "the target per second, over the last 10 s", labels=["group"])
        drate = GaugeMetricFamily("ferry_disk_shipped_bytes_per_second", "Write bytes "
                                  "shipped per second, over the last 10 s",
                                  labels=["group", "disk"])
        for g, figures in sorted(w.rates().items()):
            if figures["compression_ratio"] is not None:
                ratio.add_metric([g], figures["compression_ratio"])
            rate.add_metric([g], figures["sent_bps"])
            for d, bps in sorted(figures["disks"].items()):
                drate.add_metric([g, d], bps)
        firing = GaugeMetricFamily("ferry_alert_firing", "1 while an alert is raised",
                                   labels=["alert", "group", "severity"])
        for a in w.alerts.active():
            firing.add_metric([a["alert"], a["group"], a["severity"]], 1)
        raised = CounterMetricFamily("ferry_alerts_raised", "Alerts raised since the agent "
                                     "started", labels=["alert"])
        for name, n in sorted(w.alerts.raised.items()):
            raised.add_metric([name], n)
        events = CounterMetricFamily("ferry_events", "Events since the agent started",
                                     labels=["kind"])
        for kind, n in sorted(w.events.counts.items()):
            events.add_metric([kind], n)
        hooks = CounterMetricFamily("ferry_hook_failures", "Alert hooks that failed or timed "
                                    "out since the agent started")
        hooks.add_metric([], w.hook_failures)
        yield from (ratio, rate, drate, firing, raised, events, hooks)


def exposition(collector: StatusCollector) -> bytes:
    """The text format of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    out: bytes = generate_latest(registry)
    return out

