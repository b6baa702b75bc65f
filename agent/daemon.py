"""``ferry agent``: one per host, the replication engine and control plane of that host.

It binds its three sockets (replication, splitters, HTTP API) before it says it is ready,
on stderr and, under systemd, with ``READY=1`` on ``$NOTIFY_SOCKET`` (``Type=notify``).
SIGTERM or SIGINT stops it cleanly: the target's replicas are synced and their metadata
saved. The splitters keep serving their VMs whether the agent runs or not.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import Any, Optional, Tuple

import hypercorn.config
import hypercorn.trio
import trio

from . import tls
from .api import Api
from .pairing import Trust
from .source import SourceSite
from .store import Store
from .target import TargetSite

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


async def run(data_dir: str, listen: Tuple[str, int], api: Tuple[str, int],
              site: Optional[str] = None, insecure: bool = False) -> None:
    site = site or socket.gethostname()
    store = Store(data_dir)
    trust = Trust(store, tls.load_identity(data_dir, site), site, insecure, listen)
    if insecure:
        for line in ("--insecure: replication runs over PLAIN TCP, unauthenticated and "
                     "unencrypted,", "and this agent accepts plain TCP from ANY host that "
                     "reaches %s:%d." % listen, "Use it for labs only; pair sites "
                     "(ferry pair-token / ferry pair) for anything else."):
            log.warning("%s", line)
    target = TargetSite(data_dir, site, trust)
    await trio.to_thread.run_sync(target.load)
    source = SourceSite(data_dir, store, trust.connect)
    config = hypercorn.config.Config()
    config.bind = ["%s:%d" % api if ":" not in api[0] else "[%s]:%d" % api]
    config.accesslog = None
    config.errorlog = logging.getLogger("ferry.http")
    config.graceful_timeout = 1
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(target.serve, listen[0], listen[1])
            await nursery.start(source.run)
            app: Any = Api(source, target, site, trust)
            await nursery.start(lambda task_status: hypercorn.trio.serve(
                app, config, task_status=task_status))
            log.info("ferry agent ready: site %s, data %s, replication %s:%d (%s), "
                     "API http://%s:%d", site, data_dir, listen[0], listen[1],
                     "PLAIN TCP, --insecure" if insecure else "TLS, %d paired site(s)"
                     % len(trust.peers()), api[0], api[1])
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
        log.info("ferry agent stopped")
