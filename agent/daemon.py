"""``ferry agent``: one per host, the replication engine and control plane of that host.

It binds its sockets (replication, splitters, the API's listeners) before it says it is ready,
on stderr and, under systemd, with ``READY=1`` on ``$NOTIFY_SOCKET`` (``Type=notify``).
SIGTERM or SIGINT stops it cleanly: the target's replicas are synced and their metadata
saved. The splitters keep serving their VMs whether the agent runs or not.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import hypercorn.config
import hypercorn.trio
import trio

from formats.durable import fsync_dir

from . import access, logs, memory, tls
from .alerts import Alerts
from .api import Api
from .devices import DeviceWatch
from .disks import Policy
from .domains import Domains
from .errors import Invalid, Unavailable
from .events import EventLog
from .jobs import Jobs
from .pairing import Trust
from .source import SourceSite
from .source.failback import fenced_disks
from .store import Store
from .target import TargetSite
from .watch import Watcher

log = logging.getLogger("ferry.agent")


def parse_hostport(text: str, default_port: int) -> Tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("%r: the port must be a number from 1 to 65535" % text)
    return host.strip("[]"), int(port)


def sd_notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(message.encode())


@dataclass
class Options:
    """What ``ferry agent`` was told (cli/daemon.py parses; docs/operations.md describes)."""

    data_dir: str
    listen: Tuple[str, int]
    apis: List[access.Listener] = field(default_factory=lambda: [
        access.Listener("unix", path=access.DEFAULT_SOCKET)])
    site: Optional[str] = None
    insecure: bool = False
    metrics: Optional[Tuple[str, int]] = None
    api_group: str = "ferry"
    token_file: Optional[str] = None
    api_cert: Optional[str] = None
    api_key: Optional[str] = None
    api_client_ca: Optional[str] = None
    hooks_dir: Optional[str] = "/etc/ferry/hooks.d"
    link_down_alert: float = 60.0
    image_roots: List[str] = field(default_factory=list)
    new_identity: bool = False  # make a new TLS identity although peers know the old one
    libvirt_uri: str = "qemu:///system"  # where protect --domain finds its domains
    splitter_group: Optional[str] = None  # group that may connect to splitter sockets
    scrub_period: float = 24 * 3600.0  # the background scrub's pass (target/scrubber.py)
    scrub_rate: int = 16 * 1024 * 1024  # and its bytes a second at most
    domain_hooks: Optional[str] = "/etc/ferry/domain-hooks.d"  # agent/domains/hooks.py


def _config(bind: str) -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("ferry.http")
    config.graceful_timeout = 1
    return config


def _tcp_bind(host: str, port: int) -> str:
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def listeners(opts: Options, app: Any, made: List[Tuple[str, int, int]]
              ) -> List[Tuple[hypercorn.config.Config, Any, str]]:
    """A hypercorn config and a guarded application for each listener, sockets bound now
    (Unix: each added to ``made`` as path, device, inode) or by hypercorn (TCP). Raises
    ``FerryError`` for a listener that would be unsafe."""
    out = []
    for lst in opts.apis:
        if lst.kind == "unix":
            sock = access.unix_socket(lst.path, opts.api_group)
            st = os.lstat(lst.path)
            made.append((lst.path, st.st_dev, st.st_ino))
            out.append((_config("fd://%d" % sock.detach()), access.Guard(app, "local"),
                        str(lst)))
            continue
        if not lst.tls and not access.is_loopback(lst.host):
            raise Invalid("--api %s: a TCP API off loopback needs TLS (https://, with "
                          "--api-cert and --api-key)" % lst)
        if lst.tls and not (opts.api_cert and opts.api_key):
            raise Invalid("--api %s needs --api-cert and --api-key" % lst)
        config = _config(_tcp_bind(lst.host, lst.port))
        if lst.tls:
            config.certfile, config.keyfile = opts.api_cert, opts.api_key
        if lst.tls and opts.api_client_ca:
            # The handshake is the credential: only certificates this CA signed get in.
            config.ca_certs, config.verify_mode = opts.api_client_ca, ssl.CERT_REQUIRED
            out.append((config, access.Guard(app, "cert"), str(lst) + " (client certificate)"))
            continue
        token = access.load_token(opts.token_file or os.path.join(opts.data_dir, "api.token"))
        out.append((config, access.Guard(app, "token", token), str(lst)))
        host = "127.0.0.1" if lst.host in ("", "0.0.0.0") else "[::1]" if lst.host == "::" \
            else "[%s]" % lst.host if ":" in lst.host else lst.host
        app.dashboard_urls.append("%s://%s:%d/login?token=%s" % (
            "https" if lst.tls else "http", host, lst.port, token))
    if opts.metrics is not None:
        out.append((_config(_tcp_bind(*opts.metrics)), access.Guard(app, "metrics"),
                    "metrics http://%s" % _tcp_bind(*opts.metrics)))
    return out


def check_identity(data_dir: str, store: Store, new_identity: bool) -> None:
    """Refuse to start where this site's TLS identity is gone (or half gone) while paired
    sites know it: a new one made silently would leave every peer unpaired. The
    administrator restores the files, or says ``--new-identity`` and pairs again."""
    tls_dir = os.path.join(data_dir, "tls")
    if not os.path.isdir(tls_dir):
        os.makedirs(tls_dir, mode=0o700, exist_ok=True)
        fsync_dir(data_dir)  # the directory's name survives a crash with the files in it
    files = [os.path.join(tls_dir, name) for name in ("site.crt", "site.key")]
    missing = [f for f in files if not os.path.exists(f)]
    if not missing or new_identity:
        if missing:
            for f in files:  # a half identity is replaced whole
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f)
            log.warning("making a new TLS identity (--new-identity): paired sites must "
                        "pair with this site again")
        return
    peers = store.peers()
    if len(missing) == len(files) and not peers:
        return  # a new site: its identity is made on first start
    raise Unavailable(
        "this site's TLS identity is incomplete or gone (%s missing)%s: restore the files "
        "from a backup, or start with --new-identity and pair again"
        % (", ".join(missing), " and %d paired site(s) know it (%s)" % (
            len(peers), ", ".join(p.site for p in peers)) if peers else ""))


async def run(opts: Options) -> None:
    data_dir, listen, insecure = opts.data_dir, opts.listen, opts.insecure
    site = opts.site or socket.gethostname()
    store = Store(data_dir)
    check_identity(data_dir, store, opts.new_identity)
    trust = Trust(store, tls.load_identity(data_dir, site), site, insecure, listen)
    if insecure:
        for line in ("--insecure: replication runs over PLAIN TCP, unauthenticated and "
                     "unencrypted,", "and this agent accepts plain TCP from ANY host that "
                     "reaches %s:%d." % listen, "Use it for labs only; pair sites "
                     "(ferry pair-token / ferry pair) for anything else."):
            log.warning("%s", line)
    policy = Policy(data_dir, opts.image_roots)
    target = TargetSite(data_dir, site, trust, policy)
    target.scrubber.period, target.scrubber.rate = opts.scrub_period, opts.scrub_rate
    await trio.to_thread.run_sync(target.load)
    source = SourceSite(data_dir, store, trust.connect, policy)
    source.fleet.socket_group = opts.splitter_group
    target.fenced_disks = functools.partial(fenced_disks, source)  # failback, in place
    target.retire_source = source.unprotect  # failback's return leg ends the reverse group
    made: List[Tuple[str, int, int]] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(target.serve, listen[0], listen[1])
            await nursery.start(source.run)
            api = Api(source, target, site, trust)
            api.domains = Domains(source, opts.libvirt_uri, opts.domain_hooks)
            await nursery.start(api.domains.run)
            await nursery.start(DeviceWatch(data_dir, lambda: [
                (d.id, "%s/%s" % (r.name, d.name), d.path, d.size)
                for r in store.groups() for d in r.disks], source.fleet.device_problems).run)
            api.watcher = Watcher(api.status, EventLog(), Alerts(opts.link_down_alert),
                                  opts.hooks_dir, source.checkpoint, source.checkpoints,
                                  os.path.join(data_dir, "alerts.json"), api.status_async)
            target.notify = api.watcher.events.emit
            target.journal_refused = source.journal_refused = api.watcher.journal_refused
            source.journal_resumed = api.watcher.journal_resumed
            await nursery.start(api.watcher.run)
            api.jobs = Jobs(api.watcher.events)
            await nursery.start(api.jobs.run)
            await nursery.start(logs.rotate_forever, os.path.join(data_dir, "disks"))
            if os.environ.get("FERRY_MALLOC_TRIM", "1") != "0":
                await nursery.start(memory.give_back)
            app: Any = api
            served = listeners(opts, app, made)
            for config, guarded, _name in served:
                await nursery.start(functools.partial(_serve, guarded, config))
            log.info("ferry agent ready: site %s, data %s, replication %s:%d (%s), "
                     "API %s", site, data_dir, listen[0], listen[1],
                     "PLAIN TCP, --insecure" if insecure else "TLS, %d paired site(s)"
                     % len(trust.peers()), ", ".join(name for _c, _a, name in served))
            sd_notify("READY=1")
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("stopping on %s", signal.Signals(signum).name)
                    sd_notify("STOPPING=1")
                    nursery.cancel_scope.cancel()
                    break
    finally:
        target.close()
        store.close()
        for path, dev, ino in made:  # ours only: never what stood there before
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)
        log.info("ferry agent stopped")


async def _serve(app: Any, config: hypercorn.config.Config,
                 task_status: trio.TaskStatus[List[str]] = trio.TASK_STATUS_IGNORED) -> None:
    await hypercorn.trio.serve(app, config, task_status=task_status)
