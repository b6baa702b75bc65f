"""The target site's commands of recovery: ``restore``, ``view``, ``view-close`` and
``failover``, each at a point in time (``--checkpoint`` or ``--at``); a live failover is
then committed (``--commit``) or rolled back (``--rollback``)."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import click

from .app import Agent, call, cli, complete_groups, emit
from .jobs import job_options, run_job
from .units import iso, parse_time


def point_options(f: Any) -> Any:
    f = click.option("--at", "at", default=None, metavar="ISO-TIME",
                     help="The newest checkpoint at or before this time.")(f)
    f = click.option("--checkpoint", "checkpoint", default=None, metavar="ID|TAG",
                     help="A checkpoint by id or tag.")(f)
    return f


def point_body(checkpoint: Optional[str], at: Optional[str]) -> Dict[str, Any]:
    if checkpoint is not None and at is not None:
        raise click.UsageError("give --checkpoint or --at, not both")
    body: Dict[str, Any] = {}
    if checkpoint is not None:
        body["checkpoint"] = checkpoint
    if at is not None:
        body["at_ns"] = parse_time(at)
    return body


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--disk", required=True, help="The disk's name in the group.")
@click.option("--to", "dest", required=True, type=click.Path(dir_okay=False),
              help="A new file to write (on the target site's host).")
@click.option("--format", "fmt", default=None, type=click.Choice(["raw", "qcow2", "vmdk"]),
              help="The image format to write (default raw): qcow2 and vmdk are written by "
                   "qemu-img convert from a point-in-time view, in one pass, sparse.")
@click.option("--subformat", default=None, metavar="SUBFORMAT",
              help="VMDK: monolithicSparse (default) or streamOptimized (ESXi uploads).")
@click.option("--compress", is_flag=True, help="qcow2: compressed clusters.")
@point_options
@job_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def restore(api: Agent, group: str, disk: str, dest: str, fmt: Optional[str],
            subformat: Optional[str], compress: bool, checkpoint: Optional[str],
            at: Optional[str], progress: Optional[bool], detach: bool, as_json: bool) -> None:
    """On the target site: write a disk as of a checkpoint (default: its newest
    consistent state) to a new file."""
    body = dict(point_body(checkpoint, at), disk=disk, to=os.path.abspath(dest))
    if fmt is not None:
        body["format"] = fmt
    if subformat is not None:
        body["subformat"] = subformat
    if compress:
        body["compress"] = True
    result = run_job(api, dict(body, kind="restore", group=group),
                     "restoring %s/%s" % (group, disk), progress, detach)
    if result is None:
        return
    if as_json:
        return emit(result)
    c = result.get("checkpoint")
    click.echo("restored %s/%s to %s (%s%d bytes, generation %d, sequence %d%s)"
               % (group, disk, result["to"], "%s, " % result["format"]
                  if result.get("format") else "", result["size"], result["gen"], result["seq"],
                  ", checkpoint %s of %s" % (c["id"], iso(c["wall_ns"])) if c else ""))


def _print_view(result: Dict[str, Any], as_json: bool, what: str) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    c = result.get("checkpoint")
    click.echo("%s %s of %s at %s" % (what, result["id"], result["group"],
                                      "checkpoint %s (%s)" % (c["id"], iso(c["wall_ns"]))
                                      if c else "its newest consistent state"))
    for name, uri in sorted(result["disks"].items()):
        click.echo("%s\t%s" % (name, uri))
    vms = result.get("vms")
    for name in (vms or {}).get("started", []):
        click.echo("domain %s\tstarted" % name)
    if vms and vms.get("error"):
        click.echo("ferry: error: %s" % vms["error"], err=True)


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@point_options
@click.option("--overlay", "overlay", multiple=True, metavar="[DISK=]FILE",
              help="Also write a new qcow2 FILE over DISK's replica holding the journal's "
                   "changes up to the point, for a VM started here without copying the disk; "
                   "valid while the view is open. DISK= may be left out for a group of one "
                   "disk. Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def view(api: Agent, group: str, checkpoint: Optional[str], at: Optional[str],
         overlay: Tuple[str, ...], as_json: bool) -> None:
    """On the target site: serve GROUP's disks as of a point, read-only over NBD (default:
    the newest consistent state); prints the view id and a URI per disk."""
    body = point_body(checkpoint, at)
    if overlay:
        body["overlay"] = _overlays(overlay)
    result = call(api, "POST", "/v1/replicas/%s/views" % group, body, timeout=3600)
    _print_view(result, as_json, "view")
    if not as_json:
        for name, path in sorted((result.get("overlays") or {}).items()):
            click.echo("%s\toverlay %s" % (name, path))


def _overlays(values: Tuple[str, ...]) -> Any:
    """``--overlay`` values: one FILE, or DISK=FILE each (a FILE with '=' in its name: give
    it as ./NAME or with its directory)."""
    out: Dict[str, str] = {}
    for v in values:
        disk, sep, path = v.partition("=")
        if not sep or "/" in disk or not disk:
            if len(values) > 1:
                raise click.BadParameter("give DISK=FILE for each of several overlays",
                                         param_hint="--overlay")
            return os.path.abspath(v)
        if not path:
            raise click.BadParameter("%s: give DISK=FILE" % v, param_hint="--overlay")
        if disk in out:
            raise click.BadParameter("disk %s given twice" % disk, param_hint="--overlay")
        out[disk] = os.path.abspath(path)
    return out


@cli.command("view-close")
@click.argument("view_id", metavar="VIEW")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def view_close(api: Agent, view_id: str, as_json: bool) -> None:
    """Close a view (or a test failover) by its id."""
    result = call(api, "DELETE", "/v1/views/" + view_id)
    if as_json:
        return emit(result)
    click.echo("closed view %s" % view_id)


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--test", "mode", flag_value="test",
              help="Serve the point with a private writable overlay; replication goes on.")
@click.option("--stop-test", "mode", flag_value="stop-test",
              help="End the test failover; its writes are discarded.")
@click.option("--live", "mode", flag_value="live",
              help="Stop replicating; the disks as of the point become the live ones.")
@click.option("--commit", "mode", flag_value="commit",
              help="Keep a live failover: its point becomes the group's base (the journal "
                   "before and after it is discarded).")
@click.option("--rollback", "mode", flag_value="rollback",
              help="Undo a live failover: stop its export, discard its writes, replicate "
                   "again.")
@point_options
@job_options
@click.option("--network-map", "network_map", multiple=True, metavar="SRC=DST",
              help="Plug the VMs' interfaces on network (or bridge) SRC of site A into DST "
                   "here; repeatable. A test's unmapped interfaces are unplugged.")
@click.option("--boot-order", default=None, metavar="VM,VM,...",
              help="Start the group's VMs in this order (default: as protected).")
@click.option("--boot-delay", default=0.0, show_default=True, type=float, metavar="SECONDS",
              help="Wait this long between starting two VMs of the group.")
@click.option("--vm-suffix", default=None, metavar="SUFFIX",
              help="Name the VMs started here NAME+SUFFIX (default: -test for --test, "
                   "none for --live).")
@click.option("--no-vms", is_flag=True,
              help="Serve the disks only: define and start none of the group's VMs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def failover(api: Agent, group: str, mode: Optional[str], checkpoint: Optional[str],
             at: Optional[str], progress: Optional[bool], detach: bool,
             network_map: Tuple[str, ...], boot_order: Optional[str], boot_delay: float,
             vm_suffix: Optional[str], no_vms: bool, as_json: bool) -> None:
    """On the target site: test failover, stop it, or fail over for real (then commit
    or roll back)."""
    if mode is None:
        raise click.UsageError("give one of --test, --stop-test, --live, --commit, "
                               "--rollback")
    body = dict(point_body(checkpoint, at), mode=mode)
    if mode in ("stop-test", "commit", "rollback") and len(body) > 1:
        raise click.UsageError("--%s takes no point" % mode)
    if mode in ("test", "live"):  # the group's libvirt domains (agent/domains/vms.py)
        body.update(_vm_options(network_map, boot_order, boot_delay, no_vms))
        if vm_suffix is not None:
            body["vm_suffix"] = vm_suffix
    result = run_job(api, dict(body, kind="failover", group=group),
                     "%s failover of %s" % (mode, group), progress, detach)
    if result is None:
        return
    if as_json and mode in ("stop-test", "commit", "rollback"):
        return emit(result)
    if mode in ("commit", "rollback"):
        return _print_step(group, mode, result)
    if mode == "stop-test":
        click.echo("test failover %s of %s stopped; its writes are discarded"
                   % (result["id"], group))
        return
    _print_view(result, as_json, "test failover" if mode == "test" else "live failover")


def _vm_options(network_map: Tuple[str, ...], boot_order: Optional[str], boot_delay: float,
                no_vms: bool) -> Dict[str, Any]:
    nmap = {}
    for spec in network_map:
        src, sep, dst = spec.partition("=")
        if not sep or not src or not dst:
            raise click.BadParameter("give SRC=DST", param_hint="--network-map")
        nmap[src] = dst
    out: Dict[str, Any] = {"vms": not no_vms, "boot_delay": boot_delay}
    if nmap:
        out["network_map"] = nmap
    if boot_order:
        out["boot_order"] = [n for n in boot_order.split(",") if n]
    return out


def _print_step(group: str, mode: str, result: Dict[str, Any]) -> None:
    if mode == "rollback":
        click.echo("failover of %s rolled back: its live writes are discarded and it "
                   "replicates again" % group)
        return
    c = result["failover"].get("checkpoint")
    click.echo("failover of %s committed at %s: that point is its base now; its journal "
               "before and after it is discarded" % (group, "checkpoint %s (%s)" % (
                   c["id"], iso(c["wall_ns"])) if c else "its newest consistent state"))
    for name, uri in sorted(result["disks"].items()):
        click.echo("%s\t%s" % (name, uri))


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--target", "address", default=None, metavar="HOST:PORT",
              help="The old source site's replication address (its original disks); "
                   "not needed on the return leg.")
@click.option("--timeout", default=600.0, show_default=True, type=float,
              help="Seconds to wait until the old source holds everything.")
@click.option("--no-wait", "no_wait", is_flag=True,
              help="Return once the reverse protection runs; do not wait for the sync.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def failback(api: Agent, group: str, address: Optional[str], timeout: float,
             no_wait: bool, as_json: bool) -> None:
    """On the site where GROUP is failed over live (committed): protect its live disks
    back to the old source, onto that site's original disks, shipping only the chunks
    that differ. The live disks are served by splitters from then on, on the same URIs;
    then `ferry move GROUP` here makes the old source live again, and `ferry failback
    GROUP` there (the return leg) protects it to this site again, without a full sync."""
    body: Dict[str, Any] = {"timeout": timeout, "wait": not no_wait}
    if address is not None:
        body["target"] = address
    result = call(api, "POST", "/v1/groups/%s/failback" % group, body,
                  timeout=timeout + 120)
    if as_json:
        return emit(result)
    click.echo("group %s %s %s: %s; %d of %d bytes shipped" % (
        group, "is protected again to" if result.get("returned") else "fails back to",
        result["target"], "the target holds everything" if result["synced"]
        else "the sync runs (ferry wait %s --synced)" % group, result["bytes_shipped"],
        result["size"]))
    for name, d in sorted(result["disks"].items()):
        click.echo("%s\t%s" % (name, d["nbd_uri"]))


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--keep", type=click.Choice(["a", "b"]), default=None,
              help="On site B: the survivor of a split brain (a: the old source's writes, "
                   "the failover rolled back; b: this site's live disks).")
@click.option("--drop-kept", "drop_kept", is_flag=True,
              help="Delete the loser's kept copies on this site.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def resolve(api: Agent, group: str, keep: Optional[str], drop_kept: bool,
            as_json: bool) -> None:
    """Resolve GROUP's split brain (both sites took writes) by naming the survivor; the
    loser's changes are kept (a copy under the data directory's kept/) until dropped."""
    if (keep is None) == (not drop_kept):
        raise click.UsageError("give --keep a|b or --drop-kept")
    body: Dict[str, Any] = {"keep": keep} if keep else {"drop_kept": True}
    result = call(api, "POST", "/v1/replicas/%s/resolve" % group, body, timeout=3600)
    if as_json:
        return emit(result)
    if drop_kept:
        click.echo("group %s: kept copies dropped from %s" % (group, result["directory"]))
    elif keep == "b":
        click.echo("group %s: split brain resolved, site B's live disks win; site A's "
                   "writes are copied aside on site A when the failback adopts its disks"
                   % group)
    else:
        click.echo("group %s: split brain resolved, site A's writes win; the failover is "
                   "rolled back and site B's live disks are kept:" % group)
        for name, path in sorted(result["kept"].items()):
            click.echo("%s\t%s" % (name, path))
