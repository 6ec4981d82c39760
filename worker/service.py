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
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from redis.exceptions import ResponseError

from schemas.messages import ControlMessage, DeadLetter, MessageError
from worker.backends import Backend
from worker.config import Settings
from worker.intake import Intake
from worker.labels import softmax
from worker.metrics import Metrics
from worker.ownership import Ownership, assign
from worker.publishing import Publishing, Row, dead_letter
from worker.runtime import BACKOFF_MAX_SECONDS, BACKOFF_START_SECONDS, REDIS_ERRORS, Camera, log, text_of


class Worker(Intake, Publishing):
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
        self.ema_frames, self.ema_replay = settings.ema_plan(self.window)
        self.per_slot = 1 if self.ema_frames else 2  # model steps per camera per slot
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
        keeper = asyncio.create_task(self._keep_leases(), name="leases")  # the drain may outlast a lease
        try:
            await asyncio.wait_for(stepper, timeout=self.settings.grace_seconds)
        except asyncio.TimeoutError:
            log.warning("grace period over with work pending; the next owner replays it")
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
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

    async def _discover(self) -> None:
        now = time.monotonic()
        if not self.settings.discover or now - self._last_discovery < self.settings.discover_interval_seconds:
            return
        self._last_discovery = now
        pattern = self.settings.frames_key.format(camera="*")
        async for key in self.redis.scan_iter(match=pattern, count=1000):
            name = self.settings.camera_from_frames_key(text_of(key))
            if name and name not in self.cameras and name not in self.unsubscribed:
                self._camera(name)

    async def _renew(self) -> None:
        for name in await self.ownership.renew():
            cam = self.cameras.get(name)
            log.warning("camera %s: lease lost; state dropped", name)
            self.metrics.leases_lost.inc()
            if cam is not None:
                cam.owned = False
                self._drop_state(cam)

    async def _keep_leases(self) -> None:
        """While draining after a stop: only renew the leases, so the slots in flight stay ours to publish."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                await self._renew()
            except (*REDIS_ERRORS, ResponseError) as exc:
                log.warning("lease renewal failed while draining (%s)", exc)

    async def _own_once(self) -> None:
        """Heartbeat, renew leases, and take or hand over cameras to match the shared assignment."""
        await self._discover()
        live = await self.ownership.heartbeat()
        await self._renew()
        wanted = assign(list(self.cameras), live)
        for name, cam in self.cameras.items():
            mine = wanted.get(name) == self.settings.worker_id
            if mine and not cam.owned:
                taken, unreleased = await self.ownership.acquire(name)
                if not taken:
                    continue
                cam.owned, cam.resumed, cam.release = True, False, False
                cam.acquired_at = time.monotonic()
                self.metrics.leases_acquired.inc()
                if unreleased:  # its holder died or stalled instead of handing it over
                    self.metrics.leases_taken_over.inc()
                log.info("camera %s: lease acquired%s", name, f" from {unreleased}" if unreleased else "")
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

    async def _control_once(self) -> None:
        response = await self.redis.xread(
            {self.settings.control_stream: self._control_id}, count=500, block=1000
        )
        for _, entries in response or []:
            for entry_id, fields in entries:
                self._control_id = text_of(entry_id)
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
        """Rounds of one slot per owned camera; a round's publish overlaps the next round's model step.

        At most one publish is in flight, so predictions reach Redis in order; hand-overs and the
        final drain wait for it, so a lease is never released with the camera's output unwritten.
        """
        publishing: asyncio.Task[None] | None = None
        try:
            while True:
                if publishing is not None and (
                    self.stopping.is_set() or any(c.release for c in self.cameras.values())
                ):
                    await publishing
                    publishing = None
                await self._hand_over()
                for name in [n for n in self.unsubscribed if n in self.cameras and not self.cameras[n].owned]:
                    del self.cameras[name]
                batch = [cam.pending.popleft() for cam in self.cameras.values() if cam.owned and cam.pending]
                if not batch:
                    if publishing is not None:
                        await publishing
                        publishing = None
                        continue
                    if self._dead_letters or any(c.pending_alerts for c in self.cameras.values()):
                        await self._publish_retrying([])
                    if self.stopping.is_set():
                        return
                    self._work.clear()
                    await self._work.wait()
                    continue
                rows = await self._round(batch)
                if publishing is not None:
                    await publishing
                publishing = asyncio.create_task(self._publish_round(rows))
        finally:
            if publishing is not None and not publishing.done():
                publishing.cancel()

    async def _round(self, batch: list[Any]) -> list[tuple[Camera, Row]]:
        """Step one slot of each camera in `batch` (in the model thread) and turn the results into rows."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        per = self.per_slot
        states: list[Any] = []
        images = np.empty((per * len(batch), *self.size, 3), np.uint8)
        for i, work in enumerate(batch):
            cam = self.cameras[work.camera]
            assert cam.timeline is not None
            cam.in_model += 1
            states.extend(cam.timeline.states_for(work))
            images[per * i : per * i + per] = work.image
        self.metrics.stage_seconds.labels("state").inc(time.perf_counter() - started)
        started = time.perf_counter()
        try:
            logits, new_states = await loop.run_in_executor(self._model_pool, self._step, images, states)
        finally:
            for work in batch:
                if work.camera in self.cameras:
                    self.cameras[work.camera].in_model -= 1
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        advanced = time.perf_counter()
        self.metrics.batch_size.observe(len(states))
        self.metrics.frames_stepped.inc(len(states))
        rows: list[tuple[Camera, Row]] = []
        probs = softmax(logits)  # one call for the whole round
        for i, work in enumerate(batch):
            owner = self.cameras.get(work.camera)
            if owner is None or owner.timeline is None or not owner.owned:
                continue  # lost or dropped while stepping
            chosen = owner.timeline.advance(work.slot, new_states[per * i : per * i + per])
            index = per * i + owner.timeline.windows.index(chosen)
            row = Row(work, chosen.start_slot, chosen.frames, probs[index])
            if owner.alerts is not None and (
                owner.published_slot is None or work.slot > owner.published_slot
            ):
                start, end = owner.clock.start_ms(work.slot), owner.clock.end_ms(work.slot)
                row.alerts = owner.alerts.evaluate(work.slot, start, end, row.probs)
            rows.append((owner, row))
        self.metrics.stage_seconds.labels("state").inc(time.perf_counter() - advanced)
        return rows

    async def _publish_round(self, rows: list[tuple[Camera, Row]]) -> None:
        started = time.perf_counter()
        await self._publish_retrying(rows)
        self.metrics.stage_seconds.labels("publish").inc(time.perf_counter() - started)
        self._space.set()

    def _step(self, images: np.ndarray, states: list[Any]) -> tuple[np.ndarray, list[Any]]:
        started = time.perf_counter()
        frames = images.astype(np.float32)
        frames *= 1.0 / 255.0
        stepping = time.perf_counter()
        self.metrics.stage_seconds.labels("convert").inc(stepping - started)
        result = self.backend.step(frames[:, None], states, self.ema_frames)
        self.metrics.stage_seconds.labels("model").inc(time.perf_counter() - stepping)
        return result
