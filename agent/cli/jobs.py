"""Jobs on the agent (restores, waits, failovers): starting one and following it to its
end with a progress bar, and the ``jobs`` and ``job`` commands."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict, Optional

import click

from ..client import error_from
from ..errors import EXIT_UNAVAILABLE, FerryError, Unavailable, exit_status
from .app import Agent, Failure, call, cli, emit
from .units import duration, human, iso

JOB_RECONNECT = 60.0  # seconds a CLI following a job keeps trying to reach the agent


class Bar:
    """One line on stderr, redrawn: a job's progress (only on a terminal)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.width = 0

    def update(self, p: Optional[Dict[str, Any]]) -> None:
        if p is None:
            text = "%s: working, %s" % (self.label, duration(time.monotonic() - self.started))
        else:
            filled = int(30 * p["progress"])
            text = "%s [%s%s] %5.1f%%" % (self.label, "#" * filled, "-" * (30 - filled),
                                           100 * p["progress"])
            if p.get("total_bytes"):
                text += " %s of %s" % (human(p["done_bytes"]), human(p["total_bytes"]))
            if p.get("eta_seconds") is not None:
                text += ", ETA %s" % duration(p["eta_seconds"])
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


def _job_line(j: Dict[str, Any]) -> str:
    p = j.get("progress")
    extra = ("%.1f%%" % (100 * p["progress"])) if p else ""
    if j["state"] == "failed":
        extra = j["error"]["error"]
    return "%s  %-14s %-10s %-8s %s  %s" % (j["id"], j["kind"], j["group"], j["state"],
                                            iso(int(j["started"] * 1e9)), extra)


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


def job_options(f: Any) -> Any:
    """--progress and --detach, for every command that runs as a job on the agent."""
    f = click.option("--detach", is_flag=True,
                     help="Start the job on the agent, print its id and return (ferry job ID)."
                     )(f)
    return click.option("--progress/--no-progress", default=None,
                        help="Show a progress bar (default: on a terminal).")(f)
