"""The HTTP API refuses what it cannot take with a 4xx and one line, whatever it is sent.

Hypothesis sends arbitrary JSON (and raw junk, deep nesting, huge numbers, NaN literals,
NULs) to every route of two real agents (site A with a protected group, site B with its
replica) over their unix API sockets, and accepts only a 2xx or a 4xx whose body is strict
JSON, an error being one non-empty line. Both agents must be alive afterwards.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Dict, List, Tuple
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api.request import parse_address, parse_body

try:
    from builtins import ExceptionGroup  # Python 3.11
except ImportError:  # older Pythons: trio's backport
    from exceptiongroup import ExceptionGroup
from agent.errors import Invalid, TooLarge
from agent.source.settings import NAME_RE

GROUP, DISK = "grp-g0", "disk-d0"  # names hypothesis's text will not hit by chance

# (method, path template); NAME is a group, a view, a job or a site, drawn below.
ROUTES = [
    ("GET", "/v1/status"), ("POST", "/v1/groups"), ("DELETE", "/v1/groups/NAME"),
    ("POST", "/v1/groups/NAME/wait"), ("POST", "/v1/groups/NAME/settings"),
    ("POST", "/v1/groups/NAME/pause"), ("POST", "/v1/groups/NAME/resume"),
    ("POST", "/v1/groups/NAME/checkpoints"), ("GET", "/v1/checkpoints/NAME"),
    ("POST", "/v1/groups/NAME/move"),
    ("POST", "/v1/replicas/NAME/views"), ("DELETE", "/v1/views/NAME"),
    ("POST", "/v1/replicas/NAME/failover"), ("POST", "/v1/replicas/NAME/restore"),
    ("POST", "/v1/replicas/NAME/mounts"), ("POST", "/v1/umount"),
    ("POST", "/v1/replicas/NAME/journal-volume"), ("DELETE", "/v1/replicas/NAME/journal-volume"),
    ("POST", "/v1/groups/NAME/resync"), ("POST", "/v1/replicas/NAME/repair"),
    ("POST", "/v1/replicas/NAME/scrub"), ("POST", "/v1/groups/NAME/verify"),
    ("POST", "/v1/pair-token"), ("POST", "/v1/pairs"), ("GET", "/v1/pairs"),
    ("DELETE", "/v1/pairs/NAME"), ("GET", "/v1/events"), ("GET", "/v1/alerts"),
    ("POST", "/v1/groups/NAME/alerts"), ("GET", "/v1/overview"), ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"), ("GET", "/v1/jobs/NAME"), ("GET", "/metrics"), ("GET", "/healthz"),
    ("GET", "/v1/dashboard-url"), ("PUT", "/v1/groups"), ("POST", "/v1/nosuch"),
]
# Routes that may wait as long as a body says (a wait, a checkpoint of a paused group):
# the real group is not named there, so they answer at once.
WAITS = ("/wait", "/checkpoints", "/move")

FIELDS = ["name", "target", "disks", "path", "allow_unreachable", "queue_bytes", "history_s",
          "journal_max", "checkpoint_interval", "bandwidth", "seeds", "timeout", "tag",
          "checkpoint", "at_ns", "mode", "disk", "to", "ttl", "address", "token", "kind",
          "group", "rpo_alert", "dir", "ranges", "replica_format", "device", "journal_max",
          "splitter_threads"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
    st.sampled_from(["", "x\n", "a\0b", "/tmp/x\0", "g\n", "é" * 10, "a" * 300,
                     "localhost:0", "host:99999", "-bad-.example:4005", "[::1]:4005",
                     "xn--bcher-kva.example:4005", "\u00e9t\u00e9.example:1"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
keyed = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)
json_bodies = st.one_of(keyed, st.dictionaries(st.text(max_size=10), values, max_size=5),
                        values).map(lambda v: json.dumps(v).encode())
raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"NaN", b'{"bandwidth": NaN}', b'{"rpo_alert": Infinity}',
                     b'{"timeout": -Infinity}', b'{"bandwidth": 1e999}',
                     b'{"bandwidth": 9223372036854775808}', b'{"at_ns": -9223372036854775808}',
                     b'{"bandwidth": ' + b"9" * 5000 + b"}", b"[" * 100000 + b"]" * 100000,
                     b'{"a":' * 50 + b"1" + b"}" * 50, b'{"name": "\\ud800"}',
                     b'{"to": "/tmp/a\\u0000b"}', b"\xff\xfe{}", b"{}" + b" " * 10, b"{"]))
bodies = st.one_of(json_bodies, raw_bodies, st.just(b""))
names = st.one_of(st.sampled_from([GROUP, "nosuch", "a%00b", "%ff", "x" * 2000, "."]),
                  st.text(min_size=1, max_size=12).map(lambda t: quote(t, safe="")))
queries = st.sampled_from(["", "?wait=nan", "?wait=inf", "?wait=-1", "?limit=0",
                           "?after=99999999999999999999999", "?group=%00", "?group=%ff",
                           "?wait=1e999", "?limit=x", "?group=" + GROUP])


def call(sock_path: str, method: str, path: str, body: bytes,
         timeout: float = 60) -> Tuple[int, bytes]:
    """One HTTP/1.1 request, bytes as given; (status, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(("%s %s HTTP/1.1\r\nHost: ferry\r\nContent-Type: application/json\r\n"
                   "Content-Length: %d\r\nConnection: close\r\n\r\n"
                   % (method, path, len(body))).encode() + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, payload


def strict_json(data: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError("%s in an answer" % name)
    return json.loads(data, parse_constant=refuse)


def check_answer(method: str, path: str, status: int, payload: bytes) -> None:
    what = "%s %s -> %d %r" % (method, path[:80], status, payload[:300])
    assert 200 <= status < 300 or 400 <= status < 500, what
    if path.startswith("/metrics") and status == 200:
        return
    answer = strict_json(payload)
    if status >= 400:
        error = answer.get("error")
        assert isinstance(error, str) and error.strip() and "\n" not in error, what


@pytest.fixture
def fuzzed(sites: Any) -> Dict[str, Any]:
    lab = sites
    image = lab.image(DISK)
    lab.protect(GROUP, image)
    lab.a.ferry("wait", GROUP, "--synced", "--timeout", "120")
    return {"lab": lab, "A": str(lab.a.data / "api.sock"), "B": str(lab.b.data / "api.sock")}


@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_every_route_answers_2xx_or_one_line_4xx(fuzzed: Dict[str, Any], data: Any) -> None:
    method, template = data.draw(st.sampled_from(ROUTES))
    name = data.draw(names)
    if template.endswith(WAITS) and name == GROUP:
        name = "nosuch"
    path = template.replace("NAME", name) + data.draw(queries)
    body = data.draw(bodies)
    site = data.draw(st.sampled_from(["A", "B"]))
    status, payload = call(fuzzed[site], method, path, body)
    check_answer(method, path, status, payload)


def test_agents_alive_after_junk(fuzzed: Dict[str, Any]) -> None:
    """A few of the worst bodies to every route, then both agents still answer."""
    lab = fuzzed["lab"]
    worst = [b"[" * 100000, b'{"bandwidth": NaN}', b"\0" * 1000, b"{" * 2000 + b"}" * 2000,
             b'{"x": "' + b"a" * (1024 * 1024 + 10) + b'"}']
    for method, template in ROUTES:
        if template.endswith(WAITS):
            continue
        for body in worst:
            path = template.replace("NAME", GROUP)
            status, payload = call(fuzzed["A"], method, path, body)
            check_answer(method, path, status, payload)
    for site in (lab.a, lab.b):
        assert site.proc is not None and site.proc.poll() is None
        assert call(fuzzed["A" if site is lab.a else "B"], "GET", "/healthz", b"")[0] == 200
    # The group still replicates: the fuzz changed nothing it could not.
    assert GROUP in lab.a.status()["groups"]


def test_nan_setting_cannot_be_stored(fuzzed: Dict[str, Any]) -> None:
    lab = fuzzed["lab"]
    for raw in (b'{"bandwidth": NaN}', b'{"bandwidth": 1e999}', b'{"bandwidth": 1.5}',
                b'{"bandwidth": true}', b'{"bandwidth": -1}',
                b'{"bandwidth": 9223372036854775808}'):
        status, payload = call(fuzzed["A"], "POST", "/v1/groups/%s/settings" % GROUP, raw)
        assert status == 400, (raw, payload)
    for raw in (b'{"rpo_alert": NaN}', b'{"rpo_alert": Infinity}', b'{"rpo_alert": 0}'):
        status, payload = call(fuzzed["A"], "POST", "/v1/groups/%s/alerts" % GROUP, raw)
        assert status == 400, (raw, payload)
    out = lab.a.ferry("status", "--json").stdout
    assert "NaN" not in out and "Infinity" not in out
    strict_json(out.encode())


def test_a_trailing_newline_is_not_a_name(fuzzed: Dict[str, Any], tmp_path: Path) -> None:
    image = fuzzed["lab"].image("other")
    for name, disk in (("g2\n", "d"), ("g2", "d\n")):
        body = json.dumps({"name": name, "target": fuzzed["lab"].b.address,
                           "disks": [{"name": disk, "path": str(image)}]}).encode()
        status, payload = call(fuzzed["A"], "POST", "/v1/groups", body)
        assert status == 400 and b"name" in payload, payload
    assert NAME_RE.match("g\n") is None and NAME_RE.match("g") is not None


def test_a_nul_in_a_path_is_refused(fuzzed: Dict[str, Any]) -> None:
    body = (b'{"name": "g3", "target": "127.0.0.1:1", '
            b'"disks": [{"name": "d", "path": "/tmp/a\\u0000b"}]}')
    status, payload = call(fuzzed["A"], "POST", "/v1/groups", body)
    assert status == 400 and b"NUL" in payload, payload
    status, payload = call(fuzzed["B"], "POST", "/v1/replicas/%s/restore" % GROUP,
                           json.dumps({"disk": DISK, "to": "/tmp/x\0y"}).encode())
    assert status == 400 and b"NUL" in payload, payload


def test_a_body_past_the_limit_is_413(fuzzed: Dict[str, Any]) -> None:
    status, payload = call(fuzzed["A"], "POST", "/v1/groups", b" " * (1024 * 1024 + 1))
    assert status == 413 and strict_json(payload)["error"]


# -- the parsing alone -----------------------------------------------------------------------

@pytest.mark.parametrize("raw, error", [
    (b'{"a": NaN}', Invalid), (b'{"a": Infinity}', Invalid), (b'{"a": -Infinity}', Invalid),
    (b'{"a": 1e400}', Invalid), (b'{"a": 9223372036854775808}', Invalid),
    (b'{"a": -9223372036854775808}', Invalid), (b'{"a": 1' + b"0" * 30 + b"}", Invalid),
    (b'{"a": ' * 9 + b"1" + b"}" * 9, Invalid), (b"[" * 100000 + b"]" * 100000, Invalid),
    (b'{"a": "x\\u0000"}', Invalid), (b'{"a\\u0000": 1}', Invalid), (b'{"a": "\\udc00"}', Invalid),
    (b"\xff", Invalid), (b"[]", Invalid), (b"{", Invalid),
    (b'{"a": "' + b"x" * 70000 + b'"}', Invalid), (b" " * (1024 * 1024 + 1), TooLarge),
])
def test_parse_body_refuses(raw: bytes, error: type) -> None:
    with pytest.raises(error) as info:
        parse_body(raw)
    assert str(info.value) and "\n" not in str(info.value)


def test_parse_body_takes() -> None:
    assert parse_body(b"") == {}
    assert parse_body(b'{"a": 9223372036854775807, "b": -1.5, "c": [[{"d": "e"}]]}') == {
        "a": 2 ** 63 - 1, "b": -1.5, "c": [[{"d": "e"}]]}
    assert parse_body(b'{"a": ' * 7 + b"1" + b"}" * 7)


@pytest.mark.parametrize("text", [
    "h", "h:1", "h:65535", "a-b.example.com:4005", "10.0.0.1:4005", "[::1]:4005", "[fe80::1]",
    "x" * 63 + ".example",
])
def test_addresses_taken(text: str) -> None:
    parse_address(text)


@pytest.mark.parametrize("text", [
    "h:0", "h:65536", "h:99999", "-h:1", "h-:1", "h..x:1", "h_x:1", "\u00e9t\u00e9:1", "h:1\n",
    "x" * 64 + ".example", ".".join(["abcdefg"] * 40), "[nothost]:1", "h:\u0664", "", ":1",
    "h:1:2", "h :1",
])
def test_addresses_refused(text: str) -> None:
    with pytest.raises(Invalid):
        parse_address(text)


# -- the ASGI application alone: the answers for what a site raises or returns ---------------

class _Source:
    """A source site whose pause answers as told (the rest of the API is not reached)."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome

    def set_paused(self, name: str, paused: bool) -> Any:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def _asgi(outcome: Any) -> Tuple[int, Dict[str, Any]]:
    import trio

    from agent.api import Api

    api = Api(_Source(outcome), None, "A", None)  # type: ignore[arg-type]
    sent: List[Dict[str, Any]] = []

    async def receive() -> Dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/groups/g/pause",
             "query_string": b""}
    trio.run(api, scope, receive, send)
    return sent[0]["status"], strict_json(sent[1]["body"])


def test_a_peer_refusal_is_409_with_its_reason() -> None:
    from agent.protocol import frames
    status, answer = _asgi(frames.RemoteError("bad-group", "group g failed over\nhere"))
    assert status == 409 and answer["kind"] == "PeerRefused"
    assert answer["error"] == "the other site refused: group g failed over here"


def test_an_answer_with_a_nan_is_a_one_line_500_not_nan() -> None:
    status, answer = _asgi({"bandwidth": float("nan")})
    assert status == 500 and "not strict JSON" in answer["error"]


def test_an_empty_error_message_still_says_something() -> None:
    from agent.errors import Conflict
    status, answer = _asgi(Conflict(""))
    assert status == 409 and answer["error"] == "Conflict"


def test_a_group_of_one_error_is_answered_as_that_error() -> None:
    from agent.errors import Conflict
    status, answer = _asgi(ExceptionGroup("nursery", [Conflict("disk held by group g")]))
    assert (status, answer["kind"], answer["error"]) == (409, "Conflict",
                                                         "disk held by group g")


@pytest.mark.parametrize("exc, text", [
    (OSError(5, "Input/output error"), "OSError: [Errno 5] Input/output error"),
    (KeyError("x"), "internal error (KeyError); see the agent's log"),
    (ExceptionGroup("n", [ValueError("a"), ValueError("b")]),
     "internal error (ExceptionGroup); see the agent's log"),
])
def test_a_failure_of_this_site_is_a_one_line_500(exc: Exception, text: str) -> None:
    status, answer = _asgi(exc)
    assert status == 500 and answer["error"] == text
