"""Where the nbdkit plugins are: files that nbdkit's embedded Python runs, never imported here.

The plugins live in the ``nbd_plugin`` package beside ``agent`` (in a checkout and where
the packages install them); the agent only names their files on nbdkit's command line.
``find_spec`` locates the package without running any of it.
"""

from __future__ import annotations

import importlib.util
import os


def _plugin_dir() -> str:
    spec = importlib.util.find_spec("nbd_plugin")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the nbd_plugin package is not installed beside the agent")
    return os.path.realpath(next(iter(spec.submodule_search_locations)))


PLUGIN_DIR = _plugin_dir()
SPLITTER = os.path.join(PLUGIN_DIR, "splitter.py")
VIEW = os.path.join(PLUGIN_DIR, "view.py")
