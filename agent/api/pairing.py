"""The endpoints of pairing: ``/v1/pair-token`` and ``/v1/pairs`` (``agent/pairing.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .. import tls
from ..errors import Forbidden, NotFound, Unavailable
from .request import parse_address, seconds_of, str_of

if TYPE_CHECKING:
    from .app import Api


async def route(api: Api, method: str, parts: List[str], query: Dict[str, list],
                body: Dict[str, Any]) -> Optional[Tuple[int, Any]]:
    if parts[:2] not in (["v1", "pair-token"], ["v1", "pairs"]):
        return None
    trust = api.trust
    if parts == ["v1", "pair-token"] and method == "POST":
        ttl = seconds_of(body, "ttl", tls.TOKEN_TTL, 1.0, 86400.0)
        return 201, trust.make_token(ttl)
    if parts == ["v1", "pairs"] and method == "GET":
        return 200, trust.status()
    if parts == ["v1", "pairs"] and method == "POST":
        address = str_of(body, "address", 300)
        host, port = parse_address(address)
        token = str_of(body, "token", 256)
        try:
            return 201, await trust.pair(host, port, address, token)
        except tls.PairingError as e:
            raise Forbidden(str(e)) from None
        except OSError as e:
            raise Unavailable("cannot reach %s: %s" % (address, e.strerror or e)) from None
    if len(parts) == 3 and parts[1] == "pairs" and method == "DELETE":
        if not trust.unpair(parts[2]):
            raise NotFound("no paired site %s" % parts[2])
        return 200, trust.status()
    raise NotFound("no such endpoint: %s /%s" % (method, "/".join(parts)))
