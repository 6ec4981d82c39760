"""Which cameras may share a model call, at what padded size, and how long a round waits for more.

The rule comes from MoViNet itself: `pool_frame_count` has shape `[1]`, so every state in one
batched call must have seen the same number of frames (DESIGN.md fact 2).

Waiting (a latency budget, what Triton calls a maximum queue delay): live cameras' frames arrive
spread over a slot, so a stepper that steps whatever is ready steps one or two cameras at a time, and
a small batch costs several times more per camera-frame than a large one (TF: 62 ms at 2 states
against 13.5 ms at 64). A round therefore waits for the cameras still expected on the slot, but only
while the earliest slot it holds can still be published within the budget after its capture,
counting the round's own estimated time (`RoundCost`) and keeping a reserve (`PLANNED_SHARE`); a
slot that would miss it is never held.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

# RoundCost forgets old rounds at this rate (about the last 30 rounds count).
COST_DECAY = 1 / 30
# A round plans to have its predictions published within this share of the latency budget; the rest
# absorbs what the estimate cannot see (a publish waiting for the one before, a neighbour's CPU), so
# a hold does not put the slots it holds at the very edge of the budget.
PLANNED_SHARE = 0.75
# A round's estimated time is stretched by this much before a hold is decided: a noisy neighbour or
# a slow publish must not turn a hold into a missed deadline.
COST_MARGIN = 1.25


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


class RoundCost:
    """A round's time from its start to its predictions published, `fixed + per_frame * n`, fitted
    by least squares over recent rounds of `n` camera-frames (weights decaying by `COST_DECAY`).

    With rounds of one size only, half of the time is taken as fixed: neither all of it (a big batch
    would look free and every hold would run late) nor none (a big batch would look as dear per
    camera-frame as a small one, so holds would never begin and batches never grow).
    """

    def __init__(self, decay: float = COST_DECAY) -> None:
        self.keep = 1.0 - decay
        self.w = self.n = self.t = self.nn = self.nt = 0.0

    def observe(self, frames: int, seconds: float) -> None:
        k = self.keep
        self.w = k * self.w + 1.0
        self.n = k * self.n + frames
        self.t = k * self.t + seconds
        self.nn = k * self.nn + frames * frames
        self.nt = k * self.nt + frames * seconds

    def line(self) -> tuple[float, float]:
        """(fixed seconds, seconds per camera-frame); (0, 0) before any round."""
        if self.w <= 0 or self.n <= 0:
            return 0.0, 0.0
        mean_n, mean_t = self.n / self.w, self.t / self.w
        var = self.nn / self.w - mean_n * mean_n
        if var > 1e-6 * mean_n * mean_n:
            per = (self.nt / self.w - mean_n * mean_t) / var
        else:
            per = mean_t / (2 * mean_n)
        per = min(max(per, 0.0), mean_t / mean_n)  # never below zero fixed time
        return mean_t - per * mean_n, per

    def seconds(self, frames: int) -> float:
        fixed, per = self.line()
        return fixed + per * frames


def hold_seconds(now: float, dues: Sequence[float], expected: int, cost: RoundCost) -> float:
    """How long a round waits before it steps the slots ready now (0: step them now).

    `dues`: for each camera with a slot ready, when its prediction is due (capture + the planned
    share of the budget);
    `expected`: cameras whose slot has not arrived yet but should have (they delivered the one
    before). A round waits only for them, and only until the earliest due slot, stepped in a batch
    of every camera (ready and expected), would be published just in time. Pure, for tests.
    """
    if not dues or expected <= 0:
        return 0.0
    start_by = min(dues) - COST_MARGIN * cost.seconds(len(dues) + expected)
    if not math.isfinite(start_by):
        return 0.0
    return max(0.0, start_by - now)
