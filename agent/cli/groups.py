"""The commands of the source site's protected groups: ``protect``, ``set``, ``pause``,
``resume``, ``unprotect``, ``wait``, ``checkpoint`` and ``checkpoints``."""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

import click

from .app import Agent, call, cli, complete_groups, emit
from .jobs import run_job
from .units import human, iso, parse_duration, parse_size


def _split_disk(spec: str, index: int) -> Tuple[str, str]:
    if "=" in spec:
        name, path = spec.split("=", 1)
    else:
        path = spec
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(path))[0])
        name = name.lstrip("._-") or "disk%d" % index
    return name, os.path.abspath(path)


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--disk", "disks", multiple=True, metavar="[NAME=]PATH",
              help="A disk to protect (raw image file or block device); repeatable.")
@click.option("--domain", "domains", multiple=True, metavar="NAME",
              help="A libvirt domain (shut off) whose writable disks to protect, named by "
                   "target dev; the domain is attached to the splitters. Repeatable; "
                   "instead of --disk.")
@click.option("--target", required=True, metavar="HOST:PORT", help="The target site's agent.")
@click.option("--queue", default="256M", show_default=True,
              help="Bound of each disk's in-memory change queue.")
@click.option("--allow-unreachable", is_flag=True,
              help="Protect even if the target cannot be reached now.")
@click.option("--history", default="4h", show_default=True,
              help="How far back the target keeps points in time (30m, 4h, 2d).")
@click.option("--journal-max", default="50G", show_default=True,
              help="Most bytes the target's journal for the group may use; past it the "
                   "oldest history is given up (and an alert logged).")
@click.option("--journal-reserve", is_flag=True,
              help="Site B preallocates the journal's space up to --journal-max now, so "
                   "that a full file system there cannot stop the journal later; refused "
                   "with the numbers when the space is not there.")
@click.option("--checkpoint-interval", default="1s", show_default=True,
              help="Automatic crash-consistent checkpoints this often (0: none).")
@click.option("--bandwidth", default="0", show_default=True, metavar="RATE",
              help="Most bytes per second the link may carry (50M, 1G; 0: no limit). "
                   "Change it later with `ferry set`.")
@click.option("--rpo-alert", default=None, metavar="DURATION",
              help="Raise an alert while the group's RPO is above this (30s, 5m).")
@click.option("--splitter-threads", type=click.IntRange(1, 64), default=None, metavar="N",
              help="Requests each disk's splitter serves at once [default: 16]. Fewer "
                   "cost less CPU per write on fast local storage; more hide a slow "
                   "disk's latency (bench/splitter_threads.py measures both).")
@click.option("--replica-format", type=click.Choice(["raw", "qcow2", "vmdk"]), default=None,
              help="Site B keeps each replica as this format too [default: raw]: a qcow2 "
                   "or monolithicFlat VMDK image over the raw replica, for qemu, libvirt "
                   "or ESXi to open in place.")
@click.option("--preseeded", "seeds", multiple=True, metavar="[NAME=]PATH",
              help="A copy of disk NAME that site B already holds (absolute path there): "
                   "only chunks that differ are shipped. Repeatable; a new group only.")
@click.option("--app-consistent-every", default=None, metavar="DURATION",
              help="With --domain: an application-consistent checkpoint (guests frozen "
                   "through the qemu guest agent) this often (15m, 1h).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def protect(api: Agent, group: str, disks: Tuple[str, ...], domains: Tuple[str, ...],
            target: str, queue: str,
            allow_unreachable: bool, history: str, journal_max: str, journal_reserve: bool,
            checkpoint_interval: str, bandwidth: str, rpo_alert: Optional[str],
            splitter_threads: Optional[int], replica_format: Optional[str],
            seeds: Tuple[str, ...], app_consistent_every: Optional[str],
            as_json: bool) -> None:
    """Protect disks as GROUP, replicated to TARGET; prints each disk's NBD URI."""
    if bool(disks) == bool(domains):
        raise click.UsageError("give --disk or --domain (one of them, repeatable)")
    specs = [_split_disk(s, i) for i, s in enumerate(disks)]
    seeded = _seeds(seeds, [n for n, _p in specs])
    if app_consistent_every is not None and not domains:
        raise click.UsageError("--app-consistent-every needs --domain (a guest to freeze)")
    history_s = parse_duration(history)
    if history_s < 1:
        raise click.BadParameter("the history must be at least 1s", param_hint="--history")
    result = call(api, "POST", "/v1/groups", {
        "name": group, "target": target, "allow_unreachable": allow_unreachable,
        "queue_bytes": parse_size(queue),
        "history_s": int(history_s), "journal_max": parse_size(journal_max),
        "checkpoint_interval": parse_duration(checkpoint_interval),
        "bandwidth": parse_size(bandwidth), "seeds": seeded,
        **({"journal_reserve": True} if journal_reserve else {}),
        **({"splitter_threads": splitter_threads} if splitter_threads else {}),
        **({"replica_format": replica_format} if replica_format else {}),
        **({"domains": list(domains), "app_consistent_every":
            parse_duration(app_consistent_every or "0")} if domains else
           {"disks": [{"name": n, "path": p} for n, p in specs]})})
    if rpo_alert is not None:
        result["rpo_alert"] = call(api, "POST", "/v1/groups/%s/alerts" % group, {
            "rpo_alert": parse_duration(rpo_alert) or None})["rpo_alert"]
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for d in result["disks"]:
        click.echo("%s\t%s" % (d["name"], d["nbd_uri"]))
    for name, dom in sorted(result.get("domains", {}).items()):
        click.echo("domain %s\tattached (%s)" % (name, dom["attached"]))


def _seeds(specs: Tuple[str, ...], disks: List[str]) -> Dict[str, str]:
    """--preseeded NAME=PATH (PATH alone for a group of one disk); PATH is on site B."""
    out: Dict[str, str] = {}
    for spec in specs:
        name, path = spec.split("=", 1) if "=" in spec else (
            disks[0] if len(disks) == 1 else "", spec)
        if not name:
            raise click.BadParameter("give NAME=PATH for a group of several disks",
                                     param_hint="--preseeded")
        if not path.startswith("/"):
            raise click.BadParameter("%s is a file on the target site: give its absolute "
                                     "path" % path, param_hint="--preseeded")
        if name in out:
            raise click.BadParameter("disk %s is given twice" % name, param_hint="--preseeded")
        out[name] = path
    return out


@cli.command(name="set")
@click.argument("group", shell_complete=complete_groups)
@click.option("--bandwidth", default=None, metavar="RATE",
              help="Most bytes per second the link may carry (50M, 1G; 0: no limit).")
@click.option("--rpo-alert", default=None, metavar="DURATION",
              help="Alert while the group's RPO is above this (0: no RPO alert).")
@click.option("--replica-format", type=click.Choice(["raw", "qcow2", "vmdk"]), default=None,
              help="Site B keeps the replicas as this format too (see protect).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def set_(api: Agent, group: str, bandwidth: Optional[str], rpo_alert: Optional[str],
         replica_format: Optional[str], as_json: bool) -> None:
    """Change a protected group's settings while it runs."""
    if bandwidth is None and rpo_alert is None and replica_format is None:
        raise click.UsageError("give --bandwidth, --rpo-alert or --replica-format")
    result: Dict[str, Any] = {"group": group}
    if replica_format is not None:
        result.update(call(api, "POST", "/v1/groups/%s/settings" % group,
                           {"replica_format": replica_format}))
    if bandwidth is not None:
        result.update(call(api, "POST", "/v1/groups/%s/settings" % group,
                           {"bandwidth": parse_size(bandwidth)}))
    if rpo_alert is not None:
        result.update(call(api, "POST", "/v1/groups/%s/alerts" % group,
                           {"rpo_alert": parse_duration(rpo_alert) or None}))
    if as_json:
        return emit(result)
    if "bandwidth" in result:
        rate = result["bandwidth"]
        click.echo("%s: bandwidth %s" % (group, "%s/s" % human(rate) if rate else "unlimited"))
    if "rpo_alert" in result:
        click.echo("%s: RPO alert %s" % (group, "above %g s" % result["rpo_alert"]
                                         if result["rpo_alert"] else "off"))
    if "replica_format" in result:
        click.echo("%s: replicas kept as %s on site B" % (group, result["replica_format"]))


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--disk", required=True, help="The disk of GROUP that grew.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def resize(api: Agent, group: str, disk: str, as_json: bool) -> None:
    """Replicate a disk of GROUP that grew at its new size (shrinking is refused)."""
    result = call(api, "POST", "/v1/groups/%s/resize" % group, {"disk": disk})
    if as_json:
        return emit(result)
    if not result["resized"]:
        click.echo("%s/%s: %d bytes, unchanged" % (group, disk, result["size"]))
        return
    click.echo("%s/%s: grown from %d to %d bytes; replicated at the new size, its new tail "
               "is being synced" % (group, disk, result["old_size"], result["size"]))


def _pause_command(verb: str, done: str, doc: str) -> None:
    @cli.command(name=verb, help=doc)
    @click.argument("group", shell_complete=complete_groups)
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    def command(api: Agent, group: str, as_json: bool) -> None:
        result = call(api, "POST", "/v1/groups/%s/%s" % (group, verb))
        if as_json:
            return emit(result)
        click.echo("%s %s" % (group, done))


_pause_command("pause", "paused", "Stop shipping GROUP to the target (writes go on; their "
               "changes wait).")
_pause_command("resume", "resumed", "Ship GROUP again after a pause.")


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def unprotect(api: Agent, group: str, as_json: bool) -> None:
    """Stop protecting GROUP (its splitters stop; the target keeps its replica)."""
    result = call(api, "DELETE", "/v1/groups/" + group)
    if as_json:
        return emit(result)
    click.echo("unprotected %s" % group)


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--synced", is_flag=True, required=True,
              help="Wait until the target holds every write made before the call.")
@click.option("--timeout", default=600.0, show_default=True, type=float, help="Seconds.")
@click.option("--progress", is_flag=True,
              help="Show the initial sync's or resync's progress (on a terminal).")
@click.option("--detach", is_flag=True,
              help="Start the job on the agent, print its id and return (ferry job ID).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def wait(api: Agent, group: str, synced: bool, timeout: float, progress: bool, detach: bool,
         as_json: bool) -> None:
    """Wait for GROUP to reach a state (exit 0 once reached)."""
    result = run_job(api, {"kind": "wait", "group": group, "timeout": timeout},
                     "syncing %s" % group, progress and sys.stderr.isatty(), detach)
    if result is None:
        return
    if as_json:
        return emit(result)
    click.echo("%s synced" % group)


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--tag", default=None, help="A name for the checkpoint (\"before upgrade\").")
@click.option("--timeout", default=30.0, show_default=True, type=float,
              help="Seconds to wait for the target to journal it.")
@click.option("--app-consistent", is_flag=True,
              help="Freeze the file systems of the group's domains (qemu guest agent) "
                   "around the checkpoint, with their pre/post hooks.")
@click.option("--freeze-limit", default=10.0, show_default=True, type=float,
              help="With --app-consistent: the most seconds the guests stay frozen.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def checkpoint(api: Agent, group: str, tag: Optional[str], timeout: float,
               app_consistent: bool, freeze_limit: float, as_json: bool) -> None:
    """On the source site: cut a crash-consistent checkpoint of GROUP (application-
    consistent with --app-consistent); prints its id."""
    body: Dict[str, Any] = {"tag": tag, "timeout": timeout}
    if app_consistent:
        body.update(app_consistent=True, freeze_limit=freeze_limit)
    result = call(api, "POST", "/v1/groups/%s/checkpoints" % group, body,
                  timeout=timeout + freeze_limit + 60)
    if as_json:
        return emit(result)
    click.echo(result["id"])
    for line in result.get("post_hook_errors") or []:
        click.echo("ferry: warning: %s" % line, err=True)
    if not result.get("acked"):
        click.echo("ferry: warning: checkpoint %s is cut but the target has not journaled "
                   "it yet" % result["id"], err=True)


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--timeout", default=120.0, show_default=True, type=float,
              help="Seconds each step may take (the last writes out, site B live).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def move(api: Agent, group: str, timeout: float, as_json: bool) -> None:
    """On the source site: move GROUP to its target site with nothing lost.

    The splitters refuse writes from now on (the VMs must be stopped, or ready to stop),
    the last writes are shipped, and site B goes live at that point: start the VMs there.
    On failure the splitters take writes again and replication goes on."""
    result = call(api, "POST", "/v1/groups/%s/move" % group, {"timeout": timeout},
                  timeout=4 * timeout + 30)
    if as_json:
        return emit(result)
    click.echo("group %s moved to %s at checkpoint %s; writes lost: %d" % (
        group, result["target"], result["checkpoint"], result["lost_writes"]))


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def checkpoints(api: Agent, group: str, as_json: bool) -> None:
    """List GROUP's checkpoints: made here (source) and held here (target)."""
    result = call(api, "GET", "/v1/checkpoints/" + group)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    for side in ("source", "target"):
        items = result.get(side)
        if items is None:
            continue
        click.echo("%s checkpoints of %s (%d):" % (side, group, len(items)))
        for c in items:
            extra = ""
            if side == "source":
                extra = "acked" if c.get("acked") else "not acked"
            extra = ", ".join(x for x in [extra, *c.get("tags", [])] if x)
            if c.get("refused"):  # it needs damaged journal records (a gap in history)
                extra = "; ".join(x for x in [extra, "refused: " + c["refused"]] if x)
            click.echo("  %s  %s  %-4s  %s%s" % (c["id"], iso(c["wall_ns"]), c["kind"],
                                                 c.get("tag") or "-",
                                                 "  (%s)" % extra if extra else ""))
