"""Disk image formats: which one a file holds, and what Ferry does with it.

Everything Ferry knows about image formats is here (the splitter imports it too, so: standard
library only, Python 3.9 and later).

- ``sniff(path)`` names the format from the file's first bytes (its magic), never from its
  name: ``raw``, ``qcow2``, ``vmdk``, or another format qemu knows (``qcow``, ``vdi``,
  ``vhdx``, ``vpc``, ``qed``, ``luks``, ``parallels``, ``bochs``, ``cloop``), which Ferry
  refuses. A file with no known magic is raw.
- ``inspect(path, check_file)`` is what ``protect`` asks: the format, the virtual size (the
  disk the guest sees) and every file the image reads (backing chain, external data file,
  VMDK extents), each passed to ``check_file`` (the site's path policy); or ``Unsupported``
  with one line saying why (an encrypted image, an unsupported format or VMDK subformat, a
  backing file with no recorded format, a file that is not a plain path).
- The format decided at ``protect`` is pinned: the splitter is told it and opens the image
  with it (``qemu-nbd --format``), so a guest that writes a qcow2 header into its raw disk
  never makes Ferry read the host's files through a backing file of its choosing.
- ``qemu_nbd_command`` is how a non-raw image is served to the splitter; ``convert_command``
  how a restore writes a format.
- A replica kept as qcow2 or VMDK (``protect --replica-format``) is an image over the raw
  replica file: ``qcow2_over_raw_commands`` (a qcow2 whose external data file, in raw mode,
  is the replica) and ``vmdk_over_raw`` (a monolithicFlat descriptor whose one extent is
  the replica); ``image_over_raw`` reads back which raw file and size such an image names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

RAW, QCOW2, VMDK = "raw", "qcow2", "vmdk"
PROTECTABLE = (RAW, QCOW2, VMDK)
VMDK_SUBFORMATS = ("monolithicSparse", "monolithicFlat")
# What a restore (or a replica) may be written as, with the options each takes.
OUTPUT_FORMATS = (RAW, QCOW2, VMDK)
REPLICA_FORMATS = (RAW, QCOW2, VMDK)
REPLICA_SUFFIX = {RAW: ".img", QCOW2: ".qcow2", VMDK: ".vmdk"}
OVER_RAW_CLUSTER = "1M"  # the qcow2 over a replica maps all of it: 12 MiB of tables per TiB
# One file each: a restore is written into one unnamed file (monolithicFlat needs two).
OUTPUT_SUBFORMATS = {VMDK: ("monolithicSparse", "streamOptimized")}
INFO_TIMEOUT = 60.0
MAX_CHAIN = 64                 # images in a backing chain
_DESCRIPTOR_MAX = 64 * 1024    # bytes of a VMDK text descriptor read

# (offset, magic, format): qemu's own probes, in the order qemu tries them.
_MAGICS = (
    (0, b"QFI\xfb\x00\x00\x00\x01", "qcow"),
    (0, b"QFI\xfb", QCOW2),
    (0, b"QED\x00", "qed"),
    (0, b"KDMV", VMDK),
    (0, b"COWD", "vmdk-cowd"),
    (0, b"# Disk DescriptorFile", VMDK),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
)
_SNIFF_BYTES = 512


class Unsupported(Exception):
    """The image cannot be protected (or read) as asked; the message is one line."""


@dataclass(frozen=True)
class Image:
    path: str
    format: str                 # raw, qcow2 or vmdk
    virtual_size: int           # bytes the guest sees
    subformat: str = ""         # VMDK: monolithicSparse or monolithicFlat
    files: List[str] = field(default_factory=list)  # other files it reads (absolute)


def sniff_bytes(head: bytes) -> str:
    """The format a file's first bytes say it is (``raw`` when none)."""
    for offset, magic, name in _MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return name
    return RAW


def sniff(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        return sniff_bytes(os.pread(fd, _SNIFF_BYTES, 0))
    finally:
        os.close(fd)


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise Unsupported("%s is not installed (Debian: apt-get install qemu-utils)" % name)
    return found


def _info(path: str, fmt: str) -> dict:
    """``qemu-img info`` of one layer, its backing file not opened (``"backing": null``)."""
    try:
        block = stat.S_ISBLK(os.stat(path).st_mode)
    except OSError as e:
        raise Unsupported("%s: %s" % (path, e.strerror or e)) from None
    spec: Dict[str, Any] = {"driver": fmt, "file": {
        "driver": "host_device" if block else "file", "filename": path}}
    if fmt != RAW:
        spec["backing"] = None
    cmd = [tool("qemu-img"), "info", "-U", "--output=json", "json:" + json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=INFO_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise Unsupported("qemu-img info %s did not answer within %g s"
                          % (path, INFO_TIMEOUT)) from None
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"]
        raise Unsupported("qemu-img cannot open %s as %s: %s" % (path, fmt, why[-1]))
    info = json.loads(proc.stdout)
    if not isinstance(info, dict):
        raise Unsupported("qemu-img info %s: unexpected answer" % path)
    return info


_EXTENT = re.compile(r'^[ \t]*(?:RW|RDONLY|NOACCESS)[ \t]+\d+[ \t]+\w+[ \t]+"([^"]*)"', re.M)


def descriptor_extents(path: str) -> List[str]:
    """The files a VMDK text descriptor names (read here, before qemu opens any)."""
    with open(path, "rb") as f:
        head = f.read(_DESCRIPTOR_MAX)
    if not head.startswith(b"# Disk DescriptorFile"):
        return []
    return _EXTENT.findall(head.decode("utf-8", "replace"))


_FLAT = re.compile(r'^[ \t]*RW[ \t]+(\d+)[ \t]+FLAT[ \t]+"([^"]*)"[ \t]+(\d+)[ \t]*$', re.M)
_CREATE_TYPE = re.compile(r'^[ \t]*createType[ \t]*=[ \t]*"([^"]*)"', re.M)


def flat_extent(path: str) -> Tuple[str, int]:
    """The data file of a monolithicFlat VMDK (its one extent, written from its first byte)
    and the disk's size: where a VMDK container's bytes are, with no qemu in between.
    Unsupported, in one line, for any other VMDK."""
    with open(path, "rb") as f:
        head = f.read(_DESCRIPTOR_MAX)
    if not head.startswith(b"# Disk DescriptorFile"):
        raise Unsupported("%s is a VMDK with its descriptor embedded (a sparse VMDK): only "
                          "a monolithicFlat VMDK has its bytes in one plain file" % path)
    text = head.decode("utf-8", "replace")
    create = _CREATE_TYPE.search(text)
    flat = _FLAT.findall(text)
    if create is None or create.group(1) != "monolithicFlat" or len(flat) != 1 \
            or len(_EXTENT.findall(text)) != 1:
        raise Unsupported("%s is a VMDK of subformat %s: only a monolithicFlat VMDK (one flat "
                          "extent) has its bytes in one plain file"
                          % (path, create.group(1) if create else "(unknown)"))
    sectors, name, offset = flat[0]
    if int(offset) != 0:
        raise Unsupported("%s: its flat extent starts at sector %s of %s, not at its first "
                          "byte" % (path, offset, name))
    return _plain(name, "extent of %s" % path, os.path.dirname(path)), int(sectors) * 512


def _plain(name: str, what: str, base_dir: str) -> str:
    """A file an image names, as an absolute path; protocols and json: are refused."""
    if name.startswith("json:") or ("://" in name) or (":" in name.split("/")[0]):
        raise Unsupported("%s %r is not a plain file name" % (what, name))
    return os.path.normpath(os.path.join(base_dir, name))


def refusal(path: str, fmt: str) -> str:
    if fmt == "luks":
        return "%s is a LUKS-encrypted image: Ferry cannot protect encrypted images" % path
    return ("%s is a %s image: Ferry protects raw, qcow2 and VMDK (%s) images (convert it "
            "with qemu-img convert -O qcow2)" % (path, fmt, ", ".join(VMDK_SUBFORMATS)))


def inspect(path: str, check_file: Callable[[str, str], object] = lambda what, p: None
            ) -> Image:
    """What ``protect`` needs to know of the image at ``path`` (absolute), or Unsupported.

    ``check_file(what, path)`` is called on every other file the image reads, before qemu
    opens it, and raises when the site must not read it. The chain is walked a layer at a
    time: each backing file is checked, then opened (with its recorded format)."""
    fmt = sniff(path)
    if fmt == RAW:
        return Image(path, RAW, _size(path))
    if fmt not in PROTECTABLE:
        raise Unsupported(refusal(path, fmt))
    files: List[str] = []

    def other(name: str, what: str, base_dir: str) -> None:
        f = _plain(name, what, base_dir)
        if f != path and f not in files:
            check_file("file %s (read by %s)" % (f, path), f)
            files.append(f)

    layer, layer_fmt = path, fmt
    top: Dict[str, Any] = {}
    subformat = ""
    for _depth in range(MAX_CHAIN):
        layer_dir = os.path.dirname(layer)
        if layer_fmt == RAW:
            break
        if layer_fmt == VMDK:
            for name in descriptor_extents(layer):
                other(name, "extent of %s" % layer, layer_dir)
        info = _info(layer, layer_fmt)
        top = top or info
        if info.get("encrypted"):
            raise Unsupported("%s is an encrypted %s image: Ferry cannot protect encrypted "
                              "images" % (layer, layer_fmt))
        spec = (info.get("format-specific") or {}).get("data") or {}
        if spec.get("data-file"):
            other(spec["data-file"], "data file of %s" % layer, layer_dir)
        if layer_fmt == VMDK:
            create = spec.get("create-type", "")
            if create not in VMDK_SUBFORMATS:
                raise Unsupported("%s is a VMDK of subformat %s: Ferry protects %s"
                                  % (layer, create or "(unknown)", ", ".join(VMDK_SUBFORMATS)))
            subformat = subformat or create
            for ext in spec.get("extents", []):
                other(ext.get("filename", ""), "extent of %s" % layer, layer_dir)
        backing = info.get("backing-filename")
        if not backing:
            break
        backing_fmt = info.get("backing-filename-format")
        if not backing_fmt:
            raise Unsupported("%s names backing file %s without its format: record it "
                              "(qemu-img rebase -u -F FORMAT -b %s %s)"
                              % (layer, backing, backing, layer))
        if backing_fmt not in PROTECTABLE:
            raise Unsupported("%s names backing file %s of format %s: %s"
                              % (layer, backing, backing_fmt, "not supported"))
        following = _plain(backing, "backing file of %s" % layer, layer_dir)
        if following == path or following in files:
            raise Unsupported("%s: its backing chain comes back to %s" % (path, following))
        other(following, "backing file of %s" % layer, layer_dir)
        layer, layer_fmt = following, backing_fmt
    else:
        raise Unsupported("%s: a backing chain of more than %d images" % (path, MAX_CHAIN))
    return Image(path, fmt, int(top["virtual-size"]), subformat, files)


def _size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def qemu_nbd_command(path: str, fmt: str, socket: str) -> List[str]:
    """qemu-nbd serving ``path`` (of format ``fmt``, pinned) as the guest sees it, on a Unix
    socket, to any number of connections; it exits when its last connection closes."""
    if fmt not in (QCOW2, VMDK):
        raise Unsupported("qemu-nbd backend: format %r is not one Ferry serves" % fmt)
    return [tool("qemu-nbd"), "--format=" + fmt, "--socket=" + socket, "--shared=0",
            "--cache=writeback", "--aio=threads", "--discard=unmap", path]


def convert_command(source_uri: str, dest: str, fmt: str, subformat: Optional[str] = None,
                    compress: bool = False, options: Sequence[str] = ()) -> List[str]:
    """``qemu-img convert`` from an NBD export to a new image ``dest`` of format ``fmt``:
    one pass, sparse where the source reads as zeroes, with progress on stdout."""
    if fmt not in OUTPUT_FORMATS:
        raise Unsupported("format %r: choose one of %s" % (fmt, ", ".join(OUTPUT_FORMATS)))
    opts = list(options)
    if subformat:
        if subformat not in OUTPUT_SUBFORMATS.get(fmt, ()):
            raise Unsupported("subformat %r is not one of format %s's (%s)" % (
                subformat, fmt, ", ".join(OUTPUT_SUBFORMATS.get(fmt, ())) or "none"))
        opts.append("subformat=" + subformat)
    cmd = [tool("qemu-img"), "convert", "-p", "-f", "raw", "-O", fmt]
    if compress:
        if fmt != QCOW2:
            raise Unsupported("--compress is for qcow2 only")
        cmd.append("-c")
    if opts:
        cmd += ["-o", ",".join(opts)]
    return [*cmd, source_uri, dest]


def qcow2_over_raw_commands(image: str, scratch: str, data_name: str, size: int
                            ) -> List[List[str]]:
    """Commands that make ``image``, a qcow2 of ``size`` bytes whose data file is
    ``data_name`` (absolute: qemu 7.2 opens a relative one from its working directory; the
    file is neither opened nor changed here) in raw mode:
    every cluster mapped at its own offset, so the raw file always is the disk, whoever
    writes it. ``qemu-img create`` would truncate a data file it is given, so the image is
    made over ``scratch`` (a new file, removed after) and then pointed at ``data_name``."""
    qemu_img = tool("qemu-img")
    spec = {"driver": QCOW2, "file": {"driver": "file", "filename": image},
            "data-file": {"driver": "file", "filename": scratch}}
    return [[qemu_img, "create", "-q", "-f", QCOW2, "-o",
             "data_file=%s,data_file_raw=on,cluster_size=%s" % (scratch, OVER_RAW_CLUSTER),
             image, str(_sectors(size) * 512)],
            [qemu_img, "amend", "-q", "-f", QCOW2, "-o", "data_file=" + data_name,
             "json:" + json.dumps(spec)]]


def vmdk_over_raw(descriptor: str, data_name: str, size: int) -> str:
    """``descriptor`` (the text ``qemu-img create -f vmdk -o subformat=monolithicFlat``
    wrote, for a disk of ``size`` bytes) with its one flat extent named ``data_name``."""
    flat = _FLAT.findall(descriptor)
    if len(flat) != 1 or '"' in data_name or "\n" in data_name:
        raise Unsupported("not a monolithicFlat descriptor of one extent")
    return _FLAT.sub('RW %d FLAT "%s" 0' % (_sectors(size), data_name), descriptor, count=1)


def image_over_raw(path: str, fmt: str) -> Tuple[str, int]:
    """The raw file (absolute) and the size a qcow2 or VMDK made over a replica names:
    ``("", 0)`` when it is not such an image (damaged, or of another kind)."""
    try:
        if fmt == VMDK:
            return flat_extent(path)
        with open(path, "rb") as f:
            head = f.read(4096)
    except (OSError, Unsupported):
        return "", 0
    if len(head) < 104 or head[:4] != b"QFI\xfb":
        return "", 0
    version = int.from_bytes(head[4:8], "big")
    size = int.from_bytes(head[24:32], "big")
    incompatible = int.from_bytes(head[72:80], "big") if version >= 3 else 0
    if version < 3 or not incompatible & 4:   # bit 2: an external data file
        return "", 0
    length = int.from_bytes(head[100:104], "big")
    at = length  # header extensions follow the header
    while at + 8 <= len(head):
        kind = int.from_bytes(head[at:at + 4], "big")
        n = int.from_bytes(head[at + 4:at + 8], "big")
        if kind == 0:
            break
        if kind == 0x44415441:  # "DATA": the data file's name
            name = head[at + 8:at + 8 + n].decode("utf-8", "replace")
            return os.path.normpath(os.path.join(os.path.dirname(path), name)), size
        at += 8 + (n + 7) // 8 * 8
    return "", 0


def _sectors(size: int) -> int:
    return -(-size // 512)
