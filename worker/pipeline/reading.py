"""Reading: where a camera resumes, and how its entries become slot work or dead letters.

`Reader.read_once` is one turn of the reader task: resume the owned cameras not yet resumed, XREAD
every owned camera from its cursor, decode in a thread pool, and queue each camera's slot work on
its `Camera.pending` (or its dead letters on the shared list the publisher writes out).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from redis.exceptions import ResponseError

from schemas.messages import DeadLetter, Frame, MessageError, Prediction
from worker.config import Settings
from worker.pipeline.alerting import AlertTracker
from worker.pipeline.cameras import Camera, Cameras, id_key, log, text_of
from worker.pipeline.capacity import Capacity
from worker.pipeline.checkpoint import Checkpoints
from worker.pipeline.codec import decode_image
from worker.pipeline.metrics import Metrics
from worker.pipeline.publishing import dead_letter
from worker.pipeline.supervisor import REDIS_ERRORS, denied_command

# Entry IDs are Redis '*' IDs, i.e. ms since the epoch: anything before 2001 is not a clock.
MIN_ENTRY_MS = 1_000_000_000_000
# A camera whose resume failed on its own data is tried again after this long.
QUARANTINE_SECONDS = 30.0


@dataclasses.dataclass
class Checked:
    """One entry after the cheap checks: the frame to decode (with its pixel limit), or why not."""

    entry_id: str
    ms: int
    fields: dict[Any, Any]
    frame: Frame | None
    error: MessageError | None
    max_pixels: int


def _decode_jobs(
    jobs: list[tuple[Camera, list[Checked]]], size: tuple[int, int], budget: float
) -> list[list[tuple[Checked, np.ndarray | MessageError | None]]]:
    """In the decode thread: each camera's entries in order until its decode time passes `budget`;
    the entries left are not consumed (the camera's cursor stops before them) and are read again."""
    out: list[list[tuple[Checked, np.ndarray | MessageError | None]]] = []
    for _, items in jobs:
        results: list[tuple[Checked, np.ndarray | MessageError | None]] = []
        started = time.perf_counter()
        for item in items:
            if time.perf_counter() - started > budget:
                break
            if item.frame is None:
                results.append((item, item.error))
                continue
            try:
                results.append((item, decode_image(item.frame, size, item.max_pixels)))
            except MessageError as exc:
                results.append((item, exc))
            except Exception as exc:  # a decoder bug on one hostile image must not cost the others
                results.append((item, MessageError("undecodable", f"{type(exc).__name__}: {exc}")))
        out.append(results)
    return out


class Reader:
    """Owned cameras' entries into slot work: `read_once` (the reader task's turn), `tracker`
    (a camera's alert rules as subscribed), `close`. It reads no more while the queues are full and
    waits on `space` for the stepper; it sets `work` when it queued slot work."""

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        cameras: Cameras,
        labels: list[str],
        *,
        metrics: Metrics,
        checkpoints: Checkpoints,
        capacity: Capacity,
        dead_letters: list[DeadLetter],
        work: asyncio.Event,
        space: asyncio.Event,
        beat: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings, self.redis, self.cameras, self.labels = settings, redis, cameras, labels
        self.metrics, self.checkpoints, self.capacity = metrics, checkpoints, capacity
        self.dead_letters, self.work, self.space, self.beat = dead_letters, work, space, beat
        self.size = cameras.plan.size
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, "decode")
        # Read no more for a camera with this many slots queued: the rest waits in Redis.
        self.max_pending = 2 * settings.read_count

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False)

    async def _resume(self, cam: Camera) -> None:
        """Rebuild position and windows after taking the lease (start, restart, takeover)."""
        start = "0" if self.settings.start_from == "all" else "$"
        try:
            await self.redis.xgroup_create(cam.stream, self.settings.group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        groups = await self.redis.xinfo_groups(cam.stream)
        cam.committed = next(
            (text_of(g["last-delivered-id"]) for g in groups if text_of(g["name"]) == self.settings.group),
            "0-0",
        )
        last = await self.redis.xrevrange(cam.out, count=1)
        previous = None
        if last:
            try:
                previous = Prediction.from_fields(last[0][1])
            except MessageError as exc:
                log.error(
                    "camera %s: the last entry of %s is not a prediction (%s): starting afresh",
                    cam.name,
                    cam.out,
                    exc,
                )
        cam.published_slot = previous.slot if previous else None
        cam.timeline = None
        cam.pending.clear()
        timeline = self.cameras.timeline(cam)
        cam.cursor = cam.committed
        if cam.skip_to_ms and id_key(cam.cursor) < (cam.skip_to_ms, 0):
            cam.cursor = f"{cam.skip_to_ms}-0"
            previous = None  # nothing before the skip is replayed
        cam.skip_to_ms = 0
        if previous is not None:
            restored = await self.checkpoints.restore(self.redis, cam, timeline, previous.slot)
            first_slot = timeline.replay_start_slot(previous.slot + 1) if restored is None else restored + 1
            replay_from = (max(cam.clock.start_ms(first_slot), 1) - 1, 2**63 - 1)
            if replay_from < id_key(cam.committed):
                cam.cursor = f"{replay_from[0]}-{replay_from[1]}"
        cam.alerts = self.tracker(cam)
        if cam.alerts is not None:
            stored = await self.redis.get(self.settings.alert_state(cam.name))
            try:
                cam.alerts.load(stored)
            except (ValueError, TypeError) as exc:
                log.error("camera %s: stored alert state unreadable (%s): rules start closed", cam.name, exc)
            # The stored state is what the previous owner published: its open alerts are open here now.
            states = cam.alerts.states.items()
            opened = [(n, s.label, s.start_ms, s.emitted_peak) for n, s in states if s.open]
            if cam.owned:
                self.metrics.restore_open_alerts(cam.name, opened)
        cam.replayed = 0
        cam.resumed = True

    def tracker(self, cam: Camera) -> AlertTracker | None:
        """The camera's alert rules (its subscription's, else the settings'), or None without rules."""
        sub = self.cameras.subscribed.get(cam.name)
        rules = sub.rules if sub is not None and sub.rules is not None else self.settings.alert_rules
        if not rules:
            return None
        tracker = AlertTracker(cam.name, rules, self.labels, self.settings.worker_id)
        if self.settings.evidence:
            tracker.evidence = self.settings.evidence_index(cam.name)
        return tracker

    async def read_once(self) -> None:
        """One turn of the reader task: resume, read, decode, queue."""
        now = time.monotonic()
        for cam in [c for c in self.cameras.values() if c.owned and not c.resumed]:
            if cam.quarantined_until > now:
                continue
            try:
                await self._resume(cam)
            except REDIS_ERRORS:
                raise
            except Exception as exc:  # its data is broken (a key of the wrong type...): the others go on
                if denied_command(exc) is not None:
                    raise
                cam.quarantined_until = now + QUARANTINE_SECONDS
                log.error(
                    "camera %s: cannot resume (retrying in %.0fs)", cam.name, QUARANTINE_SECONDS, exc_info=exc
                )
        queued = sum(len(c.pending) for c in self.cameras.values())
        room = self.settings.readahead_frames - queued  # the global read-ahead budget
        ready = [
            c for c in self.cameras.values() if c.owned and c.resumed and len(c.pending) < self.max_pending
        ]
        self.beat()
        if not ready or room <= 0:
            self.space.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.space.wait(), self.settings.block_ms / 1000)
            return
        count = max(1, min(self.settings.read_count, room // len(ready)))
        started = time.perf_counter()
        try:
            response = await self._read(ready, count)
        except ResponseError as exc:  # one key of another type fails the whole read: find it
            if "WRONGTYPE" not in str(exc):
                raise
            await self._drop_wrong_types(ready)
            return
        self.beat()
        if response:  # an empty reply is time spent waiting for frames, not reading them
            self.metrics.stage_seconds.labels("redis_read").inc(time.perf_counter() - started)
        by_stream = {cam.stream: cam for cam in ready}
        jobs: list[tuple[Camera, list[Checked]]] = []
        for stream, entries in response or []:
            owner = by_stream.get(text_of(stream))
            if owner is not None and owner.owned:
                jobs.append((owner, [self._check(owner, text_of(e), f) for e, f in entries]))
        if not jobs:
            return
        # Decoding runs off the event loop, each camera within its time budget per read.
        budget = self.settings.decode_budget_ms / 1000
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        decoded = await loop.run_in_executor(self.decode_pool, _decode_jobs, jobs, self.size, budget)
        took = time.perf_counter() - started
        self.metrics.stage_seconds.labels("decode").inc(took)
        self.capacity.busy("decode", took)
        for (cam, _), results in zip(jobs, decoded, strict=True):
            if not (cam.owned and cam.resumed):
                continue  # lost or dropped while decoding: the next owner reads these again
            for item, result in results:
                self._accept(cam, item, result)
        self.work.set()

    async def _read(self, ready: list[Camera], count: int) -> Any:
        if not self.settings.redis_cluster:
            return await self.redis.xread(
                {cam.stream: cam.cursor for cam in ready}, count=count, block=self.settings.block_ms
            )
        # A cluster refuses one command across shards: one non-blocking read per camera, pipelined.
        pipe = self.redis.pipeline(transaction=False)
        for cam in ready:
            pipe.xread({cam.stream: cam.cursor}, count=count)
        response = [item for reply in await pipe.execute() for item in (reply or [])]
        if not response:
            await asyncio.sleep(self.settings.block_ms / 1000)
        return response

    async def _drop_wrong_types(self, cameras: list[Camera]) -> None:
        """A camera's stream replaced by another type of key: that camera waits, the others go on."""
        for cam in cameras:
            kind = text_of(await self.redis.type(cam.stream))
            if kind != "stream":
                log.error(
                    "camera %s: %s is a %s, not a stream (retrying in %.0fs)",
                    cam.name,
                    cam.stream,
                    kind,
                    QUARANTINE_SECONDS,
                )
                self.cameras.drop_state(cam)
                cam.quarantined_until = time.monotonic() + QUARANTINE_SECONDS

    def _check(self, cam: Camera, entry_id: str, fields: dict[Any, Any]) -> Checked:
        """The cheap checks of one entry, before any pixel is decoded: an error, or the frame to decode."""
        try:
            ms, _ = id_key(entry_id)
            if ms < MIN_ENTRY_MS:
                raise MessageError(
                    "bad_entry_id", f"ID time {ms} ms is before 2001: use '*' IDs (or ms since the epoch)"
                )
            ahead = ms / 1000 - time.time()
            if ahead > self.settings.clock_ahead_seconds:
                raise MessageError(
                    "clock_ahead", f"ID time is {ahead:.0f}s ahead of the worker's clock (see the runbook)"
                )
            size = sum(len(v) for v in fields.values())
            if size > self.settings.max_frame_bytes:
                limit = self.settings.max_frame_bytes
                raise MessageError("too_large", f"entry is {size} bytes, limit {limit}")
            frame = Frame.from_fields(fields)
            if frame.camera != cam.name:
                raise MessageError("wrong_camera", f"frame names camera {frame.camera!r}")
            if (
                frame.capture_ms is not None
                and abs(frame.capture_ms - ms) > self.settings.capture_skew_seconds * 1000
            ):
                raise MessageError(
                    "bad_capture_time",
                    f"capture_ms {frame.capture_ms} is more than {self.settings.capture_skew_seconds:g}s "
                    "from the entry ID's time",
                )
            pixels = (
                self.settings.max_png_pixels if frame.encoding == "png" else self.settings.max_frame_pixels
            )
            return Checked(entry_id, ms, fields, frame, None, pixels)
        except MessageError as exc:
            return Checked(entry_id, 0, fields, None, exc, 0)

    def _accept(self, cam: Camera, item: Checked, result: np.ndarray | MessageError | None) -> None:
        """Queue one decoded entry's slot work, or dead-letter it; the camera's cursor moves past it."""
        entry_id = item.entry_id
        cam.cursor = entry_id
        self.metrics.frames_received.inc()
        cam.seen_at = time.monotonic()
        replay = id_key(entry_id) <= id_key(cam.committed)
        cam.replayed += replay
        self._clock_ahead(cam, isinstance(result, MessageError) and result.reason == "clock_ahead")
        if isinstance(result, MessageError) or result is None or item.frame is None:
            exc = result if isinstance(result, MessageError) else MessageError("undecodable", "no image")
            if not replay:  # a replayed entry was dead-lettered the first time round
                log.warning("camera %s entry %s dead-lettered: %s", cam.name, entry_id, exc)
                self.metrics.frames_deadlettered.labels(exc.reason).inc()
                self.dead_letters.append(
                    dead_letter(
                        cam.stream, cam.name, entry_id, item.fields, exc, worker=self.settings.worker_id
                    )
                )
            return
        capture = item.frame.capture_ms if item.frame.capture_ms is not None else item.ms
        work = self.cameras.timeline(cam).accept(item.ms, entry_id, result, capture)
        if work is None:
            self.metrics.frames_dropped.inc()
            return
        self.metrics.frames_repeated.inc(sum(1 for w in work if w.repeated))
        cam.pending.extend(work)

    def _clock_ahead(self, cam: Camera, ahead: bool) -> None:
        if ahead and not cam.ahead:
            log.error(
                "camera %s: its stream's entry IDs are ahead of the wall clock; every later frame is "
                "dead-lettered until the stream is deleted (runbook: deploy/README.md, 'Clock ahead')",
                cam.name,
            )
        if ahead != cam.ahead:
            cam.ahead = ahead
            self.metrics.cameras_clock_ahead.set(sum(1 for c in self.cameras.values() if c.ahead))
