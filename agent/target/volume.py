"""A group's journal on a dedicated block device (an LVM logical volume, a partition, a
loop device): ``ferry journal-volume GROUP DEVICE --journal-max SIZE`` on site B, before the
group is protected.

The device gets its own ext4 file system (label ``ferry-journal``, a new UUID, no blocks
kept for root), mounted ``nodev,nosuid,noexec`` on the group's journal directory
(``<data>/target/GROUP/journal``): the journal keeps its segment files and record format,
and nothing else on the host shares its space. With ``protect --journal-reserve`` its slots
are allocated on the device.

Refused, in one line naming the device: a path that is not a block device; a device that is
in use (opened exclusively by anyone: mounted, swap, held by device-mapper or another
program; ``O_EXCL`` says ``EBUSY``), or a protected disk; one that holds a signature
(a file system, a partition table, an LVM PV: ``blkid -p``; wipe it first); one smaller than
the journal's limit with its reserve and the file system's own overhead (``need``); and a
group that already has a journal or a volume here.

The volume is known by its file system's UUID, recorded in ``<data>/journal-volumes.json``
(atomic, durable), never by the device's path. The mount outlives the agent; an agent that
starts and finds the journal directory of a group with a volume not mounted mounts it again
by UUID (``mount_all``), and when that fails the group is not opened (its journal would
otherwise go to the wrong file system), with the reason in one line.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import uuid
from typing import Any, Dict, Optional

from formats.durable import write_atomic

from ..disks import Policy
from ..errors import Conflict, Invalid, NotFound, StorageError
from . import reserve

MiB = 1024 * 1024
RECORD = "journal-volumes.json"
LABEL = "ferry-journal"
OVERHEAD = 0.06          # ext4's inode tables and journal, of the device's size
OVERHEAD_MIN = 8 * MiB
TOOL_TIMEOUT = 120.0


def need(journal_max: int) -> int:
    """The smallest device that holds a journal of ``journal_max`` with its reserve."""
    data = reserve.total(journal_max)
    return int(data / (1 - OVERHEAD)) + OVERHEAD_MIN


def load(data_dir: str) -> Dict[str, Dict[str, Any]]:
    try:
        with open(os.path.join(data_dir, RECORD)) as f:
            out = json.load(f)
    except FileNotFoundError:
        return {}
    if not isinstance(out, dict):
        raise ValueError("%s is not an object" % RECORD)
    return out


def check(device: str, journal_max: int, policy: Optional[Policy] = None) -> int:
    """Refuse (one line) a device that cannot hold the journal (see the module); its size."""
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise NotFound("journal volume %s does not exist" % device) from None
    if not stat.S_ISBLK(st.st_mode):
        raise Invalid("journal volume %s is not a block device" % device)
    holder = policy.claimed_path(device) if policy is not None else None
    if holder is not None:
        raise Conflict("journal volume %s is disk %s of protected group %s"
                       % (device, holder[1], holder[0]))
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise Conflict("journal volume %s is in use (mounted, or held by another "
                           "program)" % device) from None
        raise StorageError("journal volume %s: %s" % (device, e.strerror), device,
                           e.errno) from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    wanted = need(journal_max)
    if size < wanted:
        raise Conflict("journal volume %s holds %d MiB; a journal of --journal-max %d MiB "
                       "with its reserve needs %d MiB" % (device, size // MiB,
                                                           journal_max // MiB, -(-wanted // MiB)))
    found = _signature(device)
    if found:
        raise Conflict("journal volume %s holds %s; wipe it first (wipefs -a %s) to give it "
                       "to Ferry" % (device, found, device))
    return size


def _signature(device: str) -> str:
    """What ``blkid -p`` finds on the device ('' for nothing)."""
    done = _tool(["blkid", "-p", "-o", "export", device], "journal volume %s" % device,
                 ok=(0, 2))
    fields = dict(line.split("=", 1) for line in done.splitlines() if "=" in line)
    kind = fields.get("TYPE") or fields.get("PTTYPE")
    if kind:
        return "a signature (%s)" % kind
    rest = sorted(set(fields) - {"DEVNAME"})
    return "a signature (%s)" % ", ".join(rest) if rest else ""


def give(data_dir: str, group_dir: str, group: str, device: str, journal_max: int,
         policy: Optional[Policy] = None) -> Dict[str, Any]:
    """Make the journal file system on ``device`` and mount it on the group's journal
    directory; recorded (durable) when it returns."""
    volumes = load(data_dir)
    if group in volumes:
        raise Conflict("group %s has a journal volume already (file system %s)"
                       % (group, volumes[group]["uuid"]))
    journal = os.path.join(group_dir, "journal")
    if os.path.isdir(journal) and os.listdir(journal):
        raise Conflict("group %s has a journal here already; a journal volume is given "
                       "before the group is protected" % group)
    size = check(device, journal_max, policy)
    fs = str(uuid.uuid4())
    what = "journal volume %s" % device
    _tool(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", LABEL, "-U", fs, device], what)
    os.makedirs(journal, exist_ok=True)
    _tool(["mount", "-t", "ext4", "-o", "nodev,nosuid,noexec", "UUID=" + fs, journal], what)
    volumes[group] = {"uuid": fs, "device": device, "size": size, "journal_max": journal_max}
    try:
        write_atomic(os.path.join(data_dir, RECORD), json.dumps(volumes, indent=1).encode())
    except BaseException:
        _tool(["umount", journal], what, ok=(0, 1, 32))
        raise
    return {"group": group, "device": device, "uuid": fs, "size": size, "journal": journal}


def mount_all(data_dir: str, root: str) -> Dict[str, str]:
    """Mount each recorded volume that is not mounted on its group's journal directory;
    ``{group: reason}`` for those that cannot be (their groups must not be opened)."""
    failed: Dict[str, str] = {}
    try:
        volumes = load(data_dir)
    except (OSError, ValueError) as e:
        # Which groups have a volume is unknown: a group whose journal directory is empty
        # and not a mount point may be one whose volume is not mounted; it is not opened.
        why = "%s cannot be read (%s): its journal may live on a device not mounted" % (
            os.path.join(data_dir, RECORD), e)
        for group in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            journal = os.path.join(root, group, "journal")
            if os.path.isdir(journal) and not os.path.ismount(journal) \
                    and not os.listdir(journal):
                failed[group] = why
        return failed
    for group, v in volumes.items():
        journal = os.path.join(root, group, "journal")
        if mounted(journal, v["uuid"]):
            continue
        try:
            os.makedirs(journal, exist_ok=True)
            if os.listdir(journal):
                raise Conflict("%s is not empty" % journal)
            _tool(["mount", "-t", "ext4", "-o", "nodev,nosuid,noexec", "UUID=" + v["uuid"],
                   journal], "journal volume of group %s" % group)
        except (OSError, Conflict, StorageError) as e:
            failed[group] = "its journal volume (file system %s, was %s) cannot be mounted " \
                "on %s: %s" % (v["uuid"], v["device"], journal, e)
    return failed


def mounted(journal: str, fs: str) -> bool:
    """Is the file system of UUID ``fs`` mounted on ``journal``?"""
    if not os.path.ismount(journal):
        return False
    done = subprocess.run(["findmnt", "-n", "-o", "UUID", "--mountpoint", journal],
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    return done.returncode == 0 and fs in done.stdout.split()


def _tool(cmd: list, what: str, ok: tuple = (0,)) -> str:
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise StorageError("%s: %s did not end within %g s" % (what, cmd[0], TOOL_TIMEOUT),
                           None, errno.ETIMEDOUT) from None
    if done.returncode not in ok:
        lines = done.stderr.strip().splitlines() or ["exit status %d" % done.returncode]
        raise StorageError("%s: %s: %s" % (what, cmd[0], "; ".join(lines)[:400]), None,
                           errno.EIO)
    return done.stdout
