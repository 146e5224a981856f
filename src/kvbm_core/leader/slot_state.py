"""The states of one tier slot and the only transitions allowed between them.

"Can this slot be matched, evicted or overwritten?" has one answer, read off its state::

    FREE ──allocate──> WRITING ──write ok──> READY <──last hold released── HELD
      ^                   │                    │  ──hold (promise/read)──>  │
      │                   └──write failed──────┤                            │ read failed
      │                                        │                            v
      └────────────evicted──────────────────── READY         DOOMED <───────┘
      └──────────────last hold released───────────────────── DOOMED

A block a restarted tier finds valid at start goes ``FREE -> WRITING -> READY`` at once (it was
written by the previous run), so ``READY`` is only ever entered from a completed write or a release.

- ``FREE``: no bytes; the slot is in the free list.
- ``WRITING``: target of a planned store whose result has not arrived. Its key is registered, so the
  same block is never stored twice, but it is **not matchable** (the bytes may not be there yet).
- ``READY``: bytes valid and registered; matchable; evictable.
- ``HELD``: bytes valid and registered; matchable; pinned by a promise to a request or read by an
  in-flight operation (``holds > 0``); never evicted or overwritten.
- ``DOOMED``: a read found the bytes bad; unregistered (not matchable) but still held by readers;
  freed when the last of them lets go.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class SlotState(IntEnum):
    FREE = 0
    WRITING = 1
    READY = 2
    HELD = 3
    DOOMED = 4


ALLOWED: dict[SlotState, frozenset[SlotState]] = {
    SlotState.FREE: frozenset({SlotState.WRITING}),
    SlotState.WRITING: frozenset({SlotState.READY, SlotState.FREE}),
    SlotState.READY: frozenset({SlotState.HELD, SlotState.FREE}),
    SlotState.HELD: frozenset({SlotState.HELD, SlotState.READY, SlotState.DOOMED}),
    SlotState.DOOMED: frozenset({SlotState.DOOMED, SlotState.FREE}),
}
"""``ALLOWED[a]`` is the set of states a slot in state ``a`` may move to."""

MATCHABLE = frozenset({SlotState.READY, SlotState.HELD})
"""States whose bytes a new request may be promised."""

REGISTERED = frozenset({SlotState.WRITING, SlotState.READY, SlotState.HELD})
"""States whose key is in the tier's index (a new store of that key is skipped)."""

TRANSITIONS = np.zeros((len(SlotState), len(SlotState)), bool)
"""``ALLOWED`` as a boolean matrix, so a batch of slots is checked in one numpy call."""
for _src, _targets in ALLOWED.items():
    for _dst in _targets:
        TRANSITIONS[_src, _dst] = True

MATCHABLE_MASK = np.array([s in MATCHABLE for s in SlotState], bool)
