"""Attaching a running domain's disk to its splitter without a reboot (blocking calls).

Theory of operation
-------------------
The splitter serves the very image qemu has open. ``virDomainBlockCopy`` starts a mirror
job (qemu's ``blockdev-mirror``) from the disk's current source onto the splitter's NBD
export, in **write-blocking** mode (``SYNCHRONOUS_WRITES``: a guest write completes only
once it is on both sides) and with a **full** copy (not shallow): every block of the disk
is written through the splitter once after the job starts, so whatever qemu wrote directly
to the image before the mirror began reaches the replica too. The copy rewrites the image
with its own content, block by block; qemu serialises a guest write with an in-flight copy
of the same range, so no stale block lands after a newer one. Once the job is ready
(source and export in step), the pivot switches the guest's disk to the export: from then
on every write goes through the splitter only. The persistent definition is rewritten
separately (``xml.attach``), so the next boot also uses the splitter.

Detaching is the same the other way: a mirror from the splitter's export onto the image
itself (the splitter keeps recording every write until the pivot), then the pivot back.

``qemu_pids`` names the domain's qemu among the processes that hold the image, so the
in-use check (``agent/inuse.py``) lets exactly that one through while the group is made.
"""

from __future__ import annotations

import time
from typing import Any, List
from xml.sax.saxutils import escape

from ..errors import TimedOut, Unavailable
from ..inuse import holders

READY_TIMEOUT = 600.0


def qemu_pids(paths: List[str], uuid: str) -> List[int]:
    """The pids that hold one of ``paths`` and run the domain ``uuid`` (its qemu)."""
    import os
    out = []
    for path in paths:
        for pid, _comm in holders(os.stat(path)):
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if uuid.encode() in args and pid not in out:
                out.append(pid)
    return out


def nbd_disk_xml(socket: str) -> str:
    return ("<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
            "<source protocol='nbd'><host transport='unix' socket='%s'/></source></disk>"
            % escape(socket, {"'": "&apos;"}))


def plain_disk_xml(kind: str, path: str) -> str:
    """The way back: the image file or block device itself."""
    return ("<disk type='%s' device='disk'><driver name='qemu' type='raw'/>"
            "<source %s='%s'/></disk>" % (kind, "dev" if kind == "block" else "file",
                                          escape(path, {"'": "&apos;"})))


def copy_and_pivot(libvirt: Any, dom: Any, name: str, dev: str, dest: str,
                   timeout: float = READY_TIMEOUT) -> float:
    """Mirror ``dev`` onto ``dest`` (a <disk> element: the splitter's export, or the way
    back to the image) and pivot to it; the pivot's seconds."""
    flags = (libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
             | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
             | libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES)
    try:
        dom.blockCopy(dev, dest, {}, flags)
    except libvirt.libvirtError as e:
        raise Unavailable("domain %s disk %s: cannot start the copy: %s"
                          % (name, dev, e.get_error_message())) from None
    deadline = time.monotonic() + timeout
    try:
        while True:
            info = dom.blockJobInfo(dev, 0)
            if info and info.get("end", 0) > 0 and info["cur"] == info["end"]:
                started = time.monotonic()
                try:
                    dom.blockJobAbort(dev, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                    return time.monotonic() - started
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
                        raise Unavailable("domain %s disk %s: pivot "
                                          "failed: %s" % (name, dev, e.get_error_message())
                                          ) from None
            if time.monotonic() > deadline:
                raise TimedOut("domain %s disk %s: the copy was not ready "
                               "within %g s" % (name, dev, timeout))
            time.sleep(0.05)
    except BaseException:
        try:
            dom.blockJobAbort(dev, 0)  # the guest stays on its image
        except libvirt.libvirtError:
            pass
        raise
