"""What a worker holds per camera (`Camera`), the table of them its parts share (`Cameras`), and
what the parts need of the model (`ModelPlan`).

The reader (reading.py), the stepper (stepping.py) and the publisher (publishing.py) each hold the
same `Cameras`; `Worker` (worker.py) makes the table and the parts, and wires them together.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections import deque
from pathlib import Path
from typing import Any

from schemas.alerts import Alert
from schemas.messages import CAMERA_ID_PATTERN, ControlMessage
from worker.config import Settings
from worker.model.backends import Backend
from worker.pipeline.alerting import AlertTracker
from worker.pipeline.metrics import Metrics
from worker.pipeline.timeline import CameraTimeline, Clock, SlotWork

log = logging.getLogger("movinet.worker")

_CAMERA_ID = re.compile(CAMERA_ID_PATTERN.removeprefix("^").removesuffix("$"))


def valid_camera(name: str) -> bool:
    """The one camera-ID rule (schemas' CAMERA_ID_PATTERN), for keys and names from outside."""
    return _CAMERA_ID.fullmatch(name) is not None


def text_of(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclasses.dataclass
class Camera:
    name: str
    stream: str
    out: str
    clock: Clock
    top_k: int
    owned: bool = False  # this worker holds the lease
    resumed: bool = False  # position and windows rebuilt since the lease was taken
    release: bool = False  # hand over between two rounds
    timeline: CameraTimeline | None = None
    pending: deque[SlotWork] = dataclasses.field(default_factory=deque)
    cursor: str = "0-0"  # last entry read
    committed: str = "0-0"  # position committed when the lease was taken
    published_slot: int | None = None  # last slot with a prediction in the output stream
    acquired_at: float = 0.0
    replayed: int = 0
    in_model: int = 0  # slots taken off `pending` and not yet advanced: not done, not to be committed
    newest_ms: int = 0  # start of the newest slot published
    lag: float = 0.0  # wall clock minus newest_ms when it was published
    seen_at: float = dataclasses.field(default_factory=time.monotonic)
    alerts: AlertTracker | None = None  # rules and their state; None without rules
    quarantined_until: float = 0.0  # resuming failed on its data: retried after this (monotonic)
    ahead: bool = False  # its newest entry ID is ahead of the wall clock
    skip_to_ms: int = 0  # fell too far behind: the next resume starts here
    head_ms: int = 0  # time of its stream's newest entry, when last looked at
    skipped: int = 0  # slots skipped so far
    pending_alerts: list[Alert] = dataclasses.field(default_factory=list)  # closes on going quiet
    snapshot: Any = None  # checkpoint.Snapshot of the newest stepped slot
    checkpoint_slot: int | None = None  # slot of the newest periodic checkpoint scheduled


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """What the parts need of the loaded model and the temporal mode the settings choose."""

    name: str  # as predictions name it
    fps: float
    window: int
    ema_frames: int | None  # EMA mode: the frame count states are held at; None: two windows
    ema_replay: int | None
    size: tuple[int, int]  # (height, width) frames are decoded to

    @property
    def per_slot(self) -> int:
        """Model steps per camera per slot: one EMA state, or two windows."""
        return 1 if self.ema_frames else 2

    @classmethod
    def of(cls, settings: Settings, backend: Backend) -> ModelPlan:
        info = backend.info
        window = settings.window or info.clip_frames
        ema_frames, ema_replay = settings.ema_plan(window)
        return cls(
            name=Path(info.source).name or info.source,
            fps=settings.fps or info.fps,
            window=window,
            ema_frames=ema_frames,
            ema_replay=ema_replay,
            size=(info.height, info.width),
        )


class Cameras(dict[str, Camera]):
    """The camera table the reader, stepper and publisher share: every camera known by name
    (discovered, announced or subscribed; owned ones hold state), the subscriptions, and the
    per-camera bookkeeping they all use."""

    def __init__(self, settings: Settings, backend: Backend, plan: ModelPlan, metrics: Metrics) -> None:
        super().__init__()
        self.settings, self.backend, self.plan, self.metrics = settings, backend, plan, metrics
        self.subscribed: dict[str, ControlMessage] = {}
        self.unsubscribed: dict[str, None] = {}  # an ordered set, capped by the control reader

    def camera(self, name: str) -> Camera:
        """The camera of this name, added to the table if new."""
        cam = self.get(name)
        if cam is None:
            sub = self.subscribed.get(name)
            cam = Camera(
                name=name,
                stream=self.settings.frames_stream(name),
                out=self.settings.predictions_stream(name),
                clock=Clock.of(sub.fps if sub and sub.fps else self.plan.fps),
                top_k=sub.top_k if sub and sub.top_k else self.settings.top_k,
            )
            self[name] = cam
        return cam

    def timeline(self, cam: Camera) -> CameraTimeline:
        """The camera's slot timeline, made at the zero state if it has none."""
        if cam.timeline is None:
            cam.timeline = CameraTimeline(
                cam.name,
                cam.clock,
                self.plan.window,
                self.settings.max_gap_slots,
                self.backend.init_state(),
                ema_replay=self.plan.ema_replay,
            )
            self.count_active()
        return cam.timeline

    @staticmethod
    def uncommitted(cam: Camera) -> bool:
        """Read past its committed position with nothing left to publish: only dead letters were read."""
        idle = cam.owned and cam.resumed and not cam.pending and not cam.in_model
        return idle and id_key(cam.cursor) > id_key(cam.committed)

    def count_active(self) -> None:
        self.metrics.cameras.set(sum(1 for c in self.values() if c.timeline is not None))

    def count_owned(self) -> None:
        self.metrics.cameras_owned.set(sum(1 for c in self.values() if c.owned))

    def drop_state(self, cam: Camera) -> None:
        """Forget what the camera holds; it resumes from Redis if it is (still or again) owned."""
        cam.timeline = None
        cam.snapshot = None
        cam.alerts = None  # its state lives in Redis; the next owner loads it
        cam.pending_alerts.clear()
        cam.pending.clear()
        cam.resumed = False
        self.metrics.forget_camera(cam.name)
        self.count_active()
