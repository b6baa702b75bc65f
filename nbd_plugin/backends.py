"""Which backend serves a protected disk: chosen by the format ``protect`` pinned.

- ``raw`` (a raw file or a block device): ``LocalDisk``, the file itself, read and written
  with the kernel's calls.
- ``qcow2``, ``vmdk``: ``QemuDisk``, the image opened by qemu's block layer (qemu-nbd on a
  private Unix socket), so the guest sees the virtual disk, not the container.

Both have one interface (size, pread, read, pwrite, flush, zero, trim, all_zero, is_hole,
close) and raise ``OSError`` with the errno to hand back to the NBD client.
"""

from __future__ import annotations

from typing import Union

from formats import images
from nbd_plugin.disk import LocalDisk
from nbd_plugin.qemudisk import QemuDisk

Disk = Union[LocalDisk, QemuDisk]


def open_disk(path: str, fmt: str, qemu_socket: str, log_path: str = "") -> Disk:
    if fmt == images.RAW:
        return LocalDisk(path)
    if fmt not in images.PROTECTABLE:
        raise ValueError("format %r: the splitter serves %s" % (fmt, ", ".join(images.PROTECTABLE)))
    if not qemu_socket:
        raise ValueError("format %s needs qemu_socket=PATH" % fmt)
    return QemuDisk(path, fmt, qemu_socket, log_path)
