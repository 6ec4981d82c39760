"""Evidence kept per alert: the frames the model saw (as received) and its predictions, from the start
of the window that opened the alert up to its close (at most `evidence_max_alert_seconds`).

The worker never holds evidence in memory: the fenced publish script (`ownership.PUBLISH`) copies the
entries from the camera's input and output streams into the alert's own streams, in the same atomic
step that publishes the slot, before the input is trimmed. So a worker that lost the camera writes
none, and a takeover continues where the last publish stopped: the copy resumes after the last entry
ID kept (stored beside it), which makes it complete and free of duplicates whatever the hand-over.

Keys (all under the camera's hash tag, `evidence:{<camera>}` by default):
- `<index>`: a hash, evidence key -> bytes, of the camera's alerts (the per-camera cap is kept on it);
- `<index>:<rule>:<start_ms>`: the alert's hash: `info` (model, clock, windows: JSON), `from_ms`,
  `until_ms`, `bytes`, `frames`, `predictions`, `capped` ('' / alert / camera / duration), `closed`,
  `event` (its latest alert event, JSON) and the last entry IDs copied;
- `<that>:frames` and `<that>:predictions`: streams with the entries' own IDs and fields.
Every key expires `evidence_seconds` after the alert's last write.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from schemas.alerts import Alert
from schemas.rules import RULE_NAME_PATTERN

_RULE = re.compile(RULE_NAME_PATTERN)


def evidence_key(index: str, rule: str, start_ms: int) -> str:
    return f"{index}:{rule}:{start_ms}"


def alert_id(camera: str, rule: str, start_ms: int) -> str:
    return f"{camera}:{rule}:{start_ms}"


def parse_alert_id(alert_id: str) -> tuple[str, str, int]:
    """`<camera>:<rule>:<start_ms>` -> its parts; ValueError saying what is wrong."""
    head, sep, start = alert_id.rpartition(":")
    camera, sep2, rule = head.rpartition(":")
    if not sep or not sep2 or not camera or not start.isdigit() or not _RULE.fullmatch(rule):
        raise ValueError(
            f"{alert_id!r} is not an alert ID: expected <camera>:<rule>:<start_ms>, as `movinet-worker "
            "alerts` prints it in brackets"
        )
    return camera, rule, int(start)


def evidence_start_slot(window_start_slot: int, slot: int, ema_replay: int | None, max_gap: int) -> int:
    """First slot of an alert's evidence, opened at `slot` by a prediction whose window began at
    `window_start_slot`: that window (in ema mode at most `ema_replay` slots of it), and the `max_gap + 1`
    slots before it that decide whether its first slot was filled with a repeated frame."""
    first = window_start_slot if ema_replay is None else max(window_start_slot, slot - ema_replay)
    return first - max_gap - 1


@dataclasses.dataclass
class Op:
    """What one publish call does to one alert's evidence."""

    key: str
    from_ms: int | None = None  # set when the alert opened in this call: where its evidence starts
    to_ms: int = 0  # entries before this are copied (the end of the newest slot published)
    closing: bool = False
    event: Alert | None = None


def plan(
    index: str,
    opened: Sequence[tuple[str, int, int | None, int]],
    events: Sequence[Alert],
    end_ms: Callable[[int], int],
) -> list[Op]:
    """One call's evidence operations. `opened`: (rule, start_ms, from_ms or None, slot) of the alerts
    open after each of the call's slots, from_ms set where one opened; `events`: the call's alert
    events; `end_ms`: a slot's end."""
    ops: dict[str, Op] = {}
    for rule, start_ms, from_ms, slot in opened:
        key = evidence_key(index, rule, start_ms)
        op = ops.setdefault(key, Op(key))
        op.to_ms = max(op.to_ms, end_ms(slot))
        if from_ms is not None:
            op.from_ms = from_ms if op.from_ms is None else min(op.from_ms, from_ms)
    for event in events:
        if event.evidence is None:
            continue
        op = ops.setdefault(event.evidence, Op(event.evidence))
        op.to_ms = max(op.to_ms, end_ms(event.slot))
        op.event = event
        op.closing = op.closing or event.event == "close"
    return list(ops.values())


def script_args(
    ops: Sequence[Op], info: dict[str, Any], *, keep_ms: int, max_alert: int, max_camera: int, max_ms: int
) -> list[Any]:
    """The evidence section of `ownership.PUBLISH`'s arguments."""
    args: list[Any] = [keep_ms, max_alert, max_camera, len(ops)]
    for op in ops:
        event = json.dumps(op.event.model_dump(mode="json", exclude_none=True)) if op.event else ""
        start = "" if op.from_ms is None else op.from_ms
        until = "" if op.from_ms is None else op.from_ms + max_ms
        args += [op.key, start, op.to_ms, until, "1" if op.closing else "0", json.dumps(info), event]
    return args


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclasses.dataclass
class Evidence:
    """One alert's evidence as read back from Redis."""

    key: str
    meta: dict[str, str]
    info: dict[str, Any]
    frames: list[tuple[str, dict[Any, Any]]]
    predictions: list[tuple[str, dict[Any, Any]]]
    event: Alert | None

    @property
    def capped(self) -> str:
        return self.meta.get("capped", "")

    @property
    def closed(self) -> bool:
        return self.meta.get("closed") == "1"

    @property
    def bytes(self) -> int:
        return int(self.meta.get("bytes", 0))


def read(client: Any, key: str) -> Evidence | None:
    """The evidence under `key`, or None when there is none (expired, evicted, or never kept)."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(key)
    pipe.xrange(key + ":frames")
    pipe.xrange(key + ":predictions")
    raw, frames, predictions = pipe.execute()
    if not raw:
        return None
    meta = {_text(k): _text(v) for k, v in raw.items()}
    event = Alert.model_validate(json.loads(meta["event"])) if meta.get("event") else None
    return Evidence(
        key,
        meta,
        json.loads(meta.get("info", "{}")),
        [(_text(i), f) for i, f in frames],
        [(_text(i), f) for i, f in predictions],
        event,
    )
