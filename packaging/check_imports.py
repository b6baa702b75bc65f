"""Import every module of the built tree, as the package promises (debian/rules' test step;
the spec's %check uses Fedora's %pyproject_check_import for the same).

    python3 packaging/check_imports.py SITE

SITE holds the built top-level packages. The agent's modules import with the python3-*
packages the package depends on. The splitter's side (nbd_plugin, formats) runs in the
Python nbdkit embeds, so it must import with the standard library alone: those modules are
imported again in a child with no site-packages at all (-I -S). nbd_plugin's two nbdkit
plugin files import nbdkit's built-in module and are left out.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import List

STDLIB_ONLY = ("nbd_plugin", "formats")
PLUGINS = ("nbd_plugin.splitter", "nbd_plugin.view")


def modules(site: Path, top: str) -> List[str]:
    found = [top]
    for info in pkgutil.walk_packages([str(site / top)], top + "."):
        if info.name not in PLUGINS and not info.name.endswith(".__main__"):
            found.append(info.name)
    return found


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        print("usage: check_imports.py SITE", file=sys.stderr)
        return 2
    site = Path(argv[1]).resolve()
    tops = sorted(p.parent.name for p in site.glob("*/__init__.py"))
    if "agent" not in tops or "nbd_plugin" not in tops:
        print("check_imports.py: no agent and nbd_plugin in %s" % site, file=sys.stderr)
        return 1
    sys.path.insert(0, str(site))
    names = [m for top in tops for m in modules(site, top)]
    for name in names:
        importlib.import_module(name)
    stdlib_only = [m for m in names if m.split(".")[0] in STDLIB_ONLY]
    code = "import importlib, sys; sys.path.insert(0, sys.argv[1]); " \
           "[importlib.import_module(m) for m in sys.argv[2:]]"
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(site), *stdlib_only],
                          check=False)
    if proc.returncode:
        print("check_imports.py: the splitter's modules need more than the standard library",
              file=sys.stderr)
        return 1
    print("check_imports.py: %d modules import" % len(names))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
