"""libvirt domains as the unit (issue 11): a real libvirtd (tests/libvirt_lab.py) running the
lab's busybox guest as a ``type='qemu'`` domain, real splitters, real agents."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import libvirt
import pytest
from conftest import LAB_CACHE, Lab, first_difference, same_bytes
from libvirt_lab import Libvirtd, copy_readable, domain_xml, wait_shut_off

from agent import inuse
from agent.domains import record, xml
from agent.errors import Conflict, Invalid, StorageError
from agent.source.splitters import SplitterError, share_socket
from lab.initramfs import build_initramfs
from lab.kernel import ensure_kernel
from lab.sites import FERRY

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent

WRITE_PATTERN = """
dd if=/dev/urandom of=/dev/vda bs=64k count=100 seek=3 conv=fsync 2>/dev/null
echo ferry-pattern | dd of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null
sync
echo guest-wrote
"""


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    short = Path(os.path.join("/tmp", "lv%d" % os.getpid()))  # socket paths stay short
    short.mkdir(exist_ok=True)
    daemon = Libvirtd(short, REPO / ".cache" / "libvirt")
    (REPO / ".cache" / "libvirt").mkdir(parents=True, exist_ok=True)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        subprocess.run(["rm", "-rf", str(short)], check=False)


class VirtLab:
    """Two sites, site A's agent told the private libvirt's URI and to share its splitter
    sockets with qemu's group (kvm), and the lab guest's kernel where qemu can read it."""

    def __init__(self, lab: Lab, daemon: Libvirtd, share: bool = True) -> None:
        self.lab = lab
        self.daemon = daemon
        os.chmod(lab.root, 0o755)  # libvirt-qemu must reach site A's run/ directory
        self.images = lab.root / "images"
        self.images.mkdir(mode=0o755)
        self.kernel = copy_readable(ensure_kernel(LAB_CACHE), self.images)
        self.conn = daemon.connect()
        self.defined: list = []
        for site in (lab.a, lab.b):  # B: a failover starts the domains there
            site.extra_args += ["--libvirt-uri", daemon.uri]
            if share:
                site.extra_args += ["--splitter-socket-group", "kvm"]
        lab.a.image_roots.append(self.images)  # the domains' images live here
        lab.b.start()
        lab.a.start()

    def image(self, name: str, size: int = 64 * MiB) -> Path:
        path = self.images / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def define(self, name: str, script: str, disks: list, agent: bool = False) -> object:
        initrd = copy_readable(build_initramfs(  # (qemu-ga: where the host has it)
            LAB_CACHE, script, extra_tools=("qemu-ga",) if agent else ()), self.images)
        dom = self.conn.defineXML(domain_xml(name, self.kernel, initrd, disks,
                                             self.images / (name + ".console"),
                                             agent=agent))
        self.defined.append(dom)
        return dom

    def console(self, name: str) -> str:
        return (self.images / (name + ".console")).read_text(errors="replace")

    def close(self) -> None:
        for dom in self.defined:
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except Exception:
                pass
        self.conn.close()


@pytest.fixture
def virt(lab: Lab, libvirtd: Libvirtd) -> Iterator[VirtLab]:
    v = VirtLab(lab, libvirtd)
    try:
        yield v
    finally:
        v.close()


def disk_sources(dom) -> dict:
    """{dev: (type, file or socket)} of a domain's persistent definition."""
    import xml.etree.ElementTree as ET
    root = ET.fromstring(dom.XMLDesc(2))  # VIR_DOMAIN_XML_INACTIVE
    out = {}
    for disk in root.findall("./devices/disk"):
        src = disk.find("source")
        host = src.find("host") if src is not None else None
        out[disk.find("target").get("dev")] = (
            disk.get("type"), host.get("socket") if host is not None else src.get("file"))
    return out


@pytest.mark.guest
def test_offline_domain_protected_its_guest_writes_replicated_and_unprotect_restores(
        virt: VirtLab) -> None:
    lab = virt.lab
    disk = virt.image("vm1-vda.img")
    dom = virt.define("vm1", WRITE_PATTERN, [disk])
    before = dom.XMLDesc(2)
    out = lab.a.ferry("protect", "g1", "--domain", "vm1", "--target", lab.b.address).stdout
    lines = dict(line.split("\t") for line in out.strip().splitlines())
    assert lines["domain vm1"] == "attached (offline)"
    kind, sock = disk_sources(dom)["vda"]
    assert kind == "network" and lines["vda"].endswith("socket=" + sock)
    assert oct(os.stat(sock).st_mode & 0o777) == "0o660"
    dom.create()
    wait_shut_off(dom, 240)
    assert "guest-wrote" in virt.console("vm1"), virt.console("vm1")[-2000:]
    assert "FERRY-GUEST-EXIT 0" in virt.console("vm1")
    with open(disk, "rb") as f:
        f.seek(512)
        assert f.read(14) == b"ferry-pattern\n"  # written through the splitter
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    restored = lab.restore("g1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)
    status = lab.a.status("g1")["groups"]["g1"]
    assert list(status["disks"]) == ["vda"]
    result = json.loads(lab.a.ferry("unprotect", "g1", "--json").stdout)
    assert result["domains"] == ["vm1"]
    assert disk_sources(dom) == {"vda": ("file", str(disk))}
    assert xml.writable_disks(dom.XMLDesc(2)) == xml.writable_disks(before)
    assert not (lab.a.data / "domains" / "g1.json").exists()


# Writes the pattern, unless the disk has it already (the domain started on site B).
WRITE_ONCE = """
if dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | grep -q ferry-pattern; then
    echo seen-on-site-b
else
""" + WRITE_PATTERN + """
fi
"""


@pytest.mark.guest
def test_test_failover_starts_the_domain_on_site_b_on_the_view_and_stop_test_removes_it(
        virt: VirtLab) -> None:
    lab = virt.lab
    disk = virt.image("vm7-vda.img")
    dom = virt.define("vm7", WRITE_ONCE, [disk])
    lab.a.ferry("protect", "g7", "--domain", "vm7", "--target", lab.b.address)
    dom.create()
    wait_shut_off(dom, 240)
    assert "guest-wrote" in virt.console("vm7"), virt.console("vm7")[-2000:]
    lab.a.ferry("wait", "g7", "--synced", "--timeout", "120")
    kept = list(lab.b.data.rglob("domains.json"))  # the definition travelled with the group
    assert len(kept) == 1 and json.loads(kept[0].read_text())[0]["disks"] == {"vda": "vda"}
    out = lab.b.ferry("failover", "g7", "--test", "--no-progress").stdout
    assert "domain vm7-test\tstarted" in out, out
    copy = virt.conn.lookupByName("vm7-test")
    assert copy.UUIDString() != dom.UUIDString()
    wait_shut_off(copy, 240)
    console = virt.console("vm7")  # (the copy's serial console is the same file)
    assert "seen-on-site-b" in console and "FERRY-GUEST-EXIT 0" in console, console[-2000:]
    out = lab.b.ferry("failover", "g7", "--stop-test", "--no-progress").stdout
    assert "stopped" in out
    with pytest.raises(libvirt.libvirtError):
        virt.conn.lookupByName("vm7-test")
    assert virt.conn.lookupByName("vm7").UUIDString() == dom.UUIDString()  # A's untouched
    # A boot order naming a domain the group does not have is refused before any start.
    r = lab.b.ferry("failover", "g7", "--test", "--boot-order", "nosuch", "--no-progress",
                    check=False)
    assert r.returncode != 0 and "the group has no domain nosuch" in r.stderr, r.stderr
    r = lab.b.ferry("failover", "g7", "--stop-test", "--no-progress", check=False)
    assert "has no test failover running" in r.stderr, r.stderr  # none was opened
    # A domain that cannot start here (its kernel is not on site B): named, the test ends.
    kernel = virt.kernel.rename(virt.kernel.with_suffix(".away"))
    try:
        r = lab.b.ferry("failover", "g7", "--test", "--no-progress", check=False)
    finally:
        kernel.rename(virt.kernel)
    assert r.returncode != 0 and "domain vm7-test: cannot start" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(libvirt.libvirtError):
        virt.conn.lookupByName("vm7-test")
    r = lab.b.ferry("failover", "g7", "--stop-test", "--no-progress", check=False)
    assert "has no test failover running" in r.stderr, r.stderr
    # Live (named apart: both sites share this libvirtd), then rolled back: removed.
    (virt.images / "vm7.console").write_text("")
    out = lab.b.ferry("failover", "g7", "--live", "--vm-suffix", "-dr", "--no-progress").stdout
    assert "domain vm7-dr\tstarted" in out, out
    wait_shut_off(virt.conn.lookupByName("vm7-dr"), 240)
    assert "seen-on-site-b" in virt.console("vm7"), virt.console("vm7")[-2000:]
    lab.b.ferry("failover", "g7", "--rollback", "--no-progress")
    with pytest.raises(libvirt.libvirtError):
        virt.conn.lookupByName("vm7-dr")


@pytest.mark.guest
def test_an_image_a_running_domain_has_open_is_refused(virt: VirtLab) -> None:
    lab = virt.lab
    disk = virt.image("vm2-vda.img")
    dom = virt.define("vm2", "sleep 300\n", [disk])
    dom.create()
    qemu_pid = None
    deadline = time.monotonic() + 60
    while qemu_pid is None and time.monotonic() < deadline:
        found = inuse.holders(os.stat(disk))
        qemu_pid = next((p for p, comm in found if comm.startswith("qemu")), None)
        time.sleep(0.2)
    assert qemu_pid is not None
    proc = lab.a.ferry("protect", "g2", "--disk", "vda=%s" % disk, "--target", lab.b.address,
                       check=False)
    assert proc.returncode == 4, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1
    assert str(disk) in err and "pid %d" % qemu_pid in err and "in use" in err
    assert "g2" not in lab.a.status()["groups"]


# The guest writes 4 KiB blocks with fsync for 40 s of its uptime, and reports the longest
# gap between two writes (centiseconds) and the number of writes.
WRITE_LOOP = """
start=$(cut -d' ' -f1 /proc/uptime | tr -d .)
prev=$start; max=0; n=0
echo loop-start
while [ $((prev - start)) -lt 4000 ]; do
    dd if=/dev/urandom of=/dev/vda bs=4k count=1 seek=$((n % 4000 * 3)) conv=fsync 2>/dev/null
    now=$(cut -d' ' -f1 /proc/uptime | tr -d .)
    gap=$((now - prev))
    if [ $gap -gt $max ]; then max=$gap; fi
    prev=$now
    n=$((n + 1))
done
sync
echo "loop-done writes $n longest-gap-cs $max elapsed-cs $((prev - start))"
"""


@pytest.mark.guest
def test_running_domain_attached_live_while_it_writes_replica_identical(
        virt: VirtLab) -> None:
    lab = virt.lab
    disk = virt.image("vm6-vda.img")
    with open(disk, "r+b") as f:  # something written before Ferry came: the sync must ship it
        f.write(b"before-ferry" * 1000)
    dom = virt.define("vm6", WRITE_LOOP, [disk])
    dom.create()
    deadline = time.monotonic() + 120
    while "loop-start" not in virt.console("vm6"):
        assert time.monotonic() < deadline, virt.console("vm6")[-2000:]
        time.sleep(0.1)
    time.sleep(3)
    started = time.monotonic()
    result = json.loads(lab.a.ferry("protect", "g6", "--domain", "vm6", "--target",
                                    lab.b.address, "--json").stdout)
    took = time.monotonic() - started
    assert result["domains"]["vm6"]["attached"] == "live"
    live = disk_sources_live(dom)
    assert live["vda"][0] == "network", live
    assert disk_sources(dom)["vda"][0] == "network"  # and at the next boot
    wait_shut_off(dom, 300)
    console = virt.console("vm6")
    assert "FERRY-GUEST-EXIT 0" in console, console[-2000:]
    line = next(x for x in console.splitlines() if x.startswith("loop-done"))
    print("live attach: protect took %.2f s, pivot %.3f s; guest: %s" % (
        took, result["domains"]["vm6"]["pivot_seconds"], line))
    lab.a.ferry("wait", "g6", "--synced", "--timeout", "120")
    restored = lab.restore("g6", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)
    lab.a.ferry("unprotect", "g6")
    assert disk_sources(dom) == {"vda": ("file", str(disk))}


def disk_sources_live(dom) -> dict:
    import xml.etree.ElementTree as ET
    root = ET.fromstring(dom.XMLDesc(0))
    return {d.find("target").get("dev"): (d.get("type"),) for d in root.findall("./devices/disk")}


@pytest.mark.guest
def test_unprotect_of_a_running_domain_moves_it_back_live(virt: VirtLab) -> None:
    lab = virt.lab
    disk = virt.image("vm3-vda.img")
    dom = virt.define("vm3", WRITE_LOOP.replace("4000", "2500"), [disk])
    lab.a.ferry("protect", "g3", "--domain", "vm3", "--target", lab.b.address)
    dom.create()
    deadline = time.monotonic() + 120
    while "loop-start" not in virt.console("vm3"):
        assert time.monotonic() < deadline, virt.console("vm3")[-2000:]
        time.sleep(0.1)
    time.sleep(3)
    result = json.loads(lab.a.ferry("unprotect", "g3", "--json").stdout)
    assert result["domains"] == ["vm3"]
    assert disk_sources_live(dom)["vda"][0] == "file"
    assert disk_sources(dom) == {"vda": ("file", str(disk))}
    assert lab.a.splitter_pids() == []
    wait_shut_off(dom, 300)
    console = virt.console("vm3")
    assert "FERRY-GUEST-EXIT 0" in console and "I/O error" not in console, console[-2000:]
    print("live detach; guest: %s" % next(
        x for x in console.splitlines() if x.startswith("loop-done")))


@pytest.mark.guest
def test_a_live_attach_qemu_cannot_make_leaves_the_domain_on_its_image(
        lab: Lab, libvirtd: Libvirtd) -> None:
    virt = VirtLab(lab, libvirtd, share=False)  # the sockets stay root's: qemu cannot connect
    try:
        disk = virt.image("vm7-vda.img")
        dom = virt.define("vm7", "sleep 300\n", [disk])
        before = dom.XMLDesc(2)
        dom.create()
        deadline = time.monotonic() + 60
        while not any(c.startswith("qemu") for _p, c in inuse.holders(os.stat(disk))):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc = lab.a.ferry("protect", "g7", "--domain", "vm7", "--target", lab.b.address,
                           check=False)
        assert proc.returncode == 5, proc.stderr
        assert "domain vm7 disk vda: cannot start the copy" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert "g7" not in lab.a.status()["groups"]
        assert lab.a.splitter_pids() == []
        assert disk_sources_live(dom)["vda"][0] == "file" and dom.isActive()
        assert dom.XMLDesc(2) == before
        assert not (lab.a.data / "domains" / "g7.json").exists()
    finally:
        virt.close()


def test_protect_domain_errors(virt: VirtLab) -> None:
    lab = virt.lab
    a = lab.a

    def refused(*args: str) -> subprocess.CompletedProcess:
        proc = a.ferry("protect", "g4", *args, "--target", lab.b.address, check=False)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
        return proc

    assert refused("--domain", "nosuch").returncode == 3
    assert "no libvirt domain nosuch" in refused("--domain", "nosuch").stderr
    assert "give --disk or --domain" in refused().stderr
    assert "give --disk or --domain" in refused("--domain", "x", "--disk", "/dev/null").stderr
    assert "named twice" in refused("--domain", "x", "--domain", "x").stderr
    virt.define("vm4", "true\n", [])
    assert "domain vm4 has no writable disk" in refused("--domain", "vm4").stderr
    qcow = virt.images / "vm5.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "16M"], check=True)
    text = domain_xml("vm5", virt.kernel, virt.kernel, [qcow], virt.images / "c5")
    virt.defined.append(virt.conn.defineXML(text.replace("type='raw'", "type='qcow2'")))
    proc = refused("--domain", "vm5")
    assert proc.returncode == 1 and "qcow2 image" in proc.stderr
    assert "g4" not in a.status()["groups"]
    body = {"name": "g4", "target": lab.b.address, "domains": ["vm4"], "disks": []}
    with pytest.raises(Invalid, match="domains or disks"):
        a.api("POST", "/v1/groups", body)
    with pytest.raises(Invalid, match="list of domain names"):
        a.api("POST", "/v1/groups", {"name": "g4", "target": "x", "domains": "vm4"})
    with pytest.raises(Invalid, match="name is required"):
        a.api("POST", "/v1/groups", {"target": "x", "domains": ["vm4"]})


def test_a_group_whose_domain_was_undefined_can_still_be_unprotected(virt: VirtLab) -> None:
    lab = virt.lab
    disk = virt.image("vm8-vda.img")
    dom = virt.define("vm8", "true\n", [disk])
    lab.a.ferry("protect", "g8", "--domain", "vm8", "--target", lab.b.address)
    dom.undefine()
    virt.defined.remove(dom)
    result = json.loads(lab.a.ferry("unprotect", "g8", "--json").stdout)
    assert result["group"] == "g8" and result["domains"] == ["vm8"]
    assert "g8" not in lab.a.status()["groups"]
    assert "domain vm8 is gone" in lab.a.log.read_text()


def test_without_libvirt_python_a_domain_is_refused_by_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.domains import hypervisor
    from agent.errors import Unavailable
    monkeypatch.setitem(sys.modules, "libvirt", None)  # import libvirt raises ImportError
    with pytest.raises(Unavailable, match="apt-get install python3-libvirt"):
        with hypervisor.connection("qemu:///system"):
            pass


def test_a_libvirt_that_cannot_be_reached_is_named(lab: Lab, tmp_path: Path) -> None:
    lab.a.extra_args += ["--libvirt-uri", "qemu+unix:///system?socket=%s/none" % tmp_path]
    lab.b.start()
    lab.a.start()
    proc = lab.a.ferry("protect", "g", "--domain", "vm", "--target", lab.b.address,
                       check=False)
    assert proc.returncode == 5, proc.stderr
    assert "cannot connect to libvirt at qemu+unix" in proc.stderr


def test_an_unknown_splitter_socket_group_is_refused(lab: Lab) -> None:
    lab.a.data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([*FERRY, "agent",
                           "--data", str(lab.a.data), "--splitter-socket-group", "nosuchgrp"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 1
    assert "--splitter-socket-group nosuchgrp: no such group" in proc.stderr
    with pytest.raises(SplitterError, match="no group nosuchgrp"):
        share_socket(str(lab.a.data / "x.sock"), "nosuchgrp")


# -- the domain XML, without libvirt --------------------------------------------------

def _domain(*disks: str) -> str:
    return "<domain type='qemu'><name>d</name><devices>%s</devices></domain>" % "".join(disks)


FILE_DISK = ("<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
             "<source file='/img/a.img'/><target dev='vda' bus='virtio'/></disk>")


def test_writable_disks_skip_what_is_never_written_and_refuse_what_cannot_be_protected(
        ) -> None:
    cdrom = ("<disk type='file' device='cdrom'><source file='/x.iso'/>"
             "<target dev='sda'/><readonly/></disk>")
    ro = ("<disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdc'/>"
          "<readonly/></disk>")
    blk = "<disk type='block' device='disk'><source dev='/dev/sdy'/><target dev='vdb'/></disk>"
    found = xml.writable_disks(_domain(FILE_DISK, cdrom, ro, blk))
    assert [(d.dev, d.kind, d.path) for d in found] == [
        ("vda", "file", "/img/a.img"), ("vdb", "block", "/dev/sdy")]
    bad = {
        "network disk": "<disk type='network'><source protocol='iscsi' name='x'/>"
                        "<target dev='vda'/></disk>",
        "already reads an NBD socket": "<disk type='network'><source protocol='nbd'>"
                                       "<host transport='unix' socket='/s'/></source>"
                                       "<target dev='vda'/></disk>",
        "no source": "<disk type='file'><target dev='vda'/></disk>",
        "qcow2 image": FILE_DISK.replace("type='raw'", "type='qcow2'"),
        "shareable": FILE_DISK.replace("</disk>", "<shareable/></disk>"),
        "without <target": "<disk type='file'><source file='/a'/></disk>",
    }
    for words, disk in bad.items():
        with pytest.raises(Invalid, match=words):
            xml.writable_disks(_domain(disk))
    with pytest.raises(Invalid, match="does not parse"):
        xml.writable_disks("<domain")


def test_attach_and_detach_round_trip_and_leave_other_changes_alone() -> None:
    text = _domain(FILE_DISK, FILE_DISK.replace("vda", "vdb").replace("a.img", "b.img"))
    disks = xml.writable_disks(text)
    attached = xml.attach(text, {"vda": "/run/1.sock"})
    assert "protocol=\"nbd\"" in attached and "/run/1.sock" in attached
    assert [d.dev for d in xml.writable_disks(attached.replace(
        "<source protocol=\"nbd\"><host transport=\"unix\" socket=\"/run/1.sock\" /></source>",
        "<source file='/x'/>").replace("type=\"network\"", "type=\"file\""))] == ["vda", "vdb"]
    with pytest.raises(Invalid, match="no disk vdz"):
        xml.attach(text, {"vdz": "/s"})
    back = xml.detach(attached, {"vda": disks[0].element}, {"vda": "/run/1.sock"})
    assert xml.writable_disks(back) == disks
    # A disk an administrator pointed elsewhere meanwhile stays as they left it.
    moved = attached.replace("/run/1.sock", "/elsewhere.sock")
    assert "/elsewhere.sock" in xml.detach(moved, {"vda": disks[0].element},
                                           {"vda": "/run/1.sock"})


def test_the_definition_for_site_b_is_renamed_on_its_exports_and_isolated_in_a_test(
        ) -> None:
    text = _domain("<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                   "<source file='/img/a.img'/><target dev='vda' bus='virtio'/></disk>"
                   "<interface type='network'><mac address='52:54:00:00:00:01'/>"
                   "<source network='prod'/><target dev='vnet7'/></interface>"
                   "<interface type='bridge'><source bridge='br0'/></interface>"
                   ).replace("<name>", "<uuid>6f1d3c1e-0000-4000-8000-000000000001</uuid>"
                             "<name>")
    out = xml.recovered(text, "vm1-test", {"vda": "/b/run/x.sock"}, True, {"br0": "br-dr"})
    root = ET.fromstring(out)
    assert root.findtext("name") == "vm1-test" and root.find("uuid") is None
    assert root.find("./devices/disk/source/host").get("socket") == "/b/run/x.sock"
    prod, bridge = root.findall("./devices/interface")
    assert prod.find("link").get("state") == "down" and prod.find("source").get(
        "network") == xml.ISOLATED and prod.find("mac") is not None  # unplugged, isolated
    assert prod.find("target") is None  # no tap name production may hold
    assert bridge.find("source").get("bridge") == "br-dr" and bridge.find("link") is None
    assert xml.networks(out) == [xml.ISOLATED] and xml.networks(text) == ["prod"]
    live = ET.fromstring(xml.recovered(text, "vm1", {"vda": "/s"}, False, {"prod": "dr"}))
    assert [i.find("link") for i in live.findall("./devices/interface")] == [None, None]
    assert live.find("./devices/interface/source").get("network") == "dr"


def test_open_carries_the_domains_and_refuses_what_does_not_fit_the_group() -> None:
    from agent.protocol import frames, messages
    doms = ({"name": "vm1", "xml": "<domain/>", "disks": {"vda": "vda"}},)
    opened = messages.Open("g", "p", (("vda", 4096),), domains=doms)
    assert messages.Open.parse(opened.body(), messages.Context()).domains == doms
    assert "domains" not in messages.Open("g", "p", (("vda", 4096),)).body()
    for bad, why in [([], "1 to 32 domains"), (["x"], "not a map"),
                     ([dict(doms[0], name="")], "bad domain name"),
                     ([dict(doms[0], xml="x" * (256 * 1024 + 1))], "definition is not"),
                     ([dict(doms[0], disks={"vda": "vdz"})], "must name disks of the group")]:
        body = dict(opened.body(), domains=bad)
        with pytest.raises(frames.ProtocolError, match=why):
            messages.Open.parse(body, messages.Context())


def test_failover_vm_options_and_unreadable_files_are_named(tmp_path: Path) -> None:
    from agent.domains import travel, vms
    assert vms._options({"mode": "test"})["suffix"] == "-test"
    assert vms._options({"mode": "live", "network_map": {"a": "b"}})["suffix"] == ""
    for bad, why in [({"vms": 1}, "vms is true or false"),
                     ({"network_map": {"a": 1}}, "network_map maps"),
                     ({"boot_order": "vm1"}, "boot_order is a list"),
                     ({"boot_delay": -1}, "boot_delay is 0 to"),
                     ({"vm_suffix": "a b"}, "vm_suffix is at most")]:
        with pytest.raises(Invalid, match=why):
            vms._options(dict(bad, mode="test"))
    with pytest.raises(Invalid, match="the group has no domain vm9"):
        vms._ordered([{"name": "vm1"}], ["vm9"])
    assert [d["name"] for d in vms._ordered([{"name": "a"}, {"name": "b"}, {"name": "c"}],
                                            ["c", "a"])] == ["c", "a", "b"]
    assert travel.load(str(tmp_path)) is None and vms._load(str(tmp_path)) == []
    (tmp_path / "domains.json").write_text("{")
    (tmp_path / "vms.json").write_text("[]")
    with pytest.raises(StorageError, match=r"domains\.json cannot be read"):
        travel.load(str(tmp_path))
    with pytest.raises(StorageError, match=r"vms\.json cannot be read"):
        vms._load(str(tmp_path))


def test_a_record_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    assert record.load(str(tmp_path), "g") is None
    record.save(str(tmp_path), "g", {"group": "g"})
    assert record.load(str(tmp_path), "g") == {"group": "g"}
    (tmp_path / "domains" / "g.json").write_text("{not json")
    with pytest.raises(StorageError, match=r"group g: domain record .* cannot be read"):
        record.load(str(tmp_path), "g")
    record.remove(str(tmp_path), "g")
    record.remove(str(tmp_path), "g")
    assert record.load(str(tmp_path), "g") is None


# -- in use -------------------------------------------------------------------------------

def test_a_file_another_process_locks_is_refused_naming_it(tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(b"\0" * 4096)
    inuse.refuse_if_in_use("vda", str(image))  # nobody holds it
    holder = subprocess.Popen(["flock", "-s", str(image), "sleep", "60"])
    try:
        deadline = time.monotonic() + 30
        while not inuse.holders(os.stat(image)) and time.monotonic() < deadline:
            time.sleep(0.05)
        # flock(2) is not a record lock: a qemu-style OFD lock is what counts
        inuse.refuse_if_in_use("vda", str(image))
    finally:
        holder.kill()
        holder.wait()
    fd = os.open(image, os.O_RDWR)
    try:
        fcntl.fcntl(fd, inuse.F_OFD_GETLK + 1,  # F_OFD_SETLK, as qemu takes its locks
                    struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 100, 1, 0))
        child = subprocess.run(
            [sys.executable, "-c", "import sys; sys.path.insert(0, %r); from agent import inuse; "
             "inuse.refuse_if_in_use('vda', %r)" % (str(REPO), str(image))],
            capture_output=True, text=True)
    finally:
        os.close(fd)
    assert child.returncode != 0
    assert "disk vda: %s is in use" % image in child.stderr
    assert "(pid %d)" % os.getpid() in child.stderr
    with pytest.raises(Conflict):
        _locked_by_child(image)


def test_a_block_device_held_exclusively_is_refused(tmp_path: Path) -> None:
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\0" * MiB)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                         text=True)
    if dev.returncode != 0:
        pytest.skip("no loop device here: %s" % dev.stderr.strip())
    loop = dev.stdout.strip()
    try:
        inuse.refuse_if_in_use("vdb", loop)  # nobody holds it
        code = ("import os, time; fd = os.open(%r, os.O_RDONLY | os.O_EXCL); "
                "print('held', flush=True); time.sleep(60)" % loop)
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                 text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "held"
            with pytest.raises(Conflict, match="disk vdb: %s is in use: python.*pid %d.* "
                               "open exclusively" % (loop, child.pid)):
                inuse.refuse_if_in_use("vdb", loop)
        finally:
            child.kill()
            child.wait()
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def _locked_by_child(image: Path) -> None:
    """A lock held by another process (a child holding an OFD lock) seen from here."""
    code = ("import fcntl, os, struct, time; fd = os.open(%r, os.O_RDWR); "
            "fcntl.fcntl(fd, 37, struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, 200, 1, 0)); "
            "print('locked', flush=True); time.sleep(60)" % str(image))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        inuse.refuse_if_in_use("vda", str(image))
    finally:
        child.kill()
        child.wait()


# -- live attach's error branches, against a domain that fails as libvirt would -----------

class FailingDomain:
    """A running domain's block-job interface, failing as ``script`` says: ``blockJobInfo``
    reports a copy that is ``ready`` or never is, a pivot answers ``not-ready`` (libvirt's
    VIR_ERR_BLOCK_COPY_ACTIVE) a number of times, then ``ok`` or ``refused``."""

    def __init__(self, libvirt, ready: bool, pivots: list) -> None:
        self.libvirt = libvirt
        self.ready = ready
        self.pivots = list(pivots)
        self.on = "image"  # where the guest's disk is: image | copying | export

    def error(self, code: int, text: str):
        err = self.libvirt.libvirtError(text)
        err.get_error_code = lambda: code
        err.get_error_message = lambda: text
        return err

    def blockCopy(self, dev, dest, params, flags):
        self.on = "copying"

    def blockJobInfo(self, dev, flags):
        return {"cur": 10, "end": 10 if self.ready else 20, "type": 2}

    def blockJobAbort(self, dev, flags):
        if flags & self.libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT:
            answer = self.pivots.pop(0)
            if answer == "not-ready":
                raise self.error(self.libvirt.VIR_ERR_BLOCK_COPY_ACTIVE, "not ready yet")
            if answer == "refused":
                raise self.error(self.libvirt.VIR_ERR_OPERATION_FAILED, "pivot refused")
            self.on = "export"
            return
        self.on = "image"


def test_live_copy_pivots_once_ready_and_leaves_the_guest_on_its_image_otherwise() -> None:
    import libvirt

    from agent.domains import live
    from agent.errors import TimedOut, Unavailable
    dest = live.nbd_disk_xml("/run/x.sock")
    dom = FailingDomain(libvirt, True, ["not-ready", "not-ready", "ok"])
    assert live.copy_and_pivot(libvirt, dom, "vm", "vda", dest) >= 0
    assert dom.on == "export" and dom.pivots == []
    dom = FailingDomain(libvirt, False, [])
    with pytest.raises(TimedOut, match="domain vm disk vda: the copy was not ready within"):
        live.copy_and_pivot(libvirt, dom, "vm", "vda", dest, timeout=0.2)
    assert dom.on == "image"
    dom = FailingDomain(libvirt, True, ["refused"])
    with pytest.raises(Unavailable, match="domain vm disk vda: pivot failed: pivot refused"):
        live.copy_and_pivot(libvirt, dom, "vm", "vda", dest)
    assert dom.on == "image"
    assert "socket='/run/x.sock'" in dest
    assert "<source dev='/dev/sdb'/>" in live.plain_disk_xml("block", "/dev/sdb")
