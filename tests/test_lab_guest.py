"""The lab guest: a TCG qemu with a busybox initramfs writing ext4 through a real nbdkit."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.guest import (
    Disk,
    Guest,
    GuestError,
    GuestTimeout,
)
from lab.initramfs import build_initramfs
from lab.kernel import ensure_kernel

pytestmark = pytest.mark.guest

CACHE = Path(os.environ.get("FERRY_LAB_CACHE", Path(__file__).resolve().parents[1] / ".cache/lab"))
BOOT_TIMEOUT = 180.0

WRITE_SCRIPT = """
mkfs.ext4 -q /dev/vda
mount -t ext4 /dev/vda /mnt
echo ferry-mounted
sleep "${FERRY_PAUSE:-0}"
printf 'hello from the guest\\n' > /mnt/hello.txt
mkdir /mnt/dir
seq 1 2000 > /mnt/dir/seq.txt
dd if=/dev/urandom of=/mnt/random.bin bs=64k count=32 2>/dev/null
md5sum /mnt/random.bin
sync
umount /mnt
echo ferry-synced
"""


@contextlib.contextmanager
def nbdkit_file(image: Path, workdir: Path) -> Iterator[str]:
    """Serve ``image`` with nbdkit's file plugin on a Unix socket; yield its NBD URI."""
    sock, pidfile = workdir / "nbdkit.sock", workdir / "nbdkit.pid"
    proc = start_nbdkit(image, sock, pidfile)
    try:
        yield f"nbd+unix:///?socket={sock}"
    finally:
        stop(proc)


def start_nbdkit(image: Path, sock: Path, pidfile: Path) -> subprocess.Popen[bytes]:
    pidfile.unlink(missing_ok=True)
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(
        ["nbdkit", "-f", "--unix", str(sock), "--pidfile", str(pidfile), "file", str(image)]
    )
    deadline = time.monotonic() + 10
    while not pidfile.exists():  # written once the socket listens
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError("nbdkit did not start")
        time.sleep(0.02)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Shut nbdkit down; it answers requests still arriving with ESHUTDOWN meanwhile."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def debugfs_cat(image: Path, path: str) -> bytes:
    result = subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True
    )
    return result.stdout


def check_written_fs(image: Path, console: str) -> None:
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert debugfs_cat(image, "/hello.txt") == b"hello from the guest\n"
    expected_seq = "".join(f"{i}\n" for i in range(1, 2001)).encode()
    assert debugfs_cat(image, "/dir/seq.txt") == expected_seq
    match = re.search(r"^([0-9a-f]{32})  /mnt/random\.bin", console, re.MULTILINE)
    assert match, "guest printed no md5sum"
    data = debugfs_cat(image, "/random.bin")
    assert len(data) == 32 * 65536
    assert hashlib.md5(data).hexdigest() == match.group(1)


@pytest.fixture(scope="module")
def kernel() -> Path:
    return ensure_kernel(CACHE)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    return path


def test_guest_writes_ext4_through_nbdkit(kernel: Path, image: Path, tmp_path: Path) -> None:
    initrd = build_initramfs(CACHE, WRITE_SCRIPT, tmp_path / "initrd.gz")
    with nbdkit_file(image, tmp_path) as uri:
        with Guest(kernel, initrd, [uri], tmp_path / "console.log") as guest:
            rc = guest.wait(BOOT_TIMEOUT)
    assert rc == 0, guest.tail()
    assert "ferry-synced" in guest.output()
    check_written_fs(image, guest.output())


def test_guest_rides_out_an_nbdkit_restart(kernel: Path, image: Path, tmp_path: Path) -> None:
    """With reconnect_delay, writes issued while nbdkit is down wait for its return."""
    initrd = build_initramfs(CACHE, "FERRY_PAUSE=3\n" + WRITE_SCRIPT, tmp_path / "initrd.gz")
    sock, pidfile = tmp_path / "nbdkit.sock", tmp_path / "nbdkit.pid"
    server = start_nbdkit(image, sock, pidfile)
    try:
        disk = Disk(f"nbd+unix:///?socket={sock}", reconnect_delay=60)
        with Guest(kernel, initrd, [disk], tmp_path / "console.log") as guest:
            guest.wait_for("^ferry-mounted", BOOT_TIMEOUT)
            server.kill()  # a crash: no ESHUTDOWN replies, just a dead socket
            server.wait()  # before the guest's writes, which start 3 s after the marker
            time.sleep(6)
            assert "ferry-synced" not in guest.output(), "sync finished without a server"
            server = start_nbdkit(image, sock, pidfile)
            rc = guest.wait(BOOT_TIMEOUT)
    finally:
        stop(server)
    assert rc == 0, guest.tail()
    check_written_fs(image, guest.output())


def test_script_runs_with_errexit_and_reports_its_code(kernel: Path, tmp_path: Path) -> None:
    initrd = build_initramfs(
        CACHE, "echo ferry-before\n(exit 7)\necho ferry-after\n", tmp_path / "initrd.gz"
    )
    with Guest(kernel, initrd, [], tmp_path / "console.log") as guest:
        assert guest.wait(BOOT_TIMEOUT) == 7
    assert "ferry-before" in guest.output()
    assert "ferry-after" not in guest.output()


def test_wait_timeout_leaves_guest_running_until_exit(kernel: Path, tmp_path: Path) -> None:
    initrd = build_initramfs(CACHE, "echo ferry-sleeping\nsleep 600\n", tmp_path / "initrd.gz")
    with Guest(kernel, initrd, [], tmp_path / "console.log") as guest:
        guest.wait_for("^ferry-sleeping", BOOT_TIMEOUT)
        with pytest.raises(GuestTimeout, match="ferry-sleeping"):
            guest.wait(0.5)
        pid = guest.pid
        assert pid is not None
        os.kill(pid, 0)  # still running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_qemu_failure_raises_with_its_message(kernel: Path, tmp_path: Path) -> None:
    initrd = build_initramfs(CACHE, "true\n", tmp_path / "initrd.gz")
    missing = tmp_path / "no-such.sock"
    with Guest(kernel, initrd, [f"nbd+unix:///?socket={missing}"], tmp_path / "c.log") as guest:
        with pytest.raises(GuestError, match="qemu exited") as info:
            guest.wait(BOOT_TIMEOUT)
    assert str(missing) in info.value.log_tail


def test_guest_panic_ends_qemu_instead_of_hanging(kernel: Path, tmp_path: Path) -> None:
    initrd = build_initramfs(CACHE, "echo c > /proc/sysrq-trigger\nsleep 600\n", tmp_path / "i.gz")
    with Guest(kernel, initrd, [], tmp_path / "console.log") as guest:
        with pytest.raises(GuestError, match="qemu exited") as info:
            guest.wait(BOOT_TIMEOUT)
    # The panic's first line may sit above the tail's 40 lines of stack trace (the closing
    # "end Kernel panic" line does not always reach the console before qemu stops).
    console = (tmp_path / "console.log").read_text(errors="replace").replace("\r", "")
    assert "Kernel panic" in console
    assert info.value.log_tail and console.rstrip().endswith(info.value.log_tail.rstrip())
