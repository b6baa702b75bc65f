"""Long operations as jobs on the agent: restore, wait for sync, failover.

A job runs in the agent's own nursery, not in the HTTP request that started it: a CLI that
loses its connection (or a restore longer than any HTTP timeout) reattaches with its id
(``ferry job ID``). A job is

    {"id", "kind", "group", "state": "running" | "done" | "failed", "started", "ended",
     "progress": {"progress": 0..1, "eta_seconds", "done_bytes", "total_bytes"} | null,
     "result": <what the synchronous endpoint answers> | null,
     "error": {"error", "kind"} | null}

The last ``KEEP`` finished jobs are kept in memory (not across an agent restart: a job that
was running when the agent stopped is gone; its effect, a file or a failover, is not).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Dict, List, Optional

import trio

from .errors import Conflict, FerryError, NotFound, Unavailable, kind_of
from .events import EventLog

log = logging.getLogger("ferry.jobs")

KEEP = 100
MAX_RUNNING = 16

Progress = Callable[[], Optional[Dict[str, Any]]]


class Jobs:
    def __init__(self, events: Optional[EventLog] = None) -> None:
        self.events = events
        self._jobs: OrderedDict[str, Dict[str, Any]] = OrderedDict()
        self._progress: Dict[str, Progress] = {}
        self._done: Dict[str, trio.Event] = {}
        self._nursery: Optional[trio.Nursery] = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def start(self, kind: str, group: str, work: Callable[[], Awaitable[Any]],
              progress: Optional[Progress] = None) -> Dict[str, Any]:
        if self._nursery is None:
            raise Unavailable("the agent's job runner is not running")
        running = [j for j in self._jobs.values() if j["state"] == "running"]
        if len(running) >= MAX_RUNNING:
            raise Conflict("%d jobs are running already; wait for one to end" % len(running))
        job_id = "j" + secrets.token_hex(4)
        job = {"id": job_id, "kind": kind, "group": group, "state": "running",
               "started": round(time.time(), 3), "ended": None, "progress": None,
               "result": None, "error": None}
        self._jobs[job_id] = job
        self._progress[job_id] = progress or (lambda: None)
        self._done[job_id] = trio.Event()
        self._emit(job, "started")
        self._nursery.start_soon(self._run, job, work)
        return self.get(job_id)

    async def _run(self, job: Dict[str, Any], work: Callable[[], Awaitable[Any]]) -> None:
        try:
            job["result"] = await work()
            job["state"] = "done"
        except FerryError as e:
            job["state"] = "failed"
            job["error"] = {"error": str(e), "kind": kind_of(e)}
        except OSError as e:  # storage: say where in the log, as the API does
            log.exception("job %s (%s of %s): request failed", job["id"], job["kind"],
                          job["group"])
            job["state"] = "failed"
            job["error"] = {"error": "%s: %s" % (type(e).__name__, e), "kind": "FerryError"}
        finally:
            job["ended"] = round(time.time(), 3)
            self._progress.pop(job["id"], None)
            self._done.pop(job["id"]).set()
            self._emit(job, job["state"] if job["state"] != "running" else "failed")
            self._trim()

    def _emit(self, job: Dict[str, Any], change: str) -> None:
        if self.events is not None:
            self.events.emit("job", "warning" if change == "failed" else "info",
                             group=job["group"], job=job["id"], job_kind=job["kind"],
                             change=change, error=(job["error"] or {}).get("error"))

    def _trim(self) -> None:
        done = [k for k, j in self._jobs.items() if j["state"] != "running"]
        for k in done[:max(0, len(done) - KEEP)]:
            del self._jobs[k]

    def get(self, job_id: str) -> Dict[str, Any]:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound("no job %s (finished jobs are kept until the agent restarts)"
                           % job_id)
        out = dict(job)
        if job["state"] == "running":
            try:
                out["progress"] = self._progress[job_id]()
            except (OSError, FerryError):
                out["progress"] = None
        return out

    async def wait(self, job_id: str, seconds: float) -> Dict[str, Any]:
        """The job, once it has ended or after ``seconds``, whichever comes first."""
        self.get(job_id)
        done = self._done.get(job_id)
        if done is not None:
            with trio.move_on_after(seconds):
                await done.wait()
        return self.get(job_id)

    def list(self) -> List[Dict[str, Any]]:
        return [self.get(k) for k in self._jobs]
