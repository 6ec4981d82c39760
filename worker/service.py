"""The worker: frames in from Redis Streams, one batched model step per round, predictions out.

Four asyncio tasks share one event loop: the owner (heartbeat, leases, balance), the reader (XREAD
from each owned camera's position, decode, place frames on slots), the stepper (one slot per camera
per round, all cameras in one backend call run in a thread, so reading and decoding go on while the
model computes) and the control reader (subscriptions).

Exactly once: a prediction's entry ID is derived from its slot, so Redis refuses a second one; it is
published by a script that checks the camera's lease (fencing) and moves the camera's committed
position (its consumer group's last-delivered ID) in the same step. A camera picked up (start,
restart, takeover) replays its frames from the start of its current windows: the stream is the log,
and the windows are a pure function of it (see `camera.py`).
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
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.alerts import Alert
from schemas.messages import ControlMessage, DeadLetter, Frame, MessageError, Prediction
from worker.alerting import AlertTracker
from worker.backends import Backend
from worker.camera import CameraTimeline, Clock, SlotWork
from worker.codec import decode_image
from worker.config import Settings
from worker.labels import softmax
from worker.metrics import Metrics
from worker.ownership import PUBLISH, Ownership, assign
from worker.publishing import Row, dead_letter, id_key, make_prediction, script_args

log = logging.getLogger("movinet.worker")

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
# After a failed Redis call: wait this long, doubling up to the cap, then try again.
BACKOFF_START_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0


def _text(value: bytes | str) -> str:
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
    newest_ms: int = 0  # start of the newest slot published
    lag: float = 0.0  # wall clock minus newest_ms when it was published
    seen_at: float = dataclasses.field(default_factory=time.monotonic)
    alerts: AlertTracker | None = None  # rules and their state; None without rules
    pending_alerts: list[Alert] = dataclasses.field(default_factory=list)  # closes on going quiet


class Worker:
    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        labels: list[str],
        redis: Any,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.labels = labels
        self.redis = redis
        self.metrics = metrics or Metrics()
        self.ownership = Ownership(redis, settings)
        info = backend.info
        self.fps = settings.fps or info.fps
        self.window = settings.window or info.clip_frames
        self.size = (info.height, info.width)
        self.model_name = Path(info.source).name or info.source
        self.cameras: dict[str, Camera] = {}  # known: discovered or subscribed; owned ones hold state
        self.subscribed: dict[str, ControlMessage] = {}
        self.unsubscribed: set[str] = set()
        self.stopping = asyncio.Event()
        self._work = asyncio.Event()
        self._space = asyncio.Event()  # set by the stepper: queues have room to read into
        self._model_pool = ThreadPoolExecutor(1, "model")
        self._last_discovery = 0.0
        self._control_id = "0-0"
        self._dead_letters: list[DeadLetter] = []
        self._live: list[str] = []  # workers alive at the last heartbeat
        # Read no more for a camera with this many slots queued: the rest waits in Redis.
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
        """Serve until `request_stop`; then drain within the grace period, hand over and return."""
        self.metrics.up.set(1)
        tasks = [
            asyncio.create_task(self._guarded(self._own_once), name="owner"),
            asyncio.create_task(self._guarded(self._read_once), name="reader"),
            asyncio.create_task(self._guarded(self._control_once), name="control"),
        ]
        stepper = asyncio.create_task(self._step_loop(), name="stepper")
        stepper.add_done_callback(lambda _: self.request_stop())  # it only ends on stop, or on a bug
        await self.stopping.wait()
        self.metrics.up.set(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._work.set()
        try:
            await asyncio.wait_for(stepper, timeout=self.settings.grace_seconds)
        except asyncio.TimeoutError:
            log.warning("grace period over with work pending; the next owner replays it")
        if stepper.done() and not stepper.cancelled() and stepper.exception() is not None:
            raise RuntimeError("the model stepper failed") from stepper.exception()
        with contextlib.suppress(*REDIS_ERRORS, ResponseError):
            for name in list(self.ownership.held):
                await self.ownership.release(name)
            await self.ownership.deregister()
        self._model_pool.shutdown(wait=False)

    async def _guarded(self, once: Any) -> None:
        """Run `once` forever; Redis outages are waited out with capped exponential backoff."""
        delay = BACKOFF_START_SECONDS
        while not self.stopping.is_set():
            try:
                await once()
                delay = BACKOFF_START_SECONDS
            except (*REDIS_ERRORS, ResponseError) as exc:
                self.metrics.redis_errors.inc()
                log.warning("redis call failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    # ---- cameras and ownership -------------------------------------------------------------

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
                cam.name, cam.clock, self.window, self.settings.max_gap_slots, self.backend.init_state()
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

    async def _discover(self) -> None:
        now = time.monotonic()
        if not self.settings.discover or now - self._last_discovery < self.settings.discover_interval_seconds:
            return
        self._last_discovery = now
        pattern = self.settings.frames_key.format(camera="*")
        async for key in self.redis.scan_iter(match=pattern, count=1000):
            name = self.settings.camera_from_frames_key(_text(key))
            if name and name not in self.cameras and name not in self.unsubscribed:
                self._camera(name)

    async def _own_once(self) -> None:
        """Heartbeat, renew leases, and take or hand over cameras to match the shared assignment."""
        await self._discover()
        live = self._live = await self.ownership.heartbeat()
        for name in await self.ownership.renew():
            cam = self.cameras.get(name)
            log.warning("camera %s: lease lost; state dropped", name)
            self.metrics.leases_lost.inc()
            if cam is not None:
                cam.owned = False
                self._drop_state(cam)
        wanted = assign(list(self.cameras), live)
        for name, cam in self.cameras.items():
            mine = wanted.get(name) == self.settings.worker_id
            if mine and not cam.owned and await self.ownership.acquire(name):
                cam.owned, cam.resumed, cam.release = True, False, False
                cam.acquired_at = time.monotonic()
                self.metrics.leases_acquired.inc()
                log.info("camera %s: lease acquired", name)
            elif cam.owned and not mine:
                cam.release = True  # the stepper hands it over between two rounds
                self._work.set()
        self._evict_idle()
        self.metrics.cameras_owned.set(sum(1 for c in self.cameras.values() if c.owned))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), self.settings.heartbeat_seconds)

    async def _hand_over(self) -> None:
        for cam in self.cameras.values():
            if cam.release and cam.owned:
                cam.owned, cam.release = False, False
                self._drop_state(cam)
                await self.ownership.release(cam.name)
                self.metrics.cameras_owned.set(sum(1 for c in self.cameras.values() if c.owned))
                log.info("camera %s handed over", cam.name)

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
            (_text(g["last-delivered-id"]) for g in groups if _text(g["name"]) == self.settings.group), "0-0"
        )
        last = await self.redis.xrevrange(cam.out, count=1)
        previous = Prediction.from_fields(last[0][1]) if last else None
        cam.published_slot = previous.slot if previous else None
        cam.timeline = None
        cam.pending.clear()
        timeline = self._timeline(cam)
        cam.cursor = cam.committed
        if previous is not None:
            first_slot = timeline.replay_start_slot(previous.slot + 1)
            replay_from = (max(cam.clock.start_ms(first_slot), 1) - 1, 2**63 - 1)
            if replay_from < id_key(cam.committed):
                cam.cursor = f"{replay_from[0]}-{replay_from[1]}"
            if previous.worker != self.settings.worker_id and previous.worker not in self._live:
                self.metrics.leases_taken_over.inc()  # from a worker that died, not one that handed over
        cam.alerts = self._tracker(cam)
        if cam.alerts is not None:
            cam.alerts.load(await self.redis.get(self.settings.alert_state(cam.name)))
        cam.replayed = 0
        cam.resumed = True

    def _tracker(self, cam: Camera) -> AlertTracker | None:
        sub = self.subscribed.get(cam.name)
        rules = sub.rules if sub is not None and sub.rules is not None else self.settings.alert_rules
        if not rules:
            return None
        return AlertTracker(cam.name, rules, self.labels, self.settings.worker_id)

    def _evict_idle(self) -> None:
        now = time.monotonic()
        for cam in self.cameras.values():
            idle = now - cam.seen_at > self.settings.idle_timeout_seconds
            if cam.timeline is not None and not cam.pending and idle:
                log.info("camera %s idle for %.0fs: state freed", cam.name, now - cam.seen_at)
                if cam.alerts is not None and cam.owned:
                    cam.pending_alerts.extend(cam.alerts.close_all(cam.timeline.stepped_slot or 0))
                    self._work.set()
                cam.timeline = None
                self.metrics.forget_camera(cam.name)
        self._count_active()

    # ---- reading ---------------------------------------------------------------------------

    async def _read_once(self) -> None:
        for cam in list(self.cameras.values()):
            if cam.owned and not cam.resumed:
                await self._resume(cam)
        ready = [
            c for c in self.cameras.values() if c.owned and c.resumed and len(c.pending) < self._max_pending
        ]
        if not ready:
            self._space.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._space.wait(), self.settings.block_ms / 1000)
            return
        if self.settings.redis_cluster:
            # A cluster refuses one command across shards: one non-blocking read per camera, pipelined.
            pipe = self.redis.pipeline(transaction=False)
            for cam in ready:
                pipe.xread({cam.stream: cam.cursor}, count=self.settings.read_count)
            replies = await pipe.execute()
            response = [item for reply in replies for item in (reply or [])]
            if not response:
                await asyncio.sleep(self.settings.block_ms / 1000)
        else:
            response = await self.redis.xread(
                {cam.stream: cam.cursor for cam in ready},
                count=self.settings.read_count,
                block=self.settings.block_ms,
            )
        by_stream = {cam.stream: cam for cam in ready}
        for stream, entries in response or []:
            owner = by_stream.get(_text(stream))
            if owner is None or not owner.owned:
                continue
            for entry_id, fields in entries:
                self._ingest(owner, _text(entry_id), fields)
        self._work.set()

    def _ingest(self, cam: Camera, entry_id: str, fields: dict[Any, Any]) -> None:
        """Validate and decode one entry and queue its slot work; bad entries go to the dead letters."""
        cam.cursor = entry_id
        self.metrics.frames_received.inc()
        cam.seen_at = time.monotonic()
        replay = id_key(entry_id) <= id_key(cam.committed)
        cam.replayed += replay
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
            if not replay:  # a replayed entry was dead-lettered the first time round
                log.warning("camera %s entry %s dead-lettered: %s", cam.name, entry_id, exc)
                self.metrics.frames_deadlettered.labels(exc.reason).inc()
                self._dead_letters.append(
                    dead_letter(cam.stream, cam.name, entry_id, fields, exc, worker=self.settings.worker_id)
                )
            return
        ms = int(entry_id.split("-", 1)[0])
        work = self._timeline(cam).accept(ms, entry_id, image, frame.capture_ms or ms)
        if work is None:
            self.metrics.frames_dropped.inc()
            return
        self.metrics.frames_repeated.inc(sum(1 for w in work if w.repeated))
        cam.pending.extend(work)

    # ---- control ---------------------------------------------------------------------------

    async def _control_once(self) -> None:
        response = await self.redis.xread(
            {self.settings.control_stream: self._control_id}, count=500, block=1000
        )
        for _, entries in response or []:
            for entry_id, fields in entries:
                self._control_id = _text(entry_id)
                try:
                    self._apply_control(ControlMessage.from_fields(fields))
                except MessageError as exc:
                    log.warning("control entry %s rejected: %s", self._control_id, exc)
                    self.metrics.frames_deadlettered.labels(exc.reason).inc()
                    stream = self.settings.control_stream
                    self._dead_letters.append(
                        dead_letter(stream, "", self._control_id, fields, exc, worker=self.settings.worker_id)
                    )
                    self._work.set()

    def _apply_control(self, msg: ControlMessage) -> None:
        if msg.action == "subscribe":
            self.subscribed[msg.camera] = msg
            self.unsubscribed.discard(msg.camera)
            cam = self._camera(msg.camera)
            if msg.top_k:
                cam.top_k = msg.top_k
            if msg.rules is not None and cam.resumed:  # new rules from the next slot on, state kept
                old = cam.alerts
                cam.alerts = self._tracker(cam)
                if cam.alerts is not None and old is not None:
                    cam.alerts.load(old.dump())
            log.info("camera %s subscribed", msg.camera)
        else:
            self.subscribed.pop(msg.camera, None)
            self.unsubscribed.add(msg.camera)
            known = self.cameras.get(msg.camera)
            if known is not None:
                known.release = True  # the stepper drops it between two rounds
                self._work.set()
                log.info("camera %s unsubscribed", msg.camera)

    # ---- stepping and publishing -----------------------------------------------------------

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._hand_over()
            for name in [n for n in self.unsubscribed if n in self.cameras and not self.cameras[n].owned]:
                del self.cameras[name]
            batch = [cam.pending.popleft() for cam in self.cameras.values() if cam.owned and cam.pending]
            if not batch:
                if self._dead_letters or any(c.pending_alerts for c in self.cameras.values()):
                    await self._publish_retrying([])
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
            rows: list[tuple[Camera, Row]] = []
            for i, work in enumerate(batch):
                owner = self.cameras.get(work.camera)
                if owner is None or owner.timeline is None or not owner.owned:
                    continue  # lost or dropped while stepping
                chosen = owner.timeline.advance(work.slot, new_states[2 * i : 2 * i + 2])
                index = 2 * i + owner.timeline.windows.index(chosen)
                row = Row(work, chosen.start_slot, chosen.frames, logits[index])
                if owner.alerts is not None and (
                    owner.published_slot is None or work.slot > owner.published_slot
                ):
                    start, end = owner.clock.start_ms(work.slot), owner.clock.end_ms(work.slot)
                    row.alerts = owner.alerts.evaluate(work.slot, start, end, softmax(row.logits))
                rows.append((owner, row))
            await self._publish_retrying(rows)
            self._space.set()

    def _step(self, images: np.ndarray, states: list[Any]) -> tuple[np.ndarray, list[Any]]:
        frames = images.astype(np.float32)
        frames *= 1.0 / 255.0
        return self.backend.step(frames[:, None], states)

    async def _publish_retrying(self, rows: list[tuple[Camera, Row]]) -> None:
        delay = BACKOFF_START_SECONDS
        while True:
            try:
                await self._publish(rows)
                return
            except REDIS_ERRORS as exc:
                self.metrics.redis_errors.inc()
                log.warning("publish failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    async def _publish(self, rows: list[tuple[Camera, Row]]) -> None:
        """Per camera one fenced script: predictions in, committed position forward; then dead letters."""
        now_ms = int(time.time() * 1000)
        per_camera: dict[str, tuple[Camera, list[Row]]] = {}
        for cam, row in rows:
            per_camera.setdefault(cam.name, (cam, []))[1].append(row)
        for cam in self.cameras.values():
            if cam.pending_alerts and cam.owned:
                per_camera.setdefault(cam.name, (cam, []))
        pipe = self.redis.pipeline(transaction=False)
        calls: list[tuple[Camera, list[tuple[Row, Prediction]], list[Alert]]] = []
        for cam, cam_rows in per_camera.values():
            token = self.ownership.held.get(cam.name)
            if token is None:
                continue
            fresh = [r for r in cam_rows if cam.published_slot is None or r.work.slot > cam.published_slot]
            made = [
                (
                    r,
                    make_prediction(
                        r,
                        cam.name,
                        cam.clock,
                        self.labels,
                        k=cam.top_k,
                        model=self.model_name,
                        worker=self.settings.worker_id,
                    ),
                )
                for r in fresh
            ]
            # Everything read is done once nothing is queued; otherwise up to the last slot published.
            ids = [e for r in cam_rows for e in r.work.entry_ids]
            commit = cam.cursor if not cam.pending else max(ids, key=id_key, default="")
            if commit and id_key(commit) <= id_key(cam.committed):
                commit = ""
            events = cam.pending_alerts + [a for r in cam_rows for a in r.alerts]
            # Keep the input history a takeover replays (and more), drop what is older.
            trim, keep = "", int(self.settings.input_retention_seconds * 1000)
            if commit and keep:
                trim = str(max(0, id_key(commit)[0] - keep))
            args = script_args(
                token,
                self.settings.group,
                self.settings.predictions_maxlen,
                commit=commit,
                trim=trim,
                predictions=[p for _, p in made],
                alert_state=cam.alerts.dump() if cam.alerts is not None else "",
                alerts_maxlen=self.settings.alerts_maxlen,
                alerts=events,
            )
            keys = (
                cam.out,
                cam.stream,
                self.settings.alert_state(cam.name),
                self.settings.alerts_stream(cam.name),
            )
            pipe.eval(PUBLISH, 5, self.settings.owner(cam.name), *keys, *args)
            calls.append((cam, made, events))
        letters = list(self._dead_letters)
        for letter in letters:
            pipe.xadd(
                self.settings.deadletter_stream,
                letter.to_fields(),
                maxlen=self.settings.deadletter_maxlen,
                approximate=True,
            )
        results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, REDIS_ERRORS):
                raise result
        del self._dead_letters[: len(letters)]
        for (cam, made, events), result in zip(calls, results, strict=False):
            if isinstance(result, Exception):
                log.warning("camera %s: publish failed: %s", cam.name, result)
                continue
            if result == -1:  # fenced: the lease is gone, another worker owns the camera
                log.warning("camera %s: lease lost while publishing; dropping it", cam.name)
                self.metrics.leases_lost.inc()
                self.ownership.held.pop(cam.name, None)
                cam.owned = False
                self._drop_state(cam)
                continue
            cam.pending_alerts.clear()
            for event in events:
                if event.event == "open":
                    self.metrics.alerts_opened.labels(event.rule).inc()
                elif event.event == "close":
                    self.metrics.alerts_closed.labels(event.rule).inc()
                log.info("alert %s %s (%s %.3f)", event.event, event.alert_id, event.label, event.score)
            for (row, prediction), ok in zip(made, result, strict=False):
                cam.published_slot = max(cam.published_slot or row.work.slot, row.work.slot)
                if not ok:
                    continue  # that slot was published before
                self._observe(cam, row, prediction, now_ms)
            if made and cam.acquired_at:
                self.metrics.takeover_replay_frames.inc(cam.replayed)
                self.metrics.takeover_replay_seconds.observe(time.monotonic() - cam.acquired_at)
                cam.acquired_at = 0.0
        self.metrics.input_lag_total.set(sum(c.lag for c in self.cameras.values() if c.timeline is not None))
        self._count_alerts()

    def _count_alerts(self) -> None:
        active: dict[str, int] = {}
        for cam in self.cameras.values():
            for rule, is_open in cam.alerts.active.items() if cam.alerts else ():
                active[rule] = active.get(rule, 0) + is_open
        for rule, count in active.items():
            self.metrics.alerts_active.labels(rule).set(count)

    def _observe(self, cam: Camera, row: Row, prediction: Prediction, now_ms: int) -> None:
        self.metrics.predictions.inc()
        if not row.work.repeated:
            self.metrics.latency.observe(max(0.0, (now_ms - row.work.capture_ms) / 1000))
        if now_ms > prediction.end_ms + (prediction.end_ms - prediction.start_ms):
            self.metrics.slots_late.inc()
        cam.newest_ms = max(cam.newest_ms, prediction.start_ms)
        cam.lag = max(0.0, (now_ms - cam.newest_ms) / 1000)
        self.metrics.input_lag.labels(cam.name).set(cam.lag)
