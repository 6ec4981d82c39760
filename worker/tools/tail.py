"""`movinet-worker tail` and `alerts`: follow predictions or alert events as they are published."""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import redis

from schemas.alerts import Alert
from schemas.messages import MessageError, Prediction, StreamMessage


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def format_prediction(p: Prediction) -> str:
    when = dt.datetime.fromtimestamp(p.start_ms / 1000, dt.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    labels = " | ".join(f"{t.label} {t.score:.3f}" for t in p.top[:3])
    mark = " (repeat)" if p.repeated else ""
    return f"{p.camera:<12} {when} slot {p.slot} [{p.frames:>2} frames]{mark}  {labels}"


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%H:%M:%S.%f")[:-3]


def format_alert(a: Alert) -> str:
    span = f"{_when(a.start_ms)}-{_when(a.end_ms)}" if a.end_ms is not None else f"since {_when(a.start_ms)}"
    return (
        f"{a.event.upper():<6} {a.camera:<12} {a.rule:<12} {a.label} {span} "
        f"peak {a.peak_score:.3f} at {_when(a.peak_ms)}  [{a.alert_id}]"
        + (f"  evidence {a.evidence}: movinet-worker explain {a.alert_id}" if a.evidence else "")
    )


def follow(
    client: redis.Redis,
    streams: Callable[[], list[str]],
    *,
    from_start: bool = False,
    count: int | None = None,
    timeout: float | None = None,
    out: TextIO = sys.stdout,
    as_json: bool = False,
    on_prediction: Callable[[Any], bool] | None = None,
    message: type[StreamMessage] = Prediction,
    fmt: Callable[[Any], str] | None = None,
    keep: Callable[[Any], bool] | None = None,
) -> int:
    """Print messages from `streams()` (re-evaluated as cameras appear) until `count` or `timeout`.

    `on_prediction` returning True stops the follow; `keep` filters. Returns how many were printed.
    """
    show: Callable[[Any], str] = fmt or format_prediction
    cursors: dict[str, str] = {}
    printed = 0
    deadline = time.monotonic() + timeout if timeout else None
    while deadline is None or time.monotonic() < deadline:
        for key in streams():
            cursors.setdefault(key, "0-0" if from_start else "$")
        if not cursors:
            time.sleep(0.2)
            continue
        response: Any = client.xread(cursors, count=100, block=200)
        for stream, entries in response or []:
            for entry_id, fields in entries:
                cursors[_text(stream)] = _text(entry_id)
                try:
                    prediction = message.from_fields(fields)
                except MessageError as exc:
                    print(f"{_text(stream)} {_text(entry_id)}: unreadable entry: {exc}", file=out)
                    continue
                if keep is not None and not keep(prediction):
                    continue
                text = prediction.model_dump_json(exclude_none=True) if as_json else show(prediction)
                print(text, file=out, flush=True)
                printed += 1
                if (count and printed >= count) or (on_prediction and on_prediction(prediction)):
                    return printed
    return printed


def prediction_streams(client: redis.Redis, template: str, camera: str | None) -> Callable[[], list[str]]:
    if camera:
        return lambda: [template.format(camera=camera)]
    pattern = template.format(camera="*")

    def scan() -> list[str]:
        return sorted(_text(k) for k in client.scan_iter(match=pattern, _type="stream", count=1000))

    return scan
