"""Decoding video with PyAV onto the model's frame clock, at the model's resolution.

Frames are placed by their presentation time: slot `k` covers `[k/fps, (k+1)/fps)` from the first
frame, and the first frame in each slot is kept. Frames that are not kept are never converted, and
the kept ones are scaled by FFmpeg's swscale straight to the model's size in RGB.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

# Float error in `time * fps` must not move a frame that sits exactly on a slot boundary.
SLOT_EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class VideoFrame:
    index: int  # position among all decoded frames
    time: float  # seconds since the first decoded frame
    slot: int | None  # slot on the model clock, None when not resampling
    image: np.ndarray  # uint8 [H, W, 3] RGB


class VideoError(RuntimeError):
    """A source that PyAV cannot open or decode."""


def open_source(
    source: str, options: dict[str, str] | None = None, timeout: tuple[float, float] | None = None
) -> Any:
    """`timeout`: (open, read) seconds before a silent network source raises instead of blocking."""
    import av

    try:
        return av.open(source, options=options or {}, timeout=timeout)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(f"cannot open video {source!r}: {exc}") from exc


def expected_frames(container: Any, fps: float | None) -> int | None:
    """How many frames will be yielded, if the container knows its length (live streams don't)."""
    stream = container.streams.video[0]
    if fps:
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1_000_000
        return math.ceil(duration * fps) if duration else None
    return int(stream.frames) or None


def slot_of(seconds: float, fps: float) -> int:
    return math.floor(seconds * fps + SLOT_EPSILON)


def read_frames(
    source: str,
    size: tuple[int, int] | None,
    fps: float | None,
    *,
    container: Any = None,
    skipped: Callable[[], None] | None = None,
) -> Iterator[VideoFrame]:
    """Yield RGB frames resized to `size` (height, width), one per slot of `fps` when given.

    `skipped` is called for each decoded frame not kept (a live reader counts them, and may raise
    from it to give up on a source that decodes but never yields).
    """
    import av

    own = container is None
    container = container or open_source(source)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start: float | None = None
        last_slot = -1
        rate = float(stream.average_rate or 0) or None
        for index, frame in enumerate(container.decode(stream)):
            # GIFs and some raw streams lack timestamps: fall back to the nominal rate.
            t = float(frame.time) if frame.time is not None else index / (rate or 1.0)
            if start is None:
                start = t
            t -= start
            slot = None
            if fps:
                slot = slot_of(t, fps)
                if slot <= last_slot:
                    if skipped is not None:
                        skipped()
                    continue  # a second frame in a slot that already has one
                last_slot = slot
            if size is None:
                image = frame.to_ndarray(format="rgb24")
            else:
                image = frame.reformat(
                    width=size[1], height=size[0], format="rgb24", interpolation="BILINEAR"
                ).to_ndarray()
            yield VideoFrame(index, t, slot, image)
    except av.error.FFmpegError as exc:
        raise VideoError(f"cannot decode {source!r}: {exc}") from exc
    finally:
        if own:
            container.close()


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 `[N, H, W, 3]` -> float32 `[N, 1, H, W, 3]` in [0, 1], the layout `Backend.step` takes."""
    out = images.astype(np.float32)
    out *= 1.0 / 255.0
    return out[:, None]
