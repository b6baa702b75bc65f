"""Application-consistent checkpoints (issue 11): guests frozen around the cut, thawed always.

The unit tests drive ``quiesce.app_checkpoint`` with in-memory guests (the full ``Guest``
interface) and real hook scripts. The guest test runs a real libvirtd and the lab's busybox
guest with a qemu guest agent channel. The agent in the guest is Debian's ``qemu-ga`` where
the host has the qemu-guest-agent package (lab/initramfs.py then copies it, with its
libraries, into the guest); otherwise a busybox shell loop speaking the guest agent's JSON
protocol (guest-sync, guest-fsfreeze-freeze/-thaw/-status) on the real virtio-serial port
and freezing the guest's ext4 with FIFREEZE (busybox ``fsfreeze``). libvirt's own agent
client talks to either.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import trio
from conftest import Lab
from libvirt_lab import Libvirtd
from test_libvirt import VirtLab
from test_libvirt import libvirtd as libvirtd  # (this module's own daemon)

from agent.domains import quiesce
from agent.domains.hooks import HookFailed, Hooks
from agent.errors import Conflict, TimedOut, Unavailable


class FakeGuest:
    """A guest whose freeze and thaw are recorded in a shared log."""

    def __init__(self, name: str, log: List[str], freeze_delay: float = 0.0,
                 fail_freeze: bool = False) -> None:
        self.name = name
        self.log = log
        self.frozen = False
        self.freeze_delay = freeze_delay
        self.fail_freeze = fail_freeze

    def freeze(self) -> int:
        time.sleep(self.freeze_delay)
        if self.fail_freeze:
            raise Unavailable("domain %s: cannot freeze its file systems: no agent" % self.name)
        self.frozen = True
        self.log.append("freeze " + self.name)
        return 1

    def thaw(self) -> int:
        if self.frozen:
            self.log.append("thaw " + self.name)
        self.frozen = False
        return 1


def hook_dir(tmp_path: Path, log: Path, scripts: Dict[str, str]) -> Hooks:
    d = tmp_path / "hooks"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        p = d / name
        p.write_text("#!/bin/sh\n" + body.replace("LOG", str(log)) + "\n")
        p.chmod(0o755)
    return Hooks(str(d), timeout=5)


def cutter(log: List[str], cut: bool = True, fail: bool = False):
    async def take(event: trio.Event) -> Dict[str, Any]:
        if fail:
            raise Conflict("group g: is not replicating")
        if not cut:
            await trio.sleep_forever()
        log.append("cut")
        event.set()
        await trio.sleep(0.05)  # the ack comes later: the guests are thawed before it
        log.append("acked")
        return {"id": "c1", "kind": "app", "acked": True}
    return take


def test_guests_frozen_around_the_cut_thawed_before_the_ack_hooks_outside(
        tmp_path: Path) -> None:
    log: List[str] = []
    hlog = tmp_path / "hooks.log"
    hooks = hook_dir(tmp_path, hlog, {
        "vm1.pre": 'echo "pre $FERRY_DOMAIN $1 $3" >> LOG',
        "vm1.post": 'echo "post $FERRY_DOMAIN $FERRY_PHASE" >> LOG'})
    guests = [FakeGuest("vm1", log), FakeGuest("vm2", log)]
    result = trio.run(quiesce.app_checkpoint, "g", guests, hooks, cutter(log))
    assert log == ["freeze vm1", "freeze vm2", "cut", "thaw vm2", "thaw vm1", "acked"]
    assert result["kind"] == "app" and result["domains"] == ["vm1", "vm2"]
    assert result["frozen_ms"] is not None and result["post_hook_errors"] == []
    assert hlog.read_text().splitlines() == ["pre vm1 g pre", "post vm1 post"]


def test_a_cut_that_does_not_come_within_the_limit_thaws_and_says_so() -> None:
    log: List[str] = []
    guests = [FakeGuest("vm1", log)]
    with pytest.raises(TimedOut, match=r"group g: .*frozen 0.3 s.*thawed"):
        trio.run(quiesce.app_checkpoint, "g", guests, Hooks(None), cutter(log, cut=False),
                 0.3)
    assert log == ["freeze vm1", "thaw vm1"] and not guests[0].frozen


def test_a_freeze_that_returns_after_the_limit_is_thawed_at_once() -> None:
    log: List[str] = []
    slow = FakeGuest("vm1", log, freeze_delay=1.0)
    with pytest.raises(TimedOut):
        trio.run(quiesce.app_checkpoint, "g", [slow], Hooks(None), cutter(log), 0.2)
    deadline = time.monotonic() + 10
    while log != ["freeze vm1", "thaw vm1"]:
        assert time.monotonic() < deadline, log
        time.sleep(0.05)
    assert not slow.frozen


def test_the_watchdog_thaws_what_a_stuck_caller_left_frozen() -> None:
    log: List[str] = []
    guest = FakeGuest("vm1", log)
    window = quiesce._Window("g")
    guest.freeze()
    window.frozen(guest)
    timer = threading.Timer(0.05, quiesce._watchdog, (window,))
    timer.start()
    timer.join(10)
    assert log == ["freeze vm1", "thaw vm1"] and window.closed


def test_a_failing_pre_hook_aborts_in_one_line_and_thaws_what_was_frozen(
        tmp_path: Path) -> None:
    log: List[str] = []
    hlog = tmp_path / "hooks.log"
    hooks = hook_dir(tmp_path, hlog, {
        "vm1.post": 'echo "post $FERRY_DOMAIN" >> LOG',
        "vm2.pre": 'echo "database will not flush" >&2; exit 3'})
    guests = [FakeGuest("vm1", log), FakeGuest("vm2", log)]
    with pytest.raises(HookFailed) as e:
        trio.run(quiesce.app_checkpoint, "g", guests, hooks, cutter(log))
    assert str(e.value) == ("domain vm2: pre hook %s/vm2.pre failed (exit 3): database "
                            "will not flush" % hooks.directory)
    assert log == [] and hlog.read_text() == "post vm1\n"  # nothing frozen; vm1 resumed


def test_a_failing_freeze_or_cut_thaws_the_others_and_runs_post_hooks(tmp_path: Path) -> None:
    log: List[str] = []
    hlog = tmp_path / "hooks.log"
    hooks = hook_dir(tmp_path, hlog, {"vm1.post": 'echo "post $FERRY_DOMAIN" >> LOG'})
    guests = [FakeGuest("vm1", log), FakeGuest("vm2", log, fail_freeze=True)]
    with pytest.raises(Unavailable, match="domain vm2: cannot freeze"):
        trio.run(quiesce.app_checkpoint, "g", guests, hooks, cutter(log))
    assert log == ["freeze vm1", "thaw vm1"] and hlog.read_text() == "post vm1\n"
    log.clear()
    with pytest.raises(Conflict, match="not replicating"):
        trio.run(quiesce.app_checkpoint, "g", [FakeGuest("vm1", log)], hooks,
                 cutter(log, fail=True))
    assert log == ["freeze vm1", "thaw vm1"]


def test_a_failing_post_hook_is_reported_with_the_checkpoint(tmp_path: Path) -> None:
    log: List[str] = []
    hooks = hook_dir(tmp_path, tmp_path / "x", {"vm1.post": "exit 1"})
    result = trio.run(quiesce.app_checkpoint, "g", [FakeGuest("vm1", log)], hooks,
                      cutter(log))
    assert result["id"] == "c1"
    assert result["post_hook_errors"] == ["domain vm1: post hook %s/vm1.post failed (exit 1)"
                                          % hooks.directory]


def test_unsafe_or_slow_hooks_are_refused_by_name(tmp_path: Path) -> None:
    hooks = hook_dir(tmp_path, tmp_path / "x", {"vm1.pre": "sleep 30", "vm2.pre": "true",
                                                "vm3.pre": "true"})
    hooks.timeout = 0.3
    d = Path(str(hooks.directory))
    (d / "vm2.pre").chmod(0o777)
    (d / "vm3.pre").chmod(0o644)
    os.symlink("/bin/true", d / "vm4.pre")
    with pytest.raises(HookFailed, match=r"vm1.pre did not finish within 0.3 s"):
        trio.run(hooks.run, "g", "vm1", "pre")
    with pytest.raises(HookFailed, match=r"vm2.pre is refused: writable by others"):
        trio.run(hooks.run, "g", "vm2", "pre")
    with pytest.raises(HookFailed, match=r"vm3.pre is refused: not executable"):
        trio.run(hooks.run, "g", "vm3", "pre")
    with pytest.raises(HookFailed, match=r"vm4.pre is refused: not a regular file"):
        trio.run(hooks.run, "g", "vm4", "pre")
    assert hooks.path("vm5", "pre") is None


# --- a real guest under libvirt ---------------------------------------------------------

AGENT_GUEST = r"""
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
done
[ -n "$port" ] || { echo no-agent-port; exit 1; }
ga_line() {
    case "$1" in
    *guest-sync*)
        id=${1#*\"id\"}; id=${id#*:}; id=${id# }; id=${id%%[!0-9]*}
        echo "{\"return\": $id}" ;;  # (no fork: a TCG guest forks slowly)
    *guest-fsfreeze-freeze*)
        if fsfreeze --freeze /mnt; then
            echo ga-frozen >/dev/console; echo '{"return": 1}'
        else
            echo '{"error": {"class": "GenericError", "desc": "FIFREEZE failed"}}'
        fi ;;
    *guest-fsfreeze-thaw*)
        if fsfreeze --unfreeze /mnt; then
            echo ga-thawed >/dev/console; echo '{"return": 1}'
        else
            echo '{"error": {"class": "GenericError", "desc": "FITHAW failed"}}'
        fi ;;
    *guest-fsfreeze-status*) echo '{"return": "thawed"}' ;;
    *guest-ping*) echo '{"return": {}}' ;;
    *) echo '{"error": {"class": "CommandNotFound", "desc": "not in this agent"}}' ;;
    esac
}
ga() {
    while :; do
        while IFS= read -r line; do ga_line "$line"; done
        sleep 0.2  # EOF: the host side of the port is not connected (yet, or any more)
    done
}
if [ -x /usr/sbin/qemu-ga ]; then  # Debian's qemu-guest-agent, where the host has it
    mkdir -p /var/run /usr/local/var/run
    qemu-ga -m virtio-serial -p "$port" -t /run -l /dev/console -v &
    echo agent-qemu-ga
else
    exec 3<>"$port"
    ga <&3 >&3 &
    echo agent-shell
fi
echo loop-start
i=0
while :; do
    echo "$i" >> /mnt/log
    sync
    i=$((i + 1))
    sleep 0.2
done
"""


@pytest.fixture
def agent_virt(lab: Lab, libvirtd: Libvirtd, tmp_path: Path) -> Iterator[VirtLab]:
    hooks = tmp_path / "domain-hooks"
    hooks.mkdir()
    lab.a.extra_args += ["--domain-hooks", str(hooks)]
    v = VirtLab(lab, libvirtd)
    try:
        yield v
    finally:
        v.close()


def features_at(lab: Lab, checkpoint: str) -> str:
    """The ext4 features of the guest's disk as of ``checkpoint`` (restored on site B)."""
    dest = lab.work / ("at-%s.img" % checkpoint)
    lab.b.ferry("restore", "ga", "--disk", "vda", "--checkpoint", checkpoint, "--to", str(dest))
    header = subprocess.run(["dumpe2fs", "-h", str(dest)], capture_output=True, text=True)
    return next(x for x in header.stdout.splitlines() if x.startswith("Filesystem features"))


@pytest.mark.guest
def test_app_consistent_checkpoint_of_a_running_guest_is_clean_and_listed_as_app(
        agent_virt: VirtLab, tmp_path: Path) -> None:
    virt, lab = agent_virt, agent_virt.lab
    hlog = tmp_path / "hooks.log"
    for phase in ("pre", "post"):
        hook = tmp_path / "domain-hooks" / ("vmapp." + phase)
        hook.write_text("#!/bin/sh\necho $FERRY_PHASE >> %s\n" % hlog)
        hook.chmod(0o755)
    disk = virt.image("vmapp-vda.img")
    dom = virt.define("vmapp", AGENT_GUEST, [disk], agent=True)
    lab.a.ferry("protect", "ga", "--domain", "vmapp", "--target", lab.b.address,
                "--app-consistent-every", "2s")
    dom.create()
    deadline = time.monotonic() + 180
    while "loop-start" not in virt.console("vmapp"):
        assert time.monotonic() < deadline, virt.console("vmapp")[-2000:]
        time.sleep(0.2)
    while "state='connected'" not in dom.XMLDesc(0):  # the guest opened its agent's port
        assert time.monotonic() < deadline, dom.XMLDesc(0)
        time.sleep(0.2)
    lab.a.ferry("wait", "ga", "--synced", "--timeout", "120")
    # An administrator changes the definition: the checkpoint sends it to site B again.
    defined = dom.XMLDesc(2 | 1)  # VIR_DOMAIN_XML_INACTIVE | VIR_DOMAIN_XML_SECURE
    virt.conn.defineXML(defined.replace("</name>", "</name><description>changed-on-a"
                                        "</description>", 1))
    r = lab.a.ferry("checkpoint", "ga", "--app-consistent", "--tag", "app1", "--json",
                    "--timeout", "60", check=False)
    assert r.returncode == 0, r.stderr + virt.console("vmapp")[-3000:]
    made = json.loads(r.stdout)
    print("app-consistent checkpoint: guests frozen %s ms" % made["frozen_ms"])
    assert made["kind"] == "app" and made["acked"] and made["domains"] == ["vmapp"]
    console = virt.console("vmapp")
    real = "agent-qemu-ga" in console
    print("guest agent: %s" % ("Debian's qemu-ga" if real else "the busybox shell agent"))
    frozen, thawed = ("disabling logging due to filesystem freeze",
                      "logging re-enabled due to filesystem unfreeze") if real else (
                          "ga-frozen", "ga-thawed")
    assert frozen in console and thawed in console, console[-3000:]
    assert console.index(frozen) < console.index(thawed), console[-2000:]
    phases = hlog.read_text().split()  # (the schedule's own may have run too,
    if phases[-1:] == ["pre"]:           # and one may be under way now)
        phases.pop()
    assert phases[:2] == ["pre", "post"] and phases == ["pre", "post"] * (len(phases) // 2)
    listed = json.loads(lab.a.ferry("checkpoints", "ga", "--json").stdout)
    assert [c["kind"] for c in listed["source"] if c["id"] == made["id"]] == ["app"]
    held = json.loads(lab.b.ferry("checkpoints", "ga", "--json").stdout)
    assert [c["kind"] for c in held["target"] if c["id"] == made["id"]] == ["app"]
    text = lab.b.ferry("checkpoints", "ga").stdout
    assert any(made["id"] in x and " app " in x for x in text.splitlines()), text
    deadline = time.monotonic() + 60  # and the schedule cuts its own (one at a time)
    while len([c for c in listed["source"] if c["kind"] == "app"]) < 2:
        assert time.monotonic() < deadline, listed
        time.sleep(0.5)
        listed = json.loads(lab.a.ferry("checkpoints", "ga", "--json").stdout)
    # The file system at the checkpoint was frozen: clean, no journal to replay.
    kept = next(lab.b.data.rglob("domains.json"))
    deadline = time.monotonic() + 60
    while "changed-on-a" not in kept.read_text():
        assert time.monotonic() < deadline, kept.read_text()[:2000]
        time.sleep(0.3)
    sent = [x for x in lab.a.log.read_text().splitlines() if "sent to site B again" in x]
    assert len(sent) == 1, sent  # once, not at every scheduled checkpoint
    assert "changed-on-a" not in json.loads(kept.read_text())[0]["xml"].split(
        "<devices>")[1]  # and its disks as they were before Ferry, not on A's sockets
    assert "socket=" not in json.loads(kept.read_text())[0]["xml"]
    # (A crash-consistent one, cut while the guest writes, has: the test can tell.)
    crash = json.loads(lab.a.ferry("checkpoint", "ga", "--json").stdout)
    assert crash["kind"] == "user"
    assert "needs_recovery" in features_at(lab, crash["id"])
    dest = lab.work / ("at-%s.img" % made["id"])
    assert "needs_recovery" not in features_at(lab, made["id"])
    fsck = subprocess.run(["e2fsck", "-fn", str(dest)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # A group protected by disk has no guest to freeze; a guest without agent is named.
    other = lab.image("plain.img")
    lab.protect("gp", other)
    r = lab.a.ferry("checkpoint", "gp", "--app-consistent", check=False)
    assert r.returncode != 0 and "protected by disk, not by domain" in r.stderr, r.stderr
    dom.destroy()
    r = lab.a.ferry("checkpoint", "ga", "--app-consistent", check=False)
    assert r.returncode != 0 and "domain vmapp is not running" in r.stderr, r.stderr
