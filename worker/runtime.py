"""What a worker holds per camera, and the shared core its parts build on.

`Worker` (service.py) is assembled from this core, `Intake` (reading, intake.py) and `Publishing`
(publishing.py); each part declares here what it uses of the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.alerts import Alert
from schemas.messages import ControlMessage, DeadLetter
from worker.alerting import AlertTracker
from worker.backends import Backend
from worker.camera import CameraTimeline, Clock, SlotWork
from worker.config import Settings
from worker.metrics import Metrics
from worker.ownership import Ownership

log = logging.getLogger("movinet.worker")

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
# After a failed Redis call: wait this long, doubling up to the cap, then try again.
BACKOFF_START_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0


def text_of(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
    pending_alerts: list[Alert] = dataclasses.field(default_factory=list)  # closes on going quiet


class WorkerCore:
    """State shared by the worker's parts, and the per-camera bookkeeping they all use."""

    settings: Settings
    backend: Backend
    labels: list[str]
    redis: Any
    metrics: Metrics
    ownership: Ownership
    fps: float
    window: int
    ema_frames: int | None  # EMA mode: the frame count states are held at; None: two windows
    ema_replay: int | None
    size: tuple[int, int]
    model_name: str
    cameras: dict[str, Camera]
    subscribed: dict[str, ControlMessage]
    _work: asyncio.Event
    _space: asyncio.Event
    _dead_letters: list[DeadLetter]
    _max_pending: int

    def _camera(self, name: str) -> Camera:
        cam = self.cameras.get(name)
        if cam is None:
            sub = self.subscribed.get(name)
            cam = Camera(
                name=name,
                stream=self.settings.frames_stream(name),
                out=self.settings.predictions_stream(name),
                clock=Clock.of(sub.fps if sub and sub.fps else self.fps),
                top_k=sub.top_k if sub and sub.top_k else self.settings.top_k,
            )
            self.cameras[name] = cam
        return cam

    def _timeline(self, cam: Camera) -> CameraTimeline:
        if cam.timeline is None:
            cam.timeline = CameraTimeline(
                cam.name,
                cam.clock,
                self.window,
                self.settings.max_gap_slots,
                self.backend.init_state(),
                ema_replay=self.ema_replay,
            )
            self._count_active()
        return cam.timeline

    def _count_active(self) -> None:
        self.metrics.cameras.set(sum(1 for c in self.cameras.values() if c.timeline is not None))

    def _drop_state(self, cam: Camera) -> None:
        cam.timeline = None
        cam.alerts = None  # its state lives in Redis; the next owner loads it
        cam.pending_alerts.clear()
        cam.pending.clear()
        cam.resumed = False
        self.metrics.forget_camera(cam.name)
        self._count_active()
