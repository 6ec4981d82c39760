"""The worker's parts, each constructed alone against the real Redis: the reader turns a camera's
entries into slot work and dead letters, the publisher writes rows exactly once behind its fence."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from schemas.messages import DeadLetter, Frame, MessageError, Prediction
from tests.harness import settings_for
from worker.config import Settings
from worker.model.labels import softmax
from worker.pipeline.cameras import Cameras, ModelPlan
from worker.pipeline.capacity import Capacity
from worker.pipeline.checkpoint import Checkpoints
from worker.pipeline.metrics import Metrics
from worker.pipeline.ownership import Ownership
from worker.pipeline.publishing import Publisher, Row, dead_letter
from worker.pipeline.reading import Reader
from worker.pipeline.timeline import SlotWork

T0 = 1_700_000_000_000  # a fixed epoch ms on a slot boundary at 5 fps


@pytest.fixture
def keys(redis_url: str) -> Iterator[tuple[str, redis.Redis]]:
    """A key prefix private to one test (its keys deleted afterwards) and a client to look with."""
    prefix = "t" + uuid.uuid4().hex[:10]
    client = redis.Redis.from_url(redis_url)
    yield prefix, client
    found = list(client.scan_iter(match=prefix + ":*", count=1000))
    if found:
        client.delete(*found)
    client.close()


class Parts:
    """What every part is made with: settings, the metrics, the plan and the camera table."""

    def __init__(self, redis_url: str, prefix: str, backend: Any, **overrides: Any) -> None:
        self.settings: Settings = settings_for(redis_url, prefix, **overrides)
        self.backend = backend
        self.metrics = Metrics()
        self.plan = ModelPlan.of(self.settings, backend)
        self.cameras = Cameras(self.settings, backend, self.plan, self.metrics)
        self.checkpoints = Checkpoints(self.settings, backend, self.plan.window, self.metrics.registry)
        self.dead_letters: list[DeadLetter] = []

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def frame_fields(camera: str, ms: int, size: tuple[int, int], shade: int) -> dict[str, Any]:
    image = np.full((*size, 3), shade, np.uint8)
    frame = Frame(
        camera=camera,
        seq=0,
        capture_ms=ms,
        encoding="rgb24",
        width=size[1],
        height=size[0],
        data=image.tobytes(),
    )
    return dict(frame.to_fields())


def test_the_reader_alone_queues_slot_work_and_dead_letters(
    keys: tuple[str, redis.Redis], redis_url: str, lite_backend: Any
) -> None:
    prefix, client = keys
    parts = Parts(redis_url, prefix, lite_backend, start_from="all")
    cam = parts.cameras.camera("cam")
    cam.owned = True  # as the owner task marks a camera whose lease it took
    step = cam.clock.start_ms(cam.clock.slot(T0) + 1) - T0
    good: list[tuple[str, int]] = []  # (entry ID, slot)
    bad: list[str] = []
    for i in range(4):
        ms = T0 + i * step
        client.xadd(cam.stream, frame_fields("cam", ms, parts.plan.size, 40 * i), id=f"{ms}-0")
        good.append((f"{ms}-0", cam.clock.slot(ms)))
        if i == 1:  # between two slots: a frame naming another camera, and an entry that is no frame
            wrong = frame_fields("other", ms + 1, parts.plan.size, 0)
            bad.append(client.xadd(cam.stream, wrong, id=f"{ms + 1}-0").decode())
            bad.append(client.xadd(cam.stream, {"junk": "x"}, id=f"{ms + 2}-0").decode())
    last = good[-1][0]

    async def read() -> None:
        aclient = aioredis.from_url(redis_url)
        work, space = asyncio.Event(), asyncio.Event()
        reader = Reader(
            parts.settings,
            aclient,
            parts.cameras,
            [f"class {i}" for i in range(lite_backend.info.num_classes)],
            metrics=parts.metrics,
            checkpoints=parts.checkpoints,
            capacity=Capacity(None, 1.0, parts.plan.fps, None),
            dead_letters=parts.dead_letters,
            work=work,
            space=space,
        )
        try:
            for _ in range(50):  # the first turn resumes the camera; reads go on until its last entry
                await reader.read_once()
                if cam.cursor == last:
                    break
            assert work.is_set()  # the stepper is woken
        finally:
            reader.close()
            await aclient.aclose()

    asyncio.run(read())
    assert cam.resumed and cam.cursor == last
    assert [(w.entry_ids, w.slot) for w in cam.pending] == [([e], s) for e, s in good]
    assert [w.image[0, 0, 0] for w in cam.pending] == [0, 40, 80, 120]
    letters = [(d.entry_id, d.camera, d.stream) for d in parts.dead_letters]
    assert letters == [(e, "cam", cam.stream) for e in bad]
    assert parts.dead_letters[0].reason == "wrong_camera"
    assert parts.value("movinet_frames_received_total") == len(good) + len(bad)
    assert parts.value("movinet_frames_deadlettered_total", reason="wrong_camera") == 1
    # Nothing is committed by reading: the position moves only when the publisher writes.
    assert client.xinfo_groups(cam.stream)[0]["last-delivered-id"].decode() == "0-0"
    assert cam.committed == "0-0"


def test_the_publisher_alone_publishes_rows_exactly_once_behind_its_fence(
    keys: tuple[str, redis.Redis], redis_url: str, lite_backend: Any
) -> None:
    prefix, client = keys
    parts = Parts(redis_url, prefix, lite_backend)
    labels = [f"class {i}" for i in range(lite_backend.info.num_classes)]
    cam = parts.cameras.camera("cam")
    step = cam.clock.start_ms(cam.clock.slot(T0) + 1) - T0
    ids = [client.xadd(cam.stream, {"f": "x"}, id=f"{T0 + i * step}-0").decode() for i in range(4)]
    client.xgroup_create(cam.stream, parts.settings.group, id="0")
    logits = np.random.default_rng(0).normal(size=(4, len(labels))).astype(np.float32)
    image = np.zeros((*parts.plan.size, 3), np.uint8)
    first = cam.clock.slot(T0)

    def row(i: int) -> Row:
        work = SlotWork("cam", first + i, image, T0 + i * step, False, [ids[i]])
        return Row(work, first, i + 1, softmax(logits[i : i + 1])[0])

    async def publish() -> tuple[list[int], bool]:
        aclient = aioredis.from_url(redis_url)
        ownership = Ownership(aclient, parts.settings)
        publisher = Publisher(
            parts.settings,
            aclient,
            parts.cameras,
            labels,
            metrics=parts.metrics,
            ownership=ownership,
            checkpoints=parts.checkpoints,
            dead_letters=parts.dead_letters,
        )
        told: list[int] = []
        publisher.listeners.append(lambda c, r, p, ms: told.append(p.slot))
        try:
            taken, _ = await ownership.acquire("cam")
            assert taken
            cam.owned = cam.resumed = True
            cam.cursor = ids[2]  # read up to the third entry, all of it stepped
            letter = dead_letter(
                cam.stream, "cam", "1-0", {"junk": "x"}, MessageError("bad", "x"), worker="w"
            )
            parts.dead_letters.append(letter)
            rows = [(cam, row(i)) for i in range(3)]
            await publisher.publish(rows)
            assert not parts.dead_letters  # written: the list is emptied
            # The same rows again, as a worker that forgot what it published would: Redis refuses them.
            cam.published_slot = None
            await publisher.publish(rows)
            nothing_due = not publisher.due()
            # Another worker holds the lease now: the fence refuses the next row and the camera is let go.
            await aclient.set(parts.settings.owner("cam"), "other:0")
            cam.cursor = ids[3]
            await publisher.publish([(cam, row(3))])
            return told, nothing_due
        finally:
            await aclient.aclose()

    told, nothing_due = asyncio.run(publish())
    out = [(e.decode(), Prediction.from_fields(f)) for e, f in client.xrange(cam.out)]
    assert [(e, p.slot) for e, p in out] == [
        (f"{cam.clock.start_ms(first + i)}-0", first + i) for i in range(3)
    ]
    assert [p.frames for _, p in out] == [1, 2, 3]
    assert told == [first, first + 1, first + 2]  # once each, though published twice
    assert parts.value("movinet_predictions_published_total") == 3
    assert nothing_due
    # Committed up to what was stepped and published, and not past it once fenced.
    assert client.xinfo_groups(cam.stream)[0]["last-delivered-id"].decode() == ids[2]
    assert cam.committed == ids[2]
    assert not cam.owned and cam.timeline is None
    assert parts.value("movinet_leases_lost_total") == 1
    letters = client.xrange(parts.settings.deadletter_stream)
    assert [DeadLetter.from_fields(f).reason for _, f in letters] == ["bad"]
