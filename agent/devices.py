"""A protected block device's stable identity, checked before its splitter starts, and
watched while it runs.

A device number (``st_rdev``, ``disks.py``) says which device a path reaches *now*; after a
reboot, a re-plug or a ``losetup -d``/``losetup`` another device may answer to the same path
and number. So when a block device's splitter first starts, what identifies the device
itself is recorded in ``DATA/disks/ID.device.json`` (written atomically): the backing
file's (st_dev, st_ino) of a loop device (``LOOP_GET_STATUS64``), the DM UUID of a
device-mapper device (LVM, dm-crypt, multipath), the WWN and serial the kernel knows (sysfs), and
what udev's database says (``pyudev``: ID_WWN, ID_SERIAL, the ``/dev/disk/by-id`` names),
compared only where that database is there (a container may have none). Every
later start compares: a device that differs in any of the recorded keys is refused with one
line saying what changed, and nothing is written to it (``verify``). Image files are not
recorded here: their identity is their inode (``disks.py``).

``DeviceWatch`` watches the site's protected block devices while the agent runs (udev
events through ``pyudev``, and a slow poll for hosts whose udev events do not reach the
agent, as in a container): a device that disappears, is replaced, or changes size is
reported per disk (``problems``, shown by ``ferry status``) with its cause, and logged once.
A grown device is reported, not replicated grown: the group keeps its size on both sites
until ``ferry resize GROUP --disk D`` (``source/resize.py``) restarts its splitters on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import struct
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import trio

from formats.durable import write_atomic

from .errors import Conflict, StorageError

log = logging.getLogger("ferry.devices")

LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64),
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32), names and keys.
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
assert LOOP_INFO64.size == 232
STRICT_KEYS = ("loop_backing", "dm_uuid", "wwn", "serial")  # from the kernel: always there
UDEV_KEYS = ("id_wwn", "id_serial", "by_id")  # compared where udev's database is there now
POLL_SECONDS = 2.0


class DeviceChanged(Conflict):
    """Another device answers to a protected disk's path now; nothing is written to it."""


def _sysfs(rdev: int) -> str:
    return os.path.realpath("/sys/dev/block/%d:%d" % (os.major(rdev), os.minor(rdev)))


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _loop_backing(path: str) -> Optional[List[int]]:
    """The (st_dev, st_ino) of a loop device's backing file, None if it is no loop."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        buf = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
    except OSError:
        return None  # not a loop device, or one without a backing file
    finally:
        os.close(fd)
    fields = LOOP_INFO64.unpack(buf)
    return [fields[0], fields[1]]


def _udev(rdev: int) -> Dict[str, Any]:
    """What udev's database says of the device (nothing where udev does not run)."""
    try:
        import pyudev
        dev = pyudev.Devices.from_device_number(pyudev.Context(), "block", rdev)
        props = dict(dev.properties)
        links = sorted(x for x in dev.device_links if "/by-id/" in x)
    except Exception as e:  # no libudev, no such device in /sys: sysfs must do
        log.debug("udev knows nothing of %d:%d: %s", os.major(rdev), os.minor(rdev), e)
        return {}
    return {"id_wwn": props.get("ID_WWN"), "id_serial": props.get("ID_SERIAL"),
            "by_id": links or None}


def describe(path: str) -> Optional[Dict[str, Any]]:
    """The identity of the block device at ``path``; None if it is no block device.
    ``OSError`` if it cannot be reached."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        return None
    sys = _sysfs(st.st_rdev)
    ident: Dict[str, Any] = {"rdev": "%d:%d" % (os.major(st.st_rdev), os.minor(st.st_rdev)),
                             "name": os.path.basename(sys)}
    ident.update((k, v) for k, v in _udev(st.st_rdev).items() if v)
    ident["dm_uuid"] = _read(os.path.join(sys, "dm", "uuid"))
    ident["wwn"] = _read(os.path.join(sys, "wwid")) or _read(os.path.join(sys, "device", "wwid"))
    ident["serial"] = _read(os.path.join(sys, "serial")) or \
        _read(os.path.join(sys, "device", "serial"))
    ident["loop_backing"] = _loop_backing(path)
    ident["backing_file"] = _read(os.path.join(sys, "loop", "backing_file"))
    size = _read(os.path.join(sys, "size"))
    ident["size"] = int(size) * 512 if size else None
    return {k: v for k, v in ident.items() if v is not None}


def differs(recorded: Dict[str, Any], now: Dict[str, Any]) -> Optional[str]:
    """Why ``now`` is not the device ``recorded`` was, None if nothing stable differs."""
    for key in (*STRICT_KEYS, *(k for k in UDEV_KEYS if k in now)):
        if key in recorded and recorded[key] != now.get(key):
            if key == "loop_backing" and not now.get(key):
                return "its loop device has no backing file now (detached; was %s)" % (
                    recorded.get("backing_file", "?"))
            if key == "loop_backing":
                return "its loop device's backing file is another file now (%s, was %s)" % (
                    now.get("backing_file", "none"), recorded.get("backing_file", "?"))
            return "its %s is %s now, was %s" % (key.replace("_", " "), now.get(key, "none"),
                                                 recorded[key])
    return None


def _record_path(data_dir: str, disk_id: str) -> str:
    return os.path.join(data_dir, "disks", disk_id + ".device.json")


def load(data_dir: str, disk_id: str) -> Optional[Dict[str, Any]]:
    path = _record_path(data_dir, disk_id)
    try:
        with open(path, "rb") as f:
            rec: Dict[str, Any] = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StorageError("the device record %s cannot be read: %s" % (path, e)) from None
    return rec


def verify(data_dir: str, disk_id: str, disk: str, path: str) -> None:
    """Before disk ``disk``'s splitter starts on ``path``: record its device's identity the
    first time, and refuse (``DeviceChanged``) a device that is not the recorded one."""
    ident = describe(path)
    if ident is None:
        return
    recorded = load(data_dir, disk_id)
    if recorded is None:
        os.makedirs(os.path.dirname(_record_path(data_dir, disk_id)), exist_ok=True)
        write_atomic(_record_path(data_dir, disk_id), json.dumps(ident, sort_keys=True).encode())
        return
    why = differs(recorded, ident)
    if why:
        raise DeviceChanged("disk %s: %s is not the device protected: %s; its splitter is "
                            "not started and nothing is written to it" % (disk, path, why))


def forget(data_dir: str, disk_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_record_path(data_dir, disk_id))


Disk = Tuple[str, str, str, int]  # (disk id, "group/disk", path, size protected)


class DeviceWatch:
    """The protected block devices' problems now: {disk id: cause}."""

    def __init__(self, data_dir: str, disks: Callable[[], Iterable[Disk]],
                 problems: Optional[Dict[str, str]] = None) -> None:
        self.data_dir = data_dir
        self.disks = disks  # called in the event loop's thread (it reads the store)
        self.problems: Dict[str, str] = {} if problems is None else problems

    def check(self, disks: Iterable[Disk]) -> None:
        """Look at each protected block device once (blocking: sysfs and ioctls)."""
        now: Dict[str, str] = {}
        for disk_id, name, path, size in disks:
            try:
                recorded = load(self.data_dir, disk_id)
            except StorageError as e:
                now[disk_id] = str(e)
                continue
            if recorded is None:
                continue  # a file, or a device whose splitter never started
            try:
                ident = describe(path)
            except OSError as e:
                now[disk_id] = "gone: %s: %s" % (path, e.strerror or e)
                continue
            why = differs(recorded, ident) if ident else "%s is no block device now" % path
            detached = ident and "loop_backing" in recorded and "loop_backing" not in ident
            if why:
                now[disk_id] = "%s: %s: %s" % ("gone" if detached else "replaced", path, why)
            elif ident and ident.get("size") not in (None, size):
                verb = "grown" if ident["size"] > size else "shrunk"
                now[disk_id] = ("%s: %s is %d bytes now, %d protected; the group replicates "
                                "%d bytes %s" % (
                                    verb, path, ident["size"], size, size,
                                    "until ferry resize %s --disk %s" % tuple(
                                        name.split("/", 1)) if verb == "grown" else
                                    "(shrinking is refused)"))
            if disk_id in now and self.problems.get(disk_id) != now[disk_id]:
                log.error("disk %s: device %s", name, now[disk_id])
        for disk_id in set(self.problems) - set(now):
            log.info("disk %s: device problem cleared", disk_id)
        self.problems.clear()
        self.problems.update(now)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        monitor = _monitor()
        task_status.started()
        while True:
            await trio.to_thread.run_sync(self.check, list(self.disks()))
            with trio.move_on_after(POLL_SECONDS):
                if monitor is None:
                    await trio.sleep_forever()
                await trio.lowlevel.wait_readable(monitor.fileno())
                while monitor.poll(timeout=0) is not None:
                    pass  # any block event: look again now


def _monitor(source: Optional[str] = None) -> Any:
    """A monitor of block devices' events, None where there is none to have: udev's, or
    where no udevd runs (a container), the kernel's own uevents."""
    if source is None:
        source = "udev" if os.path.exists("/run/udev/control") else "kernel"
    try:
        import pyudev
        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
        monitor.filter_by("block")
        monitor.start()
        return monitor
    except Exception as e:
        log.info("no udev events (%s): block devices are looked at every %g s",
                 e, POLL_SECONDS)
        return None
