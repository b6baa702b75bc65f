"""The libvirt networks a failover's VMs need on site B.

- A test failover puts each interface it does not map on ``xml.ISOLATED``
  (``xml.recovered``), unplugged. libvirt wants that network to exist to start the VM, so
  ``ensure_isolated`` makes it before the first such VM starts: transient (it leaves no
  file behind and goes with the daemon), no ``<forward>`` and no ``<ip>`` (nothing routed,
  no host address, no dnsmasq): a bridge that only test VMs' NICs join.
- ``drop_isolated`` destroys it once no running domain names it any more (the last test
  VM stopped). A network of that name that an administrator defined (persistent) is used
  as it is and never removed.
- ``check`` runs before a failover serves anything: every network the VMs will name on this
  site (a live failover's, mapped or not; a test's mapped ones) must exist here, or the
  failover is refused naming the domain, the network and ``--network-map``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

from ..errors import Invalid, Unavailable
from . import xml
from .hypervisor import _libvirt, _msg, connection

log = logging.getLogger("ferry.domains")

ISOLATED_XML = "<network><name>%s</name></network>" % xml.ISOLATED  # no forward, no ip


def _exists(conn: Any, name: str) -> bool:
    lv = _libvirt()
    try:
        conn.networkLookupByName(name)
        return True
    except lv.libvirtError as e:
        if e.get_error_code() == lv.VIR_ERR_NO_NETWORK:
            return False
        raise Unavailable("network %s: %s" % (name, _msg(e))) from None


def check(uri: str, domains: List[Dict[str, Any]], network_map: Dict[str, str],
          test: bool) -> None:
    """Invalid naming the first network a VM would need that this site's libvirt lacks."""
    with connection(uri) as conn:
        for d in domains:
            for net in xml.networks(d["xml"]):
                if test and net not in network_map:
                    continue  # on the isolated network
                here = network_map.get(net, net)
                if _exists(conn, here):
                    continue
                if net in network_map:
                    raise Invalid("domain %s: network %s (--network-map %s=%s) does not exist "
                                  "on this site; nothing was started" % (
                                      d["name"], here, net, here))
                raise Invalid("domain %s: network %s does not exist on this site: name one "
                              "that does with --network-map %s=NETWORK; nothing was started"
                              % (d["name"], net, net))


def ensure_isolated(uri: str) -> None:
    """Make ``xml.ISOLATED`` unless it exists (and runs)."""
    lv = _libvirt()
    with connection(uri) as conn:
        try:
            net = conn.networkLookupByName(xml.ISOLATED)
            if not net.isActive():
                net.create()
            return
        except lv.libvirtError as e:
            if e.get_error_code() != lv.VIR_ERR_NO_NETWORK:
                raise Unavailable("network %s: %s" % (xml.ISOLATED, _msg(e))) from None
        try:
            conn.networkCreateXML(ISOLATED_XML)
        except lv.libvirtError as e:
            if _exists(conn, xml.ISOLATED):
                return  # another test failover made it meanwhile
            raise Unavailable("cannot make network %s for test VMs: %s"
                              % (xml.ISOLATED, _msg(e))) from None
        log.info("network %s made for test failovers (isolated, transient)", xml.ISOLATED)


def drop_isolated(uri: str) -> bool:
    """Destroy ``xml.ISOLATED`` if Ferry made it and no running domain names it; whether
    it did. A failure is logged: the test VMs are gone either way."""
    lv = _libvirt()
    with connection(uri) as conn:
        try:
            net = conn.networkLookupByName(xml.ISOLATED)
            if net.isPersistent():
                return False  # the administrator's
            for dom in conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                if xml.ISOLATED in xml.networks(dom.XMLDesc(0)):
                    return False
            net.destroy()
        except lv.libvirtError as e:
            if e.get_error_code() == lv.VIR_ERR_NO_NETWORK:
                return False
            log.warning("network %s not removed: %s", xml.ISOLATED, _msg(e))
            return False
    log.info("network %s removed: no test VM uses it", xml.ISOLATED)
    return True
