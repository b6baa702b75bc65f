"""A replica kept as qcow2 or VMDK (``protect --replica-format``): an image file beside the
raw replica that qemu, libvirt or ESXi open in that format, with the replica as its data.

Site B's replica of a disk is always the raw file ``replicas/DISK.img``: the applier, the
views, restores, scrubbing, failover and failback read and write it as they do for any
group, and every promise about it holds unchanged. For ``qcow2`` and ``vmdk`` the group
also has ``replicas/DISK.qcow2`` or ``replicas/DISK.vmdk``, metadata only:

- ``DISK.qcow2``: a qcow2 whose external data file is ``DISK.img`` in raw mode
  (``data_file_raw=on``): every cluster mapped at its own offset, so what qemu reads through
  the qcow2 is the raw file's bytes, and what it writes lands in the raw file too.
- ``DISK.vmdk``: a monolithicFlat descriptor whose one flat extent is ``DISK.img``, what
  ESXi calls a thick disk (``DISK-flat.vmdk`` there).

Thin where the replica is: zeroes and trims are holes in the raw file (``st_blocks``),
not unallocated clusters of the qcow2 (``qemu-img convert`` of the image, or ``ferry restore
--format qcow2``, writes a self-contained thin qcow2). The qcow2 names its data file by its
absolute path (qemu 7.2 opens a relative one from its working directory); the VMDK names
its extent relatively, as VMDK does.

``ensure`` makes what is missing or stale (a disk that grew, a format changed, an image
damaged) and removes images of other formats; each is made under a temporary name and
renamed into place, so a reader sees the old image or the new one. It runs when a group
opens, when a session sets the format, and when a disk grows.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from typing import Dict, List, Tuple

from formats import images
from formats.durable import fsync_dir, write_atomic

log = logging.getLogger("ferry.replica")

TOOL_TIMEOUT = 120.0
LEFTOVER = ".new-"  # the temporary directory an image is made in


def image_path(replicas: str, disk: str, fmt: str) -> str:
    """The file a replica of ``fmt`` is opened as (the raw file itself for ``raw``)."""
    return os.path.join(replicas, disk + images.REPLICA_SUFFIX[fmt])


def ensure(replicas: str, disks: List[Tuple[str, int]], fmt: str) -> Dict[str, str]:
    """Each disk's image of ``fmt`` over its raw replica, made where missing or stale;
    images of the other formats removed. ``{disk: error}`` for those that could not be
    made (the replica itself is not touched by a failure here)."""
    failed: Dict[str, str] = {}
    changed = False
    _clean(replicas)
    for disk, size in disks:
        data = os.path.abspath(image_path(replicas, disk, images.RAW))
        for other in images.REPLICA_FORMATS:
            if other not in (images.RAW, fmt):
                path = image_path(replicas, disk, other)
                if os.path.lexists(path):
                    try:
                        os.unlink(path)
                        changed = True
                    except OSError as e:
                        failed[disk] = "its %s image %s cannot be removed: %s" % (
                            other, path, e.strerror or e)
                        log.error("replica %s: %s", data, failed[disk])
        if fmt == images.RAW:
            continue
        path = os.path.abspath(image_path(replicas, disk, fmt))
        if os.path.lexists(path) and not os.path.islink(path) \
                and images.image_over_raw(path, fmt) == (data, -(-size // 512) * 512):
            continue
        try:
            _make(replicas, disk, size, fmt)
            changed = True
        except (OSError, subprocess.SubprocessError, images.Unsupported) as e:
            failed[disk] = "its %s image %s cannot be made: %s" % (fmt, path, e)
            log.error("replica %s: %s", data, failed[disk])
    if changed:
        fsync_dir(replicas)
    return failed


def _make(replicas: str, disk: str, size: int, fmt: str) -> None:
    data_name = disk + images.REPLICA_SUFFIX[images.RAW]
    final = image_path(replicas, disk, fmt)
    with tempfile.TemporaryDirectory(prefix=LEFTOVER, dir=replicas) as work:
        if fmt == images.QCOW2:
            new = os.path.join(work, "image")
            data = os.path.abspath(image_path(replicas, disk, images.RAW))
            for cmd in images.qcow2_over_raw_commands(new, os.path.join(work, "scratch"),
                                                      data, size):
                _run(cmd)
            os.replace(new, final)
        else:
            new = os.path.join(work, "image.vmdk")
            _run([images.tool("qemu-img"), "create", "-q", "-f", images.VMDK, "-o",
                  "subformat=monolithicFlat", new, str(-(-size // 512) * 512)])
            with open(new, encoding="utf-8") as f:
                text = images.vmdk_over_raw(f.read(), data_name, size)
            write_atomic(final, text.encode(), 0o600)


def _clean(replicas: str) -> None:
    """Remove what a crash left of an image being made."""
    for name in os.listdir(replicas):
        if name.startswith(LEFTOVER):
            shutil.rmtree(os.path.join(replicas, name), ignore_errors=True)


def _run(cmd: List[str]) -> None:
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT)
    if done.returncode != 0:
        why = done.stderr.strip().splitlines() or ["exit status %d" % done.returncode]
        raise images.Unsupported("%s %s: %s" % (os.path.basename(cmd[0]), cmd[1], why[-1]))
