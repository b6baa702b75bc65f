"""Failback end to end with real agents and splitters: A's disk is written through its
splitter, site B fails over live at a tagged checkpoint and its live export takes writes,
``ferry failback`` protects B's live disk back onto A's ORIGINAL disk shipping only what
differs (B's writes and A's own unreplicated ones), and ``ferry move`` makes A live again
on that very file, byte-identical to B's live disk. And every refusal of failback."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import nbd
import pytest
from conftest import Lab, first_difference, same_bytes
from test_faults import wait_for
from test_preseed import random_disk

from agent.errors import Invalid
from agent.seed import SeedError
from agent.target import failback

MiB = 1024 * 1024
SIZE = 64 * MiB


def a_group(lab: Lab) -> dict:
    return lab.a.status("g1")["groups"]["g1"]


def b_replica(lab: Lab) -> dict:
    return lab.b.status("g1")["replicas"]["g1"]


def write(uri: str, chunks: list, seed: int) -> int:
    """Random data over ``chunks`` (MiB numbers) through an NBD export; bytes written."""
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    n = 0
    for c in chunks:
        data = rng.randbytes(256 * 1024)
        h.pwrite(data, c * MiB + rng.randrange(0, 3) * 256 * 1024)
        n += len(data)
    h.flush()
    h.shutdown()
    return n


def refused(lab_site, *args: str, code: int = 0) -> str:
    """The one-line refusal of a ``ferry`` command (with exit status ``code`` if given)."""
    proc = lab_site.ferry(*args, check=False)
    assert proc.returncode != 0, proc.stdout
    assert not code or proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.strip(), proc.stderr
    return proc.stderr


def test_failback_round_trip_ships_only_differences(sites: Lab) -> None:
    disk = sites.work / "vda.img"
    random_disk(disk, SIZE, seed=7)
    uri = sites.protect("g1", disk)["vda"]
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    write(uri, [1, 2], 1)
    sites.a.ferry("checkpoint", "g1", "--tag", "before-failover")
    # A takes writes B never receives (its link paused): the failback must undo them.
    sites.a.ferry("pause", "g1")
    write(uri, [40], 2)
    assert "not failed over here" in refused(sites.b, "failback", "g1", "--target",
                                             sites.a.address)
    started = time.monotonic()
    out = json.loads(sites.b.ferry("failover", "g1", "--live", "--checkpoint",
                                   "before-failover", "--json").stdout)
    live_uri = out["disks"]["vda"]
    h = nbd.NBD()
    h.connect_uri(live_uri)
    h.pread(4096, 0)
    h.shutdown()
    print("failover: command to export serving %.2f s" % (time.monotonic() - started))
    # A was paused, not fenced: failback onto its disks is refused by A, named.
    sites.b.ferry("failover", "g1", "--commit")
    assert "not fenced" in refused(sites.b, "failback", "g1", "--target", sites.a.address,
                                   code=4)
    assert b_replica(sites)["failover"]["state"] == "committed"
    assert sites.b.export_pids(), "a refused failback serves the live disk again"
    written = write(live_uri, [5, 20, 33, 63], 3)  # B's VM writes on the live disk
    sites.a.ferry("resume", "g1")
    wait_for(lambda: a_group(sites)["state"] == "fenced", what="A fenced", timeout=60)
    # Both sites took writes: split brain, on both sites, and failback waits for the admin.
    wait_for(lambda: (b_replica(sites)["failover"] or {}).get("split_brain"),
             what="split brain on site B", timeout=60)
    sb = b_replica(sites)["failover"]["split_brain"]
    assert sb["a_unreplicated_bytes"] >= 256 * 1024 and sb["b_live_written"], sb
    assert a_group(sites)["fenced"]["split_brain"]["unreplicated_bytes"] >= 256 * 1024
    assert "split brain" in refused(sites.b, "failback", "g1", "--target", sites.a.address,
                                    code=4)
    assert "uncommitted" in refused(sites.b, "resolve", "g1", "--keep", "a", code=4)
    sites.b.ferry("resolve", "g1", "--keep", "b")
    before = disk.read_bytes()

    out = json.loads(sites.b.ferry("failback", "g1", "--target", sites.a.address,
                                   "--json").stdout)
    print("failback: %d bytes shipped of a %d-byte disk (%.2f %%); B wrote %d" % (
        out["bytes_shipped"], out["size"], 100.0 * out["bytes_shipped"] / out["size"],
        written))
    assert out["synced"] and out["size"] == SIZE, out
    assert out["bytes_shipped"] < SIZE // 10, out
    # B's four chunks and A's own one differ: at least those crossed, whole chunks.
    assert out["bytes_shipped"] >= 5 * MiB, out
    assert out["disks"]["vda"]["resync_skipped_bytes"] >= SIZE - 16 * MiB, out
    assert "failing back already" in refused(sites.b, "failback", "g1", "--target",
                                             sites.a.address)
    rec = b_replica(sites)["failover"]["failback"]
    assert rec["state"] == "synced" and rec["bytes_shipped"] == out["bytes_shipped"], rec
    # A's replica is its original disk: the failback wrote there, nowhere else.
    link = sites.a.data / "target" / "g1" / "replicas" / "vda.img"
    assert link.is_symlink() and link.resolve() == disk.resolve()
    assert disk.read_bytes() != before
    # A's split-brain writes were copied aside before its disk was adopted: kept until
    # dropped.
    kept = sites.a.data / "kept" / "g1" / "vda.img"
    assert kept.read_bytes() == before
    assert a_group(sites)["fenced"]["split_brain"]["kept"] == {"vda": str(kept)}
    sites.a.ferry("resolve", "g1", "--drop-kept")
    assert not kept.exists()
    # The splitter serves B's live disk now: a write there is shipped to A as well.
    # ... on the live export's own socket: the VM's NBD client reconnects to its URI.
    assert out["disks"]["vda"]["nbd_uri"] == live_uri, out
    write(live_uri, [10], 4)
    # B's agent restarts: the splitter serving the live disk is left alone, and kept.
    sites.b.stop()
    sites.b.start()
    wait_for(lambda: sites.b.status("g1")["groups"]["g1"]["state"] == "replicating",
             what="B's reverse group replicating again", timeout=60)
    write(live_uri, [11], 6)
    moved = json.loads(sites.b.ferry("move", "g1", "--json").stdout)
    assert moved["moved"] and moved["lost_writes"] == 0, moved
    a_rep = sites.a.status("g1")["replicas"]["g1"]
    assert a_rep["failover"]["state"] == "done" and a_rep["failover"]["in_place"], a_rep
    b_live = sites.b.data / "target" / "g1" / "live" / "vda.img"
    assert same_bytes(disk, b_live), first_difference(disk, b_live)
    # A's failover on its original disks cannot be rolled back (there is no copy).
    assert "original disks" in refused(sites.a, "failover", "g1", "--rollback")
    # The return leg starts only from A's fenced protection, not paused.
    sites.a.ferry("pause", "g1")
    assert "paused" in refused(sites.a, "failback", "g1", code=4)
    sites.a.ferry("resume", "g1")
    wait_for(lambda: a_group(sites)["state"] == "fenced", what="A fenced again", timeout=60)
    # The return leg: A protects its disk to B again; B's live disk is the seed, in place.
    back = json.loads(sites.a.ferry("failback", "g1", "--json").stdout)
    print("return leg: %d bytes shipped of %d" % (back["bytes_shipped"], back["size"]))
    assert back["returned"] and back["synced"] and back["bytes_shipped"] < SIZE // 10, back
    assert back["disks"]["vda"]["nbd_uri"] == uri  # the VM's own socket, as before
    assert "g1" not in sites.a.status()["replicas"]
    wait_for(lambda: "g1" not in sites.b.status()["groups"], what="B's reverse group to end")
    replica = sites.b.data / "target" / "g1" / "replicas" / "vda.img"
    assert replica.is_symlink() and replica.resolve() == b_live.resolve()
    assert b_replica(sites)["failover"] is None
    assert "--target" in refused(sites.a, "failback", "g1", code=1)  # nothing to return from
    assert "not failed over" in refused(sites.b, "failback", "g1", "--target",
                                        sites.a.address)
    write(uri, [12, 13], 5)  # A's VM writes through its splitter again: replicated
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    restored = sites.restore("g1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)


def test_failback_refusals(sites: Lab) -> None:
    proc = sites.b.ferry("failback", "nosuch", "--target", sites.a.address, check=False)
    assert proc.returncode == 3 and "nosuch" in proc.stderr, proc.stderr
    disk = sites.image("vda.img", 8 * MiB)
    sites.protect("g1", disk)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    assert "not failed over here" in refused(sites.b, "failback", "g1", "--target",
                                             sites.a.address)
    sites.b.ferry("failover", "g1", "--live")
    assert "commit it first" in refused(sites.b, "failback", "g1", "--target",
                                        sites.a.address, code=4)
    assert "target" in refused(sites.b, "failback", "g1", "--target", "no:port:x")
    # A itself has no failed-over replica of g1: nothing to fail back from there.
    assert "g1" in refused(sites.a, "failback", "g1", "--target", sites.b.address, code=3)
    # The API checks what the CLI cannot send.
    for body in ({"keep": "c"}, {}, {"keep": "a", "drop_kept": True}, {"keep": "a", "x": 1}):
        with pytest.raises(Invalid):
            sites.b.api("POST", "/v1/replicas/g1/resolve", body)
    sites.b.ferry("failover", "g1", "--commit")
    # Failed back onto a site that does not protect g1 (here: B itself): refused there.
    assert "not protected from this site" in refused(
        sites.b, "failback", "g1", "--target", sites.b.address, code=4)
    assert sites.b.export_pids(), "the live disk is served again"


def test_failback_onto_a_qcow2_source_is_refused(sites: Lab) -> None:
    """In place, a replica's bytes are the guest's view: a qcow2 file is not, so a failback
    onto it is refused naming the disk and the way out (a restore in its format)."""
    vda = sites.work / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(vda), "8M"], check=True)
    sites.protect("g1", vda)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    sites.b.ferry("failover", "g1", "--live")
    sites.b.ferry("failover", "g1", "--commit")
    line = refused(sites.b, "failback", "g1", "--target", sites.a.address, code=4)
    assert "disk vda is a qcow2 image" in line and "--format qcow2" in line, line
    assert subprocess.run(["qemu-img", "check", "-q", "-U", str(vda)]).returncode == 0


def test_in_place_seeds_are_all_or_none_and_checked(tmp_path: Path) -> None:
    assert not failback.wanted(None) and failback.wanted({"vda": failback.IN_PLACE})
    with pytest.raises(SeedError, match="in place and the others not"):
        failback.wanted({"vda": failback.IN_PLACE, "vdb": "/x"})
    disk = tmp_path / "vda.img"
    disk.write_bytes(bytes(4096))

    def fenced(name: str, keep: bool) -> dict:
        return {"vda": str(disk), "gone": str(tmp_path / "gone.img")}

    with pytest.raises(SeedError, match="cannot adopt disks in place"):
        failback.resolve("g1", [("vda", 4096)], None)
    with pytest.raises(SeedError, match="has no disk vdb"):
        failback.resolve("g1", [("vdb", 4096)], fenced)
    with pytest.raises(SeedError, match="No such file"):
        failback.resolve("g1", [("gone", 4096)], fenced)
    with pytest.raises(SeedError, match="is 4096 bytes; site B's live disk is 8192"):
        failback.resolve("g1", [("vda", 8192)], fenced)
    assert failback.resolve("g1", [("vda", 4096)], fenced) == {"vda": str(disk.resolve())}


GUEST_A = r"""
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
i=0
while [ $i -lt 8 ]; do
    dd if=/dev/urandom of=/mnt/a$i bs=16k count=$((i * 4 + 1)) 2>/dev/null
    i=$((i + 1))
done
(cd /mnt && md5sum a*) > /mnt/A.md5
sync
umount /mnt
echo guest-done
"""

GUEST_B = r"""
mount -t ext4 /dev/vda /mnt
(cd /mnt && md5sum -c A.md5) || exit 3
i=0
while [ $i -lt 8 ]; do
    dd if=/dev/urandom of=/mnt/b$i bs=16k count=$((i + 1)) 2>/dev/null
    i=$((i + 1))
done
rm /mnt/a3
sed -i /a3/d /mnt/A.md5
(cd /mnt && md5sum b*) > /mnt/B.md5
sync
umount /mnt
echo guest-done
"""

GUEST_BACK = r"""
mount -t ext4 /dev/vda /mnt
(cd /mnt && md5sum -c A.md5 B.md5) || exit 3
[ ! -e /mnt/a3 ] || exit 4
echo "back on A" > /mnt/back.txt
sync
umount /mnt
echo guest-done
"""


def boot(lab: Lab, uri: str, script: str, name: str) -> None:
    from conftest import LAB_CACHE

    from lab.guest import Disk, Guest
    from lab.initramfs import build_initramfs
    from lab.kernel import ensure_kernel

    initrd = build_initramfs(LAB_CACHE, script, lab.work / ("initrd-%s.gz" % name))
    with Guest(ensure_kernel(LAB_CACHE), initrd, [Disk(uri)],
               lab.work / ("console-%s.log" % name)) as guest:
        rc = guest.wait(240)
        assert rc == 0 and "guest-done" in guest.output(), guest.tail()


def fsck_clean(image: Path) -> None:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.guest
def test_guest_fails_over_fails_back_and_boots_on_its_own_disk(sites: Lab) -> None:
    disk = sites.image("vda.img", 128 * MiB)
    uri = sites.protect("vm1", disk)["vda"]
    boot(sites, uri, GUEST_A, "a")                    # ext4 written on A, through its splitter
    sites.a.ferry("wait", "vm1", "--synced", "--timeout", "120")
    sites.a.ferry("checkpoint", "vm1", "--tag", "written-on-a")
    live = json.loads(sites.b.ferry("failover", "vm1", "--live", "--checkpoint",
                                    "written-on-a", "--json").stdout)["disks"]["vda"]
    sites.b.ferry("failover", "vm1", "--commit")
    boot(sites, live, GUEST_B, "b")                   # boots on B from the live export
    b_live = sites.b.data / "target" / "vm1" / "live" / "vda.img"
    fsck_clean(b_live)
    wait_for(lambda: sites.a.status("vm1")["groups"]["vm1"]["state"] == "fenced",
             what="A fenced", timeout=60)
    out = json.loads(sites.b.ferry("failback", "vm1", "--target", sites.a.address,
                                   "--json").stdout)
    print("guest failback: %d bytes shipped of %d (%.2f %%)" % (
        out["bytes_shipped"], out["size"], 100.0 * out["bytes_shipped"] / out["size"]))
    assert out["bytes_shipped"] < out["size"] // 10, out
    moved = json.loads(sites.b.ferry("move", "vm1", "--json").stdout)
    assert moved["lost_writes"] == 0, moved
    assert same_bytes(disk, b_live), first_difference(disk, b_live)
    fsck_clean(disk)
    back = json.loads(sites.a.ferry("failback", "vm1", "--json").stdout)
    assert back["returned"] and back["disks"]["vda"]["nbd_uri"] == uri, back
    boot(sites, uri, GUEST_BACK, "back")              # boots on A, on its own disk
    fsck_clean(disk)
    sites.a.ferry("wait", "vm1", "--synced", "--timeout", "120")
    restored = sites.restore("vm1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)


def test_own_disks_and_kept_copies_refuse_by_name(tmp_path: Path) -> None:
    """A live disk that cannot be opened (or is a link) and split-brain writes that cannot
    be kept before an in-place adoption are refused, naming the disk or the group."""
    from types import SimpleNamespace

    from agent.source import failback as source_failback
    from agent.source.link import DiskLink
    from agent.source.shipper import GroupShipper
    from agent.source.states import ShipperState
    from agent.store import Store

    with pytest.raises(Invalid, match=r"live disk vda: .*nothing\.img"):
        source_failback.own_disk("vda", str(tmp_path / "nothing.img"))
    disk = tmp_path / "vda.img"
    disk.write_bytes(bytes(8192))
    (tmp_path / "link.img").symlink_to(disk)
    with pytest.raises(Invalid, match=r"live disk vda: .*link\.img"):
        source_failback.own_disk("vda", str(tmp_path / "link.img"))
    assert source_failback.own_disk("vda", str(disk))[1] == 8192

    store = Store(str(tmp_path))
    row = store.add_group("g1", "127.0.0.1:1", 1 << 20, [("vda", str(disk), 8192)],
                          protection="p1")
    shipper = GroupShipper(row, "site", [DiskLink(d) for d in row.disks],
                           lambda *a: None)  # never run: its state is set below
    site = SimpleNamespace(store=store, shippers={"g1": shipper}, data_dir=str(tmp_path))
    with pytest.raises(SeedError, match="not fenced"):
        source_failback.fenced_disks(site, "g1")
    with pytest.raises(SeedError, match="not protected from this site"):
        source_failback.fenced_disks(site, "g2")
    shipper.state = ShipperState.FENCED
    shipper.split_brain = {"unreplicated_bytes": 4096}
    kept = tmp_path / "kept" / "g1"
    kept.mkdir(parents=True)
    (kept / "old.img").write_bytes(b"x")
    with pytest.raises(SeedError, match="g1: its split-brain writes cannot be kept"):
        source_failback.fenced_disks(site, "g1", keep=True)
    (kept / "old.img").unlink()
    assert source_failback.fenced_disks(site, "g1", keep=True) == {"vda": str(disk)}
    assert (kept / "vda.img").read_bytes() == bytes(8192)
    assert shipper.split_brain["kept"] == {"vda": str(kept / "vda.img")}
    store.close()
