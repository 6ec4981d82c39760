"""A real-time camera publisher and a prediction watcher."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from redis.exceptions import ResponseError

from schemas.messages import Frame
from tests.support.base import (
    FPS,
    SIZE,
    TRANSIENT,
    KeySpace,
    RedisClient,
    _text,
    owner_worker,
    slot_of,
    slot_start_ms,
)


def frame_image(camera: str, seq: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A deterministic uint8 [H, W, 3] image per (camera, seq): seeded blocks of 4x4 pixels."""
    rng = np.random.default_rng([zlib.crc32(camera.encode()), seq])
    h, w = size
    small = rng.integers(0, 256, ((h + 3) // 4, (w + 3) // 4, 3), dtype=np.uint8)
    return np.ascontiguousarray(small.repeat(4, axis=0).repeat(4, axis=1)[:h, :w])


@dataclasses.dataclass(frozen=True)
class Published:
    entry_id: str
    seq: int
    ms: int
    wall: float  # time.time() after Redis accepted it


class LivePublisher:
    """Cameras publishing rgb24 frames in real time, `fps` each, from a background thread.

    Frames are sent at the middle of each slot of the wall clock (one frame per slot), with capture
    time = now and an explicit, increasing entry ID `<now_ms>-<seq>`. Images are deterministic per
    (camera, seq) (`frame_image`). A cut connection is retried with the same ID; `published` records
    what Redis accepted.
    """

    def __init__(
        self,
        client: RedisClient,
        keys: KeySpace,
        cameras: Sequence[str],
        *,
        fps: float = FPS,
        size: tuple[int, int] = SIZE,
        retry_seconds: float = 10.0,
    ) -> None:
        self.client, self.keys, self.cameras = client, keys, list(cameras)
        self.fps, self.size, self.retry_seconds = fps, size, retry_seconds
        self.published: dict[str, list[Published]] = {c: [] for c in self.cameras}
        self.errors = 0  # failed calls, retried
        self.skipped = 0  # frames given up on
        self.started_at: float | None = None
        self._seq = dict.fromkeys(self.cameras, 0)
        self._last_ms = dict.fromkeys(self.cameras, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._lock = threading.Lock()

    def start(self) -> LivePublisher:
        self.started_at = time.time()
        self._thread = threading.Thread(target=self._run, name="live-publisher", daemon=True)
        self._thread.start()
        return self

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.time() - self.started_at

    def run_until(self, seconds: float) -> None:
        """Sleep until the publisher has run `seconds` (it keeps publishing)."""
        time.sleep(max(0.0, seconds - self.elapsed()))
        self.check()

    def check(self) -> None:
        if self._failure is not None:
            raise AssertionError(f"publisher failed: {self._failure!r}") from self._failure

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "publisher thread did not stop"
        self.check()

    def __enter__(self) -> LivePublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    # -- what was published

    def count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.published.values())

    def last_slots(self) -> dict[str, int]:
        with self._lock:
            return {c: slot_of(v[-1].ms, self.fps) for c, v in self.published.items() if v}

    def first_slots(self) -> dict[str, int]:
        with self._lock:
            return {c: slot_of(v[0].ms, self.fps) for c, v in self.published.items() if v}

    # -- the thread

    def _run(self) -> None:
        period_ms = 1000 / self.fps
        try:
            while not self._stop.is_set():
                now_ms = time.time() * 1000
                # The middle of the next slot of the wall clock.
                target = (math.floor(now_ms / period_ms) + 1.5) * period_ms
                if self._stop.wait(max(0.0, (target - now_ms) / 1000)):
                    return
                self._tick()
        except BaseException as exc:  # reported by stop() / check()
            self._failure = exc

    def _tick(self) -> None:
        now_ms = int(time.time() * 1000)
        batch: dict[str, tuple[str, int, int, dict[str, Any]]] = {}
        h, w = self.size
        for camera in self.cameras:
            seq = self._seq[camera]
            self._seq[camera] = seq + 1
            ms = max(now_ms, self._last_ms[camera])
            self._last_ms[camera] = ms
            image = frame_image(camera, seq, self.size)
            fields = Frame(
                camera=camera,
                seq=seq,
                capture_ms=ms,
                encoding="rgb24",
                width=w,
                height=h,
                data=image.tobytes(),
            ).to_fields()
            batch[camera] = (f"{ms}-{seq}", seq, ms, fields)
        deadline = time.monotonic() + self.retry_seconds
        while batch and not self._stop.is_set():
            try:
                pipe = self.client.pipeline(transaction=False)
                for camera, (entry_id, _, _, fields) in batch.items():
                    pipe.xadd(self.keys.frames(camera), fields, id=entry_id)
                results = pipe.execute(raise_on_error=False)
            except TRANSIENT:
                self.errors += 1
                if time.monotonic() > deadline:
                    self.skipped += len(batch)
                    return
                time.sleep(0.05)
                continue
            wall = time.time()
            for (camera, (entry_id, seq, ms, _)), result in zip(list(batch.items()), results, strict=True):
                if isinstance(result, TRANSIENT) and time.monotonic() < deadline:
                    self.errors += 1
                    continue  # sent again
                del batch[camera]
                # A refused ID that is there: an earlier try went through before the connection was cut.
                done = not isinstance(result, Exception) or (
                    isinstance(result, ResponseError) and self._exists(camera, entry_id)
                )
                if not done:
                    self.skipped += 1
                    continue
                with self._lock:
                    self.published[camera].append(Published(entry_id, seq, ms, wall))

    def _exists(self, camera: str, entry_id: str) -> bool:
        with contextlib.suppress(*TRANSIENT):
            return bool(self.client.xrange(self.keys.frames(camera), entry_id, entry_id))
        return False


# ---- the watcher --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Seen:
    camera: str
    entry_id: str
    slot: int
    worker: str
    wall: float  # when the watcher first saw it (time.time())
    poll: int  # index of the poll that saw it


@dataclasses.dataclass(frozen=True)
class Gap:
    seconds: float
    camera: str
    before: int  # slot
    after: int  # slot
    start: float  # when the prediction before the gap was first seen (time.time())

    def __str__(self) -> str:
        return f"{self.seconds:.2f}s ({self.camera} slots {self.before}->{self.after})"


class PredictionWatcher:
    """Polls every camera's predictions stream (XRANGE after the last ID seen) from a thread and
    records, per prediction, when it was first seen and which worker published it.

    With `track_owners`, each poll first reads every camera's lease (in the same pipeline, before the
    XRANGE), so a prediction can be checked against who held the lease around when it appeared.
    """

    def __init__(
        self,
        client: RedisClient,
        keys: KeySpace,
        cameras: Sequence[str],
        *,
        interval: float = 0.05,
        track_owners: bool = True,
        fps: float = FPS,
    ) -> None:
        self.client, self.keys, self.cameras = client, keys, list(cameras)
        self.interval, self.track_owners, self.fps = interval, track_owners, fps
        self.seen: dict[str, list[Seen]] = {c: [] for c in self.cameras}
        self.polls = 0
        self.errors = 0
        self.poll_walls: list[float] = []
        # owners[camera][poll] = the worker holding the lease at that poll (None: no lease)
        self.owner_log: dict[str, list[str | None]] = {c: [] for c in self.cameras}
        self._last = dict.fromkeys(self.cameras, "-")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._lock = threading.Lock()

    def start(self) -> PredictionWatcher:
        self._thread = threading.Thread(target=self._run, name="prediction-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "watcher thread did not stop"
        if self._failure is not None:
            raise AssertionError(f"watcher failed: {self._failure!r}") from self._failure

    def __enter__(self) -> PredictionWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.poll_once()
                except TRANSIENT:
                    self.errors += 1
                self._stop.wait(self.interval)
        except BaseException as exc:
            self._failure = exc

    def poll_once(self) -> int:
        """One poll (also callable directly, without the thread); returns how many were new."""
        pipe = self.client.pipeline(transaction=False)
        for camera in self.cameras:
            if self.track_owners:
                pipe.get(self.keys.owner(camera))
            start = self._last[camera]
            pipe.xrange(self.keys.predictions(camera), min=start if start == "-" else "(" + start, count=5000)
        results = iter(pipe.execute())
        wall = time.time()
        new = 0
        with self._lock:
            poll = self.polls
            for camera in self.cameras:
                owner = owner_worker(next(results)) if self.track_owners else None
                self.owner_log[camera].append(owner)
                for entry_id, fields in next(results):
                    eid = _text(entry_id)
                    self._last[camera] = eid
                    slot = int(_text(fields.get(b"slot", b"-1")))
                    worker = _text(fields.get(b"worker"))
                    self.seen[camera].append(Seen(camera, eid, slot, worker, wall, poll))
                    new += 1
            self.poll_walls.append(wall)
            self.polls += 1
        return new

    # -- what was seen

    def all_seen(self) -> list[Seen]:
        with self._lock:
            return sorted((s for v in self.seen.values() for s in v), key=lambda s: s.wall)

    def count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.seen.values())

    def workers_seen(self, since: float | None = None, camera: str | None = None) -> Counter[str]:
        """How many predictions each worker published (first seen at or after `since`)."""
        return Counter(
            s.worker
            for s in self.all_seen()
            if (since is None or s.wall >= since) and (camera is None or s.camera == camera)
        )

    def max_gap(self, since: float | None = None) -> Gap | None:
        """The longest wall-clock gap between a camera's consecutive predictions (by slot), counting
        only pairs whose later one was seen at or after `since`: the takeover time."""
        best: Gap | None = None
        with self._lock:
            for camera, seen in self.seen.items():
                ordered = sorted(seen, key=lambda s: s.slot)
                for a, b in itertools.pairwise(ordered):
                    if since is not None and b.wall < since:
                        continue
                    if best is None or b.wall - a.wall > best.seconds:
                        best = Gap(b.wall - a.wall, camera, a.slot, b.slot, a.wall)
        return best

    def max_delay(self, from_slots: Mapping[str, int] | None = None) -> tuple[float, Seen | None]:
        """The longest time from a slot's end (wall clock) to its prediction being seen, over slots at
        or after `from_slots[camera]`."""
        worst: tuple[float, Seen | None] = (0.0, None)
        for s in self.all_seen():
            if from_slots is not None and s.slot < from_slots.get(s.camera, 0):
                continue
            delay = s.wall - slot_start_ms(s.slot + 1, self.fps) / 1000
            if delay > worst[0]:
                worst = (delay, s)
        return worst

    def caught_up(self, cameras: Iterable[str], since: float, within: float = 1.0) -> float | None:
        """Seconds from `since` until every one of `cameras` was live again: a prediction seen at most
        `within` seconds after its slot's end. None if one never was."""
        latest = 0.0
        for camera in cameras:
            with self._lock:
                live = [
                    s.wall
                    for s in self.seen[camera]
                    if s.wall >= since and s.wall - slot_start_ms(s.slot + 1, self.fps) / 1000 <= within
                ]
            if not live:
                return None
            latest = max(latest, min(live) - since)
        return round(latest, 2)

    def fencing_violations(self) -> list[Seen]:
        """Predictions whose publisher held the camera's lease at none of the polls just before, at
        and just after the one that saw it: published by a worker that had lost (or never had) it."""
        if not self.track_owners:
            raise ValueError("watcher was not tracking owners")
        bad: list[Seen] = []
        with self._lock:
            for camera, seen in self.seen.items():
                log = self.owner_log[camera]
                for s in seen:
                    around = {log[p] for p in (s.poll - 1, s.poll, s.poll + 1) if 0 <= p < len(log)}
                    if s.worker not in around:
                        bad.append(s)
        return bad
