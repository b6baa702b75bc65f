"""qcow2 and VMDK sources protected as their guests see them (real agents, nbdkit, qemu-nbd)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import Lab, same_bytes
from tests.test_replica_format import the_same
from tests.test_replication import error_line

MiB = 1024 * 1024


def run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "%s: %s%s" % (" ".join(cmd), proc.stdout, proc.stderr)
    return proc.stdout


def qemu_io(target: str, fmt: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, target)


def sources(work: Path) -> dict:
    """vda: qcow2 with data over a raw backing file with data; vdb, vdc: VMDKs."""
    base = work / "base.raw"
    run("qemu-img", "create", "-f", "raw", str(base), "16M")
    qemu_io(str(base), "raw", "write -P 0x11 0 4M")
    vda = work / "vda.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(vda), "16M")
    qemu_io(str(vda), "qcow2", "write -P 0x22 2M 4M")
    out = {"vda": vda}
    for name, sub in (("vdb", "monolithicSparse"), ("vdc", "monolithicFlat")):
        p = work / ("%s.vmdk" % name)
        run("qemu-img", "create", "-f", "vmdk", "-o", "subformat=" + sub, str(p), "8M")
        qemu_io(str(p), "vmdk", "write -P 0x33 1M 1M")
        out[name] = p
    return out


def test_qcow2_and_vmdk_sources_replicate_the_guest_disk(sites: Lab) -> None:
    disks = sources(sites.work)
    # Site B keeps its replicas as qcow2 too (issue 17), a journal of 1 byte: no history,
    # every record applied as it arrives, the replica always the newest point.
    uris = sites.protect("vm", *disks.values(), extra=(
        "--replica-format", "qcow2", "--history", "1s", "--journal-max", "1"))
    st = sites.a.status("vm")["groups"]["vm"]
    assert st["settings"]["formats"] == {"vda": "qcow2", "vdb": "vmdk", "vdc": "vmdk"}
    assert {n: d["format"] for n, d in st["disks"].items()} == {
        "vda": "qcow2", "vdb": "vmdk", "vdc": "vmdk"}
    assert st["disks"]["vda"]["size"] == 16 * MiB    # the virtual size, not the file's
    for uri in uris.values():   # the guest's view: raw, of the virtual size
        qemu_io(uri, "raw", "write -P 0x44 5M 1M", "write -z 7M 64k", "discard 1M 64k",
                "write -P 0x55 %d 4096" % (8 * MiB - 4096), "flush")
    qemu_io(uris["vda"], "raw", "read -P 0x11 0 1M", "read -P 0x22 2M 3M")
    # Concurrent writes, no flush (what a guest at queue depth 16 does): the pool's many
    # connections to qemu-nbd, each write still seen by the change log.
    run("fio", "--name=q", "--ioengine=nbd", "--uri=" + uris["vda"], "--rw=randwrite",
        "--bs=4k", "--iodepth=16", "--size=%d" % (8 * MiB), "--offset=%d" % (8 * MiB),
        "--io_size=%d" % (4 * MiB), "--randseed=7")
    sites.a.ferry("wait", "vm", "--synced", "--timeout", "120")
    restored = {name: sites.restore("vm", name) for name in disks}
    for name in disks:  # the replica, opened as a qcow2, catches up with the newest point
        image = sites.b.data / "target" / "vm" / "replicas" / ("%s.qcow2" % name)
        the_same(image, "qcow2", restored[name])
        run("qemu-img", "check", "-U", str(image))
    for fmt, extra in (("qcow2", ["--compress"]), ("qcow2", []), ("vmdk", []),
                       ("vmdk", ["--subformat", "streamOptimized"])):
        out = sites.work / ("vda-%s%s.img" % (fmt, "".join(extra)))
        line = sites.b.ferry("restore", "vm", "--disk", "vda", "--to", str(out),
                             "--format", fmt, *extra).stdout
        assert "(%s, %d bytes" % (fmt, 16 * MiB) in line, line
        run("qemu-img", "compare", "-f", "raw", "-F", fmt, str(restored["vda"]), str(out))
        info = run("qemu-img", "info", "--output=json", str(out))
        assert '"format": "%s"' % fmt in info
        if extra == ["--subformat", "streamOptimized"]:
            assert '"create-type": "streamOptimized"' in info
    line = error_line(sites.b.ferry("restore", "vm", "--disk", "vda", "--to", str(out),
                                    "--format", "qcow2", check=False))
    assert "already exists" in line
    line = error_line(sites.b.ferry("restore", "vm", "--disk", "vda", "--to",
                                    str(sites.work / "new.img"), "--format", "qcow2",
                                    "--subformat", "streamOptimized", check=False))
    assert "subformat 'streamOptimized' is not one of format qcow2's" in line, line
    line = error_line(sites.b.ferry("restore", "vm", "--disk", "vda", "--to",
                                    str(sites.work / "new.img"), "--format", "vmdk",
                                    "--compress", check=False))
    assert "--compress is for qcow2 only" in line, line
    assert not (sites.work / "new.img").exists()
    explicit = sites.work / "vda-explicit.raw"    # --format raw: the usual sparse copy
    sites.b.ferry("restore", "vm", "--disk", "vda", "--to", str(explicit), "--format", "raw")
    assert same_bytes(explicit, restored["vda"])
    sites.a.ferry("unprotect", "vm")  # qemu-nbd ends with the splitter: images unlocked
    for name, src in disks.items():
        fmt = "qcow2" if name == "vda" else "vmdk"
        run("qemu-img", "check", "-f", fmt, str(src))
        flat = sites.work / ("%s.converted.raw" % name)
        run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(src), str(flat))
        assert restored[name].stat().st_size == flat.stat().st_size
        assert same_bytes(restored[name], flat), name
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(restored[name]), str(flat))
    qemu_io(str(disks["vda"]), "qcow2", "read -P 0 1M 64k", "read -P 0x44 5M 1M")


def test_protect_refuses_what_it_cannot_protect(sites: Lab, tmp_path: Path) -> None:
    a, work = sites.a, sites.work
    vdi = work / "d.vdi"
    run("qemu-img", "create", "-f", "vdi", str(vdi), "4M")
    luks = work / "l.qcow2"
    luks.write_bytes(b"LUKS\xba\xbe\x00\x01" + bytes(4088))
    outside = tmp_path.parent / ("outside-%s.raw" % tmp_path.name)
    run("qemu-img", "create", "-f", "raw", str(outside), "4M")
    chained = work / "c.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", str(outside), "-F", "raw", str(chained), "4M")
    try:
        for path, words in ((vdi, "is a vdi image: Ferry protects raw, qcow2 and VMDK"),
                            (luks, "LUKS-encrypted"),
                            (chained, "(read by %s) is outside the image roots" % chained)):
            line = error_line(a.ferry("protect", "g", "--disk", "d=%s" % path, "--target",
                                      sites.b.address, check=False))
            assert line.startswith("ferry: disk d: ") or "disk d: " in line, line
            assert words in line, line
    finally:
        outside.unlink()
    assert "g" not in a.status().get("groups", {})


def qemu_nbd_pids(image: Path) -> list:
    out = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"qemu-nbd") and str(image).encode() in cmd:
            out.append(int(d.name))
    return out


def wait_for(what: str, check, timeout: float = 60) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_qemu_nbd_lives_and_dies_with_its_splitter(sites: Lab) -> None:
    vda = sites.work / "vda.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(vda), "8M")
    uri = sites.protect("g", vda)["vda"]
    assert len(qemu_nbd_pids(vda)) == 1
    sites.a.stop()                       # the agent goes: splitter and qemu-nbd serve on
    qemu_io(uri, "raw", "write -P 0x61 0 1M", "flush")
    sites.a.start()
    old = sites.a.splitter_pids()
    sites.a.kill_splitters()             # the splitter dies: its qemu-nbd ends too
    wait_for("qemu-nbd ends with its splitter", lambda: not qemu_nbd_pids(vda))
    wait_for("the agent restarts the splitter",     # with the format it was protected with
             lambda: sites.a.splitter_pids() not in ([], old) and qemu_nbd_pids(vda))
    qemu_io(uri, "raw", "read -P 0x61 0 1M", "write -P 0x62 4M 1M")
    sites.a.ferry("wait", "g", "--synced", "--timeout", "120")
    restored = sites.restore("g", "vda")
    sites.a.ferry("unprotect", "g")
    assert not qemu_nbd_pids(vda)
    run("qemu-img", "check", str(vda))
    flat = sites.work / "vda.raw"
    run("qemu-img", "convert", "-O", "raw", str(vda), str(flat))
    assert same_bytes(restored, flat)
