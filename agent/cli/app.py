"""The ``ferry`` click group and what every command shares: the global options, the
``Agent`` a command talks to, ``call`` and ``emit``, and ``main``, which turns every error
into one line on stderr and an exit status (``errors.EXIT_STATUS``).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import click

from ..client import DEFAULT_API, Client
from ..errors import (
    EXIT_FAILURE,
    EXIT_USAGE,
    FerryError,
    exit_status,
)


class Failure(click.ClickException):
    """One line for the user; exit status 1 unless told (``errors.EXIT_STATUS``)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = exit_code


def complete_groups(ctx: click.Context, _param: click.Parameter, incomplete: str) -> List[str]:
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
    click.echo(json.dumps(result, indent=2, sort_keys=True, allow_nan=False))


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
