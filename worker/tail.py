"""`movinet-worker tail`: follow predictions as they are published."""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import redis

from schemas.messages import MessageError, Prediction


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def format_prediction(p: Prediction) -> str:
    when = dt.datetime.fromtimestamp(p.start_ms / 1000, dt.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    labels = " | ".join(f"{t.label} {t.score:.3f}" for t in p.top[:3])
    mark = " (repeat)" if p.repeated else ""
    return f"{p.camera:<12} {when} slot {p.slot} [{p.frames:>2} frames]{mark}  {labels}"


def follow(
    client: redis.Redis,
    streams: Callable[[], list[str]],
    *,
    from_start: bool = False,
    count: int | None = None,
    timeout: float | None = None,
    out: TextIO = sys.stdout,
    as_json: bool = False,
    on_prediction: Callable[[Prediction], bool] | None = None,
) -> int:
    """Print predictions from `streams()` (re-evaluated as cameras appear) until `count` or `timeout`.

    `on_prediction` returning True stops the follow. Returns how many were printed.
    """
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
                    prediction = Prediction.from_fields(fields)
                except MessageError as exc:
                    print(f"{_text(stream)} {_text(entry_id)}: unreadable prediction: {exc}", file=out)
                    continue
                text = prediction.model_dump_json() if as_json else format_prediction(prediction)
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
