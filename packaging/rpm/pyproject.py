"""Fedora's %pyproject_install, %pyproject_save_files and %pyproject_check_import, reduced
to what packaging/ferry.spec needs, for rpmbuild on hosts without pyproject-rpm-macros
(loaded through packaging/rpm/macros.compat; see there).

    pyproject.py install BUILDROOT SITELIB BINDIR WHEELDIR
    pyproject.py save-files BUILDROOT SITELIB FILES GLOB...
    pyproject.py check-import BUILDROOT SITELIB FILES [-e MODULE]...
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import sys
from pathlib import Path
from typing import List


def install(buildroot: str, sitelib: str, bindir: str, wheeldir: str) -> None:
    from installer import install as install_wheel
    from installer.destinations import SchemeDictionaryDestination
    from installer.sources import WheelFile

    wheels = sorted(Path(wheeldir).glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit("pyproject.py: expected one wheel in %s, found %d"
                         % (wheeldir, len(wheels)))
    scheme = {"purelib": sitelib, "platlib": sitelib, "scripts": bindir, "data": "/usr",
              "headers": "/usr/include"}
    destination = SchemeDictionaryDestination(
        scheme, interpreter="/usr/bin/python3", script_kind="posix", destdir=buildroot,
        bytecode_optimization_levels=(0, 1))
    with WheelFile.open(wheels[0]) as source:
        install_wheel(source, destination, {"INSTALLER": b"rpm\n"})
    for record in Path(buildroot + sitelib).glob("*.dist-info/RECORD"):
        record.unlink()  # names the build root; rpm's database records the files instead
        (record.parent / "direct_url.json").unlink(missing_ok=True)


def save_files(buildroot: str, sitelib: str, files: str, globs: List[str]) -> None:
    site = Path(buildroot + sitelib)
    lines = []
    for entry in sorted(site.iterdir()):
        path = sitelib + "/" + entry.name
        if entry.name.endswith(".dist-info"):
            lines.append(path + "/")
        elif entry.is_dir() and any(fnmatch.fnmatch(entry.name, g.strip("'\"")) for g in globs):
            lines.append(path + "/")
    if not any(line.endswith(".dist-info/") for line in lines) or len(lines) < 2:
        raise SystemExit("pyproject.py: nothing in %s matches %s" % (site, globs))
    Path(files).write_text("".join(line + "\n" for line in lines))


def check_import(buildroot: str, sitelib: str, files: str, args: List[str]) -> None:
    excluded = [args[i + 1] for i, a in enumerate(args) if a == "-e"]
    sys.path.insert(0, buildroot + sitelib)
    top = [line.rstrip("/").rsplit("/", 1)[1] for line in Path(files).read_text().split()
           if not line.endswith(".dist-info/")]
    for name in top:
        for dirpath, _dirs, filenames in os.walk(Path(buildroot + sitelib) / name):
            rel = Path(dirpath).relative_to(buildroot + sitelib)
            for fn in filenames:
                if not fn.endswith(".py"):
                    continue
                module = ".".join(rel.parts + (() if fn == "__init__.py" else (fn[:-3],)))
                if not any(fnmatch.fnmatch(module, e) for e in excluded):
                    importlib.import_module(module)


def main(argv: List[str]) -> None:
    if len(argv) >= 6 and argv[1] == "install":
        install(*argv[2:6])
    elif len(argv) >= 5 and argv[1] == "save-files":
        save_files(argv[2], argv[3], argv[4], argv[5:])
    elif len(argv) >= 5 and argv[1] == "check-import":
        check_import(argv[2], argv[3], argv[4], argv[5:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
