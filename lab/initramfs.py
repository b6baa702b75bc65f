"""The lab guest's initramfs: busybox, e2fsprogs, the kernel's modules, ``/init`` and a script.

Linux unpacks a concatenation of separately compressed cpio archives: everything but the
script is a cached base archive, and each build only appends a tiny archive holding the
script, so a new script costs milliseconds. See guest.py for the whole.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .kernel import (
    ensure_kernel,
    kernel_release,
    module_name,
    modules_dir,
    read_module,
    resolve_modules,
)

GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_rng", "virtio_console", "ext4")
HOST_TOOLS = ("mke2fs", "mkfs.ext4", "e2fsck", "fsck.ext4", "tune2fs", "dumpe2fs")
HOST_FILES = ("/etc/mke2fs.conf",)
OPTIONAL_TOOLS = ("qemu-ga",)  # asked for by name; in the guest if the host has them
BUSYBOX = "/bin/busybox"
BASE_FORMAT = 1  # bump when the base archive's layout or /init changes

INIT = r"""#!/bin/sh
# Ferry lab guest: mount, load modules, wait for disks, run /ferry/script, report, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /tmp /mnt /root /run
for m in $(cat /etc/ferry/modules); do
    insmod "/lib/modules/$m" || echo "ferry-init: insmod $m failed"
done
want=$(sed -n 's/.*ferry\.disks=\([0-9]*\).*/\1/p' /proc/cmdline)
n=0
while [ "$(ls /dev | grep -c '^vd[a-z]*$')" -lt "${want:-0}" ] && [ "$n" -lt 200 ]; do
    sleep 0.1
    n=$((n + 1))
done
cd /root
echo  # the firmware's terminal escapes end without a newline; start the script's lines clean
sh -e /ferry/script
rc=$?
echo
echo "FERRY-GUEST-EXIT $rc"
sync
poweroff -f
while :; do sleep 1; done
"""



# --- cpio (newc) --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str  # without leading slash
    mode: int  # including the file type bits
    data: bytes = b""  # file content, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)


def _cpio(entries: Iterable[_Entry], first_ino: int = 1) -> bytes:
    """A newc archive: 110-byte ASCII header, NUL-terminated name, data, each 4-aligned."""
    out = bytearray()

    def put(ino: int, entry: _Entry) -> None:
        name = entry.name.encode() + b"\0"
        nlink = 2 if (entry.mode & 0o170000) == 0o040000 else 1
        fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(entry.data)
        out.extend(b"\0" * (-len(out) % 4))

    ino = first_ino
    for entry in entries:
        put(ino, entry)
        ino += 1
    put(0, _Entry("TRAILER!!!", 0))
    return bytes(out)


def _dir(name: str) -> _Entry:
    return _Entry(name, 0o040755)


def _file(name: str, data: bytes, mode: int = 0o644) -> _Entry:
    return _Entry(name, 0o100000 | mode, data)


def _symlink(name: str, target: str) -> _Entry:
    return _Entry(name, 0o120777, target.encode())


# --- initramfs --------------------------------------------------------------------------


def build_initramfs(cache_dir: Path, script: str, out: Path | None = None,
                    extra_tools: Sequence[str] = ()) -> Path:
    """Write an initramfs that runs ``script`` and return its path.

    The base archive (busybox, modules, host tools, /init) is cached in
    ``cache_dir/initramfs/``; the result is the base followed by a small archive holding
    the script. Without ``out``, the result is cached there too, named by the script's hash.
    Files are replaced atomically, so parallel builds do not see half-written archives.
    ``extra_tools`` (of ``OPTIONAL_TOOLS``) go into the base too where the host has them.
    """
    vmlinuz = ensure_kernel(cache_dir)
    base = _ensure_base(cache_dir, vmlinuz, extra_tools)
    digest = hashlib.sha256(script.encode()).hexdigest()[:16]
    if out is None:
        out = base.parent / f"guest-{base.name.removesuffix('.cpio.gz')}-{digest}.cpio.gz"
        if out.exists():
            return out
    overlay = _cpio(
        [_dir("ferry"), _file("ferry/script", script.encode(), 0o755)], first_ino=1 << 20
    )
    _write_atomically(out, base.read_bytes() + gzip.compress(overlay, mtime=0))
    return out


def _ensure_base(cache_dir: Path, vmlinuz: Path, extra_tools: Sequence[str] = ()) -> Path:
    tools = [shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") for t in HOST_TOOLS]
    missing = [t for t, p in zip(HOST_TOOLS, tools) if p is None]
    if missing:
        raise RuntimeError(f"host tools missing: {', '.join(missing)} (apt-get install e2fsprogs)")
    if not os.path.exists(BUSYBOX):
        raise RuntimeError(f"{BUSYBOX} missing (apt-get install busybox-static)")
    assert set(extra_tools) <= set(OPTIONAL_TOOLS), extra_tools
    tools += [p for p in (shutil.which(t, path="/usr/sbin:/usr/bin") for t in extra_tools)
              if p is not None]  # (qemu-ga: only where the host has qemu-guest-agent)
    inputs = [BUSYBOX, *(p for p in tools if p), *HOST_FILES]
    key = hashlib.sha256(
        json.dumps(
            [
                BASE_FORMAT,
                INIT,
                GUEST_MODULES,
                kernel_release(vmlinuz),
                [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in inputs],
            ]
        ).encode()
    ).hexdigest()[:16]
    base = cache_dir / "initramfs" / f"base-{kernel_release(vmlinuz)}-{key}.cpio.gz"
    if not base.exists():
        entries = list(_base_entries(vmlinuz, [Path(p) for p in tools if p]))
        _write_atomically(base, gzip.compress(_cpio(entries), mtime=0))
    return base


def _base_entries(vmlinuz: Path, tools: Sequence[Path]) -> Iterator[_Entry]:
    dirs = set("bin sbin usr/bin usr/sbin etc/ferry dev proc sys tmp mnt root run".split())
    files: dict[str, _Entry] = {}

    def add_libraries(binary: Path) -> None:
        for lib in _shared_libraries(binary):
            name = str(lib).lstrip("/")
            files[name] = _file(name, lib.resolve().read_bytes(), 0o755)

    # Host tools and everything they load, at the paths ldd reports.
    for tool in tools:
        real = tool.resolve()
        files[f"usr/sbin/{real.name}"] = _file(f"usr/sbin/{real.name}", real.read_bytes(), 0o755)
        if real.name != tool.name:
            files[f"usr/sbin/{tool.name}"] = _symlink(f"usr/sbin/{tool.name}", real.name)
        add_libraries(real)
    for path in HOST_FILES:
        files[path.lstrip("/")] = _file(path.lstrip("/"), Path(path).read_bytes())

    # busybox and its applets, except where a real host tool takes the name.
    files["bin/busybox"] = _file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    add_libraries(Path(BUSYBOX))  # none for busybox-static, but the plain package works too
    applets = subprocess.run(
        [BUSYBOX, "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    host_names = {t.name for t in tools}
    for applet in applets:
        if applet != "busybox" and applet not in host_names:
            files[f"bin/{applet}"] = _symlink(f"bin/{applet}", "busybox")

    modules = resolve_modules(modules_dir(vmlinuz), GUEST_MODULES)
    for ko in modules:
        name = f"lib/modules/{module_name(ko)}.ko"
        files[name] = _file(name, read_module(ko))
    order = "".join(f"{module_name(ko)}.ko\n" for ko in modules)
    files["etc/ferry/modules"] = _file("etc/ferry/modules", order.encode())
    files["etc/mtab"] = _symlink("etc/mtab", "/proc/mounts")
    files["init"] = _file("init", INIT.encode(), 0o755)

    for name in files:
        parent = os.path.dirname(name)
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    yield from (_dir(d) for d in sorted(dirs))
    yield _Entry("dev/console", 0o020600, rdev=(5, 1))
    yield from (files[name] for name in sorted(files))


def _shared_libraries(binary: Path) -> list[Path]:
    """Absolute paths of the libraries and loader ldd lists for ``binary`` (none if static)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename (no fsync: it is a rebuildable cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
