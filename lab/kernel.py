"""The lab guest's kernel: a Debian cloud kernel fetched into the cache, and its modules.

``linux-image-*-cloud-amd64`` is small and matches the host's distribution; it is fetched
with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the cache, nothing is
installed on the host. Module dependencies come from modules.dep when the tree has one,
else from each module's ``.modinfo`` section (the .deb ships no modules.dep). See guest.py.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"


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


def kernel_release(vmlinuz: Path) -> str:
    return vmlinuz.name.removeprefix("vmlinuz-")


def modules_dir(vmlinuz: Path) -> Path:
    return vmlinuz.parent.parent / "lib" / "modules" / kernel_release(vmlinuz)


# --- kernel modules ---------------------------------------------------------------------


def module_name(path: Path | str) -> str:
    return Path(path).name.split(".ko", 1)[0].replace("-", "_")


def _modinfo_depends(ko: Path) -> list[str]:
    """The ``depends=`` entry of a module's ``.modinfo`` ELF section (64-bit little endian)."""
    data = read_module(ko)
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


def read_module(ko: Path) -> bytes:
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
    builtin = {module_name(line) for line in builtin_file.read_text().split()}
    files = {module_name(p): p for p in (modules_dir / "kernel").rglob("*.ko*")}
    dep_file = modules_dir / "modules.dep"
    deps: dict[str, list[str]] = {}
    if dep_file.exists():
        for line in dep_file.read_text().splitlines():
            ko, _, rest = line.partition(":")
            deps[module_name(ko)] = [module_name(d) for d in rest.split()]

    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in builtin:
            return
        if name in chain:
            raise RuntimeError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in files:
            raise RuntimeError(f"kernel module {name} not found under {modules_dir}")
        if name not in deps:
            deps[name] = [module_name(d) for d in _modinfo_depends(files[name])]
        for dep in deps[name]:
            visit(dep, (*chain, name))
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return [files[name] for name in order]
