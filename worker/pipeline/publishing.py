"""Turning stepped slots into prediction entries, and getting them into Redis exactly once.

Per camera, one fenced script call (see `ownership.PUBLISH`) adds the predictions with IDs derived
from their slots and moves the camera's committed position; dead letters go out beside it.
`Publisher.publish` is what the stepper calls with each round's rows.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from schemas.alerts import Alert
from schemas.messages import DeadLetter, MessageError, Prediction, TopLabel, field_sizes
from worker.config import Settings
from worker.model.labels import top_k
from worker.pipeline import evidence
from worker.pipeline.cameras import Camera, Cameras, id_key, log, valid_camera
from worker.pipeline.checkpoint import Checkpoints
from worker.pipeline.metrics import Metrics
from worker.pipeline.ownership import PUBLISH, Ownership
from worker.pipeline.supervisor import REDIS_ERRORS, denied_command, retrying
from worker.pipeline.timeline import Clock, SlotWork


@dataclasses.dataclass
class Row:
    """One stepped slot of one camera, ready to become a prediction."""

    work: SlotWork
    window_start_slot: int
    frames: int
    probs: np.ndarray  # softmax of the logits, computed once for the prediction and the alert rules
    alerts: list[Alert] = dataclasses.field(default_factory=list)
    snapshot: Any = None  # checkpoint.Snapshot due with this slot, serialized into `checkpoint`
    checkpoint: bytes = b""
    opened: list[tuple[str, int, int | None, int]] = dataclasses.field(default_factory=list)  # evidence.plan


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
    checkpoint: bytes = b"",
    checkpoint_ms: int = 0,
    evidence: Sequence[Any] = (0, 0, 0, 0),
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
    args += [checkpoint, checkpoint_ms, *evidence]
    return args


def dead_letter(
    stream: str, camera: str, entry_id: str, fields: Any, exc: MessageError, *, worker: str
) -> DeadLetter:
    """The dead letter of one entry. Never raises: whatever the names, a letter is written."""
    try:
        sizes = field_sizes(fields)
    except Exception:  # field names that are not text: keep their count only
        sizes = {}
    if len(sizes) > 1000:
        sizes = dict(list(sizes.items())[:1000])
    return DeadLetter(
        stream=stream[:512] or "?",
        entry_id=entry_id if re.fullmatch(r"[0-9]{1,20}-[0-9]{1,20}", entry_id) else "0-0",
        camera=camera if valid_camera(camera) else "",
        reason=exc.reason if re.fullmatch(r"[a-z][a-z0-9_]{0,63}", exc.reason) else "unprocessable",
        detail=exc.detail,
        worker=worker,
        at_ms=int(time.time() * 1000),
        fields=sizes,
    )


# Told of each prediction published (not of one published before): camera, row, prediction, ms.
Listener = Callable[[Camera, Row, Prediction, int], None]


class Publisher:
    """Output: predictions, alert events and commits through the fenced script; dead letters beside.

    `publish(rows)` writes a round's rows (retrying while Redis is away), `due()` says whether there
    is something to write without rows (dead letters, closing alerts, a commit past dead letters),
    `listeners` are told of each new prediction.
    """

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        cameras: Cameras,
        labels: list[str],
        *,
        metrics: Metrics,
        ownership: Ownership,
        checkpoints: Checkpoints,
        dead_letters: list[DeadLetter],
        denied: Callable[[str], None] = lambda command: None,
    ) -> None:
        self.settings, self.redis, self.cameras, self.labels = settings, redis, cameras, labels
        self.metrics, self.ownership, self.checkpoints = metrics, ownership, checkpoints
        self.dead_letters, self.denied = dead_letters, denied
        self.plan = cameras.plan
        self.listeners: list[Listener] = []

    def due(self) -> bool:
        return bool(self.dead_letters) or any(
            c.pending_alerts or self.cameras.uncommitted(c) for c in self.cameras.values()
        )

    async def publish(self, rows: list[tuple[Camera, Row]]) -> None:
        """`_publish`, retried with backoff while Redis is unreachable."""
        await retrying(lambda: self._publish(rows), self.metrics, "publish")

    async def _publish(self, rows: list[tuple[Camera, Row]]) -> None:
        """Per camera one fenced script: predictions in, committed position forward; then dead letters."""
        per_camera: dict[str, tuple[Camera, list[Row]]] = {}
        for cam, row in rows:
            per_camera.setdefault(cam.name, (cam, []))[1].append(row)
        for cam in self.cameras.values():
            if (cam.pending_alerts and cam.owned) or self.cameras.uncommitted(cam):
                per_camera.setdefault(cam.name, (cam, []))
        pipe = self.redis.pipeline(transaction=False)
        # Dead letters first: an entry's position is committed only once its letter is written.
        letters = list(self.dead_letters)
        for letter in letters:
            pipe.xadd(
                self.settings.deadletter_stream,
                letter.to_fields(),
                maxlen=self.settings.deadletter_maxlen,
                approximate=True,
            )
        calls: list[tuple[Camera, list[tuple[Row, Prediction]], list[Alert], str, bytes]] = []
        for cam, cam_rows in per_camera.values():
            token = self.ownership.token(cam.name)
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
                        model=self.plan.name,
                        worker=self.settings.worker_id,
                        ema_frames=self.plan.ema_frames,
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
            blob = next((r.checkpoint for r in reversed(cam_rows) if r.checkpoint), b"")
            ops = evidence.plan(
                self.settings.evidence_index(cam.name),
                [o for r in fresh for o in r.opened],
                events,
                cam.clock.end_ms,
            )
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
                checkpoint=blob,
                checkpoint_ms=self.checkpoints.ttl_ms,
                evidence=self._evidence_args(ops),
            )
            keys = (
                cam.out,
                cam.stream,
                self.settings.alert_state(cam.name),
                self.settings.alerts_stream(cam.name),
                self.settings.checkpoint(cam.name),
                self.settings.evidence_index(cam.name),
            )
            pipe.eval(PUBLISH, 7, self.settings.owner(cam.name), *keys, *args)
            calls.append((cam, made, events, commit, blob))
        if not letters and not calls:
            return
        results = await pipe.execute(raise_on_error=False)
        now_ms = int(time.time() * 1000)  # published: what latency and lag are measured to
        for result in results:
            if isinstance(result, REDIS_ERRORS):
                raise result
        del self.dead_letters[: len(letters)]
        for result in results[: len(letters)]:
            if isinstance(result, Exception):
                self._publish_error("dead letters", result)
        for (cam, made, events, commit, blob), result in zip(calls, results[len(letters) :], strict=True):
            if isinstance(result, Exception):
                self._publish_error(f"camera {cam.name}", result)
                continue
            if result == -1:  # fenced: the lease is gone, another worker owns the camera
                log.warning("camera %s: lease lost while publishing; dropping it", cam.name)
                if self.ownership.forget(cam.name):
                    self.metrics.leases_lost.inc()
                cam.owned = False
                self.cameras.drop_state(cam)
                continue
            if commit:
                cam.committed = commit
            if blob:
                self.checkpoints.count("periodic", blob)
            cam.pending_alerts.clear()
            for event in events:
                if event.event == "open":
                    self.metrics.alerts_opened.labels(event.rule).inc()
                elif event.event == "close":
                    self.metrics.alerts_closed.labels(event.rule).inc()
                if cam.owned:  # not a lease the keeper found lost while this call ran
                    self.metrics.alert_published(event)
                log.info("alert %s %s (%s %.3f)", event.event, event.alert_id, event.label, event.score)
            self._evidence_counted(cam, bool(ops), result[len(made) :])
            for (row, prediction), ok in zip(made, result[: len(made)], strict=True):
                cam.published_slot = max(cam.published_slot or row.work.slot, row.work.slot)
                if not ok:
                    continue  # that slot was published before
                self._observe(cam, row, prediction, now_ms)
            if made and cam.acquired_at:
                self.metrics.takeover_replay_frames.inc(cam.replayed)
                self.metrics.takeover_replay_seconds.observe(time.monotonic() - cam.acquired_at)
                cam.acquired_at = 0.0
        self._count_alerts()

    def _evidence_args(self, ops: list[evidence.Op]) -> list[Any]:
        s, plan = self.settings, self.plan
        info = {
            "model": plan.name,
            "temporal": "ema" if plan.ema_frames else "windows",
            "ema_frames": plan.ema_frames,
            "ema_replay": plan.ema_replay,
            "window": plan.window,
            "fps": str(Fraction(plan.fps).limit_denominator(1000)),
            "max_gap": s.max_gap_slots,
        }
        return evidence.script_args(
            ops,
            info,
            keep_ms=int(s.evidence_seconds * 1000),
            max_alert=s.evidence_max_alert_bytes,
            max_camera=s.evidence_max_camera_bytes,
            max_ms=int(s.evidence_max_alert_seconds * 1000),
        )

    def _evidence_counted(self, cam: Camera, any_ops: bool, counts: list[int]) -> None:
        """The script's evidence answer: the camera's evidence bytes, and the entries a cap left out."""
        if not any_ops or len(counts) != 2:
            return
        total, dropped = counts
        self.metrics.evidence_bytes.labels(cam.name).set(total)
        if dropped:
            self.metrics.evidence_dropped.inc(dropped)
            log.warning("camera %s: evidence cap reached, %d entries not kept", cam.name, dropped)

    def _publish_error(self, what: str, exc: Exception) -> None:
        command = denied_command(exc)
        if command is not None:
            self.denied(command)
        log.warning("%s: publish failed: %s", what, exc)

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
        for listener in self.listeners:
            listener(cam, row, prediction, now_ms)
