"""Who may drive the agent, by listener.

    unix:PATH         the local API (default ``/run/ferry/api.sock``). The file's mode is the
                      credential: 0660 root:ferry, or 0600 root-only when there is no group
                      ``ferry``. Its directory is made 0755 by this process, or must already be
                      a real directory (not a link) of ours that nobody else can write.
    HOST:PORT         the opt-in TCP listener: every request needs the token of the token
    https://HOST:PORT file (``Authorization: Bearer``, or the dashboard's login cookie); off
                      loopback it also needs TLS (``--api-cert``/``--api-key``). With
                      ``--api-client-ca`` an https listener wants a client certificate that
                      CA signed instead of the token.
    --metrics H:P     read-only: ``GET /metrics`` and ``GET /healthz``, nothing else.

``Guard`` wraps the API application with one of these policies.
"""

from __future__ import annotations

import grp
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs

from .errors import Conflict, Invalid

log = logging.getLogger("ferry.access")

DEFAULT_SOCKET = "/run/ferry/api.sock"
COOKIE = "ferry_token"


@dataclass
class Listener:
    """A parsed ``--api`` value."""

    kind: str                     # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0
    tls: bool = False

    def __str__(self) -> str:
        if self.kind == "unix":
            return "unix:" + self.path
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s:%d" % ("https" if self.tls else "http", host, self.port)


def parse_listener(text: str, default_port: int = 9080) -> Listener:
    """``unix:PATH``, ``HOST:PORT``, ``http://HOST:PORT`` or ``https://HOST:PORT``."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise Invalid("%r: the socket's path must be absolute" % text)
        if len(path.encode()) > 107:
            raise Invalid("%r: a Unix socket path is at most 107 bytes" % text)
        return Listener("unix", path=path)
    tls = text.startswith("https://")
    rest = text.split("://", 1)[1] if "://" in text else text
    if "://" in text and not text.startswith(("http://", "https://")):
        raise Invalid("%r: give unix:PATH, HOST:PORT or https://HOST:PORT" % text)
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep:
        host, port = rest, str(default_port)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise Invalid("%r: the port must be a number from 1 to 65535" % text)
    return Listener("tcp", host=host.strip("[]"), port=int(port), tls=tls)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _safe_directory(path: str) -> None:
    """Make ``path`` (mode 0755) or check that it is a real directory of ours that only we
    can write: a socket made in a directory another user controls could be swapped."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise Conflict("%s is not a directory (a symbolic link?): refusing to make the API "
                       "socket there" % path)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise Conflict("%s is owned by uid %d with mode %04o: the API socket's directory must "
                       "be ours and writable by nobody else" % (path, st.st_uid,
                                                             stat.S_IMODE(st.st_mode)))


def unix_socket(path: str, group: str = "ferry") -> socket.socket:
    """A listening Unix socket at ``path``, mode 0660 owned by ``group``, or 0600 when that
    group does not exist. A stale socket there is replaced; anything else is refused."""
    _safe_directory(os.path.dirname(path) or ".")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise Conflict("%s exists and is not a socket: refusing to replace it" % path)
        os.unlink(path)
    try:
        gid: Optional[int] = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    if gid is None:
        log.warning("group %s does not exist: the API socket %s is for root only (0600); "
                    "add the group (groupadd --system %s) to let its members use ferry",
                    group, path, group)
    else:
        os.chown(path, -1, gid, follow_symlinks=False)
        os.chmod(path, 0o660)
    sock.listen(128)
    return sock


def load_token(path: str) -> str:
    """The token in ``path``; made (0600, 32 random bytes in hex) when the file is absent."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        fd = -1
    if fd >= 0:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("made the API token %s", path)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        if os.fstat(f.fileno()).st_mode & 0o077:
            raise Conflict("the token file %s can be read by other users: chmod 600 it" % path)
        token = f.read().strip()
    if len(token) < 16:
        raise Invalid("the token in %s is shorter than 16 characters" % path)
    return token


App = Callable[[Dict[str, Any], Callable, Callable], Any]


async def _answer(send: Callable, status: int, body: bytes, ctype: bytes,
                  headers: Optional[List[Tuple[bytes, bytes]]] = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype),
                            (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The API application behind a policy: ``local`` (the socket's mode decides), ``cert``
    (the TLS handshake required a client certificate signed by --api-client-ca), ``token``
    (a bearer token or the login cookie), ``metrics`` (read-only endpoints)."""

    def __init__(self, app: App, policy: str, token: Optional[str] = None) -> None:
        assert policy in ("local", "token", "cert", "metrics")
        assert policy != "token" or token
        self.app = app
        self.policy = policy
        self.token = token

    def _presented(self, scope: Dict[str, Any]) -> Tuple[Optional[str], bool]:
        """(the token the request carries, whether it came in the cookie)."""
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
        except Exception:  # a malformed cookie header is no credential
            return None, False
        if COOKIE in cookie:
            return cookie[COOKIE].value, True
        return None, False

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            scope = dict(scope, ferry_policy=self.policy)
        if scope["type"] != "http" or self.policy in ("local", "cert"):
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if self.policy == "metrics":
            if method == "GET" and path in ("/metrics", "/healthz"):
                return await self.app(scope, receive, send)
            return await _answer(send, 404, b'{"error": "this listener serves only /metrics '
                                 b'and /healthz", "kind": "NotFound"}\n', b"application/json")
        assert self.token is not None
        if path == "/login" and method == "GET":
            query = parse_qs(scope.get("query_string", b"").decode())
            given = (query.get("token") or [""])[0]
            if given and hmac.compare_digest(given.encode(), self.token.encode()):
                return await _answer(send, 303, b"", b"text/plain", [
                    (b"location", b"/"),
                    (b"set-cookie", ("%s=%s; HttpOnly; SameSite=Strict; Path=/"
                                     % (COOKIE, self.token)).encode())])
            return await self._refuse(send, path)
        given, by_cookie = self._presented(scope)
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            return await self._refuse(send, path)
        if by_cookie and method != "GET":
            # A form on another site can send the cookie, not this header (CSRF).
            headers = dict(scope.get("headers") or [])
            if headers.get(b"x-ferry") != b"1":
                return await _answer(send, 403, b'{"error": "a change needs the x-ferry '
                                     b'header", "kind": "Forbidden"}\n', b"application/json")
        return await self.app(scope, receive, send)

    async def _refuse(self, send: Callable, path: str) -> None:
        if path.startswith("/v1/") or path == "/metrics":
            return await _answer(send, 401, b'{"error": "this listener needs the API token '
                                 b'(Authorization: Bearer)", "kind": "Forbidden"}\n',
                                 b"application/json", [(b"www-authenticate", b"Bearer")])
        return await _answer(send, 401, b"<!doctype html><title>Ferry</title><p>Log in with "
                             b"the URL <code>ferry dashboard-url</code> prints.\n",
                             b"text/html; charset=utf-8")
