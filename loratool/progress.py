"""How long-running work reports how far it has got, without knowing who is listening.

Every command that walks tensors takes an optional `progress` callback and calls it with a `Step`
after each tensor (or module) it finishes: the CLI draws a bar from it, scripts can log it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """Work done so far: items (tensors, or modules for extract and resize) and their bytes."""

    done: int
    total: int
    bytes_done: int
    bytes_total: int
    unit: str = "tensors"


Progress = Callable[[Step], None]


class Tally:
    """Counts finished items and passes each new count to the callback, if there is one."""

    def __init__(self, progress: Progress | None, total: int, bytes_total: int, unit: str = "tensors") -> None:
        self.progress = progress
        self.total = total
        self.bytes_total = bytes_total
        self.unit = unit
        self.done = 0
        self.bytes_done = 0

    def advance(self, nbytes: int) -> None:
        self.done += 1
        self.bytes_done += nbytes
        if self.progress is not None:
            self.progress(Step(self.done, self.total, self.bytes_done, self.bytes_total, self.unit))
