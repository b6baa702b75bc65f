"""formats/images.py and the splitter's qemu backend, on real qemu-img images and qemu-nbd."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import List

import pytest

from formats import images
from nbd_plugin import nbdclient
from nbd_plugin.backends import open_disk
from nbd_plugin.disk import LocalDisk
from nbd_plugin.nbdclient import Connection, ProtocolError
from nbd_plugin.qemudisk import QemuDisk

MiB = 1024 * 1024


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qemu_io(path: Path, fmt: str, cmd: str) -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", cmd, str(path)], check=True,
                   capture_output=True)


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """A qcow2 with data in it over a raw backing file with data in it."""
    base = tmp_path / "base.raw"
    qemu_img("create", "-f", "raw", str(base), "8M")
    qemu_io(base, "raw", "write -P 0x11 0 2M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top), "8M")
    qemu_io(top, "qcow2", "write -P 0x22 1M 2M")
    return top


def test_sniff_by_content_not_name(tmp_path: Path) -> None:
    q = tmp_path / "disk.raw"            # a qcow2 named .raw
    qemu_img("create", "-f", "qcow2", str(q), "4M")
    r = tmp_path / "disk.qcow2"          # a raw file named .qcow2
    r.write_bytes(bytes(4096))
    v = tmp_path / "v.img"
    qemu_img("create", "-f", "vmdk", str(v), "4M")
    d = tmp_path / "x.img"
    qemu_img("create", "-f", "vdi", str(d), "4M")
    assert [images.sniff(str(p)) for p in (q, r, v, d)] == ["qcow2", "raw", "vmdk", "vdi"]


def test_inspect_qcow2_chain(chain: Path) -> None:
    checked: List[str] = []
    img = images.inspect(str(chain), lambda what, p: checked.append(p))
    assert (img.format, img.virtual_size) == ("qcow2", 8 * MiB)
    assert checked == [str(chain.parent / "base.raw")] == img.files
    raw = images.inspect(str(chain.parent / "base.raw"))
    assert (raw.format, raw.virtual_size, raw.files) == ("raw", 8 * MiB, [])
    ext = chain.parent / "ext.qcow2"  # an external data file is read too: checked
    qemu_img("create", "-f", "qcow2", "-o", "data_file=%s" % (chain.parent / "ext.data"),
             str(ext), "4M")
    assert images.inspect(str(ext)).files == [str(chain.parent / "ext.data")]


def test_inspect_vmdk_subformats(tmp_path: Path) -> None:
    for sub in ("monolithicSparse", "monolithicFlat"):
        v = tmp_path / (sub + ".vmdk")
        qemu_img("create", "-f", "vmdk", "-o", "subformat=" + sub, str(v), "6M")
        img = images.inspect(str(v))
        assert (img.format, img.subformat, img.virtual_size) == ("vmdk", sub, 6 * MiB)
        assert img.files == ([str(tmp_path / (sub + "-flat.vmdk"))]
                             if sub == "monolithicFlat" else [])
    s = tmp_path / "s.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(s), "6M")
    with pytest.raises(images.Unsupported, match="subformat twoGbMaxExtentSparse"):
        images.inspect(str(s))


def test_refusals_are_one_line(tmp_path: Path, chain: Path) -> None:
    enc = tmp_path / "enc.qcow2"
    for _try in range(10):  # qemu's PBKDF timing fails now and then on a loaded machine
        made = subprocess.run(["qemu-img", "create", "-f", "qcow2", "--object",
                               "secret,id=s0,data=pw", "-o", "encrypt.format=luks,"
                               "encrypt.key-secret=s0,encrypt.iter-time=200", str(enc), "4M"],
                              capture_output=True)
        if made.returncode == 0:
            break
    assert made.returncode == 0, made.stderr
    luks = tmp_path / "disk.luks"
    luks.write_bytes(b"LUKS\xba\xbe\x00\x01" + bytes(4088))  # a LUKS header's magic
    vdi = tmp_path / "x.vdi"
    qemu_img("create", "-f", "vdi", str(vdi), "4M")
    nofmt = tmp_path / "nofmt.qcow2"  # backing file named without its format
    qemu_img("create", "-f", "qcow2", "-b", str(chain), "-F", "qcow2", str(nofmt), "8M")
    head = nofmt.read_bytes()[:65536]  # qemu-img will not write that: rename its extension
    assert head.count(b"\xe2\x79\x2a\xca") == 1
    with open(nofmt, "r+b") as f:
        f.seek(head.index(b"\xe2\x79\x2a\xca"))
        f.write(b"\x0f\x0e\x0d\x0c")  # an unknown extension: ignored by qemu
    json_backing = tmp_path / "jb.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(chain), "-F", "qcow2", str(json_backing), "8M")
    subprocess.run(["qemu-img", "rebase", "-u", "-F", "raw", "-b",
                    "json:{\"file.driver\":\"file\",\"file.filename\":\"/etc/hostname\"}",
                    str(json_backing)], check=True, capture_output=True)
    garbage = tmp_path / "bad.qcow2"
    garbage.write_bytes(b"QFI\xfb" + b"\xff" * 600)
    cases = [(enc, "encrypted qcow2"), (luks, "LUKS-encrypted"), (vdi, "vdi image"),
             (nofmt, "without its format"), (json_backing, "not a plain file name"),
             (garbage, "qemu-img cannot open")]
    for path, words in cases:
        with pytest.raises(images.Unsupported) as e:
            images.inspect(str(path))
        assert words in str(e.value) and "\n" not in str(e.value), (path, e.value)


def test_backing_file_refused_by_the_policy(chain: Path) -> None:
    def refuse(what: str, path: str) -> None:
        raise PermissionError("%s is outside the roots" % what)
    with pytest.raises(PermissionError, match=r"base.raw .read by .*top.qcow2. is outside"):
        images.inspect(str(chain), refuse)


def test_every_file_is_checked_before_qemu_opens_it(tmp_path: Path, chain: Path) -> None:
    fifo = tmp_path / "fifo"            # qemu-img would wait on it for ever
    os.mkfifo(fifo)
    top = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(chain), "-F", "qcow2", str(top), "8M")
    subprocess.run(["qemu-img", "rebase", "-u", "-F", "raw", "-b", str(fifo), str(top)],
                   check=True, capture_output=True)
    desc = tmp_path / "d.vmdk"          # a VMDK descriptor naming a file elsewhere
    desc.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
                    'RW 8192 FLAT "%s" 0\n' % fifo)
    seen: List[str] = []

    def refuse_fifo(what: str, path: str) -> None:
        seen.append(path)
        if path == str(fifo):
            raise PermissionError("%s is not allowed" % what)
    for image in (top, desc):
        with pytest.raises(PermissionError, match=r"fifo .read by"):
            images.inspect(str(image), refuse_fifo)
    assert seen == [str(fifo), str(fifo)]


def test_a_backing_chain_that_loops_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        qemu_img("create", "-f", "qcow2", str(p), "4M")
    for p, q in ((a, b), (b, a)):
        subprocess.run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", str(q), str(p)],
                       check=True, capture_output=True)
    with pytest.raises(images.Unsupported, match="comes back to"):
        images.inspect(str(a))


def test_backing_chains_are_bounded_and_of_known_formats(tmp_path: Path, chain: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_CHAIN", 2)
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(chain), "-F", "qcow2", str(mid), "8M")
    assert len(images.inspect(str(chain)).files) == 1
    with pytest.raises(images.Unsupported, match="more than 2 images"):
        images.inspect(str(mid))
    vdi = tmp_path / "b.vdi"
    qemu_img("create", "-f", "vdi", str(vdi), "4M")
    over = tmp_path / "over.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(vdi), "-F", "vdi", str(over), "4M")
    with pytest.raises(images.Unsupported, match="of format vdi: not supported"):
        images.inspect(str(over))


def test_convert_command_options() -> None:
    cmd = images.convert_command("nbd+unix:///?socket=/s", "/d", "vmdk",
                                 subformat="streamOptimized")
    assert cmd[-4:] == ["-o", "subformat=streamOptimized", "nbd+unix:///?socket=/s", "/d"]
    assert "-c" in images.convert_command("u", "/d", "qcow2", compress=True)
    for kwargs, words in (({"fmt": "vdi"}, "choose one of"),
                          ({"fmt": "raw", "compress": True}, "qcow2 only"),
                          ({"fmt": "qcow2", "subformat": "x"}, "none")):
        with pytest.raises(images.Unsupported, match=words):
            images.convert_command("u", "/d", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(images.Unsupported, match="not one Ferry serves"):
        images.qemu_nbd_command("/x", "raw", "/s")


@pytest.fixture(params=["python", "native"])
def client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The QemuDisk tests run with each NBD client: the pure-Python one and libnbd's."""
    if request.param == "native" and nbdclient._nbd is None:
        pytest.skip("libnbd's Python binding (python3-libnbd) is not installed")
    monkeypatch.setenv("FERRY_NBD_CLIENT", request.param)
    assert nbdclient.native() == (request.param == "native")
    return str(request.param)


def test_qemu_disk_is_the_guest_view(tmp_path: Path, chain: Path, client: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nbdclient, "MAX_REQUEST", MiB)  # requests split in pieces
    sock = str(tmp_path / "q.sock")
    disk = QemuDisk(str(chain), "qcow2", sock, str(tmp_path / "q.log"))
    try:
        assert disk.size == 8 * MiB
        assert disk.read(0, 4) == b"\x11" * 4 and disk.read(MiB, 4) == b"\x22" * 4
        disk.pwrite(b"\x33" * (3 * MiB + 512), 4 * MiB, fua=True)
        disk.zero(0, 64 * 1024, may_trim=True, fua=False)
        disk.trim(7 * MiB, 64 * 1024 + 512, fua=False)              # unaligned tail
        disk.flush()
        assert disk.read(0, 64 * 1024) == bytes(64 * 1024)
        assert disk.read(7 * MiB, 64 * 1024 + 512) == bytes(64 * 1024 + 512)
        assert disk.read(4 * MiB, 2) == b"\x33\x33" and not disk.is_hole(0, 4096)
        with pytest.raises(OSError) as e:
            disk.read(8 * MiB - 512, 1024)  # past the end: the server's errno
        assert e.value.errno == errno.EINVAL
    finally:
        disk.close()
    # qemu-nbd ended with the last connection: the image is unlocked and clean.
    subprocess.run(["qemu-img", "check", str(chain)], check=True, capture_output=True)
    qemu_io(chain, "qcow2", "read -P 0x33 4M 3M")
    qemu_io(chain, "qcow2", "read -P 0x22 1M 1M")
    assert not os.path.exists("/proc/%d" % disk._proc.pid)  # type: ignore[union-attr]


def test_qemu_disk_restarts_a_dead_qemu_nbd(tmp_path: Path, chain: Path, client: str) -> None:
    lost: List[str] = []
    disk = open_disk(str(chain), "qcow2", str(tmp_path / "q.sock"))
    assert isinstance(disk, QemuDisk)
    disk.on_lost = lost.append
    try:
        disk.pwrite(b"x" * 4096, 0)
        proc = disk._proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with pytest.raises(OSError) as e:  # the keeper's peer is gone: EIO, once
            disk.read(0, 4096)
        assert e.value.errno == errno.EIO and len(lost) == 1 and "broke" in lost[0]
        disk.pwrite(b"y" * 4096, 0)          # a new qemu-nbd
        assert disk.read(0, 4096) == b"y" * 4096 and disk._proc is not proc
    finally:
        disk.close()


def test_qemu_disk_start_failures(tmp_path: Path, chain: Path) -> None:
    log = tmp_path / "q.log"
    with pytest.raises(OSError, match=r"qemu-nbd for .* exited .*see .*q.log"):
        QemuDisk(str(chain), "vmdk", str(tmp_path / "q.sock"), str(log))  # wrong format
    assert log.read_text()
    holder = QemuDisk(str(chain), "qcow2", str(tmp_path / "h.sock"))
    try:  # the image is locked by another qemu: refused, not shared
        with pytest.raises(OSError, match="exited"):
            QemuDisk(str(chain), "qcow2", str(tmp_path / "q2.sock"))
    finally:
        holder.close()
    with pytest.raises(ValueError, match="needs qemu_socket"):
        open_disk(str(chain), "qcow2", "")
    with pytest.raises(ValueError, match="serves raw, qcow2, vmdk"):
        open_disk(str(chain), "vdi", "/s")
    assert isinstance(open_disk(str(tmp_path / "base.raw"), "raw", ""), LocalDisk)


def fake_nbd_server(path: str, answer: bytes) -> threading.Thread:
    """A server that says hello as NBD does, reads the client's flags and option, then
    sends ``answer`` and hangs up."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        c, _ = srv.accept()
        c.sendall(struct.pack(">QQH", nbdclient.NBDMAGIC, nbdclient.IHAVEOPT, 3))
        got = b""
        while len(got) < 4 + 16 + 6:
            got += c.recv(64)
        c.sendall(answer)
        c.close()
        srv.close()
    t = threading.Thread(target=serve)
    t.start()
    return t


def _opt_reply(rtype: int, payload: bytes) -> bytes:
    return struct.pack(">QIII", nbdclient.OPT_REPLY_MAGIC, nbdclient.OPT_GO, rtype,
                       len(payload)) + payload


@pytest.mark.parametrize("answer, words", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(64), "bad NBD option reply"),
    (_opt_reply(nbdclient.REP_ERROR_BIT | 1, b"no such export"), "refused the export: no such"),
    (_opt_reply(nbdclient.REP_ACK, b""), "no export size"),
    (_opt_reply(nbdclient.REP_INFO, bytes(2) + (1 << 20).to_bytes(8, "big") + b"\x00\x01")
     + _opt_reply(nbdclient.REP_ACK, b""), "does not offer flush, FUA and write zeroes"),
])
def test_nbd_client_refuses_a_server_it_cannot_use(tmp_path: Path, answer: bytes,
                                                   words: str) -> None:
    path = str(tmp_path / "s.sock")
    t = fake_nbd_server(path, answer)
    with pytest.raises(ProtocolError, match=words):
        Connection(path, timeout=10)
    t.join()


def test_nbd_client_refuses_a_non_nbd_server(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        c, _ = srv.accept()
        c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        c.close()
    t = threading.Thread(target=serve)
    t.start()
    with pytest.raises(ProtocolError, match="not a fixed-newstyle"):
        Connection(path, timeout=10)
    t.join()
    srv.close()


def test_pool_drops_a_connection_left_half_way(tmp_path: Path, chain: Path,
                                               client: str) -> None:
    disk = QemuDisk(str(chain), "qcow2", str(tmp_path / "q.sock"))
    try:
        disk.read(0, 512)
        pooled = list(disk._pool._idle)

        def stopped(conn: Connection) -> None:
            raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            disk._pool.run(stopped)
        assert disk._pool._idle == []
        assert type(pooled[0]).__name__ == ("NativeConnection" if client == "native"
                                            else "Connection")
        if client == "native":
            assert pooled[0]._h is None
        else:
            assert pooled[0].sock.fileno() == -1
        assert disk.read(0, 4) == b"\x11" * 4  # a new connection
    finally:
        disk.close()


def test_restore_as_failure_leaves_nothing(tmp_path: Path) -> None:
    from agent.errors import Conflict, Invalid, StorageError
    from agent.target.restore import copied, restore_as
    dest = str(tmp_path / "out.qcow2")
    with pytest.raises(StorageError, match=r"qemu-img convert: .*nothing was left behind"):
        restore_as("nbd+unix:///?socket=%s" % (tmp_path / "none.sock"), dest, "restore x",
                   "qcow2", None, False, 1)
    assert os.listdir(tmp_path) == [] and copied(dest) is None
    with pytest.raises(Invalid, match="subformat 'monolithicFlat'"):
        restore_as("nbd+unix:///?socket=/x", dest, "restore x", "vmdk", "monolithicFlat",
                   False, 1)
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x5a" * MiB)
    (tmp_path / "taken").symlink_to(tmp_path / "elsewhere")  # planted meanwhile: refused
    with pytest.raises(Conflict, match="already exists"):
        restore_as("file:" + str(src), str(tmp_path / "taken"), "restore x", "qcow2",
                   None, True, 1)
    assert not (tmp_path / "elsewhere").exists()
    restore_as("file:" + str(src), dest, "restore x", "qcow2", None, True, 1)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), dest],
                   check=True, capture_output=True)


def test_native_connection_errors(tmp_path: Path, chain: Path) -> None:
    if nbdclient._nbd is None:
        pytest.skip("libnbd's Python binding (python3-libnbd) is not installed")
    with pytest.raises(FileNotFoundError, match="cannot connect to"):
        nbdclient.NativeConnection(str(tmp_path / "none.sock"))
    sock = str(tmp_path / "ro.sock")
    server = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "--read-only", "--persistent",
                               "--socket=" + sock, str(chain)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not os.path.exists(sock):
            assert server.poll() is None
            time.sleep(0.02)
        with pytest.raises(ProtocolError, match="does not offer flush, FUA and write zeroes"):
            nbdclient.NativeConnection(sock)    # a read-only export: no writes
    finally:
        server.terminate()
        server.wait()
    disk = QemuDisk(str(chain), "qcow2", str(tmp_path / "q.sock"))
    try:
        conn = nbdclient.NativeConnection(disk.socket_path)
        buf = memoryview(bytearray(4))
        conn.pread(buf, 0)
        assert bytes(buf) == b"\x11" * 4
        conn.close()
        with pytest.raises(ConnectionResetError, match="NBD connection closed"):
            conn.pread(buf, 0)
    finally:
        disk.close()


def test_the_flat_extent_of_a_vmdk(tmp_path: Path) -> None:
    """Where a monolithicFlat VMDK's bytes are (a journal volume's container); any other
    VMDK refused in one line naming why."""
    vmdk = tmp_path / "v.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
                    "subformat=monolithicFlat", str(vmdk), "40M"], check=True)
    assert images.flat_extent(str(vmdk)) == (str(tmp_path / "v-flat.vmdk"), 40 * 1024 * 1024)
    text = vmdk.read_text()
    line = 'RW 81920 FLAT "v-flat.vmdk" 0'
    assert line in text
    for changed, words in (
            (text.replace(line, 'RW 81920 FLAT "v-flat.vmdk" 8'), "starts at sector 8 of"),
            (text.replace(line, line + "\n" + line.replace("v-flat", "w-flat")),
             "only a monolithicFlat VMDK (one flat extent)"),
            (text.replace("monolithicFlat", "twoGbMaxExtentFlat"),
             "a VMDK of subformat twoGbMaxExtentFlat"),
            (text.replace(line, 'RW 81920 FLAT "nbd://host/x" 0'), "is not a plain file name"),
            ("KDMV" + text, "its descriptor embedded (a sparse VMDK)")):
        vmdk.write_text(changed)
        with pytest.raises(images.Unsupported, match=re.escape(words)):
            images.flat_extent(str(vmdk))
