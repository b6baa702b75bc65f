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

The kernel is ``kernel.py``'s, the initramfs ``initramfs.py``'s. The host side
(:class:`Guest`) starts qemu in the background, writes the serial console
to a log file, and parses the marker. Used as a context manager, it kills qemu on the way
out, whatever happened.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

EXIT_MARKER = "FERRY-GUEST-EXIT"
# The serial console on stdout; a virtio RNG so the guest's entropy pool fills at once.
QEMU_ARGS = (
    "-accel tcg -smp 1 -nodefaults -no-user-config -nographic -serial stdio"
    " -device virtio-rng-pci -no-reboot"
).split()


_EXIT_RE = re.compile(rf"^{EXIT_MARKER} (\d+)\r?$", re.MULTILINE)



class GuestError(Exception):
    """The guest did not report an exit code; the message ends with the console's tail."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(f"{message}\n--- guest log tail ---\n{log_tail}")
        self.log_tail = log_tail


class GuestTimeout(GuestError):
    """The guest is still running when the caller stopped waiting; it is left running."""


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
        # split on newlines only: splitlines() also splits on \x0b, \x0c, \x1c-\x1e and \x85,
        # which a console may print, and the tail would then not be the log's own end
        text = self.output().replace("\r", "").rstrip("\n")
        return "\n".join(text.split("\n")[-lines:])

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
