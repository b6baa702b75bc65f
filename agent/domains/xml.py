"""A libvirt domain's XML, read and rewritten for Ferry: plain logic, no libvirt calls.

``writable_disks`` names the disks a domain writes (file and block disks, not read-only,
not CD-ROMs), or refuses, by name, a disk Ferry cannot put a splitter in front of (a
network or volume disk, a qcow2 image whose file grows under a fixed-size export).
``attach`` points those disks at their splitters' NBD Unix sockets
(``<disk type='network'><source protocol='nbd'><host transport='unix' socket=.../>``);
``detach`` puts back each disk's original ``<disk>`` element where the disk still points at
Ferry's socket, and leaves any other change made to the domain meanwhile as it is.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, List

from ..errors import Invalid

ISOLATED = "ferry-isolated"  # test failovers' network on site B (networks.py)


@dataclass(frozen=True)
class DomainDisk:
    dev: str       # the guest's target device: vda, sdb
    kind: str      # file | block
    path: str      # the image file or block device
    element: str   # the original <disk> element, as libvirt gave it


def _parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as e:
        raise Invalid("domain XML does not parse: %s" % e) from None


def domain_name(xml: str) -> str:
    return _parse(xml).findtext("name") or "?"


def writable_disks(xml: str) -> List[DomainDisk]:
    """The disks the domain writes, in XML order; Invalid names the first that Ferry
    cannot protect."""
    root = _parse(xml)
    name = root.findtext("name") or "?"
    out = []
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if not dev:
            raise Invalid("domain %s: a disk without <target dev=...>" % name)
        if disk.get("device", "disk") not in ("disk", "lun"):
            continue  # cdrom, floppy: never written
        if disk.find("readonly") is not None:
            continue
        kind = disk.get("type", "file")
        source = disk.find("source")
        host = source.find("host[@transport='unix']") if source is not None else None
        if kind == "network" and source is not None and source.get("protocol") == "nbd" \
                and host is not None:
            raise Invalid("domain %s disk %s already reads an NBD socket (%s): is it "
                          "protected already?" % (name, dev, host.get("socket")))
        if kind not in ("file", "block"):
            raise Invalid("domain %s disk %s is a %s disk: Ferry protects image files and "
                          "block devices" % (name, dev, kind))
        path = source.get("file" if kind == "file" else "dev") if source is not None else None
        if not path:
            raise Invalid("domain %s disk %s has no source (an empty drive)" % (name, dev))
        driver = disk.find("driver")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        if fmt != "raw":
            raise Invalid("domain %s disk %s is a %s image (%s): Ferry protects raw images "
                          "and block devices" % (name, dev, fmt, path))
        if disk.find("shareable") is not None:
            raise Invalid("domain %s disk %s is shareable: a disk other domains write "
                          "cannot be protected through one of them" % (name, dev))
        out.append(DomainDisk(dev, kind, path, ET.tostring(disk, encoding="unicode")))
    return out


def same(a: str, b: str) -> bool:
    """The two definitions say the same (quoting, attribute order and blank text aside)."""
    def canonical(text: str) -> str:
        return ET.canonicalize(text, strip_text=True)
    try:
        return canonical(a) == canonical(b)
    except ET.ParseError:
        return a == b


def disk_devs(xml: str) -> List[str]:
    """The target devs of all the domain's disks."""
    return [t.get("dev", "") for t in _parse(xml).findall("./devices/disk/target")]


def attach(xml: str, sockets: Dict[str, str]) -> str:
    """The domain with each disk of ``sockets`` ({dev: socket path}) read over NBD."""
    root = _parse(xml)
    done = set()
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in sockets:
            continue
        disk.set("type", "network")
        for child in list(disk):
            if child.tag in ("source", "backingStore"):
                disk.remove(child)
        source = ET.Element("source", {"protocol": "nbd"})
        ET.SubElement(source, "host", {"transport": "unix", "socket": sockets[dev]})
        index = 1 if disk.find("driver") is not None else 0
        disk.insert(index, source)
        done.add(dev)
    missing = sorted(set(sockets) - done)
    if missing:
        raise Invalid("domain %s has no disk %s" % (root.findtext("name"), missing[0]))
    return ET.tostring(root, encoding="unicode")


def detach(xml: str, originals: Dict[str, str], sockets: Dict[str, str]) -> str:
    """The domain with each disk that reads its Ferry socket ({dev: socket}) put back as
    ``originals`` ({dev: <disk> element}) says."""
    root = _parse(xml)
    devices = root.find("devices")
    if devices is None:
        return xml
    for i, disk in enumerate(list(devices)):
        if disk.tag != "disk":
            continue
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        host = disk.find("source/host")
        if dev in originals and host is not None and host.get("socket") == sockets.get(dev):
            devices.remove(disk)
            devices.insert(i, ET.fromstring(originals[dev]))
    return ET.tostring(root, encoding="unicode")


def recovered(xml: str, name: str, sockets: Dict[str, str], test: bool,
              network_map: Dict[str, str]) -> str:
    """A domain's definition for site B: named ``name``, without its UUID (libvirt makes
    one), each disk of ``sockets`` on its export there, and its network interfaces mapped
    (``network_map``: a network or bridge of site A to one of site B). In a test, an
    interface that is not mapped is unplugged (``<link state='down'/>``) and put on
    ``ISOLATED`` (a network Ferry defines on site B, ``networks.py``; no tap name of its own):
    a test failover runs isolated unless a network is named for it, and starts whether or
    not site A's network exists on site B."""
    root = _parse(attach(xml, sockets))
    name_el = root.find("name")
    if name_el is None:
        name_el = ET.SubElement(root, "name")
    name_el.text = name
    for uuid in root.findall("uuid"):
        root.remove(uuid)
    for iface in root.findall("./devices/interface"):
        source = iface.find("source")
        attr = {"network": "network", "bridge": "bridge"}.get(iface.get("type", ""))
        here = source.get(attr) if source is not None and attr else None
        if here is not None and here in network_map and source is not None and attr:
            source.set(attr, network_map[here])
        elif test:
            for child in iface.findall("link") + iface.findall("source") + \
                    iface.findall("target") + iface.findall("virtualport"):
                iface.remove(child)
            iface.set("type", "network")
            ET.SubElement(iface, "source", {"network": ISOLATED})
            ET.SubElement(iface, "link", {"state": "down"})
    return ET.tostring(root, encoding="unicode")


def networks(xml: str) -> List[str]:
    """The libvirt networks (``<interface type='network'>``) a definition names, in order."""
    out: List[str] = []
    for iface in _parse(xml).findall("./devices/interface[@type='network']"):
        source = iface.find("source")
        name = source.get("network") if source is not None else None
        if name and name not in out:
            out.append(name)
    return out
