"""What the worker needs to know about a MoViNet model, and how it is found out.

The model ID (a0..a5) decides the resolution, frame rate and clip length the model was trained on.
It is read off the model itself where possible (the head's pool buffer width is unique per ID), so
a SavedModel folder or TFLite file with an uninformative name still gets the right clock.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

ModelKind = Literal["stream", "base"]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Training facts of one MoViNet size (Kondratyuk et al. 2021, table 1 and section 4)."""

    model_id: str
    resolution: int
    fps: float
    clip_frames: int
    head_filters: int  # width of `state_head_pool_buffer`, unique per ID


ARCHITECTURES: dict[str, Architecture] = {
    a.model_id: a
    for a in (
        # A0-A2 were trained on 50-frame clips at 5 fps; A3 and A5 on 120 frames at 12 fps;
        # A4 on 80 frames at 8 fps. Head widths are the `project_filters` of tf-models-official.
        Architecture("a0", 172, 5.0, 50, 480),
        Architecture("a1", 172, 5.0, 50, 600),
        Architecture("a2", 224, 5.0, 50, 640),
        Architecture("a3", 256, 12.0, 120, 744),
        Architecture("a4", 290, 8.0, 80, 856),
        Architecture("a5", 320, 12.0, 120, 992),
    )
}
_BY_HEAD = {a.head_filters: a for a in ARCHITECTURES.values()}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Metadata every backend reports; the worker's slot clock and windows come from here."""

    source: str
    backend: str
    kind: ModelKind
    model_id: str | None
    height: int
    width: int
    fps: float
    clip_frames: int
    num_classes: int

    def describe(self) -> str:
        ident = self.model_id or "unknown size"
        return (
            f"MoViNet {ident} {self.kind} ({self.backend}) {self.height}x{self.width}, "
            f"trained at {self.fps:g} fps on {self.clip_frames}-frame clips, "
            f"{self.num_classes} classes"
        )


def architecture_from_head(head_filters: int | None) -> Architecture | None:
    return _BY_HEAD.get(head_filters) if head_filters is not None else None


def architecture_from_name(name: str) -> Architecture | None:
    """Guess the size from a handle or path such as `.../movinet/a2/stream/...` or `a0_base`."""
    match = re.search(r"(?:^|[^a-z0-9])(a[0-5])(?:[^a-z0-9]|$)", name.lower())
    return ARCHITECTURES[match.group(1)] if match else None


def resolve_info(
    *,
    source: str,
    backend: str,
    kind: ModelKind,
    num_classes: int,
    head_filters: int | None,
    height: int | None,
    width: int | None,
    fps: float | None = None,
    clip_frames: int | None = None,
) -> ModelInfo:
    """Combine what the model says about itself with the architecture table.

    Explicit values (a static input shape, a user's `--fps`) win over the table; the table fills
    the rest; A0's values are the last resort since it is the model the tutorial uses.
    """
    arch = architecture_from_head(head_filters) or architecture_from_name(source)
    fallback = arch or ARCHITECTURES["a0"]
    return ModelInfo(
        source=source,
        backend=backend,
        kind=kind,
        model_id=arch.model_id if arch else None,
        height=height or fallback.resolution,
        width=width or fallback.resolution,
        fps=fps or fallback.fps,
        clip_frames=clip_frames or fallback.clip_frames,
        num_classes=num_classes,
    )
