"""Application-consistent checkpoints: guests frozen around the cut, never left frozen.

Theory of operation
-------------------
For each domain of the group, in the group's order: its ``pre`` hook runs (``Hooks``), then
its guest's file systems are frozen (qemu guest agent, ``guest-fsfreeze-freeze``). With all
frozen, the group checkpoint is requested (kind ``app``) and, as soon as it is *cut* (not
acked: the round trip to site B is not spent frozen), every guest is thawed; then the
``post`` hooks run and the checkpoint's ack is awaited as a user checkpoint's is.

A guest is never left frozen:

- the freeze window is bounded (``limit`` seconds from the first freeze): past it the
  request fails with ``TimedOut`` and every guest is thawed;
- the thaw is in a ``finally``, shielded from cancellation;
- a freeze call that returns after the window closed (its thread was abandoned) thaws its
  guest at once (``_Window.frozen``);
- a watchdog thread thaws whatever is still frozen ``limit + WATCHDOG_GRACE`` seconds after
  the first freeze, should the agent's event loop itself be stuck.

A failing pre hook or freeze aborts with one line naming the domain; the guests frozen so
far are thawed and the post hooks of the domains whose pre hook ran are run. A failing post
hook is reported after the checkpoint was made (``post_hook_errors`` in the answer).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Protocol

import trio

from ..errors import FerryError, TimedOut, Unavailable
from .hooks import Hooks

log = logging.getLogger("ferry.domains")

WATCHDOG_GRACE = 5.0
DEFAULT_LIMIT = 10.0  # seconds a group's guests may stay frozen

Cut = Callable[[trio.Event], Awaitable[Dict[str, Any]]]


class Guest(Protocol):
    """A guest whose file systems can be frozen (blocking calls, thread-safe)."""

    name: str

    def freeze(self) -> int: ...

    def thaw(self) -> int: ...


class _Window:
    """Which guests are frozen now; closing it thaws them, once, from any thread."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.lock = threading.Lock()
        self.guests: List[Guest] = []
        self.closed = False
        self.errors: List[str] = []

    def frozen(self, guest: Guest) -> None:
        """``guest`` froze: keep it, or thaw it at once if the window closed meanwhile."""
        with self.lock:
            if not self.closed:
                self.guests.append(guest)
                return
        log.warning("group %s: domain %s froze after its window closed: thawing it",
                    self.group, guest.name)
        self._thaw(guest)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            guests, self.guests = self.guests, []
        for guest in reversed(guests):
            self._thaw(guest)

    def _thaw(self, guest: Guest) -> None:
        try:
            guest.thaw()
        except FerryError as e:
            log.error("group %s: %s", self.group, e)
            self.errors.append(str(e))



async def run_abandoning(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a worker thread that a cancellation abandons (trio 0.23 renamed
    ``cancellable`` to ``abandon_on_cancel``; Debian 12 ships 0.22)."""
    try:
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    except TypeError as e:
        if "abandon_on_cancel" not in str(e):
            raise
    return await trio.to_thread.run_sync(fn, *args, cancellable=True)  # type: ignore[call-arg]

def _freeze(window: _Window, guest: Guest) -> None:
    guest.freeze()
    window.frozen(guest)


async def app_checkpoint(group: str, guests: List[Guest], hooks: Hooks, cut: Cut,
                         limit: float = DEFAULT_LIMIT) -> Dict[str, Any]:
    """Freeze ``guests``, ``cut(event)`` the checkpoint, thaw as soon as ``event`` is set;
    the checkpoint's answer with ``frozen_ms`` and ``domains``."""
    window = _Window(group)
    pre_ran: List[str] = []
    watchdog: Optional[threading.Timer] = None
    result: Dict[str, Any] = {}
    frozen_ms: Optional[float] = None
    try:
        for guest in guests:
            await hooks.run(group, guest.name, "pre")
            pre_ran.append(guest.name)
        started = time.monotonic()
        watchdog = threading.Timer(limit + WATCHDOG_GRACE, _watchdog, (window,))
        watchdog.daemon = True
        watchdog.start()
        deadline = trio.current_time() + limit
        with trio.move_on_at(deadline):
            for guest in guests:
                await run_abandoning(_freeze, window, guest)
        event = trio.Event()
        failed: List[FerryError] = []

        async def take() -> None:
            try:
                result.update(await cut(event))
            except FerryError as e:
                failed.append(e)
                event.set()

        cut_in_time = False
        if len(window.guests) == len(guests):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take)
                with trio.move_on_at(deadline):
                    await event.wait()
                    cut_in_time = True
                await _close(window)
                frozen_ms = round((time.monotonic() - started) * 1000, 1)
                if not cut_in_time:
                    nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]
        if not cut_in_time:
            raise TimedOut("group %s: no application-consistent checkpoint: the guests "
                           "stayed frozen %g s without the checkpoint being cut (the "
                           "limit); thawed" % (group, limit))
    finally:
        with trio.CancelScope(shield=True):
            await _close(window)
            if watchdog is not None:
                watchdog.cancel()
            post_errors = []
            for name in pre_ran:
                try:
                    await hooks.run(group, name, "post")
                except FerryError as e:
                    post_errors.append(str(e))
    if window.errors:
        raise Unavailable(window.errors[0])
    result.update(frozen_ms=frozen_ms, domains=[g.name for g in guests],
                  post_hook_errors=post_errors)
    log.info("group %s: application-consistent checkpoint %s, guests frozen %s ms",
             group, result.get("id"), frozen_ms)
    return result


async def _close(window: _Window) -> None:
    await trio.to_thread.run_sync(window.close)


def _watchdog(window: _Window) -> None:
    if window.guests:
        log.error("group %s: watchdog: guests still frozen past the limit; thawing them",
                  window.group)
    window.close()
