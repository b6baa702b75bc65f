"""The endpoints of groups protected by libvirt domain (``agent/domains/``):

    POST   /v1/groups   {name, target, domains: [NAME, ...], ...protect's other fields}
                        protect the domains' writable disks and attach the (shut off)
                        domains to the splitters; answers as protect, plus ``domains``
    POST   /v1/groups/NAME/checkpoints {app_consistent: true, tag?, timeout?, freeze_limit?}
                        freeze the guests, cut a checkpoint of kind ``app``, thaw; answers
                        as a user checkpoint, plus ``frozen_ms``, ``domains``,
                        ``post_hook_errors``
    DELETE /v1/groups/NAME  of such a group: the domains back on their own disks, then
                        unprotect as any group

Any other request, and these for groups protected by ``disks``, go on to ``groups.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..domains import Domains
from ..errors import Invalid
from .groups import route as group_route
from .request import seconds_of, tag_of

if TYPE_CHECKING:
    from .app import Api


async def route(api: Api, method: str, parts: List[str], query: Dict[str, list],
                body: Dict[str, Any]) -> Optional[Tuple[int, Any]]:
    if parts == ["v1", "groups"] and method == "POST" and "domains" in body:
        return 201, await _protect(api, query, body)
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "checkpoints" \
            and method == "POST" and body.get("app_consistent"):
        return 200, await _domains(api).app_checkpoint(
            parts[2], tag_of(body), seconds_of(body, "timeout", 30.0),
            seconds_of(body, "freeze_limit", 10.0))
    if len(parts) == 3 and parts[:2] == ["v1", "groups"] and method == "DELETE":
        domains = _domains(api)
        if domains.protected_by_domain(parts[2]):
            return 200, await domains.unprotect(parts[2])
    return None


def _domains(api: Api) -> Domains:
    if api.domains is None:  # an Api made without the agent's options: the default URI
        api.domains = Domains(api.source)
    return api.domains


async def _protect(api: Api, query: Dict[str, list], body: Dict[str, Any]) -> Any:
    domains = _domains(api)
    names = body["domains"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise Invalid("domains must be a list of domain names")
    if "disks" in body:
        raise Invalid("give domains or disks, not both")
    if not isinstance(body.get("name"), str) or not body["name"]:
        raise Invalid("name is required")
    every = body.get("app_consistent_every", 0)
    if not isinstance(every, (int, float)) or isinstance(every, bool):
        raise Invalid("app_consistent_every must be a number of seconds")
    rest = {k: v for k, v in body.items() if k not in ("domains", "app_consistent_every")}

    async def protect_disks(disks: List[Tuple[str, str]]) -> Dict[str, Any]:
        answer = await group_route(api, "POST", ["v1", "groups"], query, dict(
            rest, disks=[{"name": n, "path": p} for n, p in disks]))
        assert answer is not None
        result: Dict[str, Any] = answer[1]
        return result

    return await domains.protect(body["name"], names, protect_disks, float(every))
