"""The ``ferry`` commands of operations: events, alerts, jobs (and following one with a
progress bar), ``config check`` and ``dashboard-url``. ``cli.py`` imports this module, which
registers them on its ``cli`` group."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict, Optional

import click

from .cli import (
    EXIT_FAILURE,
    JOB_RECONNECT,
    Agent,
    Failure,
    _duration,
    _human,
    _iso,
    call,
    cli,
    emit,
)
from .client import error_from
from .errors import EXIT_UNAVAILABLE, FerryError, Unavailable, exit_status


class Bar:
    """One line on stderr, redrawn: a job's progress (only on a terminal)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.width = 0

    def update(self, p: Optional[Dict[str, Any]]) -> None:
        if p is None:
            text = "%s: working, %s" % (self.label, _duration(time.monotonic() - self.started))
        else:
            filled = int(30 * p["progress"])
            text = "%s [%s%s] %5.1f%%" % (self.label, "#" * filled, "-" * (30 - filled),
                                           100 * p["progress"])
            if p.get("total_bytes"):
                text += " %s of %s" % (_human(p["done_bytes"]), _human(p["total_bytes"]))
            if p.get("eta_seconds") is not None:
                text += ", ETA %s" % _duration(p["eta_seconds"])
        click.echo("\r" + text.ljust(self.width), nl=False, err=True)
        self.width = len(text)

    def close(self) -> None:
        click.echo("\r" + " " * self.width + "\r", nl=False, err=True)


def run_job(api: Agent, body: Dict[str, Any], label: str, progress: Optional[bool],
            detach: bool) -> Optional[Any]:
    """Start a job on the agent and follow it to its end; its result (None: detached)."""
    job = call(api, "POST", "/v1/jobs", body)
    if detach:
        click.echo(job["id"])
        click.echo("job %s runs on the agent: ferry job %s [--wait]" % (job["id"], job["id"]),
                   err=True)
        return None
    return follow_job(api, job["id"], label, progress)


def follow_job(api: Agent, job_id: str, label: str, progress: Optional[bool]) -> Any:
    """Poll a job until it ends; a lost connection is retried for a minute (the job goes on
    on the agent meanwhile). A failed job fails with its error's exit status."""
    bar = Bar(label) if (progress if progress is not None else sys.stderr.isatty()) else None
    lost_since: Optional[float] = None
    try:
        while True:
            try:
                job = api.client().call("GET", "/v1/jobs/%s?wait=1" % job_id, timeout=30)
                lost_since = None
            except Unavailable as e:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > JOB_RECONNECT:
                    raise Failure("%s; job %s goes on on the agent: reattach with `ferry job "
                                  "%s --wait`" % (e, job_id, job_id), EXIT_UNAVAILABLE) from None
                time.sleep(1)
                continue
            except FerryError as e:
                raise Failure(str(e), exit_status(e)) from None
            if job["state"] != "running":
                break
            if bar is not None:
                bar.update(job["progress"])
    finally:
        if bar is not None:
            bar.close()
    if job["state"] == "failed":
        err = error_from(400, json.dumps(job["error"]).encode())
        raise Failure(str(err), exit_status(err))
    return job["result"]


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
        if not follow:
            return


def _job_line(j: Dict[str, Any]) -> str:
    p = j.get("progress")
    extra = ("%.1f%%" % (100 * p["progress"])) if p else ""
    if j["state"] == "failed":
        extra = j["error"]["error"]
    return "%s  %-14s %-10s %-8s %s  %s" % (j["id"], j["kind"], j["group"], j["state"],
                                            _iso(int(j["started"] * 1e9)), extra)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def jobs(api: Agent, as_json: bool) -> None:
    """The agent's jobs (restores, waits, failovers): running, and ended since it started."""
    result = call(api, "GET", "/v1/jobs")
    if as_json:
        return emit(result)
    for j in result["jobs"]:
        click.echo(_job_line(j))
    if not result["jobs"]:
        click.echo("no jobs")


@cli.command()
@click.argument("job_id", metavar="ID")
@click.option("--wait", "wait_", is_flag=True, help="Follow the job to its end (reattach); "
              "exit with its status.")
@click.option("--progress/--no-progress", default=None,
              help="With --wait: show a progress bar (default: on a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def job(api: Agent, job_id: str, wait_: bool, progress: Optional[bool], as_json: bool) -> None:
    """One job: its state, progress and result (with --wait: once it has ended)."""
    if wait_:
        follow_job(api, job_id, "job %s" % job_id, progress)
    result = call(api, "GET", "/v1/jobs/" + job_id)
    if as_json:
        return emit(result)
    click.echo(_job_line(result))
    if result["result"] is not None:
        click.echo(json.dumps(result["result"], indent=2, sort_keys=True))


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
    from .config import check
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
            _iso(int(a["since"] * 1e9)), a["message"]))
    if not result["active"]:
        click.echo("no alerts")
