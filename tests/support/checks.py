"""The reference predictions and the checks every fault run must pass."""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import redis

from schemas.messages import Prediction
from tests.support.base import FPS, TRANSIENT, KeySpace, RedisClient, Reference, Top, _text, slot_of, wait_for
from tests.support.workers import WorkerProcess


def read_predictions(client: RedisClient, keys: KeySpace, camera: str) -> list[tuple[str, Prediction]]:
    out: list[tuple[str, Prediction]] = []
    start = "-"
    while True:
        batch = client.xrange(keys.predictions(camera), min=start, count=2000)
        out.extend((_text(e), Prediction.from_fields(f)) for e, f in batch)
        if len(batch) < 2000:
            return out
        start = "(" + _text(batch[-1][0])


def last_predicted_slots(
    client: RedisClient, keys: KeySpace, cameras: Iterable[str]
) -> dict[str, int | None]:
    cameras = list(cameras)
    pipe = client.pipeline(transaction=False)
    for camera in cameras:
        pipe.xrevrange(keys.predictions(camera), count=1)
    out: dict[str, int | None] = {}
    for camera, entries in zip(cameras, pipe.execute(), strict=True):
        out[camera] = int(_text(entries[0][1][b"slot"])) if entries else None
    return out


def wait_drained(client: RedisClient, keys: KeySpace, last_slots: Mapping[str, int], timeout: float) -> None:
    """Wait until every camera's prediction for its last frame's slot is out."""
    behind: dict[str, tuple[int | None, int]] = dict.fromkeys(last_slots, (None, 0))

    def drained() -> bool:
        nonlocal behind
        with contextlib.suppress(*TRANSIENT):
            got = last_predicted_slots(client, keys, last_slots)
            behind = {c: (got[c], s) for c, s in last_slots.items() if (got[c] or -1) < s}
        return not behind

    try:
        wait_for(drained, timeout, "every camera's last slot to be predicted", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (last published, last frame) per camera behind: {behind}") from None


def copy_frames(source: RedisClient, src: KeySpace, target: redis.Redis, dst: KeySpace, camera: str) -> int:
    """Copy a camera's frame entries (same IDs, same fields); returns how many."""
    copied, start = 0, "-"
    while True:
        batch = source.xrange(src.frames(camera), min=start, count=100)
        if not batch:
            return copied
        pipe = target.pipeline(transaction=False)
        for entry_id, fields in batch:
            pipe.xadd(dst.frames(camera), fields, id=entry_id)
        pipe.execute()
        copied += len(batch)
        start = "(" + _text(batch[-1][0])


def reference_predictions(
    source: RedisClient,
    keys: KeySpace,
    cameras: Sequence[str],
    *,
    redis_url: str,
    model: Path | str,
    labels: Path,
    log_dir: Path,
    window: int = 10,
    timeout: float = 180.0,
    fps: float = FPS,
) -> Reference:
    """What one uninterrupted worker predicts from the same frames.

    Every camera's frame entries are copied (same IDs and fields) from `source` under `keys` into a
    fresh key prefix on the standalone Redis at `redis_url`; one worker process runs over them until
    each camera's last slot is published; its predictions are returned as
    {camera: {slot: [(label, score), ...]}} and the copy is deleted.
    """
    target = redis.Redis.from_url(redis_url, socket_timeout=30)
    ref = KeySpace.new("ref")
    try:
        last: dict[str, int] = {}
        for camera in cameras:
            if copy_frames(source, keys, target, ref, camera):
                entries = target.xrevrange(ref.frames(camera), count=1)
                last[camera] = slot_of(int(_text(entries[0][0]).split("-")[0]), fps)
        with WorkerProcess(
            "reference",
            redis_url,
            ref,
            model=model,
            labels=labels,
            log_dir=log_dir,
            window=window,
            interpreters=None,
        ) as worker:
            try:
                worker.ready(60)
                wait_drained(target, ref, last, timeout)
            except AssertionError as exc:
                raise AssertionError(f"reference run: {exc}\n{worker.log_tail()}") from None
            worker.sigterm()
            worker.wait(30)
        return {
            camera: {
                p.slot: [(t.label, t.score) for t in p.top] for _, p in read_predictions(target, ref, camera)
            }
            for camera in cameras
        }
    finally:
        ref.cleanup(target)
        target.close()


@dataclasses.dataclass
class RunCheck:
    """Counts over every camera's predictions, compared with an uninterrupted reference run."""

    cameras: int = 0
    checked: int = 0  # slots compared with the reference
    lost: int = 0  # slots missing after each camera's first full window
    duplicated: int = 0  # slots published more than once
    mismatched: int = 0  # slots that differ from the reference (or that it does not have)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checked > 0 and not (self.lost or self.duplicated or self.mismatched)

    def note(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)

    def __str__(self) -> str:
        head = (
            f"{self.cameras} cameras, {self.checked} slots checked: lost {self.lost}, "
            f"duplicated {self.duplicated}, mismatched {self.mismatched}"
        )
        return "\n  ".join([head, *self.problems])


def same_top(got: Top, want: Top, tolerance: float = 1e-4) -> str | None:
    """None when two top-k lists agree: scores rank by rank within `tolerance`, and each label where
    the reference has it within `tolerance` (labels may only differ where scores tie that closely).
    Otherwise what differs."""
    if len(got) != len(want):
        return f"{len(got)} labels, reference {len(want)}"
    for rank, ((_, a), (_, b)) in enumerate(zip(got, want, strict=True)):
        if abs(a - b) > tolerance:
            return f"rank {rank}: score {a:.6f}, reference {b:.6f}"
    ref = dict(want)
    floor = want[-1][1]
    for label, score in got:
        if label in ref:
            if abs(ref[label] - score) > tolerance:
                return f"{label!r}: score {score:.6f}, reference {ref[label]:.6f}"
        elif score > floor + tolerance:
            return f"{label!r} ({score:.6f}) is not in the reference's top {len(want)}"
    return None


def check_run(
    client: RedisClient,
    keys: KeySpace,
    reference: Reference,
    window: int,
    tolerance: float = 1e-4,
) -> RunCheck:
    """Every camera: no duplicate slot, no missing slot from W slots after its first one (the first
    full window) to its last, and every prediction equal to the reference's (scores within
    `tolerance`)."""
    result = RunCheck()
    for camera, want in sorted(reference.items()):
        result.cameras += 1
        if not want:
            result.note(f"{camera}: the reference has no predictions")
            result.mismatched += 1
            continue
        live = read_predictions(client, keys, camera)
        slots = Counter(p.slot for _, p in live)
        for slot, n in sorted(slots.items()):
            if n > 1:
                result.duplicated += n - 1
                result.note(f"{camera}: slot {slot} published {n} times")
        first, last = min(want), max(want)
        missing = [s for s in range(first + window, last + 1) if s not in slots]
        result.lost += len(missing)
        if missing:
            result.note(
                f"{camera}: {len(missing)} slots missing, first {missing[:5]} (slots {first}..{last})"
            )
        done: set[int] = set()
        for _, p in live:
            if p.slot in done:
                continue
            done.add(p.slot)
            result.checked += 1
            if p.slot not in want:
                result.mismatched += 1
                result.note(f"{camera}: slot {p.slot} (by {p.worker}) is not in the reference")
                continue
            why = same_top([(t.label, t.score) for t in p.top], want[p.slot], tolerance)
            if why is not None:
                result.mismatched += 1
                result.note(f"{camera}: slot {p.slot} (by {p.worker}, {p.frames} frames): {why}")
    return result
