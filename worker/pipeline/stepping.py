"""Stepping: one slot of every ready camera per model call, the rows the publisher writes.

`Stepper.run` is the stepper task: rounds of one slot per owned camera with slot work queued (held
a little when more cameras' slots are due soon, within the latency budget), stepped in one backend
call in the model thread; each round's rows (softmax, alert rules, evidence, checkpoints due) go
to the publisher while the next round steps. Cameras to release are handed over between rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from redis.exceptions import ResponseError

from worker.config import Settings
from worker.model.backends import Backend
from worker.model.batching import PLANNED_SHARE, RoundCost, hold_seconds
from worker.model.labels import softmax
from worker.pipeline.cameras import Camera, Cameras, log
from worker.pipeline.capacity import Capacity
from worker.pipeline.checkpoint import Checkpoints
from worker.pipeline.evidence import evidence_start_slot
from worker.pipeline.metrics import Metrics
from worker.pipeline.ownership import Ownership
from worker.pipeline.publishing import Publisher, Row
from worker.pipeline.supervisor import REDIS_ERRORS


class Stepper:
    """Slot work into rows: `run` (the stepper task, until stopping and drained), `reset` (after it
    failed mid-round), `close`. It waits on `work` for slot work and sets `space` once a round is
    published (the reader reads on)."""

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        cameras: Cameras,
        backend: Backend,
        publisher: Publisher,
        *,
        metrics: Metrics,
        checkpoints: Checkpoints,
        capacity: Capacity,
        ownership: Ownership,
        stopping: asyncio.Event,
        work: asyncio.Event,
        space: asyncio.Event,
        beat: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings, self.redis, self.cameras, self.backend = settings, redis, cameras, backend
        self.publisher, self.metrics, self.checkpoints = publisher, metrics, checkpoints
        self.capacity, self.ownership = capacity, ownership
        self.stopping, self.work, self.space, self.beat = stopping, work, space, beat
        self.plan = plan = cameras.plan
        budget_ms = settings.latency_budget_ms
        self.latency_budget = (1000 / plan.fps if budget_ms is None else budget_ms) / 1000  # seconds
        self.round_cost = RoundCost()  # a round's start to its predictions published
        self.model_pool = ThreadPoolExecutor(1, "model")

    def close(self) -> None:
        self.model_pool.shutdown(wait=False)

    async def run(self) -> None:
        """Rounds of one slot per owned camera; a round's publish overlaps the next round's model step.

        At most one publish is in flight, so predictions reach Redis in order; hand-overs and the
        final drain wait for it, so a lease is never released with the camera's output unwritten.
        Returns once stopping and drained.
        """
        publishing: asyncio.Task[None] | None = None
        try:
            while True:
                self.beat()
                if publishing is not None and (
                    self.stopping.is_set() or any(c.release for c in self.cameras.values())
                ):
                    await publishing
                    publishing = None
                await self._hand_over()
                cams = self.cameras
                for name in [n for n in cams.unsubscribed if n in cams and not cams[n].owned]:
                    del cams[name]  # unsubscribed and released: forgotten
                ready = [cam for cam in self.cameras.values() if cam.owned and cam.pending]
                hold = 0.0 if self.stopping.is_set() else self._hold(ready)
                if hold > 0:  # more cameras' slots are due soon: a bigger batch, within the budget
                    self.work.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.work.wait(), min(hold, 1.0))  # beats on
                    continue
                batch = [cam.pending.popleft() for cam in ready]
                if not batch:
                    if publishing is not None:
                        await publishing
                        publishing = None
                        continue
                    if self.publisher.due():
                        await self.publisher.publish([])
                    if self.stopping.is_set():
                        return
                    self.work.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.work.wait(), 1.0)
                    continue
                began = time.monotonic()
                rows = await self._round(batch)
                if publishing is not None:
                    await publishing
                publishing = asyncio.create_task(self._publish_round(rows, len(batch), began))
        finally:
            if publishing is not None and not publishing.done():
                publishing.cancel()

    def _hold(self, ready: list[Camera]) -> float:
        """Seconds the next round waits for cameras whose slot is due but not here yet (see
        `batching.hold_seconds`): those that delivered the slot before the newest one ready."""
        if not ready or self.latency_budget <= 0:
            return 0.0
        heads = [cam.pending[0] for cam in ready]
        newest = max(work.slot for work in heads)
        expected = sum(
            1
            for cam in self.cameras.values()
            if cam.owned
            and not cam.pending
            and cam.timeline is not None
            and cam.timeline.last_slot == newest - 1
        )
        # Due: capture + the budget's planned share; a capture time ahead of the entry's slot counts
        # from the slot's end.
        planned = PLANNED_SHARE * self.latency_budget
        dues = [
            min(work.capture_ms, cam.clock.end_ms(work.slot)) / 1000 + planned
            for cam, work in zip(ready, heads, strict=True)
        ]
        return hold_seconds(time.time(), dues, expected, self.round_cost)

    def reset(self) -> None:
        """After the stepper failed mid-round: every owned camera is rebuilt from its committed position."""
        for cam in self.cameras.values():
            cam.in_model = 0
            if cam.owned:
                self.cameras.drop_state(cam)

    async def _round(self, batch: list[Any]) -> list[tuple[Camera, Row]]:
        """Step one slot of each camera in `batch` (in the model thread) and turn the results into rows."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        per = self.plan.per_slot
        states: list[Any] = []
        images = np.empty((per * len(batch), *self.plan.size, 3), np.uint8)
        for i, work in enumerate(batch):
            cam = self.cameras[work.camera]
            assert cam.timeline is not None
            cam.in_model += 1
            states.extend(cam.timeline.states_for(work))
            images[per * i : per * i + per] = work.image
        self.metrics.stage_seconds.labels("state").inc(time.perf_counter() - started)
        started = time.perf_counter()
        try:
            logits, new_states = await loop.run_in_executor(self.model_pool, self._step, images, states)
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
            row.snapshot = self.checkpoints.stepped(owner, owner.timeline, work.image, work.capture_ms)
            if owner.alerts is not None and (
                owner.published_slot is None or work.slot > owner.published_slot
            ):
                start, end = owner.clock.start_ms(work.slot), owner.clock.end_ms(work.slot)
                row.alerts = owner.alerts.evaluate(work.slot, start, end, row.probs)
                if self.settings.evidence:
                    first = evidence_start_slot(
                        chosen.start_slot, work.slot, self.plan.ema_replay, self.settings.max_gap_slots
                    )
                    opens = {a.rule for a in row.alerts if a.event == "open"}
                    row.opened = [
                        (rule, start_ms, owner.clock.start_ms(first) if rule in opens else None, work.slot)
                        for rule, start_ms in owner.alerts.open_alerts()
                    ]
            rows.append((owner, row))
        self.metrics.stage_seconds.labels("state").inc(time.perf_counter() - advanced)
        return rows

    async def _publish_round(self, rows: list[tuple[Camera, Row]], frames: int, began: float) -> None:
        started = time.perf_counter()
        await self.checkpoints.encode_rows(rows)
        await self.publisher.publish(rows)
        self.metrics.stage_seconds.labels("publish").inc(time.perf_counter() - started)
        self.round_cost.observe(frames, time.monotonic() - began)
        self.space.set()

    def _step(self, images: np.ndarray, states: list[Any]) -> tuple[np.ndarray, list[Any]]:
        started = time.perf_counter()
        frames = images.astype(np.float32)
        frames *= 1.0 / 255.0
        stepping = time.perf_counter()
        self.metrics.stage_seconds.labels("convert").inc(stepping - started)
        result = self.backend.step(frames[:, None], states, self.plan.ema_frames)
        took = time.perf_counter() - stepping
        self.metrics.stage_seconds.labels("model").inc(took)
        self.capacity.busy("model", time.perf_counter() - started)
        self.capacity.done(len(states) // self.plan.per_slot)
        return result

    async def _hand_over(self) -> None:
        """Cameras to release (rebalanced or unsubscribed): checkpoint, drop, release the lease."""
        for cam in [c for c in self.cameras.values() if c.release and c.owned]:
            cam.owned, cam.release = False, False
            with contextlib.suppress(*REDIS_ERRORS, ResponseError):  # without it, the next owner replays
                await self.checkpoints.save(self.redis, cam, self.ownership.token(cam.name))
            self.cameras.drop_state(cam)
            await self.ownership.release(cam.name)
            self.cameras.count_owned()
            log.info("camera %s handed over", cam.name)
