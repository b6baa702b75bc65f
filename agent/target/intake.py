"""The receive loop of a session: batches from the wire into a group's journal, and acks.

Two stages (``receive``): one task reads frames and checks them ahead of the journal (at
most ``RECEIVE_AHEAD`` waiting); the other journals what has arrived, several frames in one
append and one fdatasync when they queue up (group commit, at most ``GROUP_COMMIT_BYTES``
of data), in a worker thread, and acks them with one ACK (acks are cumulative). An ACK is
sent only once ``TargetGroup.accept`` returned: what it acks is durable.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import trio

from ..protocol import messages
from ..protocol.stream import SessionStream, race
from .group import TargetGroup

RECEIVE_AHEAD = 4                     # frames read and checked ahead of the journal
GROUP_COMMIT_BYTES = 16 * 1024 * 1024  # at most this much data in one journal append


async def receive(fs: SessionStream, group: TargetGroup, session: Dict[str, Any],
                  on_move: Optional[Callable[[str], Awaitable[None]]] = None,
                  repairs: Callable[[], Tuple[Any, ...]] = tuple) -> None:
    """Take BATCH frames into ``group`` until the connection ends (see the module);
    ``session`` counts batches, records and bytes for the status. Once a checkpoint of
    kind ``move`` is journaled and acked, ``on_move(its id)`` runs and the session ends.
    Each ACK carries the ranges ``repairs()`` gives (repairs.py)."""
    send_ch, recv_ch = trio.open_memory_channel[Tuple[List[Any], List[Any], int]](
        RECEIVE_AHEAD)

    async def read() -> None:
        # The channel stays open when this fails: the writer is then cancelled by
        # race() and the session ends with this task's error, not EndOfChannel.
        while True:
            # The session checked the batch against the group (name, disks, cuts).
            batch = await fs.expect(messages.Batch)
            await send_ch.send((batch.records, batch.checkpoints, batch.data_bytes))

    async def write() -> None:
        while True:
            got = [await recv_ch.receive()]
            size = got[0][2]
            while size < GROUP_COMMIT_BYTES:
                try:
                    got.append(recv_ch.receive_nowait())
                except trio.WouldBlock:
                    break
                size += got[-1][2]
            records = [r for f in got for r in f[0]]
            cps = [c for f in got for c in f[1]]
            _fresh, ids = await trio.to_thread.run_sync(group.accept, records, cps)
            session["batches"] += len(got)
            session["records"] += len(records)
            session["bytes"] += size
            await fs.send(messages.Ack(group.name, tuple(group.durable()), tuple(ids),
                                       repairs()))
            moves = [c.id for c in cps if c.kind == "move" and c.id in ids]
            if moves and on_move is not None:
                await on_move(moves[-1])
                return

    await race(read, write)
