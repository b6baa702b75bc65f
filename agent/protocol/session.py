"""The two ends of a replication session as state machines: bytes and messages in, bytes and
messages out, no I/O (the h11 way).

Theory of operation
-------------------
A session is one connection carrying one group, with two roles: the source (ships a group's
changes) and the target (journals them). Either site may play either role for a group (after
a failover, site B is the source of it), so the roles are not tied to sockets or splitters:
the code that moves bytes (``stream.py``, trio) feeds a session what it read
(``receive_data``), takes the next message (``next_event``), and asks it for the bytes of
what it sends (``send``). The session checks that every message is legal in its state, in
either direction, and moves along its transition table::

    source                                  target
    IDLE      --send HELLO-->   HELLO_SENT  AWAIT_HELLO  --recv HELLO--> HELLO_RECEIVED
    HELLO_SENT --recv WELCOME-> WELCOMED    HELLO_RECEIVED --send WELCOME-> AWAIT_OPEN
    WELCOMED  --send OPEN--->   OPEN_SENT   AWAIT_OPEN   --recv OPEN--->  OPEN_RECEIVED
    OPEN_SENT --recv OPENED-->  SEEDING*    OPEN_RECEIVED --send OPENED-> SEEDING*
    SEEDING   --recv SEED  -->  (n-1)       SEEDING      --send SEED ---> (n-1)
    STREAMING --send BATCH / recv ACK       STREAMING    --recv BATCH / send ACK
    IDLE      --send PAIR -->   PAIR_SENT   AWAIT_HELLO  --recv PAIR ---> PAIR_RECEIVED
    PAIR_SENT --recv PAIRED-->  DONE        PAIR_RECEIVED --send PAIRED-> DONE

    * SEEDING while OPENED announced SEED frames still to come, then STREAMING; a probe's
      OPENED (OPEN with ``probe``) ends the session: DONE.

ERROR may be sent or received in any state but DONE and CLOSED and closes the session; a
received ERROR is raised as ``frames.RemoteError`` (the peer refused, with its code). A
message that is not in the table for the state raises ``RemoteProtocolError`` when it
arrives (the connection is dropped, nothing of it used) and ``LocalProtocolError`` when this
side tries to send it (a bug here). Received bodies are parsed once (``messages.py``),
against what the session knows: after OPEN, its group and its number of disks.

Until the peer's first frame has arrived, a frame may be at most ``MAX_FIRST_FRAME`` bytes
(``max_frame``): a stranger's connection costs this site a small, fixed amount of memory.

Frames are read in two pieces, header then body, so that a driver reads exactly what is
missing (``wanted``) and a large body costs one join, as ``stream.read_exact`` did.
"""

from __future__ import annotations

import enum
from typing import Dict, List, Optional, Tuple, Union

from ..errors import LocalProtocolError
from . import frames, messages
from .frames import ProtocolError
from .messages import Context, Message


class State(enum.Enum):
    # source
    IDLE = "idle"
    HELLO_SENT = "hello-sent"
    WELCOMED = "welcomed"
    OPEN_SENT = "open-sent"
    PAIR_SENT = "pair-sent"
    # target
    AWAIT_HELLO = "await-hello"
    HELLO_RECEIVED = "hello-received"
    AWAIT_OPEN = "await-open"
    OPEN_RECEIVED = "open-received"
    PAIR_RECEIVED = "pair-received"
    # both
    SEEDING = "seeding"
    STREAMING = "streaming"
    DONE = "done"        # the protocol ended as it should (a probe, a pairing)
    CLOSED = "closed"    # an ERROR went either way


class Role(enum.Enum):
    SOURCE = "source"
    TARGET = "target"


SEND, RECV = "send", "recv"
T = frames
S = State

# (role, state, direction, frame type) -> next state. SEEDING and OPENED/OPEN are settled in
# code (they depend on the message: how many SEEDs follow, whether it is a probe).
TRANSITIONS: Dict[Tuple[Role, State, str, int], State] = {
    (Role.SOURCE, S.IDLE, SEND, T.T_HELLO): S.HELLO_SENT,
    (Role.SOURCE, S.HELLO_SENT, RECV, T.T_WELCOME): S.WELCOMED,
    (Role.SOURCE, S.WELCOMED, SEND, T.T_OPEN): S.OPEN_SENT,
    (Role.SOURCE, S.OPEN_SENT, RECV, T.T_OPENED): S.STREAMING,
    (Role.SOURCE, S.SEEDING, RECV, T.T_SEED): S.SEEDING,
    (Role.SOURCE, S.STREAMING, SEND, T.T_BATCH): S.STREAMING,
    (Role.SOURCE, S.STREAMING, RECV, T.T_ACK): S.STREAMING,
    (Role.SOURCE, S.IDLE, SEND, T.T_PAIR): S.PAIR_SENT,
    (Role.SOURCE, S.PAIR_SENT, RECV, T.T_PAIRED): S.DONE,
    (Role.TARGET, S.AWAIT_HELLO, RECV, T.T_HELLO): S.HELLO_RECEIVED,
    (Role.TARGET, S.HELLO_RECEIVED, SEND, T.T_WELCOME): S.AWAIT_OPEN,
    (Role.TARGET, S.AWAIT_OPEN, RECV, T.T_OPEN): S.OPEN_RECEIVED,
    (Role.TARGET, S.OPEN_RECEIVED, SEND, T.T_OPENED): S.STREAMING,
    (Role.TARGET, S.SEEDING, SEND, T.T_SEED): S.SEEDING,
    (Role.TARGET, S.STREAMING, RECV, T.T_BATCH): S.STREAMING,
    (Role.TARGET, S.STREAMING, SEND, T.T_ACK): S.STREAMING,
    (Role.TARGET, S.AWAIT_HELLO, RECV, T.T_PAIR): S.PAIR_RECEIVED,
    (Role.TARGET, S.PAIR_RECEIVED, SEND, T.T_PAIRED): S.DONE,
}
_ENDED = (S.DONE, S.CLOSED)


class NeedData:
    """``next_event``'s answer when the next frame is not complete yet."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()
Event = Union[Message, NeedData]


class Session:
    """One end of a session; ``SourceSession`` and ``TargetSession`` are the two roles."""

    role: Role
    initial: State

    def __init__(self, codec: Optional[frames.Codec] = None) -> None:
        self.codec = codec or frames.Codec()
        self.state = self.initial
        self.context = Context()
        self.seeds_left = 0          # SEED frames announced by OPENED, not yet through
        self.probe = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self._header: Optional[frames.Header] = None
        self._chunks: List[bytes] = []
        self._have = 0
        self._eof = False

    # -- receiving -------------------------------------------------------------------------

    def max_frame(self) -> int:
        """The largest body the next frame may have: small until the peer has said who it
        is (HELLO or PAIR, after TLS checked its certificate), so that a stranger cannot
        make this site hold more than MAX_FIRST_FRAME bytes for it."""
        if self.state in (S.AWAIT_HELLO, S.HELLO_SENT, S.PAIR_SENT):
            return frames.MAX_FIRST_FRAME
        return frames.MAX_FRAME

    def wanted(self) -> int:
        """Bytes still missing from the frame being read (its header, then its body)."""
        need = frames.HEADER.size if self._header is None else self._header.length
        return need - self._have

    @property
    def pending_length(self) -> int:
        """The body length of the frame being read (0 while its header is incomplete):
        a driver may parse a large one off its event loop."""
        return self._header.length if self._header is not None else 0

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the peer, at most ``wanted()`` of them; b"" is the end of file."""
        if not data:
            self._eof = True
            return
        if len(data) > self.wanted():
            raise LocalProtocolError("fed %d bytes where %d were wanted"
                                     % (len(data), self.wanted()))
        self._chunks.append(data)
        self._have += len(data)
        self.bytes_received += len(data)

    def next_event(self) -> Event:
        """The next whole message, checked and parsed, or NEED_DATA. EOFError once the peer
        closed; RemoteError for an ERROR; RemoteProtocolError for anything illegal."""
        if self._header is None:
            if self._have < frames.HEADER.size:
                return self._need()
            self._header = self.codec.decode_header(self._take(), self.max_frame())
            if self._header.length:
                return self._need()
        elif self._have < self._header.length:
            return self._need()
        header, self._header = self._header, None
        body = self.codec.decode_body(header, self._take() if header.length else b"")
        return self._received(header.type, body)

    def _need(self) -> NeedData:
        if self._eof:
            raise EOFError("the peer closed the connection")
        return NEED_DATA

    def _take(self) -> bytes:
        chunks, self._chunks, self._have = self._chunks, [], 0
        first = chunks[0] if chunks else b""
        return first if len(chunks) == 1 and isinstance(first, bytes) else b"".join(chunks)

    def _received(self, ftype: int, body: dict) -> Message:
        if self.state in _ENDED:
            raise ProtocolError("%s frame after the session ended" % frames.TYPE_NAMES[ftype])
        if ftype == frames.T_ERROR:
            err = messages.Error.parse(body, self.context)
            self.state = S.CLOSED
            raise frames.RemoteError(err.code, err.message)
        nxt = TRANSITIONS.get((self.role, self.state, RECV, ftype))
        if nxt is None:
            raise ProtocolError("%s frame in state %s" % (frames.TYPE_NAMES[ftype],
                                                          self.state.value))
        msg = messages.parse(ftype, body, self.context)
        self.state = self._settle(nxt, msg)
        return msg

    # -- sending ---------------------------------------------------------------------------

    def send(self, msg: Message, compress: bool = False) -> bytes:
        """The frame for ``msg``, if it may be sent now (LocalProtocolError if not)."""
        if isinstance(msg, messages.Error):
            if self.state in _ENDED:
                raise LocalProtocolError("ERROR after the session ended")
            self.state = S.CLOSED
        else:
            nxt = TRANSITIONS.get((self.role, self.state, SEND, msg.TYPE))
            if nxt is None:
                raise LocalProtocolError("cannot send %s in state %s"
                                         % (frames.TYPE_NAMES[msg.TYPE], self.state.value))
            self.state = self._settle(nxt, msg)
        frame = self.codec.encode(msg.TYPE, msg.body(), compress)
        self.bytes_sent += len(frame)
        return frame

    def sent_frame(self, msg_type: int, frame: frames.Frame) -> None:
        """A frame encoded elsewhere (a batch encoded in a worker thread) is being sent:
        check and count it like ``send`` would."""
        nxt = TRANSITIONS.get((self.role, self.state, SEND, msg_type))
        if nxt is None:
            raise LocalProtocolError("cannot send %s in state %s"
                                     % (frames.TYPE_NAMES[msg_type], self.state.value))
        self.state = nxt
        self.bytes_sent += len(frame)

    def _settle(self, nxt: State, msg: Message) -> State:
        """The states that depend on the message, not only on its type."""
        if isinstance(msg, messages.Open):
            self.context = Context(msg.group, len(msg.disks))
            self.probe = msg.probe
        elif isinstance(msg, messages.Opened):
            if self.probe:
                return S.DONE
            self.seeds_left = msg.seed_frames
        elif isinstance(msg, messages.Seed):
            self.seeds_left -= 1
        if nxt in (S.STREAMING, S.SEEDING):
            return S.SEEDING if self.seeds_left > 0 else S.STREAMING
        return nxt


class SourceSession(Session):
    """The source's end: HELLO, OPEN, then BATCHes out and ACKs in."""
    role = Role.SOURCE
    initial = S.IDLE


class TargetSession(Session):
    """The target's end: answers HELLO and OPEN, takes BATCHes, answers with ACKs."""
    role = Role.TARGET
    initial = S.AWAIT_HELLO
