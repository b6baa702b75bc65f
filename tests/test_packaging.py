"""The packages: packaging/build.sh makes a .deb (dpkg-buildpackage, debian/) and an .rpm
(rpmbuild, packaging/ferry.spec); these tests lint them, look inside them and run what
they hold.

Nothing is installed on this host here (tests/test_package_install.py does that): the .deb
is unpacked with ``dpkg-deb -x`` and its programs run from there with the system
python3, the .rpm goes into a throwaway root with ``rpm --root --nodeps``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Set

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "packaging" / "build.sh"
RPMLINTRC = ROOT / "packaging" / "rpm" / "ferry.rpmlintrc"
REQUIRES_LIST = ROOT / "packaging" / "rpm" / "requires.txt"
SYSTEM_PYTHON = "/usr/bin/python3"
DEB_UNIT = "lib/systemd/system/ferry-agent.service"
DEB_SITE = "usr/lib/python3/dist-packages"
CONFFILE = "/etc/ferry/agent.conf"


def project_version() -> str:
    project = (ROOT / "pyproject.toml").read_text().split("[project]", 1)[1]
    m = re.search(r'^version\s*=\s*"([^"]+)"', project, re.M)
    assert m, "no version in pyproject.toml"
    return m.group(1)


def package_version() -> str:
    """pyproject's version as build.sh spells it for dpkg and rpm (0.2.0rc1 -> 0.2.0~rc1)."""
    return re.sub(r"\.?(a|b|rc|dev)(\d+)", r"~\1\2", project_version())


def dependencies() -> Dict[str, str]:
    """pyproject's [project] dependencies: name -> floor."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.M | re.S)
    assert block
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)', block.group(1)))


def shipped_packages() -> List[str]:
    """The top-level Python packages of the checkout that pyproject's discovery ships."""
    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py")
                  if re.match(r"(agent|nbd_plugin|formats)$", p.parent.name))


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
def packages(tmp_path_factory) -> Dict[str, Path]:
    for tool in ("dpkg-buildpackage", "rpmbuild", "lintian", "rpmlint"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.skip("%s is not installed (make package-apt)" % tool)
    out = tmp_path_factory.mktemp("packages")
    env = dict(os.environ, TMPDIR=str(out))
    env.pop("FERRY_RELEASE", None)
    proc = run([str(BUILD), "all", str(out)], timeout=900, env=env)
    built = [Path(line) for line in proc.stdout.split()]
    kinds = {"deb": [p for p in built if p.name.endswith(".deb")],
             "rpm": [p for p in built if p.name.endswith(".noarch.rpm")],
             "srpm": [p for p in built if p.name.endswith(".src.rpm")]}
    assert all(len(v) == 1 and v[0].is_file() for v in kinds.values()), proc.stdout
    # The scratch directory is gone: the build leaves only the packages behind.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in built)
    return {k: v[0] for k, v in kinds.items()}


@pytest.fixture(scope="module")
def tree(packages, tmp_path_factory) -> Path:
    """The .deb unpacked, as it would land in /."""
    root = tmp_path_factory.mktemp("unpacked")
    run(["dpkg-deb", "-x", str(packages["deb"]), str(root)])
    return root


def deb_field(deb: Path, field: str) -> str:
    return run(["dpkg-deb", "-f", str(deb), field]).stdout.strip()


def deb_entries(deb: Path) -> Dict[str, str]:
    """path (no leading ./ nor trailing /) -> `dpkg-deb -c` line."""
    entries = {}
    for line in run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines():
        name = line.split(None, 5)[5].split(" -> ")[0]
        entries[name[1:].rstrip("/") or "/"] = line
    return entries


# --- the .deb -----------------------------------------------------------------------------


def test_deb_names_and_size(packages):
    deb = packages["deb"]
    assert deb.name == "ferry_%s-1_all.deb" % package_version()
    assert deb_field(deb, "Package") == "ferry"
    assert deb_field(deb, "Version") == package_version() + "-1"
    assert deb_field(deb, "Architecture") == "all"
    # A few hundred KB, as a package of Python sources should be (the venv was 11.8 MB).
    assert deb.stat().st_size < 1024 * 1024


def test_deb_depends_are_generated_from_pyproject(packages):
    depends = {d.strip() for d in deb_field(packages["deb"], "Depends").split(",")}
    for name, floor in dependencies().items():
        assert "python3-%s (>= %s)" % (name, floor) in depends, (name, depends)
    for wanted in ("nbdkit", "nbdkit-plugin-python", "python3:any"):
        assert wanted in depends
    # The ferry group comes from sysusers.d, so the package needs a sysusers implementation.
    assert any(d.startswith("systemd |") and "sysusers" in d for d in depends), depends


def test_deb_contents(packages):
    entries = deb_entries(packages["deb"])
    wanted = ["/usr/bin/ferry", "/usr/libexec/ferry/ferry-agent", "/" + DEB_UNIT,
              "/usr/lib/sysusers.d/ferry.conf", "/usr/lib/tmpfiles.d/ferry.conf", CONFFILE,
              "/etc/ferry/conf.d", "/etc/ferry/hooks.d", "/usr/share/man/man1/ferry.1.gz",
              "/usr/share/bash-completion/completions/ferry", "/usr/share/doc/ferry/copyright",
              "/usr/share/doc/ferry/changelog.Debian.gz",
              "/usr/share/doc/ferry/README.packaging.md",
              "/%s/nbd_plugin/splitter.py" % DEB_SITE, "/%s/agent/cli/__init__.py" % DEB_SITE]
    wanted += ["/%s/%s/__init__.py" % (DEB_SITE, name) for name in shipped_packages()]
    for path in wanted:
        assert path in entries, "%s is not in the .deb" % path
    assert not any(p.startswith(("/opt", "/usr/local")) for p in entries)
    assert not any(re.match(r"/%s/(lab|tests|bench)\b" % DEB_SITE, p) for p in entries)
    assert not any("agent/lab" in p for p in entries)
    # Debian compiles the bytecode at install time (py3compile), for the Python installed.
    assert not any(p.endswith(".pyc") for p in entries)
    # /var/lib/ferry is made by tmpfiles.d, not owned by the package: dpkg never removes it.
    assert "/var/lib/ferry" not in entries and "/var/lib/ferry-images" not in entries
    assert all(" root/root " in line for line in entries.values())


def test_every_file_of_the_shipped_packages_is_shipped(packages):
    """Not only the .py files: what the agent reads beside its code (agent/web/) too, in
    both packages (pyproject's [tool.setuptools.package-data])."""
    tracked = subprocess.run(["git", "ls-files", *shipped_packages()], cwd=str(ROOT),
                             capture_output=True, text=True, check=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    deb = deb_entries(packages["deb"])
    rpm = {re.sub(r"^/usr/lib/python3\.\d+/site-packages/", "", p)
           for p in rpm_query(packages["rpm"], "-l")}
    for path in tracked:
        if path.startswith("agent/lab/"):
            continue  # tests and benchmarks only (lab/ once it moves out of agent/)
        assert "/%s/%s" % (DEB_SITE, path) in deb, "%s is not in the .deb" % path
        assert path in rpm, "%s is not in the .rpm" % path


def test_deb_conffiles_and_maintainer_scripts(packages, tmp_path):
    control = tmp_path / "DEBIAN"
    run(["dpkg-deb", "-e", str(packages["deb"]), str(control)])
    assert (control / "conffiles").read_text().split() == [CONFFILE]
    for script in ("postinst", "prerm", "postrm"):
        run(["sh", "-n", str(control / script)])
    postinst = (control / "postinst").read_text()
    assert "systemd-sysusers ${DPKG_ROOT:+--root=\"$DPKG_ROOT\"} ferry.conf" in postinst
    assert "systemd-tmpfiles" in postinst and "--create ferry.conf" in postinst
    assert "_dh_action=restart" in postinst
    # prerm stops the agent on remove only: an upgrade restarts it in postinst, and
    # nothing ever stops the splitters.
    prerm = (control / "prerm").read_text()
    stops = [line for line in prerm.splitlines() if "deb-systemd-invoke stop" in line]
    assert stops
    assert re.search(r'\[ "\$1" = remove \][^\n]*\n(\s*.*\n)?\s*deb-systemd-invoke stop', prerm)
    assert "nbdkit" not in " ".join(stops)
    postrm = (control / "postrm").read_text()
    assert "/var/lib/ferry (journals, replicas, state) is kept" in postrm
    assert "rm -rf /var/lib/ferry" not in postrm


def test_lintian_clean(packages):
    """lintian finds nothing, at any level, and every override says why. (Any tag shown
    fails: --fail-on info would also count a tag lintian's own screens mask, here
    dist-info's top_level.txt, and exit 2 with nothing to show.)"""
    proc = subprocess.run(
        ["lintian", "--fail-on", "error,warning", "--display-info", "--pedantic",
         "--display-experimental", str(packages["deb"])],
        capture_output=True, text=True, timeout=600, env=clean_env())
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    lines = (ROOT / "debian" / "ferry.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("ferry:"):
            assert i > 0 and lines[i - 1].startswith("#"), "override without a reason: " + line


def test_unit(tree, tmp_path):
    unit = (tree / DEB_UNIT).read_text()
    settings = {line.strip() for line in unit.splitlines()}
    for wanted in ("Type=notify", "NotifyAccess=main", "KillMode=process",
                   "ExecStart=/usr/libexec/ferry/ferry-agent", "WantedBy=multi-user.target",
                   "Before=libvirtd.service virtqemud.service libvirt-guests.service",
                   "ProtectSystem=full", "PrivateTmp=yes", "NoNewPrivileges=yes",
                   "ReadWritePaths=/var/lib/ferry /run/ferry", "RuntimeDirectory=ferry"):
        assert wanted in settings, wanted
    caps = next(s for s in settings if s.startswith("CapabilityBoundingSet="))
    for cap in ("CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_SYS_RAWIO"):
        assert cap in caps.split("=", 1)[1].split()
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze")
    # systemd's own check, with ExecStart pointing into the unpacked tree; an unknown key or
    # a bad value is a message on stderr, so stderr must stay empty.
    copy = tmp_path / "ferry-agent.service"
    copy.write_text(unit.replace("/usr/libexec/ferry/", str(tree / "usr/libexec/ferry") + "/"))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_man_page_and_completion(tree):
    page = tree / "usr/share/man/man1/ferry.1.gz"
    proc = run(["man", "--warnings", "-l", str(page)], env=clean_env(MANWIDTH="100"))
    assert not proc.stderr.strip(), proc.stderr
    text = proc.stdout
    for command in ("agent", "protect", "wait", "restore", "status", "FERRY_API",
                    "/etc/ferry/agent.conf"):
        assert command in text, command
    completion = (tree / "usr/share/bash-completion/completions/ferry").read_text()
    assert "_FERRY_COMPLETE=bash_complete" in completion
    assert "complete " in completion and " ferry" in completion
    run(["bash", "-n", str(tree / "usr/share/bash-completion/completions/ferry")])


# --- what the .deb holds, run from the unpacked tree --------------------------------------


def test_ferry_help_on_system_python(tree):
    ferry = tree / "usr/bin/ferry"
    assert ferry.read_text().splitlines()[0] == "#!/usr/bin/python3"
    proc = run([SYSTEM_PYTHON, str(ferry), "--help"], cwd=str(tree),
               env=clean_env(PYTHONPATH=str(tree / DEB_SITE)))
    for command in ("agent", "protect", "wait", "restore", "status"):
        assert command in proc.stdout


def test_agent_and_nbdkit_share_the_plugin(tree):
    """Every path to splitter.py the agent's modules hold (agent.splitters.PLUGIN, or
    wherever a layout keeps it) is the file the package installs next to them."""
    site = tree / DEB_SITE
    code = """
import importlib, pkgutil, agent
found = set()
for info in pkgutil.walk_packages(agent.__path__, "agent."):
    if info.name.endswith(".__main__"):
        continue
    for value in vars(importlib.import_module(info.name)).values():
        if isinstance(value, str) and value.endswith("/nbd_plugin/splitter.py"):
            found.add(value)
print("\\n".join(sorted(found)))
"""
    proc = run([SYSTEM_PYTHON, "-c", code], cwd="/", env=clean_env(PYTHONPATH=str(site)))
    assert proc.stdout.split() == [str(site / "nbd_plugin/splitter.py")]


def test_system_python_loads_splitter(tree):
    """As nbdkit does: the system Python loads splitter.py by path, with nothing on its
    path, and it finds its siblings (nbd_plugin, formats) in the directory above its own
    (with a stand-in for nbdkit's built-in module)."""
    splitter = tree / DEB_SITE / "nbd_plugin/splitter.py"
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
print(getattr(sys.modules.get("formats"), "__file__", ""))
"""
    proc = run([SYSTEM_PYTHON, "-I", "-c", code, str(splitter)], env=clean_env(), cwd="/")
    lines = proc.stdout.splitlines()
    assert lines[0] == str(splitter.parent / "__init__.py")
    if "formats" in shipped_packages() and lines[1]:
        assert lines[1] == str(tree / DEB_SITE / "formats/__init__.py")


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
    run(["nbdkit", "-U", "-", "python", str(tree / DEB_SITE / "nbd_plugin/splitter.py"),
         "disk=%s" % disk, "agent=%s" % (tmp_path / "no-agent.sock"),
         "state=%s" % (tmp_path / "state.json"), "disk_id=pkgtest",
         "--run", "%s -c \"%s\" \"$uri\"" % (SYSTEM_PYTHON, client)],
        env=clean_env(), timeout=60)
    assert disk.read_bytes()[8192:8192 + 5000] == b"ferry" * 1000


def _start_script_argv(tree: Path, tmp_path: Path, drop_ins: Dict[str, str]) -> List[str]:
    conf = tmp_path / "etc"
    (conf / "conf.d").mkdir(parents=True)
    shutil.copy(tree / CONFFILE.lstrip("/"), conf / "agent.conf")
    for name, text in drop_ins.items():
        (conf / "conf.d" / name).write_text(text)
    echo = tmp_path / "echo-args"
    echo.write_text('#!/bin/sh\nfor a; do echo "$a"; done\n')
    echo.chmod(0o755)
    proc = run([str(tree / "usr/libexec/ferry/ferry-agent")],
               env=clean_env(FERRY_CONF_DIR=str(conf), FERRY_BIN=str(echo)))
    return proc.stdout.splitlines()


def test_start_script_defaults(tree, tmp_path):
    """No FERRY_API nor FERRY_METRICS: the agent's own defaults (its local API socket)."""
    assert _start_script_argv(tree, tmp_path, {}) == [
        "agent", "--data", "/var/lib/ferry", "--listen", "0.0.0.0:4005"]


def test_start_script_drop_ins_override_in_name_order(tree, tmp_path):
    argv = _start_script_argv(tree, tmp_path, {
        "50-site.conf": 'FERRY_SITE="site a"\nFERRY_LISTEN=10.0.0.1:4005\n',
        "60-api.conf": "FERRY_API=unix:/run/ferry/api.sock\nFERRY_METRICS=127.0.0.1:9081\n",
        "90-local.conf": "FERRY_LISTEN=10.0.0.2:4005\nFERRY_ARGS='--verbose'\n",
        "README": "FERRY_DATA=/not/a/conf/file\n"})
    assert argv == ["agent", "--data", "/var/lib/ferry", "--listen", "10.0.0.2:4005",
                    "--api", "unix:/run/ferry/api.sock", "--metrics", "127.0.0.1:9081",
                    "--site", "site a", "--verbose"]


# --- the .rpm -----------------------------------------------------------------------------


def rpm_query(rpm: Path, *args: str) -> List[str]:
    return run(["rpm", "-qp", *args, str(rpm)]).stdout.splitlines()


def test_rpmlint_clean(packages):
    """rpmlint finds nothing in the .rpm, the .src.rpm and the spec, once the filters of
    packaging/rpm/ferry.rpmlintrc (each with its reason) are applied."""
    proc = subprocess.run(
        ["rpmlint", "-r", str(RPMLINTRC), str(packages["rpm"]), str(packages["srpm"]),
         str(ROOT / "packaging/ferry.spec")],
        capture_output=True, text=True, timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\b0 errors, 0 warnings", proc.stdout), proc.stdout
    lines = RPMLINTRC.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("addFilter"):
            assert lines[i - 1].startswith(("#", "addFilter")), "filter without a reason"


def test_rpm_metadata(packages):
    rpm = packages["rpm"]
    assert rpm.name == "ferry-%s-1.noarch.rpm" % package_version()
    assert rpm_query(rpm, "--queryformat", "%{NAME} %{VERSION} %{ARCH}\n") == [
        "ferry %s noarch" % package_version()]
    assert rpm_query(rpm, "-c") == [CONFFILE]
    scripts = "\n".join(rpm_query(rpm, "--scripts"))
    assert "groupadd -r ferry" in scripts
    assert "preset ferry-agent.service" in scripts
    assert "try-restart ferry-agent.service" in scripts
    assert "systemd-tmpfiles --create ferry.conf" in scripts
    # Sources and their byte code (three .pyc levels each): 1.2 MB at 0.1.0 with ~150
    # modules; more means something that is not Ferry's code got in.
    assert packages["rpm"].stat().st_size < 2 * 1024 * 1024


def test_rpm_requires_are_in_the_committed_list(packages):
    """Every Requires the build generated is one packages/rpm/requires.txt maps to a Fedora
    and an EL9 package; and pyproject's floors are in the generated ones."""
    known: Set[str] = set()
    for line in REQUIRES_LIST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            known.add(line.split()[0])
    requires = [r.strip() for r in rpm_query(packages["rpm"], "--requires")]
    names = {re.sub(r"^python3\.\d+dist\(", "python3dist(", r.split()[0])
             for r in requires if not r.startswith("rpmlib(")}
    assert names <= known, sorted(names - known)
    for name, floor in dependencies().items():
        assert any(re.fullmatch(r"python3\.\d+dist\(%s\) >= %s" % (
            re.escape(name), re.escape(re.sub(r"(\.0)+$", "", floor))),
            r) for r in requires), (name, floor, requires)


def test_rpm_installs_into_a_throwaway_root(packages, tmp_path):
    """rpm --root --nodeps: the files land where the list says, verify passes, and erase
    leaves /var/lib/ferry and what is in it."""
    root = tmp_path / "root"
    db = ["--root", str(root), "--dbpath", "/var/lib/rpm"]
    run(["rpm", *db, "--initdb"])
    run(["rpm", *db, "-i", "--nodeps", "--noscripts", "--nosignature", str(packages["rpm"])])
    listed = rpm_query(packages["rpm"], "-l")
    for path in listed:
        assert os.path.lexists(str(root) + path), path
    site = [p for p in listed if re.match(r"/usr/lib/python3\.\d+/site-packages/[^/]+$", p)]
    assert sorted(p.rsplit("/", 1)[1] for p in site if not p.endswith(".dist-info")) == \
        shipped_packages()
    assert (root / "var/lib/ferry").stat().st_mode & 0o777 == 0o750
    assert (root / "usr/bin/ferry").read_text().startswith("#!/usr/bin/python3")
    run(["rpm", *db, "-V", "--nodeps", "ferry"])
    (root / "var/lib/ferry/state.db").write_text("kept")
    run(["rpm", *db, "-e", "--nodeps", "--noscripts", "ferry"])
    assert (root / "var/lib/ferry/state.db").read_text() == "kept"
    assert not (root / "usr/bin/ferry").exists()


def test_rpm_and_deb_ship_the_same_files(packages):
    """The same Python modules and host files, each in its distribution's place."""
    deb = {p for p, line in deb_entries(packages["deb"]).items() if not line.startswith("d")}
    rpm = set(rpm_query(packages["rpm"], "-l"))

    def python(paths: Set[str], site: str) -> Set[str]:
        return {re.sub(site, "", p) for p in paths
                if re.match(site, p) and p.endswith(".py") and "dist-info" not in p}

    assert python(deb, r"^/usr/lib/python3/dist-packages/") == \
        python(rpm, r"^/usr/lib/python3\.\d+/site-packages/")
    deb_host = {p.replace("/lib/systemd/", "/usr/lib/systemd/") for p in deb
                if not p.startswith(("/usr/lib/python3", "/usr/share/doc/", "/usr/share/lintian/"))}
    rpm_host = {p for p in rpm if not p.startswith(("/usr/lib/python3", "/usr/share/doc/",
                                                    "/usr/share/licenses/"))
                and p not in ("/var/lib/ferry", "/var/lib/ferry-images", "/etc/ferry/conf.d",
                              "/etc/ferry/hooks.d", "/etc/ferry", "/usr/libexec/ferry")}
    assert deb_host == rpm_host


def test_packages_recommend_what_mount_and_domain_use(packages, tree):
    """ferry mount (nbdfuse, mount, udevadm), --domain (libvirt, pyudev) and ferry
    journal-volume (mkfs.ext4: e2fsprogs) are Recommends; both packages make the default
    image root /var/lib/ferry-images."""
    def names(field: str) -> Set[str]:
        return {x.strip().split()[0] for x in field.split(",") if x.strip()}

    assert {"libnbd-bin", "mount", "udev", "python3-libvirt", "python3-pyudev"} <= \
        names(deb_field(packages["deb"], "Recommends"))
    assert "e2fsprogs" in names(deb_field(packages["deb"], "Recommends"))
    assert {"nbdfuse", "util-linux", "systemd-udev", "python3-libvirt", "python3-pyudev"} <= \
        {r.split()[0] for r in rpm_query(packages["rpm"], "--recommends")}
    assert "e2fsprogs" in {r.split()[0] for r in rpm_query(packages["rpm"], "--recommends")}
    tmpfiles = (tree / "usr/lib/tmpfiles.d/ferry.conf").read_text()
    assert re.search(r"^d /var/lib/ferry-images 0711 root root -$", tmpfiles, re.M)
    assert "/var/lib/ferry-images" in rpm_query(packages["rpm"], "-l")
