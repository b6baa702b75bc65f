"""A request's JSON body: read within a size limit, and its fields checked; each check
fails the request with ``Invalid`` (400) and one line for the user."""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import Invalid, TooLarge

MAX_REQUEST = 1024 * 1024


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
    raw = b"".join(chunks)
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise Invalid("request body is not JSON: %s" % e) from None
    if not isinstance(obj, dict):
        raise Invalid("request body must be a JSON object")
    return obj


def str_of(body: Dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise Invalid("%s is required" % key)
    return value


def point_of(body: Dict[str, Any]) -> Tuple[Optional[str], Optional[int]]:
    """The point a request names: a checkpoint id or tag, or a wall time (ns)."""
    ref = body.get("checkpoint")
    at = body.get("at_ns")
    if ref is not None and (not isinstance(ref, str) or not ref):
        raise Invalid("checkpoint must be an id or a tag")
    if at is not None and (not isinstance(at, int) or isinstance(at, bool)):
        raise Invalid("at_ns must be an integer")
    if ref is not None and at is not None:
        raise Invalid("give a checkpoint or a time, not both")
    return ref, at


def bandwidth_of(body: Dict[str, Any]) -> int:
    value = body.get("bandwidth")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Invalid("bandwidth must be a number of bytes per second (0: no limit)")
    return value


def positive_int_of(body: Dict[str, Any], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise Invalid("%s must be a positive integer" % key)
    return value
