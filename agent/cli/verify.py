"""``ferry verify G [--disk D]`` on the source site: compare each disk with site B's copy
while replication runs (``agent/source/verify.py`` says how). Exits 0 when they are the
same, 1 when ranges differ (each printed as a ``ferry resync`` range, or resynced at once
with ``--repair``)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import click

from .app import Agent, call, cli, complete_groups, emit
from .units import human, parse_size


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.option("--disk", default=None, help="One disk (default: all of the group's).")
@click.option("--chunk", default="1M", show_default=True,
              help="The size compared by one hash (a power of two, 4K to 64M).")
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(1, 100),
              help="Rounds a chunk that differs is compared again before it is reported.")
@click.option("--settle", default=1.0, show_default=True, type=click.FloatRange(0, 600),
              help="Seconds given to site B to catch up in each round.")
@click.option("--repair", is_flag=True, help="Resync the differing ranges at once.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def verify(api: Agent, group: str, disk: Optional[str], chunk: str, rounds: int,
           settle: float, repair: bool, as_json: bool) -> None:
    """On the source site: compare GROUP's disks with site B's copy, online."""
    body: Dict[str, Any] = {"chunk": parse_size(chunk), "rounds": rounds, "settle": settle,
                            "repair": repair}
    if disk:
        body["disk"] = disk
    result = call(api, "POST", "/v1/groups/%s/verify" % group, body, timeout=24 * 3600)
    if as_json:
        emit(result)
    else:
        for name, d in sorted(result["disks"].items()):
            click.echo("%s/%s: %d chunk(s) of %s, %d the same, %s differing%s" % (
                group, name, d["chunks"], human(result["chunk"]), d["same"],
                human(sum(n for _o, n in d["differing"])),
                ", %s written in every round (not compared)" % human(
                    sum(n for _o, n in d["busy"])) if d["busy"] else ""))
            for offset, length in d["differing"]:
                click.echo("  differs: --range %d:%d%s" % (
                    offset, length, " (resync asked)" if result["repair_asked"] else ""))
        if result["differing_bytes"] and not result["repair_asked"]:
            click.echo("repair: ferry resync %s --disk DISK --range OFFSET:LENGTH ... "
                       "(or verify --repair)" % group)
    if result["differing_bytes"]:
        raise SystemExit(1)
