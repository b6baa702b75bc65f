"""State machines as tables: a table of (state, event) -> next state; a step it does not have
raises ``errors.IllegalTransition``. The target role's machines (a disk under the hold-back
rule, ``holdback.py``; a replica group, ``group.py``; a failover, ``failover.py``) each write
their table beside a theory-of-operation comment and step through ``Table.step``.
"""

from __future__ import annotations

import enum
from typing import Dict, Generic, Tuple, TypeVar

from ..errors import IllegalTransition

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class Table(Generic[S, E]):
    def __init__(self, what: str, steps: Dict[Tuple[S, E], S]) -> None:
        self.what = what
        self.steps = dict(steps)

    def step(self, state: S, event: E) -> S:
        """The state after ``event`` in ``state``; IllegalTransition if there is none."""
        nxt = self.steps.get((state, event))
        if nxt is None:
            raise IllegalTransition("%s: %s while %s" % (self.what, event.value, state.value))
        return nxt
