"""The worker: frames in from Redis Streams, one batched model step per round, predictions out.

Three asyncio tasks share one event loop: the reader (XREADGROUP over every camera's stream, decode,
place frames on slots), the stepper (one slot per camera per round, all cameras in one backend call
run in a thread, so reading and decoding go on while the model computes) and the control reader
(subscriptions). Entries are acknowledged in the same pipeline that publishes their predictions.

Exactly once: a prediction's entry ID is derived from its slot, so Redis itself refuses a second
one, and a camera picked up again (restart) replays its frames from the start of its current
windows: the stream is the log, and the windows are a pure function of it (see `camera.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.messages import (
    ControlMessage,
    DeadLetter,
    Frame,
    MessageError,
    Prediction,
    TopLabel,
    field_sizes,
)
from worker.backends import Backend
from worker.camera import CameraTimeline, Clock, SlotWork
from worker.codec import decode_image
from worker.config import Settings
from worker.labels import softmax, top_k
from worker.metrics import Metrics

log = logging.getLogger("movinet.worker")

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
# After a failed Redis call: wait this long, doubling up to the cap, then try again.
BACKOFF_START_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0


def _ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclasses.dataclass
class Camera:
    name: str
    stream: str
    out: str
    clock: Clock
    top_k: int
    timeline: CameraTimeline | None = None
    pending: deque[SlotWork] = dataclasses.field(default_factory=deque)
    published_slot: int | None = None  # last slot with a prediction in the output stream
    newest_ms: int = 0  # start of the newest slot published
    lag: float = 0.0  # wall clock minus newest_ms when it was published
    seen_at: float = dataclasses.field(default_factory=time.monotonic)
    resumed: bool = False
    drop_acks: list[str] = dataclasses.field(default_factory=list)


class Worker:
    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        labels: list[str],
        redis: aioredis.Redis,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.labels = labels
        self.redis = redis
        self.metrics = metrics or Metrics()
        info = backend.info
        self.fps = settings.fps or info.fps
        self.window = settings.window or info.clip_frames
        self.size = (info.height, info.width)
        self.model_name = Path(info.source).name or info.source
        self.cameras: dict[str, Camera] = {}
        self.subscribed: dict[str, ControlMessage] = {}
        self.unsubscribed: set[str] = set()
        self.stopping = asyncio.Event()
        self._work = asyncio.Event()
        self._model_pool = ThreadPoolExecutor(1, "model")
        self._last_discovery = 0.0
        self._control_id = "0-0"
        self._dead_letters: list[tuple[str, str, DeadLetter]] = []
        self._space = asyncio.Event()  # set by the stepper: queues have room to read into
        # Read no more for a camera with this many slots queued: the rest waits in Redis, unacked.
        self._max_pending = 2 * settings.read_count

    # ---- lifecycle -------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stop requested: finishing the slot in flight")
            self.stopping.set()
            self._work.set()

    async def run(self) -> None:
        """Serve until `request_stop`; then drain within the grace period and return."""
        self.metrics.up.set(1)
        reader = asyncio.create_task(self._guarded(self._read_once), name="reader")
        control = asyncio.create_task(self._guarded(self._control_once), name="control")
        stepper = asyncio.create_task(self._step_loop(), name="stepper")
        await self.stopping.wait()
        self.metrics.up.set(0)
        for task in (reader, control):
            task.cancel()
        await asyncio.gather(reader, control, return_exceptions=True)
        self._work.set()
        try:
            await asyncio.wait_for(stepper, timeout=self.settings.grace_seconds)
        except asyncio.TimeoutError:
            log.warning("grace period over with work pending; unacknowledged frames stay in Redis")
        self._model_pool.shutdown(wait=False)

    async def _guarded(self, once: Any) -> None:
        """Run `once` forever; Redis outages are waited out with capped exponential backoff."""
        delay = BACKOFF_START_SECONDS
        while not self.stopping.is_set():
            try:
                await once()
                delay = BACKOFF_START_SECONDS
            except REDIS_ERRORS as exc:
                self.metrics.redis_errors.inc()
                log.warning("redis unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)
            except ResponseError as exc:
                # A stream or group deleted under us (NOGROUP): join again and replay.
                self.metrics.redis_errors.inc()
                log.warning("redis refused a call (%s); re-joining camera streams", exc)
                for cam in self.cameras.values():
                    cam.resumed = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    # ---- cameras ---------------------------------------------------------------------------

    def _camera(self, name: str) -> Camera:
        cam = self.cameras.get(name)
        if cam is None:
            sub = self.subscribed.get(name)
            fps = sub.fps if sub and sub.fps else self.fps
            cam = Camera(
                name=name,
                stream=self.settings.frames_stream(name),
                out=self.settings.predictions_stream(name),
                clock=Clock.of(fps),
                top_k=sub.top_k if sub and sub.top_k else self.settings.top_k,
            )
            self.cameras[name] = cam
        return cam

    def _timeline(self, cam: Camera) -> CameraTimeline:
        if cam.timeline is None:
            cam.timeline = CameraTimeline(
                cam.name, cam.clock, self.window, self.settings.max_gap_slots, self.backend.init_state()
            )
        return cam.timeline

    async def _discover(self) -> None:
        now = time.monotonic()
        if not self.settings.discover or now - self._last_discovery < self.settings.discover_interval_seconds:
            return
        self._last_discovery = now
        pattern = self.settings.frames_key.format(camera="*")
        async for key in self.redis.scan_iter(match=pattern, _type="stream", count=1000):
            name = self.settings.camera_from_frames_key(_text(key))
            if name and name not in self.cameras and name not in self.unsubscribed:
                self._camera(name)

    async def _resume(self, cam: Camera) -> None:
        """Join the consumer group and rebuild the windows from the stream (restart, takeover)."""
        start = "0" if self.settings.start_from == "all" else "$"
        try:
            await self.redis.xgroup_create(cam.stream, self.settings.group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        last = await self.redis.xrevrange(cam.out, count=1)
        if last:
            cam.published_slot = Prediction.from_fields(last[0][1]).slot
        delivered = "0-0"
        groups = await self.redis.xinfo_groups(cam.stream)
        for group in groups:
            if _text(group["name"]) == self.settings.group:
                delivered = _text(group["last-delivered-id"])
        if delivered == "0-0":
            cam.resumed = True
            return
        if cam.published_slot is not None:
            first_slot = self._timeline(cam).replay_start_slot(cam.published_slot + 1)
            start_id = f"{max(cam.clock.start_ms(first_slot), 0)}-0"
        else:
            pending = await self.redis.xpending(cam.stream, self.settings.group)
            if not pending or not pending.get("min"):
                cam.resumed = True
                return
            start_id = _text(pending["min"])
        replayed = 0
        while True:
            batch = await self.redis.xrange(cam.stream, min=start_id, max=delivered, count=500)
            for entry_id, fields in batch:
                self._ingest(cam, _text(entry_id), fields, replay=True)
                replayed += 1
            if len(batch) < 500:
                break
            start_id = "(" + _text(batch[-1][0])
        cam.resumed = True
        if replayed:
            log.info("camera %s: replayed %d entries up to %s", cam.name, replayed, delivered)

    def _evict_idle(self) -> None:
        now = time.monotonic()
        for cam in self.cameras.values():
            idle = now - cam.seen_at > self.settings.idle_timeout_seconds
            if cam.timeline is not None and not cam.pending and idle:
                log.info("camera %s idle for %.0fs: state freed", cam.name, now - cam.seen_at)
                cam.timeline = None
                self.metrics.forget_camera(cam.name)
        self.metrics.cameras.set(sum(1 for c in self.cameras.values() if c.timeline is not None))

    # ---- reading ---------------------------------------------------------------------------

    async def _read_once(self) -> None:
        await self._discover()
        self._evict_idle()
        for cam in list(self.cameras.values()):
            if not cam.resumed:
                await self._resume(cam)
                self._work.set()
        streams = {
            cam.stream: ">"
            for cam in self.cameras.values()
            if cam.resumed and len(cam.pending) < self._max_pending
        }
        if not streams:
            # Nothing to read (no cameras, or all queues full): wait for room or the next look.
            self._space.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._space.wait(), self.settings.block_ms / 1000)
            return
        response = await self.redis.xreadgroup(
            self.settings.group,
            self.settings.worker_id,
            streams,
            count=self.settings.read_count,
            block=self.settings.block_ms,
        )
        by_stream = {cam.stream: cam for cam in self.cameras.values()}
        for stream, entries in response or []:
            owner = by_stream.get(_text(stream))
            if owner is None:
                continue
            for entry_id, fields in entries:
                self._ingest(owner, _text(entry_id), fields, replay=False)
        self._work.set()

    def _ingest(self, cam: Camera, entry_id: str, fields: dict[Any, Any], replay: bool) -> None:
        """Validate and decode one entry and queue its slot work; bad entries go to the dead letters."""
        self.metrics.frames_received.inc()
        cam.seen_at = time.monotonic()
        ms = _ms(entry_id)
        try:
            size = sum(len(v) for v in fields.values())
            if size > self.settings.max_frame_bytes:
                limit = self.settings.max_frame_bytes
                raise MessageError("too_large", f"entry is {size} bytes, limit {limit}")
            frame = Frame.from_fields(fields)
            if frame.camera != cam.name:
                raise MessageError("wrong_camera", f"frame names camera {frame.camera!r}")
            image = decode_image(frame, self.size, self.settings.max_frame_pixels)
        except MessageError as exc:
            already = replay and cam.published_slot is not None and cam.clock.slot(ms) <= cam.published_slot
            if not already:
                self._dead_letter(cam, entry_id, fields, exc)
            return
        work = self._timeline(cam).accept(ms, entry_id, image, frame.capture_ms or ms)
        if work is None:
            self.metrics.frames_dropped.inc()
            cam.drop_acks.append(entry_id)
            return
        self.metrics.frames_repeated.inc(sum(1 for w in work if w.repeated))
        cam.pending.extend(work)

    def _dead_letter(self, cam: Camera, entry_id: str, fields: dict[Any, Any], exc: MessageError) -> None:
        log.warning("camera %s entry %s dead-lettered: %s", cam.name, entry_id, exc)
        self.metrics.frames_deadlettered.labels(exc.reason).inc()
        letter = DeadLetter(
            stream=cam.stream,
            entry_id=entry_id,
            camera=cam.name,
            reason=exc.reason,
            detail=exc.detail,
            worker=self.settings.worker_id,
            at_ms=int(time.time() * 1000),
            fields=field_sizes(fields),
        )
        self._dead_letters.append((cam.stream, entry_id, letter))

    # ---- control ---------------------------------------------------------------------------

    async def _control_once(self) -> None:
        response = await self.redis.xread(
            {self.settings.control_stream: self._control_id}, count=500, block=1000
        )
        for _, entries in response or []:
            for entry_id, fields in entries:
                self._control_id = _text(entry_id)
                try:
                    msg = ControlMessage.from_fields(fields)
                except MessageError as exc:
                    log.warning("control entry %s rejected: %s", self._control_id, exc)
                    self.metrics.frames_deadlettered.labels(exc.reason).inc()
                    await self.redis.xadd(
                        self.settings.deadletter_stream,
                        DeadLetter(
                            stream=self.settings.control_stream,
                            entry_id=self._control_id,
                            camera="",
                            reason=exc.reason,
                            detail=exc.detail,
                            worker=self.settings.worker_id,
                            at_ms=int(time.time() * 1000),
                            fields=field_sizes(fields),
                        ).to_fields(),
                        maxlen=self.settings.deadletter_maxlen,
                        approximate=True,
                    )
                    continue
                self._apply_control(msg)

    def _apply_control(self, msg: ControlMessage) -> None:
        if msg.action == "subscribe":
            self.subscribed[msg.camera] = msg
            self.unsubscribed.discard(msg.camera)
            cam = self.cameras.get(msg.camera)
            if cam is not None:  # new options apply from now on
                if msg.top_k:
                    cam.top_k = msg.top_k
            else:
                self._camera(msg.camera)
            log.info("camera %s subscribed", msg.camera)
        else:
            self.subscribed.pop(msg.camera, None)
            self.unsubscribed.add(msg.camera)
            if self.cameras.pop(msg.camera, None) is not None:
                self.metrics.forget_camera(msg.camera)
                log.info("camera %s unsubscribed: state freed", msg.camera)

    # ---- stepping and publishing -----------------------------------------------------------

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [cam.pending.popleft() for cam in self.cameras.values() if cam.pending]
            if not batch:
                if self._dead_letters or any(c.drop_acks for c in self.cameras.values()):
                    await self._publish([], [])
                if self.stopping.is_set():
                    return
                self._work.clear()
                await self._work.wait()
                continue
            states: list[Any] = []
            images = np.empty((2 * len(batch), *self.size, 3), np.uint8)
            for i, work in enumerate(batch):
                timeline = self.cameras[work.camera].timeline
                assert timeline is not None
                states.extend(timeline.states_for(work))
                images[2 * i] = images[2 * i + 1] = work.image
            started = time.perf_counter()
            logits, new_states = await loop.run_in_executor(self._model_pool, self._step, images, states)
            self.metrics.step_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(states))
            self.metrics.frames_stepped.inc(len(states))
            rows = []
            for i, work in enumerate(batch):
                cam = self.cameras.get(work.camera)
                if cam is None or cam.timeline is None:
                    continue  # unsubscribed while stepping
                chosen = cam.timeline.advance(work.slot, new_states[2 * i : 2 * i + 2])
                index = 2 * i + cam.timeline.windows.index(chosen)
                rows.append((cam, work, chosen.start_slot, chosen.frames, logits[index]))
            await self._publish_retrying(rows, batch)
            self._space.set()

    def _step(self, images: np.ndarray, states: list[Any]) -> tuple[np.ndarray, list[Any]]:
        frames = images.astype(np.float32)
        frames *= 1.0 / 255.0
        return self.backend.step(frames[:, None], states)

    async def _publish_retrying(self, rows: list[Any], batch: list[SlotWork]) -> None:
        delay = BACKOFF_START_SECONDS
        while True:
            try:
                await self._publish(rows, batch)
                return
            except REDIS_ERRORS as exc:
                self.metrics.redis_errors.inc()
                log.warning("publish failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    async def _publish(self, rows: list[Any], batch: list[SlotWork]) -> None:
        """Predictions, acks and dead letters in one pipeline: a frame is acked once its slot is out."""
        pipe = self.redis.pipeline(transaction=False)
        now_ms = int(time.time() * 1000)
        published: list[tuple[Camera, SlotWork]] = []
        acks: dict[str, list[str]] = {}
        for cam, work, start_slot, frames, row in rows:
            cam.newest_ms = max(cam.newest_ms, cam.clock.start_ms(work.slot))
            acks.setdefault(cam.stream, []).extend(work.entry_ids)
            if cam.published_slot is not None and work.slot <= cam.published_slot:
                continue  # replayed to rebuild state; published before
            top = top_k(softmax(row), self.labels, cam.top_k)
            prediction = Prediction(
                camera=cam.name,
                slot=work.slot,
                start_ms=cam.clock.start_ms(work.slot),
                end_ms=cam.clock.end_ms(work.slot),
                window_start_ms=cam.clock.start_ms(start_slot),
                frames=frames,
                repeated=work.repeated,
                capture_ms=work.capture_ms,
                model=self.model_name,
                worker=self.settings.worker_id,
                top=[TopLabel(label=label, score=min(max(score, 0.0), 1.0)) for label, score in top],
            )
            pipe.xadd(
                cam.out,
                prediction.to_fields(),
                id=f"{prediction.start_ms}-0",
                maxlen=self.settings.predictions_maxlen,
                approximate=True,
            )
            published.append((cam, work))
        for cam in self.cameras.values():
            if cam.drop_acks:
                acks.setdefault(cam.stream, []).extend(cam.drop_acks)
        letters = list(self._dead_letters)
        for stream, entry_id, letter in letters:
            pipe.xadd(
                self.settings.deadletter_stream,
                letter.to_fields(),
                maxlen=self.settings.deadletter_maxlen,
                approximate=True,
            )
            acks.setdefault(stream, []).append(entry_id)
        for stream, ids in acks.items():
            if ids:
                pipe.xack(stream, self.settings.group, *ids)
        results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, REDIS_ERRORS):
                raise result
        # Only now is the work durable: forget what was sent.
        del self._dead_letters[: len(letters)]
        for cam in self.cameras.values():
            cam.drop_acks.clear()
        for (cam, work), result in zip(published, results, strict=False):
            if isinstance(result, ResponseError):
                log.debug("camera %s slot %d already published", cam.name, work.slot)
                continue
            cam.published_slot = work.slot
            self.metrics.predictions.inc()
            if not work.repeated:
                self.metrics.latency.observe(max(0.0, (now_ms - work.capture_ms) / 1000))
            if now_ms > cam.clock.end_ms(work.slot + 1):
                self.metrics.slots_late.inc()
        for cam, _ in published:
            cam.lag = max(0.0, (now_ms - cam.newest_ms) / 1000)
            self.metrics.input_lag.labels(cam.name).set(cam.lag)
        self.metrics.input_lag_total.set(sum(c.lag for c in self.cameras.values() if c.timeline is not None))
