"""A domain's pre and post hooks around an application-consistent checkpoint.

``DIR/DOMAIN.pre`` runs before the domain's guest is frozen (flush a database, say), and
``DIR/DOMAIN.post`` after it is thawed; ``DIR`` is ``ferry agent --domain-hooks``
(``/etc/ferry/domain-hooks.d``). A domain without hook files has none. A hook is run as
``HOOK GROUP DOMAIN PHASE`` with ``FERRY_GROUP``, ``FERRY_DOMAIN`` and ``FERRY_PHASE`` set,
for at most ``HOOK_TIMEOUT`` seconds. The agent runs as root, so a hook must be a regular
file (not a link), executable, owned by root or the agent's user and writable by nobody
else; anything else, a non-zero exit or a timeout is a ``HookFailed`` naming the domain,
the hook and why, in one line.
"""

from __future__ import annotations

import os
import stat
import subprocess
from typing import Optional

import trio

from ..errors import Unavailable

HOOK_TIMEOUT = 30.0
DEFAULT_DIR = "/etc/ferry/domain-hooks.d"
PHASES = ("pre", "post")


class HookFailed(Unavailable):
    """A domain hook refused, failed or timed out."""


class Hooks:
    def __init__(self, directory: Optional[str] = DEFAULT_DIR,
                 timeout: float = HOOK_TIMEOUT) -> None:
        self.directory = directory
        self.timeout = timeout

    def path(self, domain: str, phase: str) -> Optional[str]:
        """The hook to run, None if there is none; ``HookFailed`` if it is not safe to run."""
        assert phase in PHASES
        if not self.directory:
            return None
        path = os.path.join(self.directory, "%s.%s" % (domain, phase))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise HookFailed("domain %s: %s hook %s: %s" % (domain, phase, path,
                                                            e.strerror or e)) from None
        why = None
        if not stat.S_ISREG(st.st_mode):
            why = "not a regular file"
        elif st.st_uid not in (0, os.geteuid()):
            why = "owned by uid %d" % st.st_uid
        elif st.st_mode & 0o022:
            why = "writable by others than its owner"
        elif not st.st_mode & 0o100:
            why = "not executable"
        if why:
            raise HookFailed("domain %s: %s hook %s is refused: %s" % (domain, phase, path, why))
        return path

    async def run(self, group: str, domain: str, phase: str) -> None:
        path = self.path(domain, phase)
        if path is None:
            return
        env = dict(os.environ, FERRY_GROUP=group, FERRY_DOMAIN=domain, FERRY_PHASE=phase)
        try:
            with trio.fail_after(self.timeout):
                proc = await trio.run_process([path, group, domain, phase], env=env,
                                              check=False, capture_stdout=True,
                                              capture_stderr=True, stdin=subprocess.DEVNULL)
        except trio.TooSlowError:
            raise HookFailed("domain %s: %s hook %s did not finish within %g s"
                             % (domain, phase, path, self.timeout)) from None
        except OSError as e:
            raise HookFailed("domain %s: %s hook %s cannot run: %s"
                             % (domain, phase, path, e.strerror or e)) from None
        if proc.returncode != 0:
            said = [x for x in proc.stderr.decode(errors="replace").splitlines() if x.strip()]
            raise HookFailed("domain %s: %s hook %s failed (exit %d)%s" % (
                domain, phase, path, proc.returncode,
                ": " + said[-1].strip()[:200] if said else ""))
