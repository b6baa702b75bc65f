"""The ``ferry`` command: runs the agent, and talks to a running agent over its API.

Exit statuses (``errors.EXIT_STATUS``): 0 done, 1 failed, 2 usage, 3 not found, 4 conflict,
5 unavailable, 6 timed out, 7 permission denied, 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

import click

from .client import DEFAULT_API, Client
from .errors import (
    EXIT_FAILURE,
    EXIT_USAGE,
    FerryError,
    exit_status,
)

JOB_RECONNECT = 60.0  # seconds a CLI following a job keeps trying to reach the agent
SIZE_RE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.I)
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


class Failure(click.ClickException):
    """One line for the user; exit status 1 unless told (``errors.EXIT_STATUS``)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = exit_code


def parse_size(text: str) -> int:
    m = SIZE_RE.match(text.strip())
    if not m:
        raise click.BadParameter("%r is not a size like 512M or 2G" % text)
    return int(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``4h`` or ``2d``."""
    m = DURATION_RE.match(text.strip())
    if not m:
        raise click.BadParameter("%r is not a duration like 30s, 15m or 4h" % text)
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_time(text: str) -> int:
    """Nanoseconds since the epoch from an ISO 8601 time (no zone: this host's local time)."""
    import datetime
    try:
        t = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter("%r is not an ISO 8601 time like 2026-11-23T05:40:00Z"
                                 % text) from None
    return int(t.timestamp() * 1e9)


def _iso(wall_ns: int) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(wall_ns / 1e9, datetime.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


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


def _complete_groups(ctx: click.Context, _param: click.Parameter, incomplete: str) -> List[str]:
    """Shell completion of a GROUP: the groups and replicas the agent has (nothing if it
    cannot be asked within a second)."""
    params = ctx.find_root().params
    try:
        client = Client(params.get("api") or DEFAULT_API, params.get("token_file"),
                        params.get("cacert"))
        st = client.call("GET", "/v1/status", timeout=1)
    except (FerryError, ValueError):
        return []
    return sorted(n for n in {*st["groups"], *st["replicas"]} if n.startswith(incomplete))


class Agent:
    """The agent a command talks to: where (``--api``) and with what credential; the
    connection is made at the first call, so ``ferry agent`` and ``--help`` need none."""

    def __init__(self, address: str, token_file: Optional[str], cafile: Optional[str],
                 cert: Optional[str] = None, key: Optional[str] = None) -> None:
        self.address = address
        self.token_file = token_file
        self.cafile = cafile
        self.cert, self.key = cert, key
        self._client: Optional[Client] = None

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.address, self.token_file, self.cafile, self.cert,
                                  self.key)
        return self._client


def call(api: Agent, method: str, path: str, body: Optional[Dict[str, Any]] = None,
         timeout: float = 60) -> Any:
    """The agent's answer; its error as a one-line ``Failure`` with the error's exit status."""
    try:
        return api.client().call(method, path, body, timeout)
    except FerryError as e:
        raise Failure(str(e), exit_status(e)) from None


def emit(result: Any) -> None:
    """``--json``: the agent's answer, indented, keys sorted."""
    click.echo(json.dumps(result, indent=2, sort_keys=True))


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("ferry")
    except Exception:  # not installed as a distribution (a source tree)
        return "0.1.0"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "-V", "--version", prog_name="ferry",
                      message="%(prog)s %(version)s")
@click.option("--api", envvar="FERRY_API", default=DEFAULT_API, show_default=True,
              metavar="unix:PATH|https://HOST:PORT",
              help="The agent's API (or $FERRY_API): its Unix socket, or its TCP listener.")
@click.option("--token-file", envvar="FERRY_TOKEN_FILE", default=None,
              type=click.Path(dir_okay=False),
              help="File holding the token of a TCP API listener (or $FERRY_TOKEN_FILE).")
@click.option("--cacert", envvar="FERRY_CACERT", default=None, type=click.Path(dir_okay=False),
              help="CA certificate to check an https:// API with (or $FERRY_CACERT).")
@click.option("--cert", envvar="FERRY_CERT", default=None, type=click.Path(dir_okay=False),
              help="Client certificate (PEM) for an https:// API that wants one (or "
                   "$FERRY_CERT).")
@click.option("--key", envvar="FERRY_KEY", default=None, type=click.Path(dir_okay=False),
              help="Its private key (or $FERRY_KEY; default: in the --cert file).")
@click.pass_context
def cli(ctx: click.Context, api: str, token_file: Optional[str], cacert: Optional[str],
        cert: Optional[str], key: Optional[str]) -> None:
    """Ferry: continuous replication of KVM virtual machine disks."""
    ctx.obj = Agent(api, token_file, cacert, cert, key)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: every error is one line on stderr and a non-zero exit status."""
    try:
        rv = cli.main(args=argv, prog_name="ferry", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("ferry: aborted", err=True)
        return 130
    except click.UsageError as e:
        hint = " (see ferry %s--help)" % (e.ctx.command_path.split(" ", 1)[1] + " "
                                          if e.ctx and " " in e.ctx.command_path else "")
        click.echo("ferry: error: %s%s" % (e.format_message(), hint), err=True)
        return EXIT_USAGE
    except click.ClickException as e:
        click.echo("ferry: error: %s" % e.format_message(), err=True)
        return e.status if isinstance(e, Failure) else e.exit_code
    except FerryError as e:
        click.echo("ferry: error: %s" % e, err=True)
        return exit_status(e)
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for this agent's state, journals and replicas.")
@click.option("--listen", default="0.0.0.0:4005", show_default=True,
              help="Replication address HOST:PORT.")
@click.option("--api", "api_addrs", multiple=True, metavar="unix:PATH|HOST:PORT|https://HOST:PORT",
              help="Where the API listens; repeatable. Default unix:/run/ferry/api.sock "
                   "(root and group ferry). A TCP listener needs the token of "
                   "--api-token-file, and TLS off loopback.")
@click.option("--api-group", default="ferry", show_default=True,
              help="Group that may use the API socket (0600, root only, if it does not exist).")
@click.option("--api-token-file", default=None, type=click.Path(dir_okay=False),
              help="Token of the TCP API listener (default DATA/api.token, made if absent).")
@click.option("--api-cert", default=None, type=click.Path(dir_okay=False, exists=True),
              help="TLS certificate (PEM) of an https:// API listener.")
@click.option("--api-key", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Its private key (PEM).")
@click.option("--api-client-ca", default=None, type=click.Path(dir_okay=False, exists=True),
              help="An https:// API listener then wants a client certificate this CA "
                   "signed, instead of the token.")
@click.option("--metrics", "metrics_addr", default=None, metavar="HOST:PORT",
              help="Read-only listener for Prometheus: GET /metrics and /healthz only.")
@click.option("--hooks", "hooks_dir", default="/etc/ferry/hooks.d", show_default=True,
              type=click.Path(file_okay=False),
              help="Programs run with each alert as JSON on stdin (root's, not writable by "
                   "others).")
@click.option("--link-down-alert", default="60s", show_default=True, metavar="DURATION",
              help="Alert when a protected group has had no session with its target this "
                   "long.")
@click.option("--site", default=None, help="Name of this site (default: the host name).")
@click.option("--insecure", is_flag=True,
              help="Replicate over plain TCP and accept it from anyone (labs only). "
                   "Without it, only TLS between paired sites.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def agent(data_dir: str, listen: str, api_addrs: Tuple[str, ...], api_group: str,
          api_token_file: Optional[str], api_cert: Optional[str], api_key: Optional[str],
          api_client_ca: Optional[str], metrics_addr: Optional[str], hooks_dir: str,
          link_down_alert: str, site: Optional[str], insecure: bool, verbose: bool) -> None:
    """Run the host agent in the foreground."""
    import trio

    from . import access, daemon, logs

    logs.setup(logging.DEBUG if verbose else logging.INFO)
    try:
        listen_hp = daemon.parse_hostport(listen, 4005)
        metrics_hp = daemon.parse_hostport(metrics_addr, 9081) if metrics_addr else None
        apis = [access.parse_listener(a) for a in api_addrs] or [
            access.Listener("unix", path=access.DEFAULT_SOCKET)]
    except (ValueError, FerryError) as e:
        raise Failure(str(e)) from None
    data_dir = os.path.abspath(data_dir)
    opts = daemon.Options(data_dir, listen_hp, apis, site, insecure, metrics_hp, api_group,
                          api_token_file, api_cert, api_key, api_client_ca,
                          os.path.abspath(hooks_dir), parse_duration(link_down_alert))
    try:
        os.makedirs(data_dir, exist_ok=True)
        trio.run(daemon.run, opts)
    except Exception as e:
        # A socket that cannot be bound fails inside the agent's nursery: an exception group.
        cause = _first_oserror(e)
        if cause is None:
            raise
        raise Failure("agent cannot start: %s" % cause,
                      exit_status(cause) if isinstance(cause, FerryError) else EXIT_FAILURE
                      ) from None


def _first_oserror(e: BaseException) -> Optional[Exception]:
    if isinstance(e, (OSError, FerryError)):
        return e
    for inner in getattr(e, "exceptions", ()):  # an ExceptionGroup (trio's nurseries)
        found = _first_oserror(inner)
        if found is not None:
            return found
    return None


def _split_disk(spec: str, index: int) -> Tuple[str, str]:
    if "=" in spec:
        name, path = spec.split("=", 1)
    else:
        path = spec
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(path))[0])
        name = name.lstrip("._-") or "disk%d" % index
    return name, os.path.abspath(path)


@cli.command()
@click.argument("group", shell_complete=_complete_groups)
@click.option("--disk", "disks", multiple=True, required=True, metavar="[NAME=]PATH",
              help="A disk to protect (raw image file or block device); repeatable.")
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
@click.option("--checkpoint-interval", default="1s", show_default=True,
              help="Automatic crash-consistent checkpoints this often (0: none).")
@click.option("--bandwidth", default="0", show_default=True, metavar="RATE",
              help="Most bytes per second the link may carry (50M, 1G; 0: no limit). "
                   "Change it later with `ferry set`.")
@click.option("--rpo-alert", default=None, metavar="DURATION",
              help="Raise an alert while the group's RPO is above this (30s, 5m).")
@click.option("--preseeded", "seeds", multiple=True, metavar="[NAME=]PATH",
              help="A copy of disk NAME that site B already holds (absolute path there): "
                   "only chunks that differ are shipped. Repeatable; a new group only.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def protect(api: Agent, group: str, disks: Tuple[str, ...], target: str, queue: str,
            allow_unreachable: bool, history: str, journal_max: str,
            checkpoint_interval: str, bandwidth: str, rpo_alert: Optional[str],
            seeds: Tuple[str, ...], as_json: bool) -> None:
    """Protect disks as GROUP, replicated to TARGET; prints each disk's NBD URI."""
    specs = [_split_disk(s, i) for i, s in enumerate(disks)]
    seeded = _seeds(seeds, [n for n, _p in specs])
    history_s = parse_duration(history)
    if history_s < 1:
        raise click.BadParameter("the history must be at least 1s", param_hint="--history")
    result = call(api, "POST", "/v1/groups", {
        "name": group, "target": target, "allow_unreachable": allow_unreachable,
        "queue_bytes": parse_size(queue),
        "history_s": int(history_s), "journal_max": parse_size(journal_max),
        "checkpoint_interval": parse_duration(checkpoint_interval),
        "bandwidth": parse_size(bandwidth), "seeds": seeded,
        "disks": [{"name": n, "path": p} for n, p in specs]})
    if rpo_alert is not None:
        result["rpo_alert"] = call(api, "POST", "/v1/groups/%s/alerts" % group, {
            "rpo_alert": parse_duration(rpo_alert) or None})["rpo_alert"]
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for d in result["disks"]:
        click.echo("%s\t%s" % (d["name"], d["nbd_uri"]))


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
@click.argument("group", shell_complete=_complete_groups)
@click.option("--bandwidth", default=None, metavar="RATE",
              help="Most bytes per second the link may carry (50M, 1G; 0: no limit).")
@click.option("--rpo-alert", default=None, metavar="DURATION",
              help="Alert while the group's RPO is above this (0: no RPO alert).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def set_(api: Agent, group: str, bandwidth: Optional[str], rpo_alert: Optional[str],
         as_json: bool) -> None:
    """Change a protected group's settings while it runs."""
    if bandwidth is None and rpo_alert is None:
        raise click.UsageError("give --bandwidth or --rpo-alert")
    result: Dict[str, Any] = {"group": group}
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
        click.echo("%s: bandwidth %s" % (group, "%s/s" % _human(rate) if rate else "unlimited"))
    if "rpo_alert" in result:
        click.echo("%s: RPO alert %s" % (group, "above %g s" % result["rpo_alert"]
                                         if result["rpo_alert"] else "off"))


def _pause_command(verb: str, done: str, doc: str) -> None:
    @cli.command(name=verb, help=doc)
    @click.argument("group", shell_complete=_complete_groups)
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


@cli.command("pair-token")
@click.option("--ttl", default="10m", show_default=True,
              help="How long the token is good for (one pairing).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def pair_token(api: Agent, ttl: str, as_json: bool) -> None:
    """Print a one-time token that lets another site pair with this one."""
    result = call(api, "POST", "/v1/pair-token", {"ttl": parse_duration(ttl)})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(result["token"])
    click.echo("good for one pairing until %s; on the other site run:\n  ferry pair "
               "%s --token %s\nthis site's certificate: %s"
               % (_iso(int(result["expires"] * 1e9)), result["address"], result["token"],
                  result["fingerprint"]), err=True)


@cli.command()
@click.argument("address", metavar="HOST:PORT")
@click.option("--token", required=True, help="The token `ferry pair-token` printed there.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def pair(api: Agent, address: str, token: str, as_json: bool) -> None:
    """Pair this site with the site whose replication port is HOST:PORT."""
    result = call(api, "POST", "/v1/pairs", {"address": address, "token": token})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo("paired with site %s at %s\n  its certificate:  %s\n  this site's:      %s"
               % (result["site"], result["address"], result["fingerprint"],
                  result["own_fingerprint"]))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def peers(api: Agent, as_json: bool) -> None:
    """The sites this one is paired with."""
    result = call(api, "GET", "/v1/pairs")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo("this site: %s%s" % (result["fingerprint"],
                                    " (--insecure: plain TCP)" if result["insecure"] else ""))
    for p in result["peers"]:
        click.echo("%s\t%s\t%s" % (p["site"], p["address"], p["fingerprint"]))
    if not result["peers"]:
        click.echo("no paired sites (ferry pair-token on one, ferry pair on the other)")


@cli.command()
@click.argument("site")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def unpair(api: Agent, site: str, as_json: bool) -> None:
    """Forget a paired SITE (by name or certificate fingerprint): no more TLS with it."""
    result = call(api, "DELETE", "/v1/pairs/" + site)
    if as_json:
        return emit(result)
    click.echo("unpaired %s" % site)


@cli.command()
@click.argument("group", shell_complete=_complete_groups)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def unprotect(api: Agent, group: str, as_json: bool) -> None:
    """Stop protecting GROUP (its splitters stop; the target keeps its replica)."""
    result = call(api, "DELETE", "/v1/groups/" + group)
    if as_json:
        return emit(result)
    click.echo("unprotected %s" % group)


@cli.command()
@click.argument("group", shell_complete=_complete_groups)
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
    from .cli_ops import run_job
    result = run_job(api, {"kind": "wait", "group": group, "timeout": timeout},
                     "syncing %s" % group, progress and sys.stderr.isatty(), detach)
    if result is None:
        return
    if as_json:
        return emit(result)
    click.echo("%s synced" % group)


@cli.command()
@click.argument("group", shell_complete=_complete_groups)
@click.option("--disk", required=True, help="The disk's name in the group.")
@click.option("--to", "dest", required=True, type=click.Path(dir_okay=False),
              help="A new file to write (on the target site's host).")
@point_options
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: on a terminal).")
@click.option("--detach", is_flag=True,
              help="Start the job on the agent, print its id and return (ferry job ID).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def restore(api: Agent, group: str, disk: str, dest: str, checkpoint: Optional[str],
            at: Optional[str], progress: Optional[bool], detach: bool, as_json: bool) -> None:
    """On the target site: write a disk as of a checkpoint (default: its newest
    consistent state) to a new file."""
    body = dict(point_body(checkpoint, at), disk=disk, to=os.path.abspath(dest))
    from .cli_ops import run_job
    result = run_job(api, dict(body, kind="restore", group=group),
                     "restoring %s/%s" % (group, disk), progress, detach)
    if result is None:
        return
    if as_json:
        return emit(result)
    c = result.get("checkpoint")
    click.echo("restored %s/%s to %s (%d bytes, generation %d, sequence %d%s)"
               % (group, disk, result["to"], result["size"], result["gen"], result["seq"],
                  ", checkpoint %s of %s" % (c["id"], _iso(c["wall_ns"])) if c else ""))


def _print_view(result: Dict[str, Any], as_json: bool, what: str) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    c = result.get("checkpoint")
    click.echo("%s %s of %s at %s" % (what, result["id"], result["group"],
                                      "checkpoint %s (%s)" % (c["id"], _iso(c["wall_ns"]))
                                      if c else "its newest consistent state"))
    for name, uri in sorted(result["disks"].items()):
        click.echo("%s\t%s" % (name, uri))


@cli.command()
@click.argument("group", shell_complete=_complete_groups)
@point_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def view(api: Agent, group: str, checkpoint: Optional[str], at: Optional[str],
         as_json: bool) -> None:
    """On the target site: serve GROUP's disks as of a point, read-only over NBD (default:
    the newest consistent state); prints the view id and a URI per disk."""
    result = call(api, "POST", "/v1/replicas/%s/views" % group, point_body(checkpoint, at),
                  timeout=600)
    _print_view(result, as_json, "view")


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
@click.argument("group", shell_complete=_complete_groups)
@click.option("--test", "mode", flag_value="test",
              help="Serve the point with a private writable overlay; replication goes on.")
@click.option("--stop-test", "mode", flag_value="stop-test",
              help="End the test failover; its writes are discarded.")
@click.option("--live", "mode", flag_value="live",
              help="Stop replicating; the disks as of the point become the live ones.")
@point_options
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: on a terminal).")
@click.option("--detach", is_flag=True,
              help="Start the job on the agent, print its id and return (ferry job ID).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def failover(api: Agent, group: str, mode: Optional[str], checkpoint: Optional[str],
             at: Optional[str], progress: Optional[bool], detach: bool,
             as_json: bool) -> None:
    """On the target site: test failover, stop it, or fail over for real."""
    if mode is None:
        raise click.UsageError("give one of --test, --stop-test, --live")
    body = dict(point_body(checkpoint, at), mode=mode)
    if mode == "stop-test" and len(body) > 1:
        raise click.UsageError("--stop-test takes no point")
    from .cli_ops import run_job
    result = run_job(api, dict(body, kind="failover", group=group),
                     "%s failover of %s" % (mode, group), progress, detach)
    if result is None:
        return
    if as_json and mode == "stop-test":
        return emit(result)
    if mode == "stop-test":
        click.echo("test failover %s of %s stopped; its writes are discarded"
                   % (result["id"], group))
        return
    _print_view(result, as_json, "test failover" if mode == "test" else "live failover")


@cli.command()
@click.argument("group", shell_complete=_complete_groups)
@click.option("--tag", default=None, help="A name for the checkpoint (\"before upgrade\").")
@click.option("--timeout", default=30.0, show_default=True, type=float,
              help="Seconds to wait for the target to journal it.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def checkpoint(api: Agent, group: str, tag: Optional[str], timeout: float,
               as_json: bool) -> None:
    """On the source site: cut a crash-consistent checkpoint of GROUP; prints its id."""
    result = call(api, "POST", "/v1/groups/%s/checkpoints" % group,
                  {"tag": tag, "timeout": timeout}, timeout=timeout + 30)
    if as_json:
        return emit(result)
    click.echo(result["id"])
    if not result.get("acked"):
        click.echo("ferry: warning: checkpoint %s is cut but the target has not journaled "
                   "it yet" % result["id"], err=True)


@cli.command()
@click.argument("group", shell_complete=_complete_groups)
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
            click.echo("  %s  %s  %-4s  %s%s" % (c["id"], _iso(c["wall_ns"]), c["kind"],
                                                 c.get("tag") or "-",
                                                 "  (%s)" % extra if extra else ""))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return "%d s" % seconds
    if seconds < 3600:
        return "%d min %02d s" % divmod(seconds, 60)
    return "%d h %02d min" % (seconds // 3600, seconds % 3600 // 60)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024
    return str(n)


@cli.command()
@click.argument("group", required=False, shell_complete=_complete_groups)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable).")
@click.pass_obj
def status(api: Agent, group: Optional[str], as_json: bool) -> None:
    """Show protected groups (source side) and replicas (target side)."""
    result = call(api, "GET", "/v1/status" + ("?group=" + group if group else ""))
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    lines: List[str] = []
    for name, g in sorted(result["groups"].items()):
        lines.append("group %s -> %s: %s, RPO %.1f s%s" % (
            name, g["target"], g["state"], g["rpo_seconds"],
            " (%s)" % g["error"] if g.get("error") else ""))
        for dname, d in sorted(g["disks"].items()):
            lines.append("  %-12s %-18s written %-10s shipped %-10s queued %-10s dirty %-10s "
                         "acked %d%s" % (dname, d["state"], _human(d["bytes_written"]),
                                         _human(d["bytes_shipped"]), _human(d["bytes_queued"]),
                                         _human(d["dirty_bytes"]), d["last_acked_seq"],
                                         "  seed held %s" % _human(d["resync_skipped_bytes"])
                                         if d.get("resync_skipped_bytes") else ""))
            if d.get("delivered_progress") is not None:
                eta = d.get("delivered_eta_seconds")
                lines.append("  %-12s %s %.1f%% delivered to the target, ETA %s" % (
                    "", d["state"], 100 * d["delivered_progress"],
                    _duration(eta) if eta is not None else "unknown yet"))
            lines.append("  %-12s %s" % ("", d["nbd_uri"]))
    for name, r in sorted(result["replicas"].items()):
        src = r.get("source") or {}
        lines.append("replica %s <- %s: journal %s" % (
            name, src.get("peer", "(source not connected)"), _human(r["journal_bytes"])))
        if "checkpoints" in r:
            lines.append("  history %.0f s of %.0f s kept%s, %d checkpoints%s%s" % (
                r["history_covered_s"], r["history_s"],
                " (LESS: journal limit)" if r["history_short"] else "", r["checkpoints"],
                ", test failover %s running" % r["test"]["id"] if r.get("test") else "",
                ", FAILED OVER LIVE" if r.get("failover") else ""))
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


# The operations commands (events, alerts, jobs, config, dashboard-url) live in cli_ops.py;
# importing it registers them on ``cli``.
from . import cli_ops  # noqa: E402, F401

if __name__ == "__main__":
    # Run the module's imported copy: cli_ops registered its commands on that one.
    from agent.cli import main as _main
    sys.exit(_main())
