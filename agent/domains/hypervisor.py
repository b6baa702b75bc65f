"""The libvirt connection the agent reads and redefines domains through (blocking calls:
run them in a worker thread). Every libvirt failure becomes one ``FerryError`` line
naming the URI or the domain; libvirt-python is imported only when a domain is asked for,
so an agent on a host without libvirt runs as before."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ..errors import NotFound, Unavailable

DEFAULT_URI = "qemu:///system"


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise Unavailable("libvirt's Python binding is not installed (Debian: apt-get "
                          "install python3-libvirt)") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # raised, not printed
    return libvirt


def open_connection(uri: str) -> Any:
    libvirt = _libvirt()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise Unavailable("cannot connect to libvirt at %s: %s" % (uri, _msg(e))) from None


def close_connection(conn: Any) -> None:
    with contextlib.suppress(_libvirt().libvirtError):
        conn.close()


@contextlib.contextmanager
def connection(uri: str) -> Iterator[Any]:
    libvirt = _libvirt()
    conn = open_connection(uri)
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def _msg(e: Exception) -> str:
    get = getattr(e, "get_error_message", None)
    return (get() if get else None) or str(e) or type(e).__name__


class Domain:
    """One domain by name on a connection."""

    def __init__(self, conn: Any, name: str) -> None:
        libvirt = _libvirt()
        self.name = name
        self._libvirt = libvirt
        try:
            self.dom = conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound("no libvirt domain %s" % name) from None
            raise Unavailable("domain %s: %s" % (name, _msg(e))) from None
        self.conn = conn

    def running(self) -> bool:
        return bool(self.dom.isActive())

    def inactive_xml(self) -> str:
        """The persistent definition, secrets included (it is defined back as it was)."""
        lv = self._libvirt
        try:
            return str(self.dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE | lv.VIR_DOMAIN_XML_SECURE))
        except lv.libvirtError as e:
            raise Unavailable("domain %s: %s" % (self.name, _msg(e))) from None

    def live_xml(self) -> str:
        """The running definition (the disks qemu has now)."""
        lv = self._libvirt
        try:
            return str(self.dom.XMLDesc(lv.VIR_DOMAIN_XML_SECURE))
        except lv.libvirtError as e:
            raise Unavailable("domain %s: %s" % (self.name, _msg(e))) from None

    def uuid(self) -> str:
        return str(self.dom.UUIDString())

    def define(self, xml: str) -> None:
        lv = self._libvirt
        try:
            self.conn.defineXML(xml)
        except lv.libvirtError as e:
            raise Unavailable("domain %s: libvirt refused the new definition: %s"
                              % (self.name, _msg(e))) from None


class GuestAgent:
    """A running domain's file systems, frozen and thawed through its qemu guest agent
    (libvirt's ``virDomainFSFreeze``/``virDomainFSThaw``: ``guest-fsfreeze-freeze``/``-thaw``
    on the ``org.qemu.guest_agent.0`` channel). Thread-safe, as libvirt's calls are."""

    def __init__(self, domain: Domain) -> None:
        self.name = domain.name
        self._dom = domain.dom
        self._libvirt = domain._libvirt

    def freeze(self) -> int:
        try:
            return int(self._dom.fsFreeze())
        except self._libvirt.libvirtError as e:
            raise Unavailable("domain %s: cannot freeze its file systems through the qemu "
                              "guest agent: %s" % (self.name, _msg(e))) from None

    def thaw(self) -> int:
        try:
            return int(self._dom.fsThaw())
        except self._libvirt.libvirtError as e:
            raise Unavailable("domain %s: cannot thaw its file systems through the qemu "
                              "guest agent: %s" % (self.name, _msg(e))) from None
