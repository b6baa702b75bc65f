"""Repairs: ``resync`` (source site: read ranges of a disk again and ship them) and
``repair`` (target site: ask the source to send ranges again). Ranges are OFFSET:LENGTH,
each with an optional unit (4096, 1M, 2G); none means the whole disk."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import click

from .app import Agent, call, cli, complete_groups, emit
from .units import human, parse_size


def ranges_body(disk: str, ranges: Tuple[str, ...]) -> Dict[str, Any]:
    body: Dict[str, Any] = {"disk": disk}
    if ranges:
        out = []
        for text in ranges:
            offset, sep, length = text.partition(":")
            if not sep:
                raise click.UsageError("a range is OFFSET:LENGTH, not %r" % text)
            out.append([parse_size(offset), parse_size(length)])
        body["ranges"] = out
    return body


def range_options(f: Any) -> Any:
    f = click.option("--range", "ranges", multiple=True, metavar="OFFSET:LENGTH",
                     help="A byte range (repeatable; default: the whole disk).")(f)
    f = click.option("--disk", required=True, help="The disk's name in the group.")(f)
    return f


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@range_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def resync(api: Agent, group: str, disk: str, ranges: Tuple[str, ...],
           as_json: bool) -> None:
    """On the source site: read ranges of DISK again and send them to the target."""
    result = call(api, "POST", "/v1/groups/%s/resync" % group, ranges_body(disk, ranges))
    if as_json:
        return emit(result)
    click.echo("resyncing %s of %s/%s (%d range(s))" % (
        human(result["bytes"]), group, disk, len(result["ranges"])))


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--disk", default=None, help="The disk's name in the group.")
@click.option("--range", "ranges", multiple=True, metavar="OFFSET:LENGTH",
              help="A byte range (repeatable; default: the whole disk).")
@click.option("--rebuild-meta", is_flag=True,
              help="Make GROUP's damaged or missing meta.json again from its journal and "
                   "replicas (instead of asking for ranges).")
@click.option("--order", default=None, metavar="DISK,DISK",
              help="With --rebuild-meta: the disks in group order (default: by name).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def repair(api: Agent, group: str, disk: Optional[str], ranges: Tuple[str, ...],
           rebuild_meta: bool, order: Optional[str], as_json: bool) -> None:
    """On the target site: ask the source to send ranges of DISK again (this site's copy
    of them is damaged); they go with the next acknowledgement to the source. With
    --rebuild-meta: rebuild the group's meta.json from its journal and replicas."""
    if rebuild_meta:
        if disk or ranges:
            raise click.UsageError("--rebuild-meta takes no --disk or --range")
        body = {"disks": order.split(",")} if order else {}
        result = call(api, "POST", "/v1/replicas/%s/rebuild-meta" % group, body)
        if as_json:
            return emit(result)
        click.echo("rebuilt %s (disks %s); group %s is %s" % (
            result["file"], ", ".join(result["disks"]), group, result["state"]))
        return
    if disk is None:
        raise click.UsageError("--disk is required (or --rebuild-meta)")
    result = call(api, "POST", "/v1/replicas/%s/repair" % group, ranges_body(disk, ranges))
    if as_json:
        return emit(result)
    click.echo("asked the source for %s of %s/%s again%s" % (
        human(result["bytes"]), group, disk,
        "" if result["connected"] else " (it is not connected: when it is)"))


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--disk", default=None, help="One disk (default: all of the group's).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def scrub(api: Agent, group: str, disk: Optional[str], as_json: bool) -> None:
    """On the target site: read every replica chunk of GROUP and check it against its
    digest; damaged chunks are asked of the source again. Exits 1 when damage was found."""
    body = {"disk": disk} if disk else {}
    result = call(api, "POST", "/v1/replicas/%s/scrub" % group, body, timeout=24 * 3600)
    if as_json:
        emit(result)
    else:
        for name, d in sorted(result["disks"].items()):
            click.echo("%s/%s: %d chunks good, %d new digests, %d damaged range(s)%s" % (
                group, name, d["checked_chunks"], d["baseline_chunks"], len(d["damaged"]),
                ": asked the source for them again" if d["damaged"] else ""))
    if result["repair_asked"]:
        raise SystemExit(1)
