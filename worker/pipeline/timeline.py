"""One camera's place on the model clock and its two staggered windows.

Everything here is a pure function of the camera's frame sequence, which is what makes a restart or
a takeover exact: replaying the same frames from a window's start rebuilds the same states.

- The clock: slot `k` covers `[k/fps, (k+1)/fps)` seconds since the epoch, by the frame's Redis
  entry ID. The first frame in a slot is used; later ones are dropped.
- A gap of up to `max_gap` slots is filled by repeating the last frame; a longer one restarts the
  camera (fresh states), so a camera that stops is never padded forever.
- Two windows per camera, reset when `slot % W` equals their phase (0 and W/2). Every camera resets
  on the same slots, so cameras share frame counts and batch together; each prediction comes from
  the window with more context: W/2 to W frames once the camera has run for W/2 slots.
- Or, in EMA mode, one state that is never reset (but after a long gap): the backend holds its
  frame count at `c`, so its pooled features are a moving average (DESIGN.md). It depends on all
  of the camera's history, so a replay of `ema_replay` slots rebuilds it only approximately: the
  frames before them weigh `(c/(c+1))^ema_replay` in the uninterrupted state.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Clock:
    """Slot arithmetic in exact fractions: float error must never move a frame between slots."""

    fps: Fraction

    @classmethod
    def of(cls, fps: float) -> Clock:
        return cls(Fraction(fps).limit_denominator(1000))

    def slot(self, ms: int) -> int:
        return math.floor(ms * self.fps / 1000)

    def start_ms(self, slot: int) -> int:
        """First whole millisecond inside the slot."""
        return math.ceil(slot * 1000 / self.fps)

    def end_ms(self, slot: int) -> int:
        return self.start_ms(slot + 1)


@dataclasses.dataclass
class SlotWork:
    """One slot of one camera, ready for the model."""

    camera: str
    slot: int
    image: np.ndarray  # uint8 [H, W, 3] at the model's size
    capture_ms: int
    repeated: bool
    entry_ids: list[str]  # entries acknowledged once this slot is published (empty for repeats)
    restart: bool = False  # a long gap came before: both windows start afresh here


@dataclasses.dataclass
class Window:
    phase: int | None  # None: never reset on a schedule (EMA mode)
    state: Any
    start_slot: int = 0
    frames: int = 0


class CameraTimeline:
    """Turns a camera's entries into slot work, and keeps its two window states."""

    def __init__(
        self,
        camera: str,
        clock: Clock,
        window: int,
        max_gap: int,
        zero_state: Any,
        *,
        ema_replay: int | None = None,
    ) -> None:
        if window < 2:
            raise ValueError("window must be at least 2 slots")
        self.camera = camera
        self.clock = clock
        self.window = window
        self.max_gap = max_gap
        self.zero = zero_state
        self.ema_replay = ema_replay
        if ema_replay is None:
            self.windows = [Window(0, zero_state), Window(window // 2, zero_state)]
        else:
            self.windows = [Window(None, zero_state)]
        self.last_slot: int | None = None  # last slot accepted (queued or stepped)
        self.last_image: np.ndarray | None = None
        self.last_capture_ms = 0
        self.stepped_slot: int | None = None  # last slot stepped through the model

    def accept(self, ms: int, entry_id: str, image: np.ndarray, capture_ms: int) -> list[SlotWork] | None:
        """Slot work for a frame at `ms`; None when the frame is dropped (its slot is taken)."""
        slot = self.clock.slot(ms)
        work: list[SlotWork] = []
        restart = False
        if self.last_slot is not None:
            if slot <= self.last_slot:
                return None
            gap = slot - self.last_slot - 1
            if gap > self.max_gap:
                restart = True  # applied when stepped: earlier slots may still be queued
            elif gap > 0 and self.last_image is not None:
                work = [
                    SlotWork(self.camera, s, self.last_image, self.last_capture_ms, True, [])
                    for s in range(self.last_slot + 1, slot)
                ]
        self.last_slot = slot
        self.last_image = image
        self.last_capture_ms = capture_ms
        work.append(SlotWork(self.camera, slot, image, capture_ms, False, [entry_id], restart))
        return work

    def states_for(self, work: SlotWork) -> list[Any]:
        """The window states to step for a slot, each reset first if the slot starts its window.

        After a long gap the old context is stale, so every window starts afresh at the slot.
        """
        slot = work.slot
        for w in self.windows:
            if work.restart or w.frames == 0 or (w.phase is not None and slot % self.window == w.phase):
                w.state, w.frames, w.start_slot = self.zero, 0, slot
        return [w.state for w in self.windows]

    def advance(self, slot: int, new_states: list[Any]) -> Window:
        """Store the stepped states; returns the window the slot's prediction comes from."""
        for w, state in zip(self.windows, new_states, strict=True):
            w.state, w.frames = state, w.frames + 1
        self.stepped_slot = slot
        return max(self.windows, key=lambda w: (w.frames, -w.start_slot))

    def replay_start_slot(self, next_slot: int) -> int:
        """First slot whose frames rebuild the windows as they are at `next_slot`.

        The older window began at the latest phase boundary `W` slots back at most (an EMA state:
        `ema_replay` slots back, approximately); frames up to `max_gap + 1` slots earlier decide
        whether the gap before it was filled or restarted.
        """
        if self.ema_replay is not None:
            return next_slot - self.ema_replay - self.max_gap - 1
        starts = [next_slot - ((next_slot - (w.phase or 0)) % self.window) for w in self.windows]
        return min(starts) - self.max_gap - 1
