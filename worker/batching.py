"""Which cameras may share a model call, and at what padded size.

The rule comes from MoViNet itself: `pool_frame_count` has shape `[1]`, so every state in one
batched call must have seen the same number of frames (DESIGN.md fact 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Counted(Protocol):
    @property
    def frames(self) -> int: ...


def group_by_count(states: Sequence[Counted]) -> list[tuple[int, list[int]]]:
    """Indices of `states` grouped by frame count, groups and members in first-seen order."""
    groups: dict[int, list[int]] = {}
    for i, state in enumerate(states):
        groups.setdefault(state.frames, []).append(i)
    return list(groups.items())


def bucket_size(n: int, sizes: Sequence[int]) -> int:
    """The smallest allowed batch size holding `n` (sizes ascending; `n` <= the largest)."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"batch of {n} exceeds the largest batch size {sizes[-1]}")
