"""A group's journal on a dedicated block device (an LVM logical volume, a partition, a
loop device) or container file: ``ferry journal-volume GROUP DEVICE --journal-max SIZE`` on
site B, before the group is protected; ``ferry journal-volume GROUP --release`` gives it back.

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

A container file (a raw file, or a monolithicFlat VMDK: its flat extent is the volume's
bytes) lies under the image roots like a disk (``Policy``; a link swapped in after the check
changes nothing: the file is formatted through the descriptor opened and checked), is not a
protected disk nor attached to a loop device, and holds no signature. Ferry allocates every
block of it (``posix_fallocate``; refused when the file system below has not the space),
formats it without discarding (a discard would punch the allocation out again), and
mounts it through a loop device (``mount -o loop``, detached at unmount). At each start it
is allocated again (an ``fstrim`` of the volume gives blocks back to the file system below)
and mounted only if it still holds the volume's file system (its UUID).

The volume is known by its file system's UUID, recorded in ``<data>/journal-volumes.json``
(atomic, durable), never by the device's path. The mount outlives the agent; an agent that
starts and finds the journal directory of a group with a volume not mounted mounts it again
by UUID (``mount_all``), and when that fails the group is not opened (its journal would
otherwise go to the wrong file system), with the reason in one line.

``release`` unmounts a volume and forgets it, for a group this site does not hold (never
protected, or its replica removed): refused while the volume holds journal files.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import subprocess
import uuid
from typing import Any, Dict, Optional, Tuple

from formats import images
from formats.durable import write_atomic

from ..disks import Policy, fd_path
from ..errors import Conflict, Invalid, NotFound, StorageError
from ..source.settings import NAME_RE
from . import reserve

log = logging.getLogger("ferry.replica")

MiB = 1024 * 1024
RECORD = "journal-volumes.json"
LABEL = "ferry-journal"
OVERHEAD = 0.06          # ext4's inode tables and journal, of the device's size
OVERHEAD_MIN = 8 * MiB
TOOL_TIMEOUT = 120.0
MOUNT_OPTIONS = "nodev,nosuid,noexec"
KEPT = ("lost+found",)  # what a volume holds that is not the journal's


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
        raise Invalid("journal volume %s is neither a block device nor a container file"
                      % device)
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
    _fits(device, size, journal_max)
    _unsigned(device, device)
    return size


def _fits(what: str, size: int, journal_max: int) -> None:
    wanted = need(journal_max)
    if size < wanted:
        raise Conflict("journal volume %s holds %d MiB; a journal of --journal-max %d MiB "
                       "with its reserve needs %d MiB" % (what, size // MiB,
                                                           journal_max // MiB, -(-wanted // MiB)))


def _unsigned(what: str, path: str, pass_fds: tuple = ()) -> None:
    found = _signature(path, pass_fds)
    if found:
        raise Conflict("journal volume %s holds %s; wipe it first (wipefs -a %s) to give it "
                       "to Ferry" % (what, found, what))


def open_container(path: str, journal_max: int, policy: Optional[Policy] = None
                   ) -> Tuple[int, str, int, str]:
    """A container file checked as the module says: ``(fd, real path of the bytes, size,
    container format)``, the fd open read-write on the file that holds the volume's bytes
    (the caller closes it). Nothing is written here."""
    what = "journal volume %s" % path
    fd = _open_file(what, path, policy)
    try:
        fmt = images.sniff_bytes(os.pread(fd, 512, 0))
        if fmt == images.VMDK:
            try:
                extent, size = images.flat_extent(fd_path(fd))
            except (images.Unsupported, OSError) as e:
                raise Invalid("%s: %s" % (what, e)) from None
            os.close(fd)
            fd = -1
            fd = _open_file("%s (its flat extent %s)" % (what, extent), extent, policy)
            if os.fstat(fd).st_size < size:
                raise Invalid("%s: its flat extent %s is shorter than the disk it describes "
                              "(%d bytes)" % (what, extent, size))
        elif fmt == images.RAW:
            size = os.fstat(fd).st_size
        else:
            raise Invalid("%s is a %s image: a journal volume is a block device, or a raw or "
                          "monolithicFlat VMDK container file" % (what, fmt))
        real = fd_path(fd)
        holder = policy.claimed_path(real) if policy is not None else None
        if holder is not None:
            raise Conflict("%s is disk %s of protected group %s" % (what, holder[1], holder[0]))
        attached = _tool(["losetup", "-n", "-O", "NAME", "-j", real], what).split()
        if attached:
            raise Conflict("%s is in use (attached to %s)" % (what, ", ".join(attached)))
        _fits(path, size, journal_max)
        _unsigned(path, "/proc/self/fd/%d" % fd, (fd,))
        return fd, real, size, fmt
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def _open_file(what: str, path: str, policy: Optional[Policy]) -> int:
    """``path`` opened read-write, checked by the site's policy on what was opened."""
    if policy is not None:
        policy.check_name(what, path)
    try:  # nothing but a regular file is opened: opening a device may have effects
        if not stat.S_ISREG(os.lstat(path).st_mode) and not os.path.islink(path):
            raise Invalid("%s is neither a block device nor a container file" % what)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_NOCTTY)
    except FileNotFoundError:
        raise NotFound("%s does not exist" % what) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Invalid("%s is a symbolic link; give the file itself" % what) from None
        raise Invalid("%s: %s" % (what, e.strerror or e)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Invalid("%s is neither a block device nor a container file" % what)
        if policy is not None:
            policy.check_open(what, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def allocate(what: str, fd: int, size: int) -> None:
    """Every block of the container's ``size`` bytes allocated in the file system below."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise Conflict("%s: the file system holding it has not the space to allocate "
                           "its %d MiB (%s)" % (what, size // MiB, e.strerror)) from None
        raise StorageError("%s: allocating it: %s" % (what, e.strerror), None,
                           e.errno) from None


def _signature(device: str, pass_fds: tuple = ()) -> str:
    """What ``blkid -p`` finds on the device ('' for nothing)."""
    done = _tool(["blkid", "-p", "-o", "export", device], "journal volume %s" % device,
                 ok=(0, 2), pass_fds=pass_fds)
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
    fs = str(uuid.uuid4())
    what = "journal volume %s" % device
    mkfs = ["mkfs.ext4", "-q", "-F", "-m", "0", "-L", LABEL, "-U", fs]
    try:
        is_block = stat.S_ISBLK(os.stat(device).st_mode)
    except FileNotFoundError:
        raise NotFound("%s does not exist" % what) from None
    entry: Dict[str, Any]
    if is_block:
        size = check(device, journal_max, policy)
        _tool([*mkfs, device], what)
        source = ["UUID=" + fs]
        entry = {"kind": "device"}
    else:
        fd, real, size, fmt = open_container(device, journal_max, policy)
        try:
            allocate(what, fd, size)
            # Formatted through the descriptor checked (a link swapped in meanwhile changes
            # nothing); no discard, which would punch the allocation out again.
            _tool([*mkfs, "-E", "nodiscard", "/proc/self/fd/%d" % fd, "%dk" % (size // 1024)],
                  what, pass_fds=(fd,))
        finally:
            os.close(fd)
        source = ["-o", "loop", real]
        entry = {"kind": "file", "file": real, "container": fmt}
    os.makedirs(journal, exist_ok=True)
    _tool(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, *source, journal], what)
    if not mounted(journal, fs):  # the file was replaced between the format and the mount
        _tool(["umount", journal], what, ok=(0, 1, 32))
        raise Conflict("%s changed while it was being formatted: nothing was mounted" % what)
    volumes[group] = dict(entry, uuid=fs, device=device, size=size, journal_max=journal_max)
    try:
        write_atomic(os.path.join(data_dir, RECORD), json.dumps(volumes, indent=1).encode())
    except BaseException:
        _tool(["umount", journal], what, ok=(0, 1, 32))
        raise
    return dict(entry, group=group, device=device, uuid=fs, size=size, journal=journal)


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
        if not NAME_RE.fullmatch(str(group)):
            log.error("%s names a group %r that cannot be one: ignored",
                      os.path.join(data_dir, RECORD), group)
            continue
        journal = os.path.join(root, group, "journal")
        damaged = _damaged(v)
        if damaged:
            failed[group] = "its entry in %s is damaged (%s): the group's journal may live " \
                "on a volume not mounted" % (os.path.join(data_dir, RECORD), damaged)
            continue
        if mounted(journal, v["uuid"]):
            continue
        try:
            os.makedirs(journal, exist_ok=True)
            if os.listdir(journal):
                raise Conflict("%s is not empty" % journal)
            what = "journal volume of group %s" % group
            if v.get("kind") == "file":
                _mount_file(what, v["file"], v["uuid"], int(v["size"]), journal)
            else:
                _tool(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, "UUID=" + v["uuid"],
                       journal], what)
        except (OSError, Conflict, StorageError, Invalid, NotFound) as e:
            failed[group] = "its journal volume (file system %s, was %s) cannot be mounted " \
                "on %s: %s" % (v["uuid"], v["device"], journal, e)
    return failed


def _damaged(v: Any) -> str:
    """What is wrong with a record's entry, read back from disk ('' when nothing)."""
    if not isinstance(v, dict):
        return "not an object"
    wanted = {"uuid": str, "device": str, **({"file": str, "size": int}
                                             if v.get("kind") == "file" else {})}
    for key, kind in wanted.items():
        if not isinstance(v.get(key), kind) or isinstance(v.get(key), bool):
            return "%s is missing or not a %s" % (key, kind.__name__)
    return ""


def _mount_file(what: str, path: str, fs: str, size: int, journal: str) -> None:
    """Mount the container at ``path`` again: allocated again, and only if it holds ``fs``."""
    fd = _open_file("%s (%s)" % (what, path), path, None)
    try:
        allocate(what, fd, size)
        found = _tool(["blkid", "-p", "-o", "value", "-s", "UUID", "/proc/self/fd/%d" % fd],
                      what, ok=(0, 2), pass_fds=(fd,)).split()
        if found != [fs]:
            raise Conflict("%s holds %s, not the volume's file system"
                           % (path, "file system " + found[0] if found else "no file system"))
    finally:
        os.close(fd)
    _tool(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, "-o", "loop", path, journal], what)
    if not mounted(journal, fs):
        _tool(["umount", journal], what, ok=(0, 1, 32))
        raise Conflict("%s changed while it was being mounted" % path)


def release(data_dir: str, group_dir: str, group: str) -> Dict[str, Any]:
    """Unmount ``group``'s volume (a group this site does not hold) and forget it."""
    volumes = load(data_dir)
    v = volumes.get(group)
    if v is None:
        raise NotFound("group %s has no journal volume" % group)
    journal = os.path.join(group_dir, "journal")
    if _damaged(v):  # nothing of it can be checked: forgotten, nothing unmounted
        v = {"uuid": None, "device": None}
    what = "journal volume %s of group %s" % (v.get("device"), group)
    if v["uuid"] and mounted(journal, v["uuid"]):
        left = sorted(set(os.listdir(journal)) - set(KEPT))
        if left:
            raise Conflict("%s holds %d journal file(s) (%s...): the group's journal is on "
                           "it" % (what, len(left), left[0]))
        _tool(["umount", journal], what)
    del volumes[group]
    write_atomic(os.path.join(data_dir, RECORD), json.dumps(volumes, indent=1).encode())
    for d in (journal, group_dir):
        try:
            os.rmdir(d)
        except OSError:
            break  # not empty (or gone): left as it is
    return dict(v, group=group, released=True)


def mounted(journal: str, fs: str) -> bool:
    """Is the file system of UUID ``fs`` mounted on ``journal``?"""
    if not os.path.ismount(journal):
        return False
    done = subprocess.run(["findmnt", "-n", "-o", "UUID", "--mountpoint", journal],
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    return done.returncode == 0 and fs in done.stdout.split()


def _tool(cmd: list, what: str, ok: tuple = (0,), pass_fds: tuple = ()) -> str:
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT, pass_fds=pass_fds)
    except subprocess.TimeoutExpired:
        raise StorageError("%s: %s did not end within %g s" % (what, cmd[0], TOOL_TIMEOUT),
                           None, errno.ETIMEDOUT) from None
    if done.returncode not in ok:
        lines = done.stderr.strip().splitlines() or ["exit status %d" % done.returncode]
        raise StorageError("%s: %s: %s" % (what, cmd[0], "; ".join(lines)[:400]), None,
                           errno.EIO)
    return done.stdout
