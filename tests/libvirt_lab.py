"""A private libvirt for the tests: ``libvirtd`` started directly (PID 1 is not systemd here).

Theory of operation
-------------------
libvirt's embedded driver (``qemu:///embed?root=...``) locks its root for one process, and
the test and the Ferry agent are two processes that both talk to the same domains. So the
tests run a real daemon instead, privileged as on a host, but in a mount namespace of its
own (``unshare -m``): /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and
/var/log/libvirt are bind mounts of directories under the lab's root, so nothing of the
host's libvirt is read or written and the domains' XML, logs and state stay in the lab.
Only its client socket is outside: ``URI`` is ``qemu+unix:///system?socket=ROOT/sock/...``.

qemu runs as Debian's ``libvirt-qemu:kvm``, as with ``qemu:///system`` on a host, so Ferry's
splitter sockets must be reachable by that user; no cgroups, no per-domain namespaces, no
virtlogd (the consoles go to files), no security driver (no AppArmor in a container).
``Domain`` defines a ``type='qemu'`` (TCG) domain that boots the lab's busybox guest
(lab/guest.py): it runs a script against /dev/vda... and powers off (the domain shuts off).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import List, Optional, Sequence
from xml.sax.saxutils import escape

import libvirt

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed

MOUNTED = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt",
           "/var/log/libvirt")

QEMU_CONF = """\
user = "libvirt-qemu"
group = "kvm"
dynamic_ownership = 1
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""


class Libvirtd:
    """One ``libvirtd`` in its own mount namespace, its state under ``root``."""

    def __init__(self, root: Path, cache: Optional[Path] = None) -> None:
        self.root = root
        self.cache = cache  # kept across runs: qemu's probed capabilities (seconds each)
        self.sock_dir = root / "sock"
        self.uri = "qemu+unix:///system?socket=%s" % (self.sock_dir / "libvirt-sock")
        self.log = root / "libvirtd.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60) -> Libvirtd:
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        binds = []
        for target in MOUNTED:
            src = self.root / target.strip("/").replace("/", "_")
            if target == "/var/cache/libvirt" and self.cache is not None:
                src = self.cache
            src.mkdir(parents=True, exist_ok=True)
            os.makedirs(target, exist_ok=True)  # a mount point on the host (empty)
            binds.append("mount --bind %s %s" % (src, target))
        # /dev/kvm is root's only here: libvirt would probe qemu with KVM as root, find
        # its user cannot use it, and probe again, forever. Its namespace has no KVM.
        nokvm = self.root / "no-kvm"
        nokvm.touch(mode=0o600)
        if os.path.exists("/dev/kvm"):
            binds.append("mount --bind %s /dev/kvm" % nokvm)
        etc = self.root / "etc_libvirt"
        (etc / "qemu.conf").write_text(QEMU_CONF)
        conf = etc / "libvirtd.conf"
        conf.write_text('unix_sock_dir = "%s"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
                        'unix_sock_rw_perms = "0700"\nlog_outputs = "3:stderr"\n'
                        % self.sock_dir)
        script = " && ".join([*binds, "exec libvirtd -f %s -p %s" % (
            conf, self.root / "libvirtd.pid")])
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private",
                                          "sh", "-c", script],
                                         stdout=logf, stderr=logf, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("libvirtd exited (%s): %s" % (self.proc.returncode,
                                                                 self.log.read_text()))
            try:
                libvirt.open(self.uri).close()
                return self
            except libvirt.libvirtError:
                time.sleep(0.1)
        raise RuntimeError("libvirtd did not answer within %g s: %s" % (timeout,
                                                                       self.log.read_text()))

    def connect(self) -> libvirt.virConnect:
        return libvirt.open(self.uri)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            conn = self.connect()
            for dom in conn.listAllDomains():
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            conn.close()
        except libvirt.libvirtError:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


GUEST_AGENT_CHANNEL = ("<channel type='unix'><target type='virtio' "
                       "name='org.qemu.guest_agent.0'/></channel>")


def domain_xml(name: str, kernel: Path, initrd: Path, disks: Sequence[Path],
               console: Path, memory_mb: int = 384, agent: bool = False) -> str:
    """A ``type='qemu'`` domain that boots the lab guest with ``disks`` as vda, vdb, ...;
    with ``agent``, a qemu guest agent channel (the guest runs the agent it wants)."""
    devs: List[str] = []
    for i, disk in enumerate(disks):
        devs.append("<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                    "<source file='%s'/><target dev='vd%s' bus='virtio'/></disk>"
                    % (escape(str(disk)), chr(ord("a") + i)))
    if agent:
        devs.append(GUEST_AGENT_CHANNEL)
    cmdline = "console=ttyS0 quiet panic=-1 ferry.disks=%d" % len(disks)
    return """<domain type='qemu'>
  <name>%s</name>
  <memory unit='MiB'>%d</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>%s</kernel>
    <initrd>%s</initrd>
    <cmdline>%s</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    %s
    <serial type='file'><source path='%s'/><target port='0'/></serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
""" % (escape(name), memory_mb, escape(str(kernel)), escape(str(initrd)), cmdline,
       "\n    ".join(devs), escape(str(console)))


def copy_readable(src: Path, dest_dir: Path) -> Path:
    """A copy of a lab kernel or initramfs where qemu's user can read it."""
    dest = dest_dir / src.name
    shutil.copyfile(src, dest)
    os.chmod(dest, 0o644)
    return dest


def wait_shut_off(dom: libvirt.virDomain, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while dom.isActive():
        if time.monotonic() > deadline:
            raise TimeoutError("domain %s still runs after %g s" % (dom.name(), timeout))
        time.sleep(0.2)
