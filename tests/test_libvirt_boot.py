"""A failover's VMs on site B with the real libvirt daemon (issue 11; agent/domains/vms.py,
networks.py): the boot order and delay between a group's VMs, as the daemon's qemu processes
started; a test VM whose network site B lacks starts on Ferry's isolated network, removed
with the last test VM; a live failover whose VMs name a network site B lacks is refused
before anything starts. The guests are firmware only (no bootable disk): cheap under TCG."""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator, Optional

import libvirt
import pytest
from conftest import Lab
from libvirt_lab import Libvirtd
from test_libvirt import VirtLab, libvirtd

from agent.domains import xml

pytestmark = pytest.mark.once  # the first CI pass only (.ci/run)

__all__ = ["libvirtd"]  # the module's daemon fixture, used by name
NIC = "<interface type='network'><source network='%s'/><model type='virtio'/></interface>"


def firmware_domain(name: str, disk: Path, nic: str = "") -> str:
    """A ``type='qemu'`` domain with one disk and no kernel: SeaBIOS finds nothing to boot
    and waits, which is all a start needs."""
    return """<domain type='qemu'>
  <name>%s</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='%s'/><target dev='vda' bus='virtio'/></disk>
    %s
  </devices>
</domain>""" % (name, disk, nic)


@pytest.fixture
def virt(lab: Lab, libvirtd: Libvirtd) -> Iterator[VirtLab]:
    v = VirtLab(lab, libvirtd)
    try:
        yield v
    finally:
        v.close()
        for name in ("vm1-test", "vm2-test", "vm1-dr", "vm2-dr"):
            try:
                dom = v.daemon.connect().lookupByName(name)
                dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass


def qemu_started(name: str) -> Optional[float]:
    """When the qemu process of domain ``name`` started (seconds since boot), None if none."""
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                args = f.read().split(b"\0")
            with open("/proc/%s/stat" % pid) as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if ("guest=%s," % name).encode() in b" ".join(args) or \
                any(a == ("guest=%s" % name).encode() for a in args):
            return int(stat[19]) / tick  # field 22: starttime
    return None


def test_boot_order_delay_and_the_isolated_network_of_test_vms(virt: VirtLab) -> None:
    lab = virt.lab
    for name, nic in (("vm1", NIC % "prodnet"), ("vm2", "")):  # prodnet: on A only
        dom = virt.conn.defineXML(firmware_domain(name, virt.image(name + ".img", 4 << 20),
                                                  nic))
        virt.defined.append(dom)
    lab.a.ferry("protect", "g1", "--domain", "vm1", "--domain", "vm2", "--target",
                lab.b.address)
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    lab.a.ferry("checkpoint", "g1", "--tag", "synced")  # a point the failovers start from
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    with pytest.raises(libvirt.libvirtError):
        virt.conn.networkLookupByName("prodnet")
    # A live failover would start vm1 on a network this site lacks: refused, nothing starts.
    r = lab.b.ferry("failover", "g1", "--live", "--vm-suffix", "-dr", "--no-progress",
                    check=False)
    assert r.returncode != 0, r.stdout
    assert r.stderr.strip().splitlines() == [
        "ferry: error: domain vm1: network prodnet does not exist on this site: name one "
        "that does with --network-map prodnet=NETWORK; nothing was started"], r.stderr
    r = lab.b.ferry("failover", "g1", "--live", "--network-map", "prodnet=drnet",
                    "--vm-suffix", "-dr", "--no-progress", check=False)
    assert "network drnet (--network-map prodnet=drnet) does not exist" in r.stderr, r.stderr
    assert not [d for d in virt.conn.listAllDomains() if d.name().endswith("-dr")]
    assert lab.b.status("g1")["replicas"]["g1"]["state"] != "failed-over"
    # Test failover: vm2 first, then vm1 three seconds later, vm1 on the isolated network.
    out = lab.b.ferry("failover", "g1", "--test", "--boot-order", "vm2,vm1",
                      "--boot-delay", "3", "--no-progress").stdout
    assert "domain vm1-test\tstarted" in out and "domain vm2-test\tstarted" in out, out
    first, second = qemu_started("vm2-test"), qemu_started("vm1-test")
    assert first is not None and second is not None
    assert second - first >= 3 - 0.02, (first, second)  # clock ticks: 10 ms
    net = virt.conn.networkLookupByName(xml.ISOLATED)
    defined = ET.fromstring(net.XMLDesc(0))
    assert not net.isPersistent() and defined.find("forward") is None \
        and defined.find("ip") is None
    iface = ET.fromstring(virt.conn.lookupByName("vm1-test").XMLDesc(0)).find(
        "./devices/interface")
    assert iface.find("source").get("network") == xml.ISOLATED
    assert iface.find("link").get("state") == "down"
    lab.b.ferry("failover", "g1", "--stop-test", "--no-progress")
    for name in ("vm1-test", "vm2-test"):
        with pytest.raises(libvirt.libvirtError):
            virt.conn.lookupByName(name)
    deadline = time.monotonic() + 10
    with pytest.raises(libvirt.libvirtError):
        while time.monotonic() < deadline:  # gone with its last test VM
            virt.conn.networkLookupByName(xml.ISOLATED)
            time.sleep(0.2)


TEST_URI = "test:///default"  # libvirt's own in-process driver: shared while one is open
TEST_DOMAIN = ("<domain type='test'><name>%s</name><memory>1024</memory><os><type>hvm</type>"
               "</os><devices>" + NIC + "</devices></domain>")


def test_the_isolated_network_is_made_kept_while_used_and_an_administrators_left_alone(
        ) -> None:
    from agent.domains import networks
    keep = libvirt.open(TEST_URI)
    try:
        networks.ensure_isolated(TEST_URI)
        networks.ensure_isolated(TEST_URI)  # there already: used as it is
        assert not keep.networkLookupByName(xml.ISOLATED).isPersistent()
        user = keep.createXML(TEST_DOMAIN % ("t1", xml.ISOLATED), 0)
        assert networks.drop_isolated(TEST_URI) is False  # a running domain names it
        user.destroy()
        assert networks.drop_isolated(TEST_URI) is True
        with pytest.raises(libvirt.libvirtError):
            keep.networkLookupByName(xml.ISOLATED)
        assert networks.drop_isolated(TEST_URI) is False  # none to drop
        mine = keep.networkDefineXML(networks.ISOLATED_XML)  # an administrator's, stopped
        try:
            networks.ensure_isolated(TEST_URI)
            assert mine.isActive() and networks.drop_isolated(TEST_URI) is False
        finally:
            mine.destroy()
            mine.undefine()
    finally:
        keep.close()


def test_a_network_site_b_lacks_is_named_with_the_option_that_maps_it() -> None:
    from agent.domains import networks
    from agent.errors import Invalid
    keep = libvirt.open(TEST_URI)
    try:
        doms = [{"name": "vm1", "xml": TEST_DOMAIN % ("vm1", "prodnet")}]
        with pytest.raises(Invalid, match=r"^domain vm1: network prodnet does not exist on "
                           r"this site: name one that does with --network-map "
                           r"prodnet=NETWORK; nothing was started$"):
            networks.check(TEST_URI, doms, {}, test=False)
        with pytest.raises(Invalid, match=r"^domain vm1: network nosuch \(--network-map "
                           r"prodnet=nosuch\) does not exist on this site"):
            networks.check(TEST_URI, doms, {"prodnet": "nosuch"}, test=True)
        networks.check(TEST_URI, doms, {"prodnet": "default"}, test=False)
        networks.check(TEST_URI, doms, {}, test=True)  # unmapped: the isolated network
    finally:
        keep.close()


def _on(conn: object):
    """``networks.connection`` replaced by one yielding ``conn``: a real libvirt
    connection in a state that makes the daemon refuse (read-only, or closed)."""
    import contextlib

    @contextlib.contextmanager
    def connection(uri: str) -> Iterator[object]:
        yield conn
    return connection


def test_libvirt_refusing_the_isolated_network_is_one_line_or_a_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from agent.domains import networks
    from agent.errors import Unavailable
    keep = libvirt.open(TEST_URI)
    ro = libvirt.openReadOnly(TEST_URI)
    try:
        # A read-only connection sees no network, and may not make one.
        monkeypatch.setattr(networks, "connection", _on(ro))
        with pytest.raises(Unavailable, match=r"^cannot make network %s for test VMs: .+"
                           % xml.ISOLATED):
            networks.ensure_isolated(TEST_URI)
        # Made by a writer, it cannot be destroyed through a read-only one: logged.
        monkeypatch.setattr(networks, "connection", _on(keep))
        networks.ensure_isolated(TEST_URI)
        monkeypatch.setattr(networks, "connection", _on(ro))
        assert networks.drop_isolated(TEST_URI) is False
        assert "network %s not removed: " % xml.ISOLATED in caplog.text
        keep.networkLookupByName(xml.ISOLATED).destroy()
        # Any error but "no such network" is the daemon's, named.
        gone = libvirt.open(TEST_URI)
        gone.close()
        monkeypatch.setattr(networks, "connection", _on(gone))
        doms = [{"name": "vm1", "xml": TEST_DOMAIN % ("vm1", "prodnet")}]
        with pytest.raises(Unavailable, match=r"^network prodnet: .+"):
            networks.check(TEST_URI, doms, {}, test=False)
        with pytest.raises(Unavailable, match=r"^network %s: .+" % xml.ISOLATED):
            networks.ensure_isolated(TEST_URI)
    finally:
        ro.close()
        keep.close()
