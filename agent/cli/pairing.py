"""The commands that pair sites for TLS: ``pair-token``, ``pair``, ``peers`` and
``unpair``."""

from __future__ import annotations

import json

import click

from .app import Agent, call, cli, emit
from .units import iso, parse_duration


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
               % (iso(int(result["expires"] * 1e9)), result["address"], result["token"],
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
