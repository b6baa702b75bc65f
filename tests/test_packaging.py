"""The packages: packaging/build.sh makes a .deb (and an .rpm where rpmbuild is installed)
from one staged tree; these tests look inside them and run what they hold.

Nothing is installed on this host. The .deb is unpacked with ``dpkg-deb -x`` into a
temporary directory, and its programs run from there: a venv finds its site-packages next
to the ``python`` it is started as, and the start script takes FERRY_CONF_DIR and FERRY_BIN
in place of /etc/ferry and /opt/ferry/bin/ferry.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "packaging" / "build.sh"
SYSTEM_PYTHON = "/usr/bin/python3"
UNIT = "usr/lib/systemd/system/ferry-agent.service"
CONFFILE = "/etc/ferry/agent.conf"


def project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1]
    m = re.search(r'^version\s*=\s*"([^"]+)"', project, re.M)
    assert m, "no version in pyproject.toml"
    return m.group(1)


def package_version() -> str:
    """pyproject's version as build.sh spells it for dpkg and rpm (0.2.0rc1 -> 0.2.0~rc1)."""
    return re.sub(r"\.?(a|b|rc|dev)(\d+)", r"~\1\2", project_version())


def system_python_version() -> str:
    return subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        check=True, capture_output=True, text=True).stdout.strip()


def run(cmd: List[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 120)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, "%s failed (%d):\n%s\n%s" % (
        " ".join(cmd), proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def clean_env(**extra: str) -> Dict[str, str]:
    """No PYTHON*, FERRY_* or virtualenv settings of the test run leak into a child."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> Dict[str, Optional[Path]]:
    for tool in ("dpkg-deb", "tar"):
        if shutil.which(tool) is None:
            pytest.skip("%s is not installed" % tool)
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("no %s" % SYSTEM_PYTHON)
    out = tmp_path_factory.mktemp("packages")
    what = "all" if shutil.which("rpmbuild") else "deb"
    env = dict(os.environ, TMPDIR=str(out), FERRY_RELEASE="1")
    proc = run([str(BUILD), what, str(out)], timeout=600, env=env)
    built = [Path(line) for line in proc.stdout.split()]
    debs = [p for p in built if p.suffix == ".deb"]
    rpms = [p for p in built if p.suffix == ".rpm"]
    assert len(debs) == 1 and debs[0].is_file(), proc.stdout
    assert len(rpms) == (1 if what == "all" else 0), proc.stdout
    # The scratch directory is gone: the build leaves only the packages behind.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in built)
    return {"deb": debs[0], "rpm": rpms[0] if rpms else None}


@pytest.fixture(scope="module")
def tree(packages, tmp_path_factory) -> Path:
    """The .deb unpacked, as it would land in /."""
    root = tmp_path_factory.mktemp("unpacked")
    run(["dpkg-deb", "-x", str(packages["deb"]), str(root)])
    return root


def site_packages(root: Path) -> Path:
    return root / "opt/ferry/lib" / ("python" + system_python_version()) / "site-packages"


def deb_field(deb: Path, field: str) -> str:
    return run(["dpkg-deb", "-f", str(deb), field]).stdout.strip()


def deb_entries(deb: Path) -> Dict[str, str]:
    """path (no leading ./ nor trailing /) -> `dpkg-deb -c` line."""
    entries = {}
    for line in run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines():
        name = line.split(None, 5)[5].split(" -> ")[0]
        entries[name[1:].rstrip("/") or "/"] = line
    return entries


# --- the .deb's metadata ------------------------------------------------------------------


def test_deb_control(packages):
    deb = packages["deb"]
    assert deb_field(deb, "Package") == "ferry"
    assert deb_field(deb, "Version") == package_version() + "-1"
    depends = [d.strip() for d in deb_field(deb, "Depends").split(",")]
    assert "python3 (>= 3.9)" in depends
    assert "nbdkit" in depends
    assert "nbdkit-plugin-python" in depends
    # The venv runs on exactly the Python it was built with.
    assert "python" + system_python_version() in depends
    assert deb_field(deb, "Architecture") == run(["dpkg", "--print-architecture"]).stdout.strip()


def test_deb_conffiles_and_maintainer_scripts(packages, tmp_path):
    control = tmp_path / "DEBIAN"
    run(["dpkg-deb", "-e", str(packages["deb"]), str(control)])
    assert (control / "conffiles").read_text().split() == [CONFFILE]
    for script in ("postinst", "prerm", "postrm"):
        path = control / script
        assert os.access(path, os.X_OK), script
        run(["sh", "-n", str(path)])
    # Upgrades restart the agent only if it runs; prerm stops it on remove, never on upgrade.
    assert "try-restart" in (control / "postinst").read_text()
    prerm = (control / "prerm").read_text()
    assert re.search(r"^remove\)\n(.*\n)*?.*stop", prerm, re.M)
    assert not re.search(r"^\s*(upgrade|failed-upgrade)[|)]", prerm, re.M)


def test_deb_contents(packages):
    entries = deb_entries(packages["deb"])
    sp = "/opt/ferry/lib/python%s/site-packages" % system_python_version()
    for path in ("/opt/ferry/bin/python", "/opt/ferry/bin/ferry", "/opt/ferry/pyvenv.cfg",
                 "/opt/ferry/libexec/ferry-agent", "/" + UNIT, CONFFILE, "/etc/ferry/conf.d",
                 "/var/lib/ferry", sp + "/agent/cli.py", sp + "/agent/daemon.py",
                 sp + "/nbd_plugin/splitter.py", sp + "/nbd_plugin/__init__.py"):
        assert path in entries, "%s is not in the .deb" % path
    assert entries["/usr/bin/ferry"].endswith("/usr/bin/ferry -> /opt/ferry/bin/ferry")
    assert entries["/var/lib/ferry"].startswith("drwxr-x--- ")
    assert all(" root/root " in line for line in entries.values())
    # An application venv: no pip or setuptools to install things into it on a host.
    assert not any(re.match(sp + r"/(pip|setuptools)[/-]", p) for p in entries)
    # Bytecode for the Python it runs on, so nothing is compiled into /opt at run time.
    tag = "cpython-%s" % system_python_version().replace(".", "")
    assert sp + "/agent/__pycache__/cli.%s.pyc" % tag in entries
    assert sp + "/nbd_plugin/__pycache__/splitter.%s.pyc" % tag in entries


def test_unit(tree, tmp_path):
    unit = (tree / UNIT).read_text()
    settings = [line.strip() for line in unit.splitlines()]
    for wanted in ("Type=notify", "KillMode=process", "ExecStart=/opt/ferry/libexec/ferry-agent",
                   "WantedBy=multi-user.target"):
        assert wanted in settings
    if shutil.which("systemd-analyze") is None:
        return
    # systemd's own check, with ExecStart pointing into the unpacked tree; an unknown key or
    # a bad value is a message on stderr, so stderr must stay empty.
    copy = tmp_path / "ferry-agent.service"
    copy.write_text(unit.replace("/opt/ferry/", str(tree / "opt/ferry") + "/"))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


# --- what the .deb holds, run from the unpacked tree --------------------------------------


def test_venv_is_relocated(tree):
    """Nothing in the tree names the scratch directory it was built in."""
    ferry = tree / "opt/ferry/bin/ferry"
    assert ferry.read_text().splitlines()[0] == "#!/opt/ferry/bin/python"
    assert os.readlink(tree / "opt/ferry/bin/python").startswith(("python3", "/usr/bin/python3"))
    proc = subprocess.run(["grep", "-rlF", "ferry-build.", str(tree)], capture_output=True,
                          text=True)
    assert proc.returncode == 1, "build paths left in:\n" + proc.stdout
    cfg = (tree / "opt/ferry/pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    assert "home = /usr/bin" in cfg


def test_ferry_help(tree):
    venv = tree / "opt/ferry"
    proc = run([str(venv / "bin/python"), "-I", str(venv / "bin/ferry"), "--help"],
               env=clean_env(), cwd=str(tree))
    for command in ("agent", "protect", "wait", "restore", "status"):
        assert command in proc.stdout


def test_agent_and_nbdkit_share_the_plugin(tree):
    """The agent's PLUGIN is the file the unpacked tree holds, importable by its Python."""
    venv = tree / "opt/ferry"
    proc = run([str(venv / "bin/python"), "-I", "-c",
                "import agent.splitters as s; print(s.PLUGIN)"], env=clean_env(), cwd=str(tree))
    assert proc.stdout.strip() == str(site_packages(tree) / "nbd_plugin/splitter.py")


def test_system_python_loads_splitter(tree):
    """As nbdkit does: the system Python loads splitter.py by path, and it finds nbd_plugin
    in the directory above its own (with a stand-in for nbdkit's built-in module)."""
    splitter = site_packages(tree) / "nbd_plugin/splitter.py"
    code = """
import importlib.util, sys, types
nbdkit = types.ModuleType("nbdkit")
nbdkit.__getattr__ = lambda name: (lambda *args, **kwargs: None)
sys.modules["nbdkit"] = nbdkit
spec = importlib.util.spec_from_file_location("splitter", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert module.API_VERSION == 2
print(sys.modules["nbd_plugin"].__file__)
"""
    proc = run([SYSTEM_PYTHON, "-I", "-c", code, str(splitter)], env=clean_env(), cwd="/")
    assert proc.stdout.strip() == str(splitter.parent / "__init__.py")


def test_nbdkit_serves_through_packaged_splitter(tree, tmp_path):
    """A write and a read through nbdkit running the packaged plugin (no agent: the
    splitter must serve regardless)."""
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    if subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode:
        pytest.skip("python3-libnbd is not installed")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    client = ("import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); "
              "h.pwrite(b'ferry' * 1000, 8192); h.flush(); "
              "assert h.pread(5000, 8192) == b'ferry' * 1000")
    run(["nbdkit", "-U", "-", "python", str(site_packages(tree) / "nbd_plugin/splitter.py"),
         "disk=%s" % disk, "agent=%s" % (tmp_path / "no-agent.sock"),
         "state=%s" % (tmp_path / "state.json"), "disk_id=pkgtest",
         "--run", "%s -c \"%s\" \"$uri\"" % (SYSTEM_PYTHON, client)],
        env=clean_env(), timeout=60)
    assert disk.read_bytes()[8192:8192 + 5000] == b"ferry" * 1000


def _free_port() -> int:
    from agent.lab.sites import free_port  # below the ephemeral range: see there

    return free_port()


def _start_script_argv(tree: Path, tmp_path: Path, drop_ins: Dict[str, str]) -> List[str]:
    conf = tmp_path / "etc"
    (conf / "conf.d").mkdir(parents=True)
    shutil.copy(tree / CONFFILE.lstrip("/"), conf / "agent.conf")
    for name, text in drop_ins.items():
        (conf / "conf.d" / name).write_text(text)
    echo = tmp_path / "echo-args"
    echo.write_text('#!/bin/sh\nfor a; do echo "$a"; done\n')
    echo.chmod(0o755)
    proc = run([str(tree / "opt/ferry/libexec/ferry-agent")],
               env=clean_env(FERRY_CONF_DIR=str(conf), FERRY_BIN=str(echo)))
    return proc.stdout.splitlines()


def test_start_script_defaults(tree, tmp_path):
    assert _start_script_argv(tree, tmp_path, {}) == [
        "agent", "--data", "/var/lib/ferry", "--listen", "0.0.0.0:4005",
        "--api", "127.0.0.1:9080"]


def test_start_script_drop_ins_override_in_name_order(tree, tmp_path):
    argv = _start_script_argv(tree, tmp_path, {
        "50-site.conf": 'FERRY_SITE="site a"\nFERRY_LISTEN=10.0.0.1:4005\n',
        "90-local.conf": "FERRY_LISTEN=10.0.0.2:4005\nFERRY_ARGS='--verbose'\n",
        "README": "FERRY_DATA=/not/a/conf/file\n"})
    assert argv == ["agent", "--data", "/var/lib/ferry", "--listen", "10.0.0.2:4005",
                    "--api", "127.0.0.1:9080", "--site", "site a", "--verbose"]


def test_packaged_agent_notifies_systemd_from_main_pid(tree, tmp_path):
    """What ferry-agent.service runs, run the same way: the start script reads the config,
    execs the agent, which sends READY=1 from the start script's pid (NotifyAccess=main)
    once bound, and STOPPING=1 on SIGTERM, then exits 0."""
    venv = tree / "opt/ferry"
    conf = tmp_path / "etc"
    (conf / "conf.d").mkdir(parents=True)
    api_port, listen_port = _free_port(), _free_port()
    (conf / "conf.d" / "50-test.conf").write_text(
        "FERRY_DATA=%s\nFERRY_LISTEN=127.0.0.1:%d\nFERRY_API=127.0.0.1:%d\nFERRY_SITE=pkgtest\n"
        % (tmp_path / "data", listen_port, api_port))
    ferry = tmp_path / "ferry"  # /opt/ferry/bin/ferry's shebang names the installed python
    ferry.write_text('#!/bin/sh\nexec %s -I %s "$@"\n' % (venv / "bin/python", venv / "bin/ferry"))
    ferry.chmod(0o755)
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notify.settimeout(60)

        def message() -> tuple:
            data, ancdata, _flags, _addr = notify.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = next(struct.unpack("iII", d[:12])[0] for level, kind, d in ancdata
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
            return data.decode(), pid

        agent = subprocess.Popen(
            [str(venv / "libexec/ferry-agent")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=clean_env(FERRY_CONF_DIR=str(conf), FERRY_BIN=str(ferry),
                                     NOTIFY_SOCKET=notify_path))
        try:
            assert message() == ("READY=1", agent.pid)
            # A TCP API needs its token (made by the agent in its data directory).
            status = run([str(ferry), "--api", "http://127.0.0.1:%d" % api_port,
                          "--token-file", str(tmp_path / "data" / "api.token"), "status",
                          "--json"], env=clean_env())
            assert '"site": "pkgtest"' in status.stdout
            agent.send_signal(signal.SIGTERM)
            assert message() == ("STOPPING=1", agent.pid)
            _out, err = agent.communicate(timeout=60)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.communicate()
    assert agent.returncode == 0, err


# --- the .rpm, from the same tree ---------------------------------------------------------


@pytest.fixture(scope="module")
def rpm(packages) -> Path:
    if packages["rpm"] is None:
        pytest.skip("rpmbuild is not installed (Debian: apt-get install rpm)")
    return packages["rpm"]


def rpm_query(rpm: Path, *args: str) -> List[str]:
    return run(["rpm", "-qp", *args, str(rpm)]).stdout.splitlines()


def test_rpm_holds_the_same_files_as_the_deb(packages, rpm):
    deb = deb_entries(packages["deb"])
    deb_files = {p for p, line in deb.items() if not line.startswith("d")}
    rpm_paths = set(rpm_query(rpm, "-l"))
    assert deb_files <= rpm_paths, sorted(deb_files - rpm_paths)[:20]
    assert rpm_paths <= set(deb), sorted(rpm_paths - set(deb))[:20]


def test_rpm_metadata(rpm):
    assert rpm_query(rpm, "--queryformat", "%{NAME} %{VERSION}\n") == [
        "ferry " + package_version()]
    requires = {r.strip() for r in rpm_query(rpm, "--requires")}
    for wanted in ("python3 >= 3.9", "nbdkit", "nbdkit-python-plugin",
                   "/usr/bin/python" + system_python_version()):
        assert wanted in requires
    assert rpm_query(rpm, "-c") == [CONFFILE]
    scripts = "\n".join(rpm_query(rpm, "--scripts"))
    assert "try-restart ferry-agent.service" in scripts
    assert "enable ferry-agent.service" in scripts
