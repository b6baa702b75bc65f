"""The .deb installed on this host with apt, as an administrator would: its dependencies
come from Debian's archive, the installed agent runs the way its unit's ExecStart runs it
(PID 1 is not systemd here), protects a disk and restores it with the installed ``ferry``;
an upgrade to a rebuilt package leaves the splitter serving; removal keeps the data.

The host is shared: the test skips when ferry is installed already or /var/lib/ferry
exists (neither is its to touch), uses ports of its own, and purges the package and
removes what it created even when it fails.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "packaging" / "build.sh"
UNIT = Path("/lib/systemd/system/ferry-agent.service")
DATA = Path("/var/lib/ferry")
DROP_IN = Path("/etc/ferry/conf.d/90-pkgtest.conf")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def run(cmd: List[str], check: bool = True, timeout: float = 300,
        env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or {"PATH": PATH, "LANG": "C.UTF-8"}, cwd="/")
    if check:
        assert proc.returncode == 0, "%s failed (%d):\n%s\n%s" % (
            " ".join(cmd), proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def apt_get(*args: str) -> subprocess.CompletedProcess:
    return run(["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", *args], timeout=900,
               env={"PATH": PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"})


def dpkg_status() -> str:
    proc = run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "ferry"], check=False)
    status = proc.stdout.strip() if proc.returncode == 0 else ""
    return "" if status in ("un", "pn") else status


def free_port() -> int:
    """A free loopback port in 20000-29999: below the ephemeral range, away from the
    lab's habits (see lab/sites.py) by chance only, so bind-checked."""
    for _ in range(100):
        port = random.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port")


def unit_start() -> Tuple[List[str], Dict[str, str]]:
    """ExecStart and Environment of the installed unit."""
    argv: List[str] = []
    env = {"PATH": PATH, "LANG": "C.UTF-8"}
    for line in UNIT.read_text().splitlines():
        if line.startswith("ExecStart="):
            argv = shlex.split(line.split("=", 1)[1])
        elif line.startswith("Environment="):
            for item in shlex.split(line.split("=", 1)[1]):
                name, _, value = item.partition("=")
                env[name] = value
    assert argv, "no ExecStart in the unit"
    return argv, env


class Agent:
    """The installed agent, started as the unit's ExecStart, watched on $NOTIFY_SOCKET."""

    def __init__(self, work: Path, name: str, conf_dir: Optional[Path] = None) -> None:
        self.name = name
        self.log = work / ("agent-%s.log" % name)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(work / ("notify-%s" % name)))
        self.notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notify.settimeout(120)
        argv, env = unit_start()
        env["NOTIFY_SOCKET"] = str(work / ("notify-%s" % name))
        if conf_dir is not None:
            env["FERRY_CONF_DIR"] = str(conf_dir)  # the start script's test hook
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, cwd="/")
        assert self.message() == ("READY=1", self.proc.pid), self.log.read_text()

    def message(self) -> Tuple[str, int]:
        try:
            data, ancdata, _flags, _addr = self.notify.recvmsg(4096, socket.CMSG_SPACE(12))
        except socket.timeout:
            raise AssertionError("agent %s: no notification:\n%s"
                                 % (self.name, self.log.read_text()[-3000:])) from None
        pid = next(struct.unpack("iII", d[:12])[0] for level, kind, d in ancdata
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        return data.decode(), pid

    def stop(self) -> None:
        """systemctl stop: SIGTERM to the main process only (KillMode=process)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.message() == ("STOPPING=1", self.proc.pid)
            assert self.proc.wait(timeout=120) == 0, self.log.read_text()[-3000:]
        self.notify.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()


def splitter_pids(disk: Path) -> List[int]:
    proc = run(["pgrep", "-f", "nbd_plugin/splitter.py disk=%s" % disk], check=False)
    return [int(p) for p in proc.stdout.split()]


def nbd_write_read(uri: str, data: bytes, offset: int, work: Path) -> None:
    """Write through the splitter with libnbd (as qemu would), flush, read it back."""
    chunk = work / "chunk"
    chunk.write_bytes(data)
    code = ("import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); "
            "data = open(sys.argv[2], 'rb').read(); off = int(sys.argv[3]); "
            "h.pwrite(data, off); h.flush(); assert h.pread(len(data), off) == data")
    run(["/usr/bin/python3", "-c", code, uri, str(chunk), str(offset)], timeout=60)


def ferry(api: str, *args: str) -> str:
    """The installed ferry command, as an administrator runs it."""
    return run(["/usr/bin/ferry", "--api", api, *args], timeout=300).stdout


def api_endpoints(work: Path, name: str) -> Tuple[str, str]:
    """(the agent's --api, the ferry command's --api) for a test agent of its own: a Unix
    socket where the installed agent serves its API on one (unix:PATH), else a loopback
    port (the HTTP API of releases before it)."""
    if "unix:PATH" in run(["/usr/bin/ferry", "agent", "--help"]).stdout:
        path = "unix:%s" % (work / ("%s.sock" % name))
        return path, path
    port = free_port()
    return "127.0.0.1:%d" % port, "http://127.0.0.1:%d" % port


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> Dict[str, Path]:
    """The package, and a rebuild of it with a higher release to upgrade to."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("installs a package: needs root and apt-get")
    if shutil.which("dpkg-buildpackage", path=PATH) is None:
        pytest.skip("dpkg-buildpackage is not installed (make package-apt)")
    out = tmp_path_factory.mktemp("debs")
    built = {}
    for release in ("1", "2"):
        env = dict(os.environ, TMPDIR=str(out), FERRY_RELEASE=release)
        proc = subprocess.run([str(BUILD), "deb", str(out / release)], capture_output=True,
                              text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        built[release] = Path(proc.stdout.split()[0])
    return built


class Host:
    """What a test started or made on this host, to undo."""

    def __init__(self, site_b: Path) -> None:
        self.site_b = site_b
        self.agents: List[Agent] = []
        self.disks: List[Path] = []


@pytest.fixture
def host(tmp_path) -> Iterator[Host]:
    """This host, with nothing of Ferry's on it before and after."""
    if dpkg_status():
        pytest.skip("ferry is installed on this host (%s): not touching it" % dpkg_status())
    if DATA.exists():
        pytest.skip("%s exists on this host: not touching it" % DATA)
    had_group = run(["getent", "group", "ferry"], check=False).returncode == 0
    made = Host(Path(tempfile.mkdtemp(prefix="fypkg", dir="/tmp")))  # short: socket paths
    try:
        yield made
    finally:
        for agent in made.agents:
            agent.kill()
        for disk in made.disks:
            for pid in splitter_pids(disk):
                os.kill(pid, signal.SIGKILL)
        if dpkg_status():
            apt_get("purge", "ferry")
        shutil.rmtree(DATA, ignore_errors=True)
        shutil.rmtree(made.site_b, ignore_errors=True)
        if not had_group:  # a package leaves its sysusers group; the test does not
            run(["groupdel", "ferry"], check=False)
        for agent in made.agents:
            if agent.log.exists():
                print("---- agent %s log (tail) ----" % agent.name)
                print(agent.log.read_text()[-2000:])


def test_install_run_protect_restore_upgrade_remove(debs, host, tmp_path):
    t0 = time.monotonic()
    # --- install, with the dependencies from Debian's archive ------------------------------
    apt_get("install", "--no-install-recommends", str(debs["1"]))
    assert dpkg_status() == "ii"
    assert run(["dpkg-query", "-W", "-f", "${Version}", "ferry"]).stdout.endswith("-1")
    assert run(["getent", "group", "ferry"]).stdout.startswith("ferry:")
    assert DATA.is_dir() and DATA.stat().st_mode & 0o777 == 0o750  # tmpfiles.d
    # py3compile made the bytecode for this host's python3.
    assert list(Path("/usr/lib/python3/dist-packages/agent/cli/__pycache__").glob("app.*.pyc"))
    assert "protect" in run(["/usr/bin/ferry", "--help"]).stdout
    assert "ferry" in run(["man", "-w", "ferry"]).stdout
    installed_at = time.monotonic() - t0

    # --- site A: the unit's ExecStart with /etc/ferry; site B: the same, its own config ----
    a_listen, b_listen = free_port(), free_port()
    a_serve, a_api = api_endpoints(host.site_b, "a")
    b_serve, b_api = api_endpoints(host.site_b, "b")
    DROP_IN.write_text("FERRY_LISTEN=127.0.0.1:%d\nFERRY_API=%s\n"
                       "FERRY_SITE=pkgtest-a\nFERRY_ARGS='--insecure --image-root %s'\n"
                       % (a_listen, a_serve, tmp_path))
    conf_b = tmp_path / "etc-b"
    (conf_b / "conf.d").mkdir(parents=True)
    (conf_b / "agent.conf").write_text(
        "FERRY_DATA=%s\nFERRY_LISTEN=127.0.0.1:%d\nFERRY_API=%s\n"
        "FERRY_SITE=pkgtest-b\nFERRY_ARGS=--insecure\n"
        % (host.site_b / "b", b_listen, b_serve))
    a = Agent(tmp_path, "a")
    host.agents.append(a)
    b = Agent(tmp_path, "b", conf_b)
    host.agents.append(b)

    # --- protect a disk, write through its splitter, restore it on B -----------------------
    disk = tmp_path / "d1.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    host.disks.append(disk)
    out = ferry(a_api, "protect", "g1", "--disk", "d1=%s" % disk, "--target",
                "127.0.0.1:%d" % b_listen)
    uri = dict(line.split("\t") for line in out.strip().splitlines())["d1"]
    first = os.urandom(256 << 10)
    nbd_write_read(uri, first, 1 << 20, tmp_path)
    ferry(a_api, "wait", "g1", "--synced", "--timeout", "120")
    restored = tmp_path / "restored-1.img"
    ferry(b_api, "restore", "g1", "--disk", "d1", "--to", str(restored))
    assert restored.read_bytes() == disk.read_bytes()
    [splitter] = splitter_pids(disk)
    assert str(DATA) in Path("/proc/%d/cmdline" % splitter).read_text()

    # --- upgrade to a rebuilt package: the splitter keeps serving --------------------------
    apt_get("install", "--no-install-recommends", str(debs["2"]))
    assert run(["dpkg-query", "-W", "-f", "${Version}", "ferry"]).stdout.endswith("-2")
    assert splitter_pids(disk) == [splitter]
    second = os.urandom(128 << 10)
    nbd_write_read(uri, second, 4 << 20, tmp_path)
    # What postinst's restart does under systemd: stop the main process, start it again.
    a.stop()
    host.agents.remove(a)
    assert splitter_pids(disk) == [splitter]
    a = Agent(tmp_path, "a2")
    host.agents.append(a)
    third = os.urandom(64 << 10)
    nbd_write_read(uri, third, 8 << 20, tmp_path)
    ferry(a_api, "wait", "g1", "--synced", "--timeout", "120")
    restored = tmp_path / "restored-2.img"
    ferry(b_api, "restore", "g1", "--disk", "d1", "--to", str(restored))
    assert restored.read_bytes() == disk.read_bytes()
    assert splitter_pids(disk) == [splitter]

    # --- remove: the data directory stays; purge: the settings go, the data stays ---------
    for agent in list(host.agents):
        agent.stop()
        host.agents.remove(agent)
    removed = apt_get("remove", "ferry")
    # The splitter still serves the disk: prerm says so, and leaves it running.
    assert "splitters (nbdkit) still serve protected disks" in removed.stdout + removed.stderr
    assert splitter_pids(disk) == [splitter]
    os.kill(splitter, signal.SIGTERM)
    assert dpkg_status() == "rc"
    assert not Path("/usr/bin/ferry").exists()
    assert Path("/etc/ferry/agent.conf").exists()  # a conffile: kept until purge
    assert DATA.is_dir() and any(DATA.iterdir())
    purged = apt_get("purge", "ferry")
    assert "/var/lib/ferry (journals, replicas, state) is kept" in purged.stdout + purged.stderr
    assert dpkg_status() == ""
    assert not Path("/etc/ferry").exists()
    assert DATA.is_dir() and any(DATA.iterdir())
    print("installed in %.1f s, whole scenario %.1f s" % (installed_at, time.monotonic() - t0))
