"""How the CLI, the lab and scripts reach an agent's API.

An address is one of:

    unix:/run/ferry/api.sock      the local socket (the default): root and group ``ferry``
    https://HOST:PORT             the opt-in TCP listener, TLS, with a token
    http://127.0.0.1:PORT         the opt-in TCP listener on loopback, with a token

A token is sent as ``Authorization: Bearer TOKEN``; it is read from a file (``--token-file``),
never from the command line, where every local user could read it in ``ps``.
Errors come back as the ``FerryError`` class the agent named (``{"error", "kind"}``).
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import ssl
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlsplit

from .errors import BY_HTTP_STATUS, BY_NAME, FerryError, Forbidden, Invalid, Unavailable

DEFAULT_SOCKET = "/run/ferry/api.sock"
DEFAULT_API = "unix:" + DEFAULT_SOCKET


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def read_token(path: str) -> str:
    try:
        with open(path) as f:
            token = f.read().strip()
    except PermissionError:
        raise Forbidden("cannot read the token file %s: permission denied" % path) from None
    except OSError as e:
        raise Invalid("cannot read the token file %s: %s" % (path, e.strerror or e)) from None
    if not token:
        raise Invalid("the token file %s is empty" % path)
    return token


class Client:
    """One agent's API, at ``address``; ``token_file`` for a TCP listener, ``cafile`` to
    check an https listener's certificate, ``cert`` and ``key`` to present a client
    certificate to one that wants it."""

    def __init__(self, address: str, token_file: Optional[str] = None,
                 cafile: Optional[str] = None, cert: Optional[str] = None,
                 key: Optional[str] = None) -> None:
        self.address = address
        self.token = read_token(token_file) if token_file else None
        self.cafile = cafile
        self.cert, self.key = cert, key
        if address.startswith("unix:"):
            self.kind, self.path = "unix", address[5:]
            if not self.path:
                raise Invalid("%r: give the socket's path after unix:" % address)
        elif address.startswith("/"):
            self.kind, self.path = "unix", address
        else:
            url = urlsplit(address)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise Invalid("%r: the API is unix:PATH, https://HOST:PORT or "
                              "http://HOST:PORT" % address)
            self.kind, self.path = url.scheme, ""
            self.host, self.port = url.hostname, url.port or (443 if url.scheme == "https"
                                                              else 80)
            self.prefix = url.path.rstrip("/")

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.kind == "unix":
            return _UnixConnection(self.path, timeout)
        if self.kind == "https":
            ctx = ssl.create_default_context(cafile=self.cafile)
            if self.cert:
                try:
                    ctx.load_cert_chain(self.cert, self.key)
                except (OSError, ssl.SSLError) as e:
                    raise Invalid("cannot load the client certificate %s: %s"
                                  % (self.cert, getattr(e, "strerror", None) or e)) from None
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Optional[Dict[str, Any]] = None,
                timeout: float = 60) -> Tuple[int, str, bytes]:
        """(status, content type, body) of one request; connection failures raised as
        ``Unavailable`` or ``Forbidden``."""
        headers = {"content-type": "application/json", "x-ferry": "1"}
        if self.token:
            headers["authorization"] = "Bearer " + self.token
        data = json.dumps(body).encode() if body is not None else None
        conn = self._connection(timeout)
        try:
            conn.request(method, (self.prefix if self.kind != "unix" else "") + path,
                         body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheader("content-type", ""), resp.read()
        except PermissionError:
            raise Forbidden("permission denied on %s: the agent's API is for root and the "
                            "members of group ferry" % self.path) from None
        except ssl.SSLError as e:
            raise Unavailable("TLS with the agent at %s failed: %s"
                              % (self.address, e.reason or e)) from None
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):
                raise Forbidden("permission denied on %s" % self.address) from None
            if isinstance(e, (TimeoutError, socket.timeout)):
                raise Unavailable("the agent at %s did not answer in %g s"
                                  % (self.address, timeout)) from None
            reason = getattr(e, "strerror", None) or e
            raise Unavailable("cannot reach the agent at %s: %s (is `ferry agent` running "
                              "there?)" % (self.address, reason)) from None
        finally:
            conn.close()

    def call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None,
             timeout: float = 60) -> Any:
        """The JSON answer of a request; an error answer raised as its ``FerryError``."""
        status, ctype, data = self.request(method, path, body, timeout)
        if status >= 400:
            raise error_from(status, data)
        if not ctype.startswith("application/json"):
            return data.decode(errors="replace")
        return json.loads(data)


def error_from(status: int, data: bytes) -> FerryError:
    """The error an answer of ``status`` carries, as the class the agent named."""
    try:
        obj = json.loads(data)
        message, kind = str(obj.get("error")), obj.get("kind")
    except (ValueError, AttributeError):
        message, kind = data.decode(errors="replace").strip() or "HTTP %d" % status, None
    cls = BY_NAME.get(kind or "") or BY_HTTP_STATUS.get(status, FerryError)
    return cls(message)
