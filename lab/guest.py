"""A throwaway Linux guest that runs one shell script against NBD disks, then powers off.

Theory of operation
-------------------
The lab must exercise Ferry's data path with a real guest kernel writing through qemu's NBD
client, on machines where /dev/kvm does not run guests (CI runners, nested containers). So:

* **TCG, not KVM.** ``qemu-system-x86_64 -accel tcg`` emulates the CPU in software. A boot to
  the script takes seconds, which is fine for a guest that only runs ``mkfs`` and ``dd``.
* **A Debian cloud kernel.** ``linux-image-*-cloud-amd64`` is small, matches the host's
  distribution and is fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``
  into the cache; nothing is installed on the host. Its ext4, jbd2, crc32c and the serial
  console are built in; virtio is modular, so the initramfs carries ``virtio``,
  ``virtio_ring``, ``virtio_pci`` (+ ``virtio_pci_modern_dev``, ``virtio_pci_legacy_dev``)
  and ``virtio_blk``, plus ``virtio_rng`` behind a ``virtio-rng-pci`` device: without an
  entropy source the emulated guest waits ~4 s for its random pool, and mke2fs (libuuid's
  getrandom) with it. Dependencies come from modules.dep when the tree has one, else from
  each module's ``.modinfo`` section: the .deb ships no modules.dep (its postinst runs
  depmod) and the host need not have kmod.
* **busybox, no root file system.** The guest lives entirely in a gzip'd newc initramfs:
  busybox-static with its applet links, the host's e2fsprogs with their shared libraries
  and loader (found with ldd), and an ``/init`` that loads the modules, waits for the disks
  (``/dev/vda``, ``/dev/vdb``, ... in the order given), runs the caller's script with
  ``sh -e``, prints ``FERRY-GUEST-EXIT <rc>`` on the serial console, syncs and powers off.
  ``-no-reboot`` with ``panic=-1`` turns a guest panic into a qemu exit, never a hang.
* **Two concatenated archives.** Linux unpacks a concatenation of (separately compressed)
  cpio archives. Everything but the script is a cached base archive; each build only
  appends a tiny archive holding the script, so a new script costs milliseconds.

The host side (:class:`Guest`) starts qemu in the background, writes the serial console
to a log file, and parses the marker. Used as a context manager, it kills qemu on the way
out, whatever happened.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

EXIT_MARKER = "FERRY-GUEST-EXIT"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_rng", "ext4")
HOST_TOOLS = ("mke2fs", "mkfs.ext4", "e2fsck", "fsck.ext4", "tune2fs", "dumpe2fs")
HOST_FILES = ("/etc/mke2fs.conf",)
BUSYBOX = "/bin/busybox"
BASE_FORMAT = 1  # bump when the base archive's layout or /init changes
# The serial console on stdout; a virtio RNG so the guest's entropy pool fills at once.
QEMU_ARGS = (
    "-accel tcg -smp 1 -nodefaults -no-user-config -nographic -serial stdio"
    " -device virtio-rng-pci -no-reboot"
).split()

_EXIT_RE = re.compile(rf"^{EXIT_MARKER} (\d+)\r?$", re.MULTILINE)

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


class GuestError(Exception):
    """The guest did not report an exit code; the message ends with the console's tail."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(f"{message}\n--- guest log tail ---\n{log_tail}")
        self.log_tail = log_tail


class GuestTimeout(GuestError):
    """The guest is still running when the caller stopped waiting; it is left running."""


# --- kernel -------------------------------------------------------------------------------


def ensure_kernel(cache_dir: Path) -> Path:
    """Return the path of a Debian cloud kernel under ``cache_dir``, fetching it if needed.

    The package is unpacked (not installed) to ``cache_dir/kernel/<release>/``, so the
    modules sit beside it in ``lib/modules/<release>/``. A cached kernel is used without
    asking apt, so a warm cache works offline.
    """
    kernels = cache_dir / "kernel"
    cached = sorted(
        (p for p in kernels.glob("*/boot/vmlinuz-*") if not p.parents[1].name.startswith(".")),
        key=lambda p: _natural(p.name),
    )
    if cached:
        return cached[-1]
    try:
        deb = _download_kernel(cache_dir)
    except subprocess.CalledProcessError:
        # Typically a fresh machine whose apt lists were never fetched.
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)
        deb = _download_kernel(cache_dir)
    release = _release_from_package(deb.name.split("_", 1)[0])
    kernels.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=kernels, prefix=".unpack-")
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        try:
            os.rename(tmp, kernels / release)  # a kernel directory is complete or absent
        except OSError:
            if not (kernels / release).is_dir():
                raise  # else a parallel fetch got there first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    deb.unlink(missing_ok=True)
    return kernels / release / "boot" / f"vmlinuz-{release}"


def _download_kernel(cache_dir: Path) -> Path:
    out = subprocess.run(
        ["apt-cache", "depends", KERNEL_META_PACKAGE], check=True, capture_output=True, text=True
    ).stdout
    match = re.search(r"Depends: (linux-image-\S+-cloud-amd64)\s", out)
    if match is None:
        raise RuntimeError(f"no kernel package in `apt-cache depends {KERNEL_META_PACKAGE}`")
    package = match.group(1)
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", package], cwd=downloads, check=True, capture_output=True)
    debs = sorted(downloads.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} left no .deb in {downloads}")
    return debs[-1]


def _release_from_package(package: str) -> str:
    return package.removeprefix("linux-image-")


def _natural(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _kernel_release(vmlinuz: Path) -> str:
    return vmlinuz.name.removeprefix("vmlinuz-")


def _modules_dir(vmlinuz: Path) -> Path:
    return vmlinuz.parent.parent / "lib" / "modules" / _kernel_release(vmlinuz)


# --- kernel modules ---------------------------------------------------------------------


def _module_name(path: Path | str) -> str:
    return Path(path).name.split(".ko", 1)[0].replace("-", "_")


def _modinfo_depends(ko: Path) -> list[str]:
    """The ``depends=`` entry of a module's ``.modinfo`` ELF section (64-bit little endian)."""
    data = _read_module(ko)
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    for name_off, _type, _flags, _addr, offset, size in sections:
        start = names_at + name_off
        if data[start : data.index(b"\0", start)] == b".modinfo":
            for entry in data[offset : offset + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [d for d in entry[8:].decode().split(",") if d]
            return []
    raise RuntimeError(f"{ko}: no .modinfo section")


def _read_module(ko: Path) -> bytes:
    """A module's ELF bytes; busybox insmod wants them uncompressed."""
    if ko.name.endswith(".ko.xz"):
        return lzma.decompress(ko.read_bytes())
    if ko.name.endswith(".ko.gz"):
        return gzip.decompress(ko.read_bytes())
    if ko.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(ko)], check=True, capture_output=True).stdout
    return ko.read_bytes()


def resolve_modules(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """Module files to load, dependencies first; built-in modules are left out."""
    builtin_file = modules_dir / "modules.builtin"
    builtin = {_module_name(line) for line in builtin_file.read_text().split()}
    files = {_module_name(p): p for p in (modules_dir / "kernel").rglob("*.ko*")}
    dep_file = modules_dir / "modules.dep"
    deps: dict[str, list[str]] = {}
    if dep_file.exists():
        for line in dep_file.read_text().splitlines():
            ko, _, rest = line.partition(":")
            deps[_module_name(ko)] = [_module_name(d) for d in rest.split()]

    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in builtin:
            return
        if name in chain:
            raise RuntimeError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in files:
            raise RuntimeError(f"kernel module {name} not found under {modules_dir}")
        if name not in deps:
            deps[name] = [_module_name(d) for d in _modinfo_depends(files[name])]
        for dep in deps[name]:
            visit(dep, (*chain, name))
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return [files[name] for name in order]


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


def build_initramfs(cache_dir: Path, script: str, out: Path | None = None) -> Path:
    """Write an initramfs that runs ``script`` and return its path.

    The base archive (busybox, modules, host tools, /init) is cached in
    ``cache_dir/initramfs/``; the result is the base followed by a small archive holding
    the script. Without ``out``, the result is cached there too, named by the script's hash.
    Files are replaced atomically, so parallel builds do not see half-written archives.
    """
    vmlinuz = ensure_kernel(cache_dir)
    base = _ensure_base(cache_dir, vmlinuz)
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


def _ensure_base(cache_dir: Path, vmlinuz: Path) -> Path:
    tools = [shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") for t in HOST_TOOLS]
    missing = [t for t, p in zip(HOST_TOOLS, tools) if p is None]
    if missing:
        raise RuntimeError(f"host tools missing: {', '.join(missing)} (apt-get install e2fsprogs)")
    if not os.path.exists(BUSYBOX):
        raise RuntimeError(f"{BUSYBOX} missing (apt-get install busybox-static)")
    inputs = [BUSYBOX, *(p for p in tools if p), *HOST_FILES]
    key = hashlib.sha256(
        json.dumps(
            [
                BASE_FORMAT,
                INIT,
                GUEST_MODULES,
                _kernel_release(vmlinuz),
                [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in inputs],
            ]
        ).encode()
    ).hexdigest()[:16]
    base = cache_dir / "initramfs" / f"base-{_kernel_release(vmlinuz)}-{key}.cpio.gz"
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

    modules = resolve_modules(_modules_dir(vmlinuz), GUEST_MODULES)
    for ko in modules:
        name = f"lib/modules/{_module_name(ko)}.ko"
        files[name] = _file(name, _read_module(ko))
    order = "".join(f"{_module_name(ko)}.ko\n" for ko in modules)
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


# --- qemu ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Disk:
    """A guest disk: an NBD URI (``nbd+unix:///export?socket=/path``, ``nbd://host:port/export``)
    or a raw image file. ``reconnect_delay`` (seconds, NBD only) lets qemu hold the guest's
    requests while the server is away instead of failing them at once."""

    target: str | Path
    reconnect_delay: int | None = None

    def blockdev(self, node: str) -> dict[str, object]:
        target = str(self.target)
        if not target.startswith("nbd"):
            if self.reconnect_delay is not None:
                raise ValueError("reconnect_delay applies to NBD disks only")
            return {
                "driver": "raw",
                "node-name": node,
                "file": {"driver": "file", "filename": target},
            }
        uri = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(uri.query)
        server: dict[str, str]
        if uri.scheme == "nbd+unix":
            if "socket" not in query:
                raise ValueError(f"{target}: nbd+unix URI without ?socket=")
            server = {"type": "unix", "path": query["socket"][0]}
        elif uri.scheme == "nbd":
            server = {
                "type": "inet",
                "host": uri.hostname or "localhost",
                "port": str(uri.port or 10809),
            }
        else:
            raise ValueError(f"{target}: unsupported NBD URI scheme {uri.scheme!r}")
        spec: dict[str, object] = {"driver": "nbd", "node-name": node, "server": server}
        export = urllib.parse.unquote(uri.path.lstrip("/"))
        if export:
            spec["export"] = export
        if self.reconnect_delay is not None:
            spec["reconnect-delay"] = self.reconnect_delay
        return spec


class Guest:
    """One qemu (TCG) boot of a lab kernel and initramfs, with disks as /dev/vda, vdb, ...

    ``start()`` returns at once; ``wait_for()`` and ``wait()`` poll the serial log. As a
    context manager the guest is started on entry and qemu is killed on exit.
    """

    POLL_SECONDS = 0.1
    POWEROFF_GRACE_SECONDS = 10.0

    def __init__(
        self,
        kernel: Path,
        initrd: Path,
        disks: Sequence[Disk | str | Path],
        log: Path,
        *,
        memory_mb: int = 512,
        machine: str = "q35",
        append: str = "",
        qemu: str = "qemu-system-x86_64",
    ) -> None:
        self.kernel = kernel
        self.initrd = initrd
        self.disks = [d if isinstance(d, Disk) else Disk(d) for d in disks]
        self.log = log
        self.memory_mb = memory_mb
        self.machine = machine
        self.append = append
        self.qemu = qemu
        self._proc: subprocess.Popen[bytes] | None = None
        self._exit_code: int | None = None

    def command(self) -> list[str]:
        append = f"console=ttyS0 quiet panic=-1 ferry.disks={len(self.disks)} {self.append}"
        cmd = [self.qemu, *QEMU_ARGS, "-machine", self.machine, "-m", str(self.memory_mb)]
        cmd += ["-kernel", str(self.kernel), "-initrd", str(self.initrd)]
        cmd += ["-append", append.strip()]
        for i, disk in enumerate(self.disks):
            node = f"disk{i}"
            cmd += ["-blockdev", json.dumps(disk.blockdev(node))]
            cmd += ["-device", f"virtio-blk-pci,drive={node}"]
        return cmd

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("guest already started")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def output(self) -> str:
        """The serial console (and qemu's own messages) so far."""
        try:
            return self.log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().replace("\r", "").splitlines()[-lines:])

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until the console matches ``pattern`` (multiline) and return the match.

        Raises GuestError if qemu exits first, GuestTimeout if time runs out; the guest is
        left running then, so a caller may fix what blocks it and wait again.
        """
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        proc = self._running_proc()
        deadline = time.monotonic() + timeout
        while True:
            exited = proc.poll() is not None  # before reading: the log is complete if so
            match = regex.search(self.output())
            if match:
                return match
            if exited:
                raise GuestError(
                    f"qemu exited ({proc.returncode}) before {regex.pattern!r}", self.tail()
                )
            if time.monotonic() >= deadline:
                raise GuestTimeout(f"no {regex.pattern!r} after {timeout:g}s", self.tail())
            time.sleep(self.POLL_SECONDS)

    def wait(self, timeout: float) -> int:
        """Wait for the guest's ``FERRY-GUEST-EXIT`` line and qemu's exit; return the code.

        Raises like :meth:`wait_for`: GuestError when qemu exits without the marker (a
        panic, a qemu error), GuestTimeout when the guest still runs after ``timeout``.
        """
        if self._exit_code is None:
            match = self.wait_for(_EXIT_RE, timeout)
            try:
                self._running_proc().wait(self.POWEROFF_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.kill()  # the script is done and the guest synced: nothing is lost
            self._exit_code = int(match.group(1))
        return self._exit_code

    def kill(self) -> None:
        """Kill qemu if it still runs; safe to call more than once."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _running_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("guest not started")
        return self._proc

    def __enter__(self) -> Guest:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
