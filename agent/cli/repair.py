"""Repairs: ``resync`` (source site: read ranges of a disk again and ship them) and
``repair`` (target site: ask the source to send ranges again). Ranges are OFFSET:LENGTH,
each with an optional unit (4096, 1M, 2G); none means the whole disk."""

from __future__ import annotations

from typing import Any, Dict, Tuple

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
@range_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def repair(api: Agent, group: str, disk: str, ranges: Tuple[str, ...],
           as_json: bool) -> None:
    """On the target site: ask the source to send ranges of DISK again (this site's copy
    of them is damaged); they go with the next acknowledgement to the source."""
    result = call(api, "POST", "/v1/replicas/%s/repair" % group, ranges_body(disk, ranges))
    if as_json:
        return emit(result)
    click.echo("asked the source for %s of %s/%s again%s" % (
        human(result["bytes"]), group, disk,
        "" if result["connected"] else " (it is not connected: when it is)"))
