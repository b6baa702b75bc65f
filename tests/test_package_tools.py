"""The packaging tools' refusals, and the lists that must agree with pyproject.toml.

build.sh, packaging/gendocs.py and packaging/rpm/pyproject.py each stop with one line
naming what is wrong; these tests make every such branch run. A build.sh that gets as far
as dpkg-buildpackage or rpmbuild is run on a copy of the checkout (not a git work tree:
the tar branch of its source copy).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def dependencies() -> Dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.M | re.S)
    assert block
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)', block.group(1)))


def run(cmd: List[str], cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(cwd),
                          env={"PATH": PATH, "LANG": "C.UTF-8", **env})


@pytest.fixture
def source(tmp_path) -> Path:
    """A copy of the checkout's files, outside git."""
    dest = tmp_path / "src"
    dest.mkdir()
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=str(ROOT), capture_output=True,
                           check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / os.fsdecode(name)
        if src.is_symlink() or src.exists():
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(name), follow_symlinks=False)
    return dest


def load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(source: Path, what: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return run([str(source / "packaging/build.sh"), what, str(tmp_path / "out")],
               TMPDIR=str(tmp_path), **env)


# --- the lists that follow pyproject.toml -------------------------------------------------


def test_every_dependency_has_its_debian_and_fedora_names():
    overrides = (ROOT / "debian/py3dist-overrides").read_text()
    control = (ROOT / "debian/control").read_text()
    requires = (ROOT / "packaging/rpm/requires.txt").read_text()
    for name in dependencies():
        line = re.search(r"^%s (python3-\S+); PEP386$" % re.escape(name), overrides, re.M)
        assert line, "no line for %s in debian/py3dist-overrides" % name
        assert re.search(r"^\s+%s,$" % re.escape(line.group(1)), control, re.M), \
            "%s is not in debian/control's Build-Depends" % line.group(1)
        assert re.search(r"^python3dist\(%s\)\s+python3-\S+\s" % re.escape(name.lower()),
                         requires, re.M), "no line for %s in packaging/rpm/requires.txt" % name


def test_the_packages_make_ferrys_default_image_root():
    """The image root the agent adds by default (agent.disks.DEFAULT_ROOTS, beside
    libvirt's) is made by the tmpfiles.d file both packages ship, and owned by the rpm."""
    from agent.disks import DEFAULT_ROOTS
    ours = [r for r in DEFAULT_ROOTS if "ferry" in r]
    assert ours == ["/var/lib/ferry-images"]
    tmpfiles = (ROOT / "packaging/ferry.tmpfiles").read_text()
    assert (ROOT / "debian/ferry.tmpfiles").read_text() == tmpfiles
    spec = (ROOT / "packaging/ferry.spec").read_text()
    for root in ours:
        assert re.search(r"^d %s 0711 root root -$" % re.escape(root), tmpfiles, re.M)
        assert "%%dir %%attr(0711,root,root) %%{_sharedstatedir}/%s" % root.split("/")[-1] \
            in spec


def test_versions_agree():
    """pyproject.toml, debian/changelog and the spec name one version (build.sh refuses
    to build otherwise: see the tests below)."""
    project = (ROOT / "pyproject.toml").read_text().split("[project]", 1)[1]
    version = re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)  # type: ignore
    changelog = (ROOT / "debian/changelog").read_text().splitlines()[0]
    assert changelog.startswith("ferry (%s-" % version)
    assert re.search(r"^Version:\s+%s$" % re.escape(version),
                     (ROOT / "packaging/ferry.spec").read_text(), re.M)


# --- build.sh -----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [[], ["deb"], ["tarball", "out"], ["deb", "a", "b"]])
def test_build_usage(args):
    proc = run([str(ROOT / "packaging/build.sh"), *args])
    assert proc.returncode == 2 and proc.stderr.startswith("usage: "), proc.stderr


def test_build_refuses_a_changelog_of_another_version(source, tmp_path):
    changelog = source / "debian/changelog"
    changelog.write_text(re.sub(r"^ferry \([^)]*\)", "ferry (9.9.9-1)", changelog.read_text()))
    proc = build(source, "deb", tmp_path)
    assert proc.returncode == 1
    assert "debian/changelog is at 9.9.9, pyproject.toml at" in proc.stderr


def test_build_refuses_a_spec_of_another_version(source, tmp_path):
    spec = source / "packaging/ferry.spec"
    spec.write_text(re.sub(r"(?m)^Version:.*$", "Version:        9.9.9", spec.read_text()))
    proc = build(source, "rpm", tmp_path)
    assert proc.returncode == 1
    assert "packaging/ferry.spec is at 9.9.9, pyproject.toml at" in proc.stderr


def test_build_refuses_a_pyproject_without_version(source, tmp_path):
    pyproject = source / "pyproject.toml"
    pyproject.write_text(re.sub(r'(?m)^version = .*$', 'dynamic = ["version"]',
                                pyproject.read_text()))
    proc = build(source, "deb", tmp_path)
    assert proc.returncode == 1 and "no usable version in pyproject.toml" in proc.stderr


def test_build_refuses_a_bad_release(source, tmp_path):
    proc = build(source, "deb", tmp_path, FERRY_RELEASE="2 beta")
    assert proc.returncode == 1 and "bad FERRY_RELEASE: '2 beta'" in proc.stderr


@pytest.mark.slow
def test_build_reports_a_failing_dpkg_buildpackage(source, tmp_path):
    rules = source / "debian/rules"
    rules.write_text(rules.read_text() + "\noverride_dh_auto_build:\n\techo rules-broken; false\n")
    proc = build(source, "deb", tmp_path)
    assert proc.returncode == 1
    assert "rules-broken" in proc.stderr and "dpkg-buildpackage failed" in proc.stderr
    assert list(tmp_path.glob("ferry-build.*")) == []  # the scratch directory is removed


@pytest.mark.slow
def test_build_reports_a_failing_rpmbuild(source, tmp_path):
    spec = source / "packaging/ferry.spec"
    spec.write_text(spec.read_text().replace("%build\n", "%build\necho spec-broken; exit 1\n"))
    proc = build(source, "rpm", tmp_path)
    assert proc.returncode == 1
    assert "spec-broken" in proc.stderr and "rpmbuild failed" in proc.stderr


# --- gendocs.py and the rpm compat helper -------------------------------------------------


def test_gendocs_usage():
    proc = run([sys.executable, str(ROOT / "packaging/gendocs.py"), "html", "out"])
    assert proc.returncode == 2 and proc.stderr.startswith("usage: gendocs.py")


def test_gendocs_refuses_a_ferry_without_completion(tmp_path):
    """A ferry command that does not answer click's completion request (here: one that
    prints nothing) stops the build instead of shipping an empty completion file."""
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent/__init__.py").write_text("")
    (tmp_path / "agent/cli.py").write_text("def main():\n    return 0\n")
    proc = run([sys.executable, str(ROOT / "packaging/gendocs.py"), "bash-completion",
                str(tmp_path / "out")], PYTHONPATH=str(tmp_path))
    assert proc.returncode == 1 and "no bash completion from ferry" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_gendocs_man_page(tmp_path):
    """The page describes every command the click group has, in valid roff."""
    proc = run([sys.executable, str(ROOT / "packaging/gendocs.py"), "man",
                str(tmp_path / "ferry.1")], PYTHONPATH=str(ROOT), SOURCE_DATE_EPOCH="0")
    if proc.returncode and "PackageNotFoundError" in proc.stderr:
        pytest.skip("ferry is not installed in this Python (its version comes from there)")
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "ferry.1").read_text()
    assert page.startswith('.TH FERRY 1 "')
    import agent.cli

    gendocs = load(ROOT / "packaging/gendocs.py")
    for name in gendocs.find_group(agent.cli).commands:
        assert (".SS ferry %s" % name).replace("-", "\\-") in page, name
    if shutil.which("man"):
        check = run(["man", "--warnings", "-l", str(tmp_path / "ferry.1")])
        assert check.returncode == 0 and not check.stderr.strip(), check.stderr


CHECK_IMPORTS = ROOT / "packaging/check_imports.py"


def test_check_imports_usage():
    proc = run([sys.executable, str(CHECK_IMPORTS)])
    assert proc.returncode == 2 and proc.stderr.startswith("usage: check_imports.py")


def test_check_imports_wants_agent_and_plugin(tmp_path):
    proc = run([sys.executable, str(CHECK_IMPORTS), str(tmp_path)])
    assert proc.returncode == 1 and "no agent and nbd_plugin in" in proc.stderr


def test_check_imports_refuses_a_splitter_beyond_the_stdlib(tmp_path):
    """nbd_plugin (and formats) must import in nbdkit's Python with the standard library
    alone: a module that needs an installed package fails the build."""
    for name in ("agent", "nbd_plugin", "formats"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "formats/frame.py").write_text("import click\n")  # fine for the agent
    (tmp_path / "nbd_plugin/splitter.py").write_text("import nbdkit\n")  # left out
    proc = run([sys.executable, str(CHECK_IMPORTS), str(tmp_path)])
    assert proc.returncode == 1
    assert "the splitter's modules need more than the standard library" in proc.stderr
    (tmp_path / "formats/frame.py").write_text("import struct\n")
    proc = run([sys.executable, str(CHECK_IMPORTS), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert "4 modules import" in proc.stdout  # agent, formats, formats.frame, nbd_plugin


COMPAT = ROOT / "packaging/rpm/pyproject.py"


def test_gendocs_wants_one_top_level_group(tmp_path):
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent/__init__.py").write_text("")
    (tmp_path / "agent/cli.py").write_text(
        "import click\n@click.group()\ndef a(): pass\n@click.group()\ndef b(): pass\n")
    proc = run([sys.executable, str(ROOT / "packaging/gendocs.py"), "man",
                str(tmp_path / "out")], PYTHONPATH=str(tmp_path))
    assert proc.returncode == 1
    assert "expected one top-level click group in agent.cli, found 2" in proc.stderr


def test_compat_usage():
    proc = run([sys.executable, str(COMPAT), "frobnicate"])
    assert proc.returncode == 1 and "pyproject.py install BUILDROOT" in proc.stderr


def test_compat_install_wants_one_wheel(tmp_path):
    (tmp_path / "wheels").mkdir()
    proc = run([sys.executable, str(COMPAT), "install", str(tmp_path / "root"),
                "/usr/lib/python3/site-packages", "/usr/bin", str(tmp_path / "wheels")])
    assert proc.returncode == 1 and "expected one wheel" in proc.stderr and "found 0" in proc.stderr


def test_compat_save_files_refuses_no_match(tmp_path):
    site = tmp_path / "root/usr/lib/python3/site-packages"
    (site / "ferry-0.1.dist-info").mkdir(parents=True)
    (site / "agent").mkdir()
    proc = run([sys.executable, str(COMPAT), "save-files", str(tmp_path / "root"),
                "/usr/lib/python3/site-packages", str(tmp_path / "files"), "nothing*"])
    assert proc.returncode == 1 and "nothing in" in proc.stderr
    proc = run([sys.executable, str(COMPAT), "save-files", str(tmp_path / "root"),
                "/usr/lib/python3/site-packages", str(tmp_path / "files"), "'*'"])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "files").read_text().split() == [
        "/usr/lib/python3/site-packages/agent/",
        "/usr/lib/python3/site-packages/ferry-0.1.dist-info/"]
