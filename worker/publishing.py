"""Turning stepped slots into prediction entries, and getting them into Redis exactly once.

Per camera, one fenced script call (see `ownership.PUBLISH`) adds the predictions with IDs derived
from their slots and moves the camera's committed position; dead letters go out beside it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from schemas.alerts import Alert
from schemas.messages import DeadLetter, MessageError, Prediction, TopLabel, field_sizes
from worker.camera import Clock, SlotWork
from worker.labels import softmax, top_k


@dataclasses.dataclass
class Row:
    """One stepped slot of one camera, ready to become a prediction."""

    work: SlotWork
    window_start_slot: int
    frames: int
    logits: np.ndarray
    alerts: list[Alert] = dataclasses.field(default_factory=list)


def make_prediction(
    row: Row, camera: str, clock: Clock, labels: list[str], *, k: int, model: str, worker: str
) -> Prediction:
    top = top_k(softmax(row.logits), labels, k)
    return Prediction(
        camera=camera,
        slot=row.work.slot,
        start_ms=clock.start_ms(row.work.slot),
        end_ms=clock.end_ms(row.work.slot),
        window_start_ms=clock.start_ms(row.window_start_slot),
        frames=row.frames,
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
