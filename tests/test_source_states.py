"""The source role's logic without I/O: a disk's cursor, the shipper's states, the
checkpoint book, and the states status shows."""

from __future__ import annotations

import time
from typing import NamedTuple

import pytest

from agent.errors import IllegalTransition
from agent.protocol.cursor import REWIND_INTERVAL, CursorState
from agent.protocol.cursor import ForwardCursor as Cursor
from agent.source.checkpointing import CheckpointBook
from agent.source.states import (
    GROUP_STATE_ORDER,
    ShipperState,
    disk_state,
    group_state,
)
from formats import localwire as lw
from formats.records import KIND_WRITE


class R(NamedTuple):
    gen: int
    seq: int


def test_a_cursor_forwards_in_sequence_from_what_the_target_holds() -> None:
    c = Cursor()
    start = c.start(3, (3, 5), now=10.0)
    assert start.ack == (3, 5) and start.rewind and c.state is CursorState.FORWARDING
    taken = c.take([R(3, 4), R(3, 5), R(3, 6), R(3, 7), R(2, 8)], (3, 5), now=10.1)
    assert taken.records == [R(3, 6), R(3, 7)] and taken.whole and not taken.rewind
    assert c.expected == (3, 8)


def test_a_newer_generation_starts_at_one_without_an_ack() -> None:
    c = Cursor()
    assert c.start(4, (3, 9), now=0.0) == (None, True)
    assert c.expected == (4, 1)


def test_a_gap_stops_the_batch_and_asks_for_a_rewind_now_and_then() -> None:
    c = Cursor()
    c.start(1, (1, 0), now=0.0)
    taken = c.take([R(1, 1), R(1, 3)], (1, 0), now=REWIND_INTERVAL / 2)
    assert taken.records == [R(1, 1)] and not taken.whole and not taken.rewind
    taken = c.take([R(1, 3)], (1, 0), now=REWIND_INTERVAL * 2)
    assert taken.records == [] and taken.rewind
    assert c.state is CursorState.FORWARDING


def test_a_gap_over_freed_records_breaks_the_cursor_until_a_start() -> None:
    c = Cursor()
    c.start(1, (1, 0), now=0.0)
    taken = c.take([R(1, 5)], (1, 3), now=5.0)
    assert taken.records == [] and c.state is CursorState.BROKEN
    assert c.error is not None and "no longer holds records 1/1" in c.error
    c.stop()
    assert c.state is CursorState.BROKEN and c.error is not None
    assert c.take([R(1, 1)], (1, 3), now=6.0).records == []
    c.start(1, (1, 3), now=7.0)
    assert c.state is CursorState.FORWARDING and c.error is None


def test_an_older_splitter_generation_breaks_the_cursor() -> None:
    c = Cursor()
    assert c.start(1, (2, 7), now=0.0) == (None, False)
    assert c.state is CursorState.BROKEN and "older than the target's 2" in str(c.error)


def test_an_illegal_cursor_move_raises() -> None:
    c = Cursor()
    c.state = CursorState.BROKEN
    with pytest.raises(IllegalTransition):
        c._go(CursorState.IDLE)


def test_nothing_goes_back_to_connecting() -> None:
    s = ShipperState.CONNECTING.to(ShipperState.TARGET_UNREACHABLE)
    s = s.to(ShipperState.REPLICATING).to(ShipperState.PAUSED).to(ShipperState.REPLICATING)
    with pytest.raises(IllegalTransition):
        s.to(ShipperState.CONNECTING)


def test_states_keep_the_strings_status_has_always_shown() -> None:
    assert [s.value for s in ShipperState] == [
        "connecting", "replicating", "paused", "target-unreachable", "target-unpaired",
        "target-error", "target-storage-error", "journal-full", "fenced"]
    assert GROUP_STATE_ORDER == (
        "error", "fenced", "source-io-error", "splitter-down", "target-unpaired",
        "target-unreachable", "target-error", "target-storage-error", "journal-full",
        "connecting", "paused",
        "bitmap", "initial-sync", "resyncing")
    assert group_state(["replicating", "bitmap", "paused"]) == "paused"
    assert group_state([]) == "replicating"


@pytest.mark.parametrize("args,state", [
    ((True, False, None, False, {}), "error"),
    ((False, False, ShipperState.REPLICATING, True, {}), "splitter-down"),
    ((False, True, None, False, {"inconsistent": 1}), "paused"),
    ((False, True, ShipperState.PAUSED, False, {"inconsistent": 1}), "paused"),
    ((False, True, ShipperState.TARGET_ERROR, False, {}), "target-error"),
    ((False, True, ShipperState.FENCED, False, {"inconsistent": 1}), "fenced"),
    ((False, True, ShipperState.TARGET_ERROR, False, {"inconsistent": 1}), "bitmap"),
    ((False, True, ShipperState.REPLICATING, True, {"inconsistent": 1, "initial": 1}),
     "initial-sync"),
    ((False, True, ShipperState.REPLICATING, True, {"inconsistent": 1}), "resyncing"),
    ((False, True, ShipperState.REPLICATING, True, {}), "replicating"),
    ((False, True, ShipperState.REPLICATING, True, {"io_error_unresolved": 1,
                                                     "inconsistent": 1}), "source-io-error"),
    ((False, True, ShipperState.PAUSED, False, {"io_error_unresolved": 1}), "source-io-error"),
    ((False, False, ShipperState.REPLICATING, True, {"io_error_unresolved": 1}),
     "splitter-down"),
    # Read and queued, its end not yet acked by site B: still syncing.
    ((False, True, ShipperState.REPLICATING, True,
      {"consistent_seq": 9, "consistent_initial": 1, "acked_seq": 8}), "initial-sync"),
    ((False, True, ShipperState.REPLICATING, True,
      {"consistent_seq": 9, "acked_seq": 8}), "resyncing"),
    ((False, True, ShipperState.REPLICATING, True,
      {"consistent_seq": 9, "consistent_initial": 1, "acked_seq": 9}), "replicating"),
])
def test_a_disk_state_is_read_off_its_link_and_shipper(args, state) -> None:
    assert disk_state(*args) == state


def test_a_checkpoint_goes_out_once_its_records_did_and_is_kept_until_acked() -> None:
    book = CheckpointBook("g", 1)
    book.session_started([(1, 0)])
    rec = lw.Record(1, time.monotonic_ns(), 0, 512, 1, KIND_WRITE, 0, bytes(512))
    book.forwarded(0, [rec])
    req = book.request("user", "tag")
    waiter = book.waiters[req.checkpoint.id]
    book.resolve()
    assert book.unacked == {}                      # the splitter's watermark is not there yet
    book.watermark(0, time.monotonic_ns())
    book.resolve()
    assert list(book.unacked) == [req.checkpoint.id] and req.checkpoint.cut == [(1, 1)]
    assert book.made[-1]["acked"] is False
    assert book.sendable() == []                   # record 1 is not sent yet
    assert book.sending([(0, rec)]) == [req.checkpoint]
    assert book.sendable() == []                   # sent once a session
    book.session_started([(1, 0)])
    assert book.sending([]) == []                  # a new session: after its records again
    assert book.sending([(0, rec)]) == [req.checkpoint]
    book.acked([req.checkpoint.id])
    assert book.unacked == {} and book.made[-1]["acked"] is True
    assert book.results[req.checkpoint.id] == "ok" and waiter.is_set()


def test_an_impossible_user_checkpoint_wakes_its_waiter_with_why() -> None:
    book = CheckpointBook("g", 1)
    req = book.request("user")
    book.restarted(0)
    assert "restarted" in book.results[req.checkpoint.id]
    assert req.checkpoint.id not in book.waiters and book.unacked == {}
