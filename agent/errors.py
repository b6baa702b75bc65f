"""What went wrong, by what to do about it.

Every error the engine raises on purpose is a ``FerryError``; its class says what the caller
should do, never a number or a message text. The HTTP edge (``api/``) alone turns classes
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
    ├── IllegalTransition   a state machine asked for a move its table lacks: a bug here
    ├── ProtocolError       bytes from a peer broke the protocol: drop that connection
    │   ├── LocalProtocolError   we were about to send something illegal (a bug here)
    │   └── RemoteProtocolError  the peer sent something illegal
    └── StorageError        this site's storage failed; names the file     (500 if it escapes)
        └── JournalCorrupt  a journal record B cannot vouch for: never returned as data (500)

``RequestError`` keeps its old name (scripts and tests catch it); its subclasses say more.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type


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


class IllegalTransition(FerryError):
    """A state machine was asked for a move its table does not have: a bug on this site."""


class StorageError(FerryError):
    """This site's storage failed. ``path`` names the file, ``errno`` the cause if known."""

    def __init__(self, message: str, path: Optional[str] = None,
                 errno: Optional[int] = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class JournalCorrupt(StorageError):
    """A journal record fails its checks, or a read reached damage found before
    (``agent/target/journal.py``); the message is one line naming the group, the disk, the
    segment file and the offset. ``damage`` is the journal's record of it."""

    def __init__(self, message: str, path: Optional[str] = None,
                 damage: Optional[Any] = None) -> None:
        super().__init__(message, path)
        self.damage = damage
        self.position: Optional[Tuple[int, int]] = None  # where a reader stopped, if it says


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


# ``ferry``'s exit statuses, by the same classes (docs/operations.md, "Exit statuses").
EXIT_FAILURE = 1        # anything not below
EXIT_USAGE = 2          # the command line is wrong (click)
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_UNAVAILABLE = 5    # the agent, a peer or a process cannot be reached now
EXIT_TIMEOUT = 6
EXIT_DENIED = 7         # permission denied: the API socket, a token, a pairing credential

EXIT_STATUS: Dict[Type[FerryError], int] = {
    NotFound: EXIT_NOT_FOUND,
    Conflict: EXIT_CONFLICT,
    PeerRefused: EXIT_CONFLICT,
    Unavailable: EXIT_UNAVAILABLE,
    TimedOut: EXIT_TIMEOUT,
    Forbidden: EXIT_DENIED,
    FerryError: EXIT_FAILURE,
}

# The classes by name, as the API reports them (``{"error": ..., "kind": "NotFound"}``).
BY_NAME: Dict[str, Type[FerryError]] = {
    cls.__name__: cls for cls in (
        FerryError, RequestError, Invalid, NotFound, Conflict, Forbidden, TooLarge,
        PeerRefused, Unavailable, TimedOut, ProtocolError, LocalProtocolError,
        RemoteProtocolError, StorageError, JournalCorrupt)}

# What an HTTP status means when the answer names no class (a proxy, an older agent).
BY_HTTP_STATUS: Dict[int, Type[FerryError]] = {
    400: Invalid, 401: Forbidden, 403: Forbidden, 404: NotFound, 409: Conflict,
    413: TooLarge, 503: Unavailable, 504: TimedOut}


def exit_status(exc: FerryError) -> int:
    """The ``ferry`` exit status for an error: its nearest class in ``EXIT_STATUS``."""
    for cls in type(exc).__mro__:
        if cls in EXIT_STATUS:
            return EXIT_STATUS[cls]
    return EXIT_FAILURE


def kind_of(exc: FerryError) -> str:
    """The name the API gives an error's class: the nearest one a client knows."""
    for cls in type(exc).__mro__:
        if cls.__name__ in BY_NAME and BY_NAME[cls.__name__] is cls:
            return cls.__name__
    return "FerryError"
