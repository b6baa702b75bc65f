"""``ferry agent``: runs the host agent (``agent/daemon.py``) in the foreground."""

from __future__ import annotations

import grp
import logging
import os
from typing import Optional, Tuple

import click

from ..errors import EXIT_FAILURE, FerryError, exit_status
from .app import Failure, cli
from .units import parse_duration, parse_size


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
@click.option("--image-root", "image_roots", multiple=True, metavar="DIR",
              type=click.Path(file_okay=False),
              help="A directory whose files may be protected disks and seeds, besides "
                   "/var/lib/libvirt/images, /var/lib/ferry-images and block devices under "
                   "/dev; repeatable.")
@click.option("--site", default=None, help="Name of this site (default: the host name).")
@click.option("--insecure", is_flag=True,
              help="Replicate over plain TCP and accept it from anyone (labs only). "
                   "Without it, only TLS between paired sites.")
@click.option("--new-identity", is_flag=True,
              help="Make a new TLS identity where this site's is gone although paired "
              "sites know it (they must pair again).")
@click.option("--libvirt-uri", default="qemu:///system", show_default=True,
              help="The libvirt connection `protect --domain` finds domains through.")
@click.option("--splitter-socket-group", default=None, metavar="GROUP",
              help="A group that may connect to the splitters' NBD sockets (libvirt's qemu "
                   "user: libvirt-qemu on Debian); default: root only.")
@click.option("--scrub-period", default="1d", show_default=True, metavar="DURATION",
              help="On the target site, the background scrub checks every replica chunk "
                   "of every group once in this time.")
@click.option("--scrub-rate", default="16M", show_default=True, metavar="BYTES",
              help="The background scrub reads at most this many bytes a second.")
@click.option("--domain-hooks", "domain_hooks", default="/etc/ferry/domain-hooks.d",
              show_default=True, type=click.Path(file_okay=False),
              help="DOMAIN.pre and DOMAIN.post run around an application-consistent "
                   "checkpoint of a domain (root's, not writable by others).")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def agent(data_dir: str, listen: str, api_addrs: Tuple[str, ...], api_group: str,
          api_token_file: Optional[str], api_cert: Optional[str], api_key: Optional[str],
          api_client_ca: Optional[str], metrics_addr: Optional[str], hooks_dir: str,
          link_down_alert: str, image_roots: Tuple[str, ...], site: Optional[str],
          insecure: bool, new_identity: bool, libvirt_uri: str,
          splitter_socket_group: Optional[str], scrub_period: str, scrub_rate: str,
          domain_hooks: str, verbose: bool) -> None:
    """Run the host agent in the foreground."""
    import trio

    from .. import access, daemon, logs

    logs.setup(logging.DEBUG if verbose else logging.INFO)
    try:
        listen_hp = daemon.parse_hostport(listen, 4005)
        metrics_hp = daemon.parse_hostport(metrics_addr, 9081) if metrics_addr else None
        apis = [access.parse_listener(a) for a in api_addrs] or [
            access.Listener("unix", path=access.DEFAULT_SOCKET)]
    except (ValueError, FerryError) as e:
        raise Failure(str(e)) from None
    if splitter_socket_group is not None:
        try:
            grp.getgrnam(splitter_socket_group)
        except KeyError:
            raise Failure("--splitter-socket-group %s: no such group"
                          % splitter_socket_group) from None
    data_dir = os.path.abspath(data_dir)
    opts = daemon.Options(data_dir, listen_hp, apis, site, insecure, metrics_hp, api_group,
                          api_token_file, api_cert, api_key, api_client_ca,
                          os.path.abspath(hooks_dir), parse_duration(link_down_alert),
                          image_roots=[os.path.abspath(r) for r in image_roots],
                          new_identity=new_identity, libvirt_uri=libvirt_uri,
                          splitter_group=splitter_socket_group,
                          scrub_period=parse_duration(scrub_period),
                          scrub_rate=parse_size(scrub_rate),
                          domain_hooks=os.path.abspath(domain_hooks))
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
