"""The commands of operations: ``events``, ``alerts``, ``config check`` and
``dashboard-url``."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict, Optional

import click

from ..errors import EXIT_FAILURE, EXIT_UNAVAILABLE, FerryError, Unavailable, exit_status
from .app import Agent, Failure, call, cli, emit
from .jobs import JOB_RECONNECT
from .units import iso


def _event_line(e: Dict[str, Any]) -> str:
    import datetime
    when = datetime.datetime.fromtimestamp(e["time"], datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
    skip = {"id", "time", "kind", "severity", "group", "message"}
    rest = " ".join("%s=%s" % (k, json.dumps(v) if not isinstance(v, str) else v)
                    for k, v in sorted(e.items()) if k not in skip and v is not None)
    return "%d %s %-7s %-10s %s%s%s" % (e["id"], when, e["severity"], e["kind"],
                                        e.get("group", "-"), " " + rest if rest else "",
                                        "  -- " + e["message"] if e.get("message") else "")


EVENTS_PAGE = 1000  # the API's default limit of one answer


@cli.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they come.")
@click.option("--after", default=None, type=int, metavar="ID",
              help="Only events after this id (resume where a consumer stopped).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
@click.pass_obj
def events(api: Agent, follow: bool, after: Optional[int], as_json: bool) -> None:
    """Print the agent's events: changes of group, disk, link, checkpoint, failover, alert
    (the last ones kept, then, with --follow, new ones as they happen)."""
    last = after or 0
    lost_since: Optional[float] = None
    while True:
        try:
            result = api.client().call(
                "GET", "/v1/events?after=%d&wait=%d" % (last, 25 if follow else 0), timeout=40)
        except Unavailable as e:
            # --follow outlives an agent restart (a minute at most); its new events follow.
            lost_since = lost_since or time.monotonic()
            if not follow or time.monotonic() - lost_since > JOB_RECONNECT:
                raise Failure(str(e), EXIT_UNAVAILABLE) from None
            time.sleep(1)
            continue
        except FerryError as e:
            raise Failure(str(e), exit_status(e)) from None
        lost_since = None
        if result["lost"]:
            click.echo("ferry: warning: events after %d are no longer kept; some were "
                       "missed" % last, err=True)
        for event in result["events"]:
            click.echo(json.dumps(event, sort_keys=True) if as_json else _event_line(event))
            last = event["id"]
        sys.stdout.flush()
        # A page holds at most 1,000 events: without --follow, page on to the newest kept.
        if not follow and len(result["events"]) < EVENTS_PAGE:
            return


@cli.group()
def config() -> None:
    """The agent's configuration files (/etc/ferry)."""


@config.command("check")
@click.option("--conf-dir", default="/etc/ferry", show_default=True,
              type=click.Path(file_okay=False), help="agent.conf and conf.d/ are here.")
@click.option("--hooks", "hooks_dir", default="/etc/ferry/hooks.d", show_default=True,
              type=click.Path(file_okay=False), help="The alert hooks' directory.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def config_check(conf_dir: str, hooks_dir: str, as_json: bool) -> None:
    """Check the settings the service would start the agent with; exit 1 on an error."""
    from ..config import check
    found = check(conf_dir, hooks_dir)
    errors = [t for level, t in found if level == "error"]
    if as_json:
        emit({"ok": not errors, "findings": [{"level": lv, "text": t} for lv, t in found]})
    else:
        for level, text in found:
            click.echo("%s: %s" % (level, text))
        click.echo("%s: %d error(s), %d warning(s)" % (
            conf_dir, len(errors), len(found) - len(errors)))
    if errors:
        raise click.exceptions.Exit(EXIT_FAILURE)


@cli.command("dashboard-url")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def dashboard_url(api: Agent, as_json: bool) -> None:
    """The web dashboard's login address (it holds the TCP listener's token: keep it
    private). Told on the local socket only."""
    result = call(api, "GET", "/v1/dashboard-url")
    if as_json:
        return emit(result)
    for url in result["urls"]:
        click.echo(url)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def alerts(api: Agent, as_json: bool) -> None:
    """The alerts raised now, and the alert settings."""
    result = call(api, "GET", "/v1/alerts")
    if as_json:
        return emit(result)
    for a in result["active"]:
        click.echo("%-7s %-16s %s%s  since %s\n        %s" % (
            a["severity"], a["alert"], a["group"], "/" + a["disk"] if a.get("disk") else "",
            iso(int(a["since"] * 1e9)), a["message"]))
    if not result["active"]:
        click.echo("no alerts")
