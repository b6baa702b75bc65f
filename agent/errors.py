"""What went wrong, by what to do about it.

Every error the engine raises on purpose is a ``FerryError``; its class says what the caller
should do, never a number or a message text. The HTTP edge (``api.py``) alone turns classes
into status codes (``HTTP_STATUS``); the engine knows nothing of HTTP.

    FerryError
    ├── RequestError        this request cannot be done as asked: fail it, keep everything
    │   ├── Invalid         the request itself is malformed or out of bounds      (400)
    │   ├── NotFound        it names a group, disk, view, checkpoint or site we lack (404)
    │   ├── Conflict        the state of things forbids it now (exists, busy, held) (409)
    │   ├── Forbidden       a credential or token was refused                      (403)
    │   ├── TooLarge        a request body past its bound                          (413)
    │   ├── PeerRefused     the other site said no, with its reason                (409)
    │   ├── Unavailable     a peer or process we need cannot be reached now        (503)
    │   └── TimedOut        it did not happen within the time given                (504)
    ├── ProtocolError       bytes from a peer broke the protocol: drop that connection
    │   ├── LocalProtocolError   we were about to send something illegal (a bug here)
    │   └── RemoteProtocolError  the peer sent something illegal
    └── StorageError        this site's storage failed; names the file     (500 if it escapes)

``RequestError`` keeps its old name (scripts and tests catch it); its subclasses say more.
"""

from __future__ import annotations

from typing import Dict, Optional, Type


class FerryError(Exception):
    """The base of every error Ferry raises on purpose."""


class RequestError(FerryError):
    """This request cannot be done as asked; nothing was changed by trying."""


class Invalid(RequestError):
    pass


class NotFound(RequestError):
    pass


class Conflict(RequestError):
    pass


class Forbidden(RequestError):
    pass


class TooLarge(RequestError):
    pass


class PeerRefused(RequestError):
    """The peer site refused; the message carries its reason."""


class Unavailable(RequestError):
    pass


class TimedOut(RequestError):
    pass


class ProtocolError(FerryError):
    """A connection's bytes broke the protocol: the connection is dropped, nothing applied."""


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol ourselves: a bug on this side."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


class StorageError(FerryError):
    """This site's storage failed. ``path`` names the file, ``errno`` the cause if known."""

    def __init__(self, message: str, path: Optional[str] = None,
                 errno: Optional[int] = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


HTTP_STATUS: Dict[Type[FerryError], int] = {
    Invalid: 400,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    PeerRefused: 409,
    TooLarge: 413,
    Unavailable: 503,
    TimedOut: 504,
    RequestError: 400,
    ProtocolError: 502,
    StorageError: 500,
    FerryError: 500,
}


def http_status(exc: FerryError) -> int:
    """The HTTP status for an error: its nearest class in ``HTTP_STATUS``."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500
