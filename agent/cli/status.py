"""``ferry status``: this site's protected groups (source side) and replicas (target
side), as lines for a person or as the agent's JSON."""

from __future__ import annotations

import json
from typing import List, Optional

import click

from .app import Agent, call, cli, complete_groups
from .units import duration, human


@cli.command()
@click.argument("group", required=False, shell_complete=complete_groups)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable).")
@click.pass_obj
def status(api: Agent, group: Optional[str], as_json: bool) -> None:
    """Show protected groups (source side) and replicas (target side)."""
    result = call(api, "GET", "/v1/status" + ("?group=" + group if group else ""))
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True, allow_nan=False))
        return
    lines: List[str] = []
    for name, g in sorted(result["groups"].items()):
        lines.append("group %s -> %s: %s, RPO %.1f s%s" % (
            name, g["target"], g["state"], g["rpo_seconds"],
            " (%s)" % g["error"] if g.get("error") else ""))
        for dname, d in sorted(g["disks"].items()):
            lines.append("  %-12s %-18s written %-10s shipped %-10s queued %-10s dirty %-10s "
                         "acked %d%s" % (dname, d["state"], human(d["bytes_written"]),
                                         human(d["bytes_shipped"]), human(d["bytes_queued"]),
                                         human(d["dirty_bytes"]), d["last_acked_seq"],
                                         "  seed held %s" % human(d["resync_skipped_bytes"])
                                         if d.get("resync_skipped_bytes") else ""))
            if d.get("delivered_progress") is not None:
                eta = d.get("delivered_eta_seconds")
                lines.append("  %-12s %s %.1f%% delivered to the target, ETA %s" % (
                    "", d["state"], 100 * d["delivered_progress"],
                    duration(eta) if eta is not None else "unknown yet"))
            lines.append("  %-12s %s" % ("", d["nbd_uri"]))
            if d.get("device_problem"):
                lines.append("  %-12s DEVICE %s" % ("", d["device_problem"]))
    for name, r in sorted(result["replicas"].items()):
        src = r.get("source") or {}
        reserve = r.get("journal_reserve")
        lines.append("replica %s <- %s: journal %s%s" % (
            name, src.get("peer", "(source not connected)"), human(r["journal_bytes"]),
            " in a reserve of %s (%s allocated)" % (human(reserve["bytes"]),
                                                    human(reserve["allocated"]))
            if reserve else ""))
        if "checkpoints" in r:
            lines.append("  history %.0f s of %.0f s kept%s, %d checkpoints%s%s" % (
                r["history_covered_s"], r["history_s"],
                " (LESS: journal limit)" if r["history_short"] else "", r["checkpoints"],
                ", test failover %s running" % r["test"]["id"] if r.get("test") else "",
                ", FAILED OVER LIVE (%s)" % r["failover"].get("label", r["failover"]["state"])
                if r.get("failover") else ""))
        for dname, d in sorted(r["disks"].items()):
            lines.append("  %-12s %-12s durable %d/%d applied %d/%d  %s" % (
                dname, "consistent" if d["consistent"] else "inconsistent",
                d["durable_gen"], d["durable_seq"], d["applied_gen"], d["applied_seq"],
                d["replica"]))
    if not lines:
        lines.append("site %s: nothing protected or replicated here" % result["site"])
    if result.get("security", {}).get("mode") == "insecure":
        lines.append("site %s runs --insecure: replication is plain TCP, open to anyone"
                     % result["site"])
    click.echo("\n".join(lines))
