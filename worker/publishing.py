"""Turning stepped slots into prediction entries, and getting them into Redis exactly once.

Per camera, one fenced script call (see `ownership.PUBLISH`) adds the predictions with IDs derived
from their slots and moves the camera's committed position; dead letters go out beside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from schemas.alerts import Alert
from schemas.messages import DeadLetter, MessageError, Prediction, TopLabel, field_sizes
from worker.camera import Clock, SlotWork
from worker.labels import top_k
from worker.ownership import PUBLISH
from worker.runtime import BACKOFF_MAX_SECONDS, BACKOFF_START_SECONDS, REDIS_ERRORS, Camera, WorkerCore, log


@dataclasses.dataclass
class Row:
    """One stepped slot of one camera, ready to become a prediction."""

    work: SlotWork
    window_start_slot: int
    frames: int
    probs: np.ndarray  # softmax of the logits, computed once for the prediction and the alert rules
    alerts: list[Alert] = dataclasses.field(default_factory=list)


def make_prediction(
    row: Row,
    camera: str,
    clock: Clock,
    labels: list[str],
    *,
    k: int,
    model: str,
    worker: str,
    ema_frames: int | None = None,
) -> Prediction:
    top = top_k(row.probs, labels, k)
    return Prediction(
        camera=camera,
        slot=row.work.slot,
        start_ms=clock.start_ms(row.work.slot),
        end_ms=clock.end_ms(row.work.slot),
        window_start_ms=clock.start_ms(row.window_start_slot),
        frames=row.frames,
        temporal="ema" if ema_frames else "windows",
        ema_frames=ema_frames,
        repeated=row.work.repeated,
        capture_ms=row.work.capture_ms,
        model=model,
        worker=worker,
        top=[TopLabel(label=label, score=min(max(score, 0.0), 1.0)) for label, score in top],
    )


def script_args(
    token: str,
    group: str,
    maxlen: int,
    *,
    commit: str,
    trim: str,
    predictions: list[Prediction],
    alert_state: str = "",
    alerts_maxlen: int = 100_000,
    alerts: Sequence[Alert] = (),
) -> list[Any]:
    """Arguments of `ownership.PUBLISH` for one camera."""
    args: list[Any] = [token, group, maxlen, commit, trim, alert_state, alerts_maxlen, len(predictions)]
    for p in predictions:
        fields = p.to_fields()
        args += [f"{p.start_ms}-0", len(fields)]
        for name, value in fields.items():
            args += [name, value]
    args.append(len(alerts))
    for alert in alerts:
        fields = alert.to_fields()
        args.append(len(fields))
        for name, value in fields.items():
            args += [name, value]
    return args


def dead_letter(
    stream: str, camera: str, entry_id: str, fields: Any, exc: MessageError, *, worker: str
) -> DeadLetter:
    return DeadLetter(
        stream=stream,
        entry_id=entry_id,
        camera=camera,
        reason=exc.reason,
        detail=exc.detail,
        worker=worker,
        at_ms=int(time.time() * 1000),
        fields=field_sizes(fields),
    )


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Publishing(WorkerCore):
    """Output: predictions, alert events and commits through the fenced script; dead letters beside."""

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
                        ema_frames=self.ema_frames,
                    ),
                )
                for r in fresh
            ]
            # Everything read is done once nothing is queued or stepping; else up to the last slot published.
            ids = [e for r in cam_rows for e in r.work.entry_ids]
            done = not cam.pending and not cam.in_model
            commit = cam.cursor if done else max(ids, key=id_key, default="")
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
        now_ms = int(time.time() * 1000)  # published: what latency and lag are measured to
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
