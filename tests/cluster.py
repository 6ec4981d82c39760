"""Helpers for multi-worker fault tests: private Redis servers and clusters, real worker processes,
a real-time camera publisher, a prediction watcher, and the checks every run must pass.

Everything here talks to loopback addresses only, bounds every wait in time and cleans up after
itself (processes stopped, temporary directories and keys removed), so a failing test leaves
nothing running. Keys live under a per-test prefix (`KeySpace`) with the camera in a Redis Cluster
hash tag, `<prefix>:frames:{<camera>}`, so a camera's keys share a cluster slot and tests never
collide.
"""

from __future__ import annotations

from tests.support.base import (
    FPS,
    LOOPBACK,
    ROOT,
    SIZE,
    TRANSIENT,
    KeySpace,
    RedisClient,
    Reference,
    Top,
    owned_by,
    owner_worker,
    owners,
    registered_workers,
    slot_of,
    slot_start_ms,
    wait_balanced,
    wait_for,
)
from tests.support.checks import (
    RunCheck,
    check_run,
    copy_frames,
    last_predicted_slots,
    read_predictions,
    reference_predictions,
    same_top,
    wait_drained,
)
from tests.support.servers import RedisCluster3, RedisServer
from tests.support.traffic import Gap, LivePublisher, PredictionWatcher, Published, Seen, frame_image
from tests.support.workers import Fleet, WorkerProcess, write_labels
from worker.testing import free_port

__all__ = [
    "FPS",
    "LOOPBACK",
    "ROOT",
    "SIZE",
    "TRANSIENT",
    "Fleet",
    "Gap",
    "KeySpace",
    "LivePublisher",
    "PredictionWatcher",
    "Published",
    "RedisClient",
    "RedisCluster3",
    "RedisServer",
    "Reference",
    "RunCheck",
    "Seen",
    "Top",
    "WorkerProcess",
    "check_run",
    "copy_frames",
    "frame_image",
    "free_port",
    "last_predicted_slots",
    "owned_by",
    "owner_worker",
    "owners",
    "read_predictions",
    "reference_predictions",
    "registered_workers",
    "same_top",
    "slot_of",
    "slot_start_ms",
    "wait_balanced",
    "wait_drained",
    "wait_for",
    "write_labels",
]
