"""``ferry config check``: the agent's settings as the packaged start script reads them
(``/etc/ferry/agent.conf``, then ``conf.d/*.conf`` in name order, shell assignments), and
every problem found before the service would start with them.

Each finding is ``(level, text)``, level ``error`` (the agent would not start, or would run
unsafely) or ``warning``. Reading is plain logic over the files: nothing is started.
"""

from __future__ import annotations

import glob
import grp
import os
import re
import shlex
import stat
from typing import Dict, List, Tuple

import click

from .access import is_loopback, parse_listener
from .disks import under
from .errors import FerryError

DEFAULTS = {"FERRY_DATA": "/var/lib/ferry", "FERRY_LISTEN": "0.0.0.0:4005",
            "FERRY_API": "127.0.0.1:9080", "FERRY_SITE": "", "FERRY_ARGS": "",
            "FERRY_METRICS": "", "FERRY_IMAGE_ROOTS": ""}
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")

Finding = Tuple[str, str]


def read(conf_dir: str) -> Tuple[Dict[str, str], List[Finding]]:
    """The settings, defaults overridden file by file, and what could not be read."""
    values = dict(DEFAULTS)
    found: List[Finding] = []
    files = [os.path.join(conf_dir, "agent.conf"),
             *sorted(glob.glob(os.path.join(conf_dir, "conf.d", "*.conf")))]
    for path in files:
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            continue
        except OSError as e:
            found.append(("error", "%s: cannot read it: %s" % (path, e.strerror or e)))
            continue
        for n, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            m = ASSIGNMENT.match(text)
            try:
                words = shlex.split(m.group(2), comments=True) if m else None
            except ValueError as e:
                words, m = None, None
                found.append(("error", "%s:%d: %s" % (path, n, e)))
                continue
            if m is None or words is None or len(words) > 1:
                found.append(("warning", "%s:%d: not a plain NAME=value assignment (the "
                              "start script runs it as shell): %s" % (path, n, text)))
                continue
            if m.group(1) not in DEFAULTS:
                found.append(("warning", "%s:%d: %s is not a setting of the agent (%s)"
                              % (path, n, m.group(1), ", ".join(sorted(DEFAULTS)))))
                continue
            values[m.group(1)] = words[0] if words else ""
    return values, found


def check(conf_dir: str, hooks_dir: str = "/etc/ferry/hooks.d") -> List[Finding]:
    values, found = read(conf_dir)
    data = values["FERRY_DATA"]
    if not os.path.isabs(data):
        found.append(("error", "FERRY_DATA=%s: give an absolute path" % data))
    elif os.path.exists(data) and not os.path.isdir(data):
        found.append(("error", "FERRY_DATA=%s is not a directory" % data))
    elif len(data) > 85:
        found.append(("error", "FERRY_DATA is %d characters: at most 85 (the splitters' "
                      "socket paths must fit in 107 bytes)" % len(data)))
    from .daemon import parse_hostport
    try:
        parse_hostport(values["FERRY_LISTEN"], 4005)
    except ValueError as e:
        found.append(("error", "FERRY_LISTEN: %s" % e))
    try:
        lst = parse_listener(values["FERRY_API"])
    except FerryError as e:
        found.append(("error", "FERRY_API: %s" % e))
    else:
        if lst.kind == "tcp" and not lst.tls and not is_loopback(lst.host):
            found.append(("error", "FERRY_API=%s: a TCP API off loopback needs https:// with "
                          "--api-cert and --api-key in FERRY_ARGS" % values["FERRY_API"]))
        elif lst.kind == "tcp":
            found.append(("warning", "FERRY_API=%s is a TCP listener (token in "
                          "FERRY_DATA/api.token): the ferry command's default is the socket "
                          "unix:/run/ferry/api.sock; set FERRY_API=unix:/run/ferry/api.sock "
                          "and add --api %s to FERRY_ARGS to have both"
                          % (values["FERRY_API"], values["FERRY_API"])))
    found.extend(_args(values))
    found.extend(_image_roots(values))
    try:
        grp.getgrnam("ferry")
    except KeyError:
        found.append(("warning", "there is no group ferry: the API socket will be for root "
                      "only (groupadd --system ferry to let its members use ferry)"))
    found.extend(_hooks(hooks_dir))
    return found


def _args(values: Dict[str, str]) -> List[Finding]:
    """FERRY_ARGS parsed by the agent command itself, as the start script passes them."""
    from .cli.daemon import agent
    args = ["--data", values["FERRY_DATA"] or "/", "--listen", values["FERRY_LISTEN"],
            "--api", values["FERRY_API"], *(values["FERRY_ARGS"].split())]
    try:
        agent.make_context("ferry agent", args)
    except click.ClickException as e:
        return [("error", "FERRY_ARGS=%s: %s" % (values["FERRY_ARGS"], e.format_message()))]
    return []


def image_roots(values: Dict[str, str]) -> List[str]:
    """FERRY_IMAGE_ROOTS: directories separated by ':' (the start script passes each as
    ``--image-root``), beside the defaults of ``agent/disks.py``."""
    return [r for r in values["FERRY_IMAGE_ROOTS"].split(":") if r]


def _image_roots(values: Dict[str, str]) -> List[Finding]:
    """An image root must be an absolute directory outside FERRY_DATA (the agent never takes
    a disk from its own data)."""
    found: List[Finding] = []
    data = os.path.realpath(values["FERRY_DATA"]) if values["FERRY_DATA"] else ""
    for root in image_roots(values):
        if not os.path.isabs(root):
            found.append(("error", "FERRY_IMAGE_ROOTS: %s: give an absolute path" % root))
        elif data and under(os.path.realpath(root), data):
            found.append(("error", "FERRY_IMAGE_ROOTS: %s lies in FERRY_DATA=%s: the agent "
                          "never takes a disk from its own data" % (root, data)))
        elif not os.path.isdir(root):
            found.append(("warning", "FERRY_IMAGE_ROOTS: %s is not a directory (yet)"
                          % root))
    return found


def _hooks(hooks_dir: str) -> List[Finding]:
    found: List[Finding] = []
    try:
        names = sorted(os.listdir(hooks_dir))
    except FileNotFoundError:
        return found
    except OSError as e:
        return [("error", "%s: cannot list it: %s" % (hooks_dir, e.strerror or e))]
    for name in names:
        st = os.lstat(os.path.join(hooks_dir, name))
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111 and (
                st.st_uid != 0 or st.st_mode & 0o022):
            found.append(("warning", "hook %s/%s is skipped: it must be root's and "
                          "writable by nobody else" % (hooks_dir, name)))
    return found
