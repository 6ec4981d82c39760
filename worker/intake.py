"""Reading: where a camera resumes, and how its entries become slot work or dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from redis.exceptions import ResponseError

from schemas.messages import Frame, MessageError, Prediction
from worker.alerting import AlertTracker
from worker.codec import decode_image
from worker.publishing import dead_letter, id_key
from worker.runtime import Camera, WorkerCore, log, text_of


class Intake(WorkerCore):
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
        started = time.perf_counter()
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
        if response:  # an empty reply is time spent waiting for frames, not reading them
            self.metrics.stage_seconds.labels("redis_read").inc(time.perf_counter() - started)
        by_stream = {cam.stream: cam for cam in ready}
        for stream, entries in response or []:
            owner = by_stream.get(text_of(stream))
            if owner is None or not owner.owned:
                continue
            for entry_id, fields in entries:
                self._ingest(owner, text_of(entry_id), fields)
        self._work.set()

    def _ingest(self, cam: Camera, entry_id: str, fields: dict[Any, Any]) -> None:
        """Validate and decode one entry and queue its slot work; bad entries go to the dead letters."""
        cam.cursor = entry_id
        self.metrics.frames_received.inc()
        cam.seen_at = time.monotonic()
        replay = id_key(entry_id) <= id_key(cam.committed)
        cam.replayed += replay
        started = time.perf_counter()
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
        self.metrics.stage_seconds.labels("decode").inc(time.perf_counter() - started)
        ms = int(entry_id.split("-", 1)[0])
        work = self._timeline(cam).accept(ms, entry_id, image, frame.capture_ms or ms)
        if work is None:
            self.metrics.frames_dropped.inc()
            return
        self.metrics.frames_repeated.inc(sum(1 for w in work if w.repeated))
        cam.pending.extend(work)

    # ---- control ---------------------------------------------------------------------------
