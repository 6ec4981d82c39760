"""The worker end to end against real Redis: exactness, restarts, bad input, metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.harness import Harness
from worker.labels import softmax

T0 = 1_700_000_000_000  # a fixed epoch ms on a slot boundary: slot = ms // 200 at 5 fps


@pytest.fixture
def harnesses() -> Iterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for h in made:
        if h._thread is not None and h._thread.is_alive():
            h.kill()
        h.cleanup()


def new(harnesses: list[Harness], *args: Any, **kwargs: Any) -> Harness:
    h = Harness(*args, **kwargs)
    harnesses.append(h)
    return h


def test_real_model_end_to_end_jumping_jacks(harnesses, redis_url, real_backend, assets: Path) -> None:
    from worker.publisher import publish

    h = new(
        harnesses, redis_url, real_backend, (assets / "kinetics600_label_map.txt").read_text().splitlines()
    )
    h.start()
    stats = publish(
        h.client,
        str(assets / "videos" / "jumpingjack.gif"),
        "gym",
        key=h.frames_key("gym"),
        size=(172, 172),
        realtime=False,
        progress=False,
    )
    last_slot = int(stats.last_id.split("-")[0]) // 200
    h.wait_for(lambda: any(p.slot == last_slot for _, p in h.predictions("gym")), what="last prediction")
    h.stop()
    last = h.predictions("gym")[-1][1]
    assert last.top[0].label == "jumping jacks" and last.top[0].score >= 0.9
    assert h.client.xpending(h.frames_key("gym"), h.settings.group)["pending"] == 0


def expected_windows(
    slots: dict[int, np.ndarray], window: int, gap: int
) -> dict[int, tuple[int, list[np.ndarray]]]:
    """Independent reference: the first slot and the frames each slot's prediction must have seen."""
    seq: dict[int, np.ndarray] = {}
    run: dict[int, int] = {}  # slot -> where the camera's current run began (start or long gap)
    prev: int | None = None
    for s in sorted(slots):
        start = run[prev] if prev is not None and s - prev - 1 <= gap else s
        for r in range(prev + 1 if prev is not None and start != s else s, s):
            seq[r], run[r] = seq[prev], start  # type: ignore[index]
        seq[s], run[s] = slots[s], start
        prev = s
    out = {}
    for k in seq:
        first = max(run[k], min(k - (k - phase) % window for phase in (0, window // 2)))
        out[k] = (first, [seq[j] for j in range(first, k + 1)])
    return out


def test_predictions_equal_the_base_model_on_their_window(
    harnesses, redis_url, tf_backend, base_model, labels600
) -> None:
    window, gap, n_slots = 6, 2, 16
    rng = np.random.default_rng(11)
    h = new(harnesses, redis_url, tf_backend, labels600, window=window, max_gap_slots=gap, top_k=5)
    published: dict[str, dict[int, np.ndarray]] = {}
    for camera, fps, skip in (("c5", 5, set()), ("c10", 10, {7, 8}), ("c30", 30, set())):
        first_per_slot: dict[int, np.ndarray] = {}
        for i in range(int(n_slots * fps / 5)):
            ms = T0 + 1000 * 3 + int(i * 1000 / fps)  # starts mid-window: slot 15 (W=6)
            slot = ms // 200
            if slot - T0 // 200 - 15 in skip:
                continue
            base = rng.random((1, 1, 3), dtype=np.float32)
            image = (rng.random((172, 172, 3)) * base * 255).astype(np.uint8)
            h.publish_rgb(camera, ms, image, seq=i)
            first_per_slot.setdefault(slot, image)
        published[camera] = first_per_slot
    h.start()
    total = sum(max(s) - min(s) + 1 for s in published.values())
    h.wait_for(lambda: sum(len(h.predictions(c)) for c in published) >= total, what="all predictions")
    h.stop()
    checked = 0
    for camera, slots in published.items():
        preds = {p.slot: p for _, p in h.predictions(camera)}
        assert sorted(preds) == list(range(min(slots), max(slots) + 1))  # none lost, none twice
        for slot, (first, frames) in expected_windows(slots, window, gap).items():
            p = preds[slot]
            assert (p.window_start_ms // 200, p.frames) == (first, len(frames)), (camera, slot)
            clip = np.stack(frames).astype(np.float32) / 255
            probs = softmax(base_model.classify_clip(clip))
            order = np.argsort(-probs)[:5]
            assert [t.label for t in p.top] == [labels600[i] for i in order]
            np.testing.assert_allclose([t.score for t in p.top], probs[order], rtol=1e-3)
            checked += 1
    assert checked == total
    # The check can fail: one frame fewer of context gives other scores.
    p = preds[max(slots)]
    _, frames = expected_windows(slots, window, gap)[max(slots)]
    shorter = softmax(base_model.classify_clip(np.stack(frames[1:]).astype(np.float32) / 255))
    assert (
        np.abs(shorter[np.argsort(-shorter)[:5]] - np.array([t.score for t in p.top])).max()
        > 1e-3 * p.top[0].score
    )
    assert (
        h.metrics.registry.get_sample_value("movinet_frames_dropped_total") > 0
    )  # the 10 and 30 fps cameras
    assert h.metrics.registry.get_sample_value("movinet_frames_repeated_total") == 2  # the gap of c10
