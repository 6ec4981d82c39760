"""The interface the worker runs models through, whatever does the arithmetic.

A backend steps N cameras by one frame each. Each camera's state is an opaque object in the
backend's cheapest form; the only thing the caller may ask of it is how many frames it has seen,
because MoViNet's pooled features divide by a frame count that is shared by a whole batch
(DESIGN.md fact 2), so cameras can only share a model call when their counts are equal.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.model.info import ModelInfo


class ModelLoadError(RuntimeError):
    """A model or label file could not be loaded; the message says what to pass instead."""


class State(abc.ABC):
    """One camera's streaming state, in whatever form its backend keeps it."""

    @property
    @abc.abstractmethod
    def frames(self) -> int:
        """Frames this state has seen since `init_state` (its `pool_frame_count`)."""


class Backend(abc.ABC):
    """A loaded MoViNet stream model."""

    name: str = ""
    info: ModelInfo

    @abc.abstractmethod
    def init_state(self) -> State:
        """A fresh state: zeros of every state tensor, frame count 0."""

    @abc.abstractmethod
    def step(
        self, frames: np.ndarray, states: Sequence[State], hold: int | None = None
    ) -> tuple[np.ndarray, list[State]]:
        """Advance N cameras by one frame each.

        `frames` is `[N, 1, H, W, 3]` float32 RGB in [0, 1], `states[i]` belongs to `frames[i]`.
        Returns logits `[N, num_classes]` and the N new states, in the same order. The input
        states are not modified, so a caller may step the same state twice.

        `hold` (the EMA mode of DESIGN.md): a new state that has seen more than `hold` frames is
        held at `hold`: each pooled sum is scaled by `hold / count` and each frame count set to
        `hold`, which keeps every pooled mean as it is. Stepping a held state again then weighs the
        newest frame by `1 / (hold + 1)` and the running mean by `hold / (hold + 1)`.
        """

    def export_state(self, state: State) -> dict[str, np.ndarray]:
        """The state's arrays by name, as numpy (for a checkpoint); the frame count is `state.frames`."""
        raise NotImplementedError(f"{type(self).__name__} cannot checkpoint its states")

    def import_state(self, arrays: dict[str, np.ndarray], frames: int) -> State:
        """A state from `export_state`'s arrays (names, shapes and dtypes already checked)."""
        raise NotImplementedError(f"{type(self).__name__} cannot checkpoint its states")

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to release
        """Release threads or interpreters."""

    def check_frames(self, frames: np.ndarray, states: Sequence[Any]) -> None:
        info = self.info
        expected = (len(states), 1, info.height, info.width, 3)
        if frames.shape != expected:
            raise ValueError(f"frames must be shaped {list(expected)}, got {list(frames.shape)}")
        if frames.dtype != np.float32:
            raise ValueError(f"frames must be float32 in [0, 1], got {frames.dtype}")


POOL_SUFFIX = "_pool_buffer"
FRAME_COUNT_SUFFIX = "_pool_frame_count"


def hold_factor(count: int, hold: int | None) -> float | None:
    """The scale that holds a state at `hold` frames, or None when it needs none."""
    return hold / count if hold is not None and count > hold else None


class ClipModel(abc.ABC):
    """A base (non-streaming) MoViNet: one call on a whole clip."""

    info: ModelInfo

    @abc.abstractmethod
    def classify_clip(self, clip: np.ndarray) -> np.ndarray:
        """Logits `[num_classes]` for `clip` shaped `[T, H, W, 3]` float32 in [0, 1]."""
