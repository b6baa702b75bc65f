"""A request's JSON body: read within a size limit, parsed strictly, and its fields checked.

What the API promises about input (docs/api.md has the routes and fields):

- a body is at most ``MAX_REQUEST`` bytes of UTF-8 JSON, an object, nested at most
  ``MAX_DEPTH`` deep; ``NaN``, ``Infinity``, ``-Infinity``, floats that overflow to an
  infinity, integers of ``2**63`` or more (either sign), strings with a NUL or a lone
  surrogate are refused before any route sees the body;
- each field is checked by what it means: names matched whole (``NAME_RE.fullmatch``),
  host names by RFC 1123, ports 1..65535, sizes, bandwidths and seconds within bounds,
  booleans never taken for numbers (and numbers never for booleans);

and every refusal is ``Invalid`` (400) or ``TooLarge`` (413) with one line for the user.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..checkpoints import MAX_TAG  # a checkpoint's tag
from ..errors import Invalid, TooLarge
from ..protocol.messages import MAX_PATH  # a path: what the target takes
from ..source.settings import DEFAULT_PORT, NAME_RE

MAX_REQUEST = 1024 * 1024
MAX_DEPTH = 8                 # {"disks": [{"name": ...}]} is 3
MAX_INT = 2 ** 63             # integers are below this, and above -MAX_INT
MAX_STRING = 64 * 1024        # any string in a body
MAX_SECONDS = 366 * 86400.0   # a timeout or an interval: a year at most
MAX_NS = 2 ** 63 - 1          # a wall time in ns
HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


# -- the body ----------------------------------------------------------------------------

async def read_body(receive: Callable) -> Dict[str, Any]:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Invalid("client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_REQUEST:
            raise TooLarge("request body over %d bytes" % MAX_REQUEST)
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return parse_body(b"".join(chunks))


def parse_body(raw: bytes) -> Dict[str, Any]:
    """A request body as a dict, or Invalid/TooLarge saying in one line what is wrong."""
    if len(raw) > MAX_REQUEST:
        raise TooLarge("request body over %d bytes" % MAX_REQUEST)
    if not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("request body is not UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=_constant, parse_float=_float,
                         parse_int=_int)
    except RecursionError:
        raise Invalid("request body is nested deeper than %d" % MAX_DEPTH) from None
    except ValueError as e:
        raise Invalid("request body is not JSON: %s" % _one_line(e)) from None
    if not isinstance(obj, dict):
        raise Invalid("request body must be a JSON object")
    _check_values(obj)
    return obj


def _constant(name: str) -> Any:
    raise ValueError("%s is not a number JSON allows" % name)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number %s is out of range" % text[:40])
    return value


def _int(text: str) -> int:
    if len(text) > 20:  # more digits than any integer below 2**63
        raise ValueError("integer %s... is out of range" % text[:20])
    value = int(text)
    if not -MAX_INT < value < MAX_INT:
        raise ValueError("integer %s is out of range (|n| < 2**63)" % text)
    return value


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _check_values(obj: Any) -> None:
    """Depth, and strings: no NUL, no lone surrogate, none past MAX_STRING."""
    stack: List[Tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise Invalid("request body is nested deeper than %d" % MAX_DEPTH)
            items = list(value.items()) if isinstance(value, dict) else \
                [(None, v) for v in value]
            for k, v in items:
                if k is not None:
                    _check_string(k)
                stack.append((v, depth + 1))
        elif isinstance(value, str):
            _check_string(value)


def _check_string(value: str) -> None:
    if len(value) > MAX_STRING:
        raise Invalid("a string of %d characters (at most %d)" % (len(value), MAX_STRING))
    if "\0" in value:
        raise Invalid("a string with a NUL character: %r" % value[:64])
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid("a string with a lone surrogate: %r" % value[:64]) from None


# -- fields --------------------------------------------------------------------------------

def only(body: Dict[str, Any], allowed: Tuple[str, ...], what: str) -> None:
    """Refuse a field this request does not have (a typo would silently do nothing)."""
    extra = sorted(set(body) - set(allowed))
    if extra:
        raise Invalid("%s: unknown field %s (fields: %s)" % (what, shown(extra[0]),
                                                             ", ".join(allowed)))


def str_of(body: Dict[str, Any], key: str, max_len: int = 1024) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise Invalid("%s is required" % key)
    if len(value) > max_len:
        raise Invalid("%s is %d characters long (at most %d)" % (key, len(value), max_len))
    return value


def is_name(value: Any) -> bool:
    """Is ``value`` a whole name (a group's, a disk's): letters, digits, '_', '.', '-'?"""
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def name_of(body: Dict[str, Any], key: str, what: str = "") -> str:
    value = body.get(key)
    if not is_name(value):
        raise Invalid("%s name %s: 1 to 128 of letters, digits, '_', '.', '-' (starting "
                      "with a letter or digit)" % (what or key, shown(value)))
    assert isinstance(value, str)
    return value


def path_of(body: Dict[str, Any], key: str) -> str:
    return path_value(body.get(key), key)


def path_value(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid("%s must be a path" % what)
    if len(value.encode("utf-8")) > MAX_PATH:
        raise Invalid("%s is longer than %d bytes" % (what, MAX_PATH))
    if "\0" in value or "\n" in value:
        raise Invalid("%s %s: a path has no NUL or newline" % (what, shown(value)))
    return value


def bool_of(body: Dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise Invalid("%s must be true or false" % key)
    return value


def int_of(body: Dict[str, Any], key: str, low: int, high: int,
           default: Optional[int] = None) -> int:
    """An integer in [low, high]; ``default`` when absent (required when None)."""
    if key not in body and default is not None:
        return default
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise Invalid("%s must be an integer from %d to %d" % (key, low, high))
    return value


MAX_RANGES = 65536


def ranges_of(body: Dict[str, Any]) -> Optional[List[Tuple[int, int]]]:
    """``ranges``: a list of [offset, length] byte ranges (absent: the whole disk)."""
    raw = body.get("ranges")
    if raw is None:
        return None
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_RANGES:
        raise Invalid("ranges must be a list of 1 to %d [offset, length] pairs" % MAX_RANGES)
    out = []
    for r in raw:
        if not (isinstance(r, list) and len(r) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62
                for x in r) and r[1] > 0):
            raise Invalid("a range is [offset, length] with offset >= 0 and length > 0, "
                          "not %s" % shown(r))
        out.append((r[0], r[1]))
    return out


def seconds_of(body: Dict[str, Any], key: str, default: Optional[float] = None,
               low: float = 0.0, high: float = MAX_SECONDS,
               positive: bool = False) -> float:
    """A number of seconds in [low, high] (> 0 if ``positive``); ``default`` when absent."""
    if key not in body and default is not None:
        return default
    value = body.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or not math.isfinite(value) or not low <= value <= high \
            or (positive and value <= 0):
        raise Invalid("%s must be a number of seconds from %g to %g%s"
                      % (key, low, high, " (more than 0)" if positive else ""))
    return float(value)


def bandwidth_of(body: Dict[str, Any]) -> int:
    value = body.get("bandwidth")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62:
        raise Invalid("bandwidth must be a number of bytes per second (0: no limit)")
    return value


def point_of(body: Dict[str, Any]) -> Tuple[Optional[str], Optional[int]]:
    """The point a request names: a checkpoint id or tag, or a wall time (ns)."""
    ref = body.get("checkpoint")
    at = body.get("at_ns")
    if ref is not None and (not isinstance(ref, str) or not ref or len(ref) > MAX_TAG):
        raise Invalid("checkpoint must be an id or a tag (1 to %d characters)" % MAX_TAG)
    if at is not None and (not isinstance(at, int) or isinstance(at, bool)
                           or not 0 <= at <= MAX_NS):
        raise Invalid("at_ns must be a wall time in ns from 0 to 2**63-1")
    if ref is not None and at is not None:
        raise Invalid("give a checkpoint or a time, not both")
    return ref, at


def tag_of(body: Dict[str, Any]) -> Optional[str]:
    tag = body.get("tag")
    if tag is None:
        return None
    if not isinstance(tag, str) or not 0 < len(tag) <= MAX_TAG \
            or any(ord(c) < 32 or ord(c) == 127 for c in tag):
        raise Invalid("a tag is 1 to %d characters on one line, without control "
                      "characters" % MAX_TAG)
    return tag


def address_of(body: Dict[str, Any], key: str) -> Tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or HOST (the default port): host and port checked."""
    return parse_address(str_of(body, key, 300), key)


def parse_address(text: str, what: str = "address") -> Tuple[str, int]:
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?", text) \
        or re.fullmatch(r"([^:\[\]]+)(?::([0-9]{1,5}))?", text)
    if not m:
        raise Invalid("%s %s is not HOST:PORT" % (what, shown(text)))
    host, port = m.group(1), int(m.group(2)) if m.group(2) else DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise Invalid("%s %s: port %d is not 1 to 65535" % (what, shown(text), port))
    if not text.startswith("[") and not is_host(host):
        raise Invalid("%s %s: %s is not a host name (RFC 1123: ASCII labels of letters, "
                      "digits and '-', at most 253 characters) or an IPv4 address"
                      % (what, shown(text), shown(host)))
    if text.startswith("[") and not _is_ipv6(host):
        raise Invalid("%s %s: %s is not an IPv6 address" % (what, shown(text), host))
    return host, port


def is_host(host: str) -> bool:
    """An RFC 1123 host name or a dotted IPv4 address, in ASCII, at most 253 characters."""
    if not host or len(host) > 253 or not host.isascii():
        return False
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return all(HOST_LABEL.fullmatch(label) for label in labels)


def _is_ipv6(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def shown(value: Any) -> str:
    """A value in an error line: quoted, escaped, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
