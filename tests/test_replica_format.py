"""``protect --replica-format qcow2|vmdk``: site B keeps, beside each raw replica, an image of
that format over it that qemu opens and ``qemu-img check`` finds clean, equal to the
source's disk; it follows a format changed at run time (``ferry set``), a disk that grew, a
restart, and an image damaged or deleted. Refusals in one line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from agent.errors import FerryError
from agent.protocol import frames, messages
from agent.target import wrappers
from tests.conftest import Lab
from tests.test_replication import error_line
from tests.test_view_overlay import run

MiB = 1024 * 1024


def shown(lab: Lab) -> Dict[str, Any]:
    return lab.b.status()["replicas"]["g1"]["disks"]["d1"]


def the_same(image: Path, fmt: str, source: Path, timeout: float = 60) -> None:
    """``image`` (read by qemu as ``fmt``) comes to equal ``source`` (the replica is the
    oldest point of the history: with --journal-max 1 it is always the newest)."""
    deadline = time.monotonic() + timeout
    while True:
        proc = run("qemu-img", "compare", "-q", "-f", fmt, "-F", "raw", str(image),
                   str(source), check=False)
        if proc.returncode == 0:
            return
        assert time.monotonic() < deadline, "%s never equalled %s: %s" % (
            image, source, run("qemu-img", "compare", "-f", fmt, "-F", "raw", str(image),
                               str(source), check=False))
        time.sleep(0.5)


def info(image: Path) -> Dict[str, Any]:
    return json.loads(run("qemu-img", "info", "-U", "--output=json", str(image)).stdout)


def test_replicas_kept_as_qcow2_and_vmdk(lab: Lab) -> None:
    a, b = lab.a, lab.b
    b.start()
    a.start()
    disk = lab.image("d1.img", 16 * MiB)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 3M", str(disk))  # data before protect
    for bad in ("qed", "QCOW2"):
        line = error_line(a.ferry("protect", "g1", "--disk", "d1=%s" % disk, "--target",
                                  b.address, "--replica-format", bad, check=False))
        assert "Invalid value for '--replica-format'" in line, line
    with pytest.raises(FerryError, match=r"replica_format 'qed': choose one of raw, qcow2, "
                                         r"vmdk$"):
        a.api("POST", "/v1/groups", {"name": "g1", "target": b.address, "replica_format":
                                     "qed", "disks": [{"name": "d1", "path": str(disk)}]})
    assert "g1" not in a.status().get("groups", {})

    uris = lab.protect("g1", disk, extra=("--replica-format", "qcow2", "--history", "1s",
                                              "--journal-max", "1"))
    assert a.status()["groups"]["g1"]["settings"]["replica_format"] == "qcow2"
    run("qemu-io", "-f", "raw", "-c", "write -P 0x22 1M 2M", "-c", "write -z 6M 1M",
        "-c", "flush", uris["d1"])
    a.ferry("wait", "g1", "--synced", "--timeout", "120")
    replicas = b.data / "target" / "g1" / "replicas"
    qcow2 = replicas / "d1.qcow2"
    st = shown(lab)
    assert (st["replica_format"], st["replica_image"], st["replica_image_error"]) == (
        "qcow2", str(qcow2), None), st
    the_same(qcow2, "qcow2", disk)
    run("qemu-img", "check", "-U", str(qcow2))
    meta = info(qcow2)
    assert meta["format"] == "qcow2" and meta["virtual-size"] == 16 * MiB, meta
    assert meta["format-specific"]["data"]["data-file"] == str(replicas / "d1.img"), meta

    # Changed while it runs: the qcow2 gives way to a VMDK over the same replica.
    out = a.ferry("set", "g1", "--replica-format", "vmdk").stdout
    assert "g1: replicas kept as vmdk on site B" in out, out
    vmdk = replicas / "d1.vmdk"
    deadline = time.monotonic() + 60
    while shown(lab)["replica_format"] != "vmdk":
        assert time.monotonic() < deadline, shown(lab)
        time.sleep(0.2)
    assert vmdk.exists() and not qcow2.exists()
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 8M 1M", "-c", "flush", uris["d1"])
    a.ferry("wait", "g1", "--synced", "--timeout", "120")
    the_same(vmdk, "vmdk", disk)
    run("qemu-img", "check", "-U", str(vmdk))
    assert info(vmdk)["format-specific"]["data"]["create-type"] == "monolithicFlat"
    with pytest.raises(FerryError, match="settings that change at run time, one at a time"):
        a.api("POST", "/v1/groups/g1/settings", {"replica_format": "vmdk", "bandwidth": 0})
    with pytest.raises(FerryError, match=r"replica_format 'vhdx': choose one of"):
        a.api("POST", "/v1/groups/g1/settings", {"replica_format": "vhdx"})
    with pytest.raises(FerryError, match=r"^no group nosuch on this site$"):
        a.api("POST", "/v1/groups/nosuch/settings", {"replica_format": "vmdk"})

    # The disk grows: the image follows.
    with open(disk, "r+b") as f:
        f.truncate(20 * MiB)
    a.kill_splitters()
    deadline = time.monotonic() + 60
    while a.ferry("resize", "g1", "--disk", "d1", check=False).returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    a.ferry("wait", "g1", "--synced", "--timeout", "120")
    deadline = time.monotonic() + 60
    while info(vmdk)["virtual-size"] != 20 * MiB:
        assert time.monotonic() < deadline, info(vmdk)
        time.sleep(0.2)
    the_same(vmdk, "vmdk", disk)

    # A damaged image is made again when the group opens; so is a deleted one.
    a.stop()
    b.stop()
    vmdk.write_text("# Disk DescriptorFile\ngarbage\n")
    b.start()
    the_same(vmdk, "vmdk", disk, timeout=5)
    b.stop()
    vmdk.unlink()
    b.start()
    the_same(vmdk, "vmdk", disk, timeout=5)
    assert sorted(os.listdir(replicas)) == sorted(
        n for n in os.listdir(replicas) if not n.startswith(wrappers.LEFTOVER))


def test_an_image_that_cannot_be_made_is_named_and_the_replica_untouched(tmp_path: Path
                                                                          ) -> None:
    replicas = tmp_path / "replicas"
    replicas.mkdir()
    raw = replicas / "d1.img"
    raw.write_bytes(b"\x5a" * MiB)
    (replicas / "d1.qcow2").mkdir()          # where the image goes: a directory
    (replicas / (wrappers.LEFTOVER + "crashed")).mkdir()  # left by a crash: cleaned
    failed = wrappers.ensure(str(replicas), [("d1", MiB)], "qcow2")
    assert list(failed) == ["d1"] and "its qcow2 image %s cannot be made" % (
        replicas / "d1.qcow2") in failed["d1"], failed
    assert raw.read_bytes() == b"\x5a" * MiB
    assert sorted(os.listdir(replicas)) == ["d1.img", "d1.qcow2"]
    # An image of another format that cannot be removed is named too.
    failed = wrappers.ensure(str(replicas), [("d1", MiB)], "vmdk")
    assert "its qcow2 image %s cannot be removed" % (replicas / "d1.qcow2") in failed["d1"]
    # Back to raw: images of the other formats go, the replica stays.
    (replicas / "d1.qcow2").rmdir()
    assert wrappers.ensure(str(replicas), [("d1", MiB)], "vmdk") == {}
    assert wrappers.ensure(str(replicas), [("d1", MiB)], "raw") == {}
    assert sorted(os.listdir(replicas)) == ["d1.img"] and raw.read_bytes() == b"\x5a" * MiB


def test_the_open_carries_the_replica_format() -> None:
    ctx = messages.Context()
    base = {"group": "g", "protection": "p", "disks": [{"name": "d", "size": MiB}]}
    assert messages.Open.parse(dict(base), ctx).replica_format == "raw"  # an older source
    opened = messages.Open("g", "p", (("d", MiB),), replica_format="vmdk")
    assert opened.body()["replica_format"] == "vmdk"
    assert messages.Open.parse(opened.body(), ctx).replica_format == "vmdk"
    assert "replica_format" not in messages.Open("g", "p", (("d", MiB),)).body()
    for bad in ("qed", 7):
        with pytest.raises(frames.ProtocolError):
            messages.Open.parse(dict(base, replica_format=bad), ctx)


def test_a_failure_to_make_images_never_fails_the_group(tmp_path: Path, monkeypatch) -> None:
    """Whatever ``wrappers.ensure`` meets (here a directory that cannot be listed), the
    group opens and replicates; its status names the images that are missing."""
    from agent.target.group import TargetGroup
    g = TargetGroup(str(tmp_path / "g1"), "g1", [("d1", MiB)], protection="p")

    def broken(*_args: Any) -> Dict[str, str]:
        raise OSError(5, "Input/output error", str(tmp_path / "g1" / "replicas"))
    monkeypatch.setattr(wrappers, "ensure", broken)
    g.set_replica_format("qcow2")
    assert g.replica_format == "qcow2"
    assert "its qcow2 image cannot be made: [Errno 5] Input/output error" in \
        g.image_errors["d1"], g.image_errors
    g.close()
    g = TargetGroup.reopen(str(tmp_path / "g1"), "g1")     # opens, the format kept
    assert g is not None and g.replica_format == "qcow2" and g.image_errors
    g.close()
