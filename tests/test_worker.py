"""The worker end to end against real Redis: exactness, restarts, bad input, metrics."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.harness import Harness, StepHook
from worker.model.labels import softmax
from worker.pipeline.codec import encode_jpeg

T0 = 1_700_000_000_000  # a fixed epoch ms on a slot boundary: slot = ms // 200 at 5 fps


def new(harnesses: list[Harness], *args: Any, **kwargs: Any) -> Harness:
    h = Harness(*args, **kwargs)
    harnesses.append(h)
    return h


def test_real_model_end_to_end_jumping_jacks(harnesses, redis_url, real_backend, assets: Path) -> None:
    from worker.tools.publish import publish

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


def publish_clip(h: Harness, camera: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = (rng.random((172, 172, 3)) * rng.random((1, 1, 3)) * 255).astype(np.uint8)
        h.publish_rgb(camera, T0 + i * 200, image, seq=i)


def scores(h: Harness, camera: str) -> dict[int, list[tuple[str, float]]]:
    return {p.slot: [(t.label, t.score) for t in p.top] for _, p in h.predictions(camera)}


@pytest.mark.parametrize("how", ["graceful", "crash"])
def test_restart_mid_stream_loses_and_duplicates_nothing(
    harnesses, redis_url, lite_backend, labels600, how: str
) -> None:
    reference = new(harnesses, redis_url, lite_backend, labels600, window=8).start()
    publish_clip(reference, "cam", 40, seed=21)
    reference.wait_for(lambda: len(reference.predictions("cam")) == 40, what="reference run")
    reference.stop()
    expected = scores(reference, "cam")

    first = new(harnesses, redis_url, lite_backend, labels600, window=8)
    publish_clip(first, "cam", 25, seed=21)  # the same frames, the stream cut short
    first.start()
    first.wait_for(lambda: len(first.predictions("cam")) >= 13, what="first worker's predictions")
    first.stop() if how == "graceful" else first.kill()
    done = len(first.predictions("cam"))
    assert 13 <= done <= 25
    rng_all = np.random.default_rng(21)
    images = [
        (rng_all.random((172, 172, 3)) * rng_all.random((1, 1, 3)) * 255).astype(np.uint8) for _ in range(40)
    ]
    for i in range(25, 40):  # the rest arrives while no worker runs
        first.publish_rgb("cam", T0 + i * 200, images[i], seq=i)
    second = Harness(redis_url, lite_backend, labels600, prefix=first.prefix, window=8)
    harnesses.append(second)
    second.start()
    second.wait_for(lambda: len(second.predictions("cam")) >= 40, what="second worker's predictions")
    second.stop()
    got = second.predictions("cam")
    assert [p.slot for _, p in got] == sorted(expected)  # every slot once, in order
    for slot, top in scores(second, "cam").items():
        assert [label for label, _ in top] == [label for label, _ in expected[slot]], slot
        np.testing.assert_allclose([s for _, s in top], [s for _, s in expected[slot]], rtol=1e-5)
    assert second.client.xpending(second.frames_key("cam"), second.settings.group)["pending"] == 0


def test_bad_entries_go_to_the_dead_letter_stream_and_the_camera_carries_on(
    harnesses, redis_url, lite_backend, labels600
) -> None:
    h = new(harnesses, redis_url, lite_backend, labels600, max_frame_bytes=200_000)
    key = h.frames_key("cam")
    good = np.full((172, 172, 3), 90, np.uint8)
    jpeg = encode_jpeg(good)
    base = {"v": "1", "camera": "cam", "seq": "1", "encoding": "jpeg", "data": jpeg}
    bad = {
        "missing_field": {k: v for k, v in base.items() if k != "data"},
        "bad_type": {**base, "seq": "abc"},
        "bad_encoding": {**base, "encoding": "webp"},
        "bad_version": {**base, "v": "9"},
        "undecodable": {**base, "data": jpeg[: len(jpeg) // 3]},
        "too_large": {**base, "data": b"\xff" * 300_000},
        "wrong_size": {**base, "encoding": "rgb24", "width": "10", "height": "10", "data": b"\x00" * 299},
        "wrong_camera": {**base, "camera": "other"},
    }
    h.publish_rgb("cam", T0, good, seq=0)
    ms = T0 + 200
    for fields in bad.values():
        h.client.xadd(key, fields, id=f"{ms}-0")
        ms += 200
    h.publish_rgb("cam", ms, good, seq=99)
    h.start()
    h.wait_for(lambda: h.client.xlen(h.settings.deadletter_stream) == len(bad), what="dead letters")
    h.wait_for(lambda: any(p.slot == ms // 200 for _, p in h.predictions("cam")), what="the last good frame")
    h.stop()
    from schemas.messages import DeadLetter

    letters = [DeadLetter.from_fields(f) for _, f in h.client.xrange(h.settings.deadletter_stream)]
    assert sorted(d.reason for d in letters) == sorted(bad)
    assert all(d.camera == "cam" and d.stream == key and d.detail for d in letters)
    assert all("data" not in d.fields or d.fields["data"] > 0 for d in letters)
    for reason in bad:
        assert (
            h.metrics.registry.get_sample_value("movinet_frames_deadlettered_total", {"reason": reason}) == 1
        )
    assert h.client.xpending(key, h.settings.group)["pending"] == 0
    # The gap left by the bad entries is longer than max_gap: the last frame starts afresh.
    assert [(p.slot - T0 // 200, p.frames) for _, p in h.predictions("cam")] == [(0, 1), (9, 1)]


def test_frame_written_with_redis_cli_as_in_the_readme(
    harnesses, redis_url, lite_backend, labels600, tmp_path: Path
) -> None:
    import shutil
    from urllib.parse import urlparse

    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli not installed")
    h = new(harnesses, redis_url, lite_backend, labels600).start()
    image = tmp_path / "frame.jpg"
    image.write_bytes(encode_jpeg(np.full((240, 320, 3), 128, np.uint8)))
    url = urlparse(redis_url)
    key = h.frames_key("cam1")
    # README: redis-cli -x XADD 'frames:{cam1}' '*' v 1 camera cam1 seq 0 encoding jpeg data < frame.jpg
    with image.open("rb") as stdin:
        subprocess.run(
            [
                cli,
                "-h",
                url.hostname or "127.0.0.1",
                "-p",
                str(url.port or 6379),
                "-x",
                "XADD",
                key,
                "*",
                "v",
                "1",
                "camera",
                "cam1",
                "seq",
                "0",
                "encoding",
                "jpeg",
                "data",
            ],
            stdin=stdin,
            check=True,
            capture_output=True,
        )
    h.wait_for(lambda: len(h.predictions("cam1")) == 1, what="a prediction")
    h.stop()
    assert h.client.xlen(h.settings.deadletter_stream) == 0
    assert h.predictions("cam1")[0][1].frames == 1


def test_run_command_drains_on_sigterm_and_exits_zero(redis_url, models, labels600, tmp_path: Path) -> None:
    """The real `movinet-worker run` process: serves, reports ready, then SIGTERM within the grace period."""
    import os
    import signal
    import sys
    import time
    import uuid

    import redis as redis_lib

    from worker.config import key_env
    from worker.runner import check
    from worker.testing import free_port

    prefix = "t" + uuid.uuid4().hex[:10]
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(labels600) + "\n")
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "MOVINET_MODEL": str(models.tflite),
        "MOVINET_LABELS": str(labels),
        "MOVINET_METRICS_PORT": str(port),
        **key_env(prefix),
        "MOVINET_GRACE_SECONDS": "10",
    }
    client = redis_lib.Redis.from_url(redis_url)
    h = Harness(redis_url, None, labels600, prefix=prefix)
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "run", "--block-ms", "20"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        h.wait_for(lambda: check(url, redis_url)[0], timeout=120, what="readiness")
        publish_clip(h, "cam", 10, seed=3)
        h.wait_for(lambda: len(h.predictions("cam")) == 10, what="predictions")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
        assert not check(url, None, timeout=1)[0]
        assert "stopped" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
        h.cleanup()
        client.close()


def test_bad_config_names_the_field() -> None:
    from tests.conftest import run_cli

    proc = run_cli("config", "--top-k", "0", "--frames-key", "frames:nocamera", check=False)
    assert proc.returncode != 0
    assert "top_k (--top-k / MOVINET_TOP_K)" in proc.stderr
    assert "frames_key (--frames-key / MOVINET_FRAMES_KEY)" in proc.stderr
    ok = run_cli("config", "--top-k", "3")
    assert '"top_k": 3' in ok.stdout
    assert run_cli("check", "--metrics-port", "1", check=False).returncode == 1


def test_control_stream_subscribes_and_unsubscribes(harnesses, redis_url, lite_backend, labels600) -> None:
    from schemas.messages import ControlMessage

    h = new(harnesses, redis_url, lite_backend, labels600, discover=False).start()
    publish_clip(h, "cam", 3, seed=5)
    time.sleep(1.0)
    assert h.predictions("cam") == []  # not discovered, not subscribed: not served
    control = h.settings.control_stream
    h.client.xadd(control, ControlMessage(action="subscribe", camera="cam", top_k=2).to_fields())
    h.wait_for(lambda: len(h.predictions("cam")) == 3, what="predictions after subscribe")
    assert all(len(p.top) == 2 for _, p in h.predictions("cam"))  # the per-camera option
    h.client.xadd(control, ControlMessage(action="unsubscribe", camera="cam").to_fields())
    h.wait_for(lambda: "cam" not in h.worker.cameras, what="camera dropped")  # type: ignore[union-attr]
    h.client.xadd(control, {"v": "1", "action": "explode", "camera": "cam"})  # bad control entry
    h.wait_for(lambda: h.client.xlen(h.settings.deadletter_stream) == 1, what="control dead letter")
    rng = np.random.default_rng(0)
    h.publish_rgb("cam", T0 + 10_000, (rng.random((172, 172, 3)) * 255).astype(np.uint8), seq=50)
    h.stop()
    assert len(h.predictions("cam")) == 3  # nothing after unsubscribe


def test_idle_camera_state_is_freed_and_its_series_removed(
    harnesses, redis_url, lite_backend, labels600
) -> None:
    h = new(harnesses, redis_url, lite_backend, labels600, idle_timeout_seconds=1.5).start()
    publish_clip(h, "cam", 3, seed=6)
    h.wait_for(lambda: len(h.predictions("cam")) == 3, what="predictions")
    registry = h.metrics.registry
    assert registry.get_sample_value("movinet_cameras_active") == 1
    assert registry.get_sample_value("movinet_input_lag_seconds", {"camera": "cam"}) is not None
    h.wait_for(lambda: registry.get_sample_value("movinet_cameras_active") == 0, timeout=10, what="eviction")
    assert registry.get_sample_value("movinet_input_lag_seconds", {"camera": "cam"}) is None
    assert h.worker is not None and h.worker.cameras["cam"].timeline is None
    # It comes back: served again from a fresh state.
    rng = np.random.default_rng(1)
    h.publish_rgb("cam", T0 + 60_000, (rng.random((172, 172, 3)) * 255).astype(np.uint8), seq=9)
    h.wait_for(lambda: len(h.predictions("cam")) == 4, what="prediction after idle")
    h.stop()
    assert h.predictions("cam")[-1][1].frames == 1
    assert registry.get_sample_value("movinet_predictions_published_total") == 4
    assert registry.get_sample_value("movinet_frames_received_total") == 4


def test_workers_share_cameras_fairly_and_take_over_a_dead_ones(
    harnesses, redis_url, lite_backend, labels600
) -> None:
    fast = {"lease_seconds": 1.0, "heartbeat_seconds": 0.2, "window": 8}
    a = new(harnesses, redis_url, lite_backend, labels600, **fast)
    for c in range(6):
        publish_clip(a, f"cam{c}", 5, seed=c)
    b = Harness(redis_url, lite_backend, labels600, prefix=a.prefix, **fast)
    harnesses.append(b)
    a.start()
    b.start()

    def owned(h: Harness) -> set[str]:
        assert h.worker is not None
        return {n for n, c in h.worker.cameras.items() if c.owned}

    a.wait_for(lambda: len(owned(a)) == 3 and len(owned(b)) == 3, what="an even split")
    assert owned(a).isdisjoint(owned(b))
    a.wait_for(lambda: all(len(a.predictions(f"cam{c}")) == 5 for c in range(6)), what="predictions")
    from_b = owned(b)
    b.kill()  # no release: its leases must lapse
    for c in range(6):
        a.publish_rgb(f"cam{c}", T0 + 5 * 200, np.full((172, 172, 3), 7, np.uint8), seq=5)
    a.wait_for(lambda: len(owned(a)) == 6, timeout=10, what="takeover")
    a.wait_for(lambda: all(len(a.predictions(f"cam{c}")) == 6 for c in range(6)), what="predictions after")
    a.stop()
    for c in range(6):
        slots = [p.slot for _, p in a.predictions(f"cam{c}")]
        assert slots == sorted(set(slots)) and len(slots) == 6
    registry = a.metrics.registry
    assert registry.get_sample_value("movinet_leases_taken_over_total") == len(from_b)
    # Its own 3 and the dead worker's 3, plus those of the other's 3 it took before the other one
    # registered and then handed over (none to all 3, depending on who started first).
    assert 6 <= registry.get_sample_value("movinet_leases_acquired_total") <= 9
    assert a.client.exists(a.settings.owner("cam0")) == 0  # released on stop
    assert a.client.zscore(a.settings.workers_key, a.settings.worker_id) is None  # deregistered


def test_input_older_than_the_retention_is_trimmed(harnesses, redis_url, lite_backend, labels600) -> None:
    """Behind the committed position and, read or not, behind the stream's newest entry."""
    h = new(harnesses, redis_url, lite_backend, labels600, input_retention_seconds=2.0, window=4)
    publish_clip(h, "cam", 200, seed=8)  # 40 s of frames
    h.start()
    h.wait_for(lambda: any(p.slot == T0 // 200 + 199 for _, p in h.predictions("cam")), what="the last slot")
    h.wait_for(lambda: h.client.xlen(h.frames_key("cam")) < 200, what="trimming")
    h.stop()
    first = h.client.xrange(h.frames_key("cam"), count=1)[0][0].decode()
    # Approximate trimming keeps whole radix-tree nodes: at most ~100 entries beyond the bound.
    assert int(first.split("-")[0]) >= T0 + 200 * 200 - 2000 - 100 * 200


def test_a_drain_longer_than_the_lease_keeps_the_leases(
    harnesses, redis_url, lite_backend, labels600
) -> None:
    """On stop the worker drains what it has queued; renewals go on meanwhile, so nothing is fenced off."""
    h = new(
        harnesses,
        redis_url,
        StepHook(lite_backend, lambda _: time.sleep(0.03)),  # a drain that outlasts the lease anywhere
        labels600,
        lease_seconds=1.0,
        heartbeat_seconds=0.2,
        read_count=200,
        readahead_frames=300,
        max_lag_seconds=10_000,
        grace_seconds=60,
    )
    ramp = np.linspace(0, 255, 172 * 172 * 3).reshape(172, 172, 3).astype(np.uint8)
    image = encode_jpeg(ramp, 80)
    pipe = h.client.pipeline(transaction=False)
    for camera in ("a", "b"):
        for i in range(400):
            fields = {"v": "1", "camera": camera, "seq": str(i), "encoding": "jpeg", "data": image}
            pipe.xadd(h.frames_key(camera), fields, id=f"{T0 + i * 200}-0")
    pipe.execute()
    h.start()
    h.wait_for(lambda: h.predictions("a") and h.predictions("b"), what="first predictions")
    h.wait_for(
        lambda: (h.metrics.registry.get_sample_value("movinet_frames_received_total") or 0) >= 250,
        what="a queue to drain",
    )
    stopping = time.monotonic()
    h.stop(timeout=60)
    drained = time.monotonic() - stopping
    received = h.metrics.registry.get_sample_value("movinet_frames_received_total")
    published = sum(len(h.predictions(c)) for c in ("a", "b"))
    assert h.metrics.registry.get_sample_value("movinet_leases_lost_total") == 0
    assert published == received  # every frame read before the stop was stepped and published
    assert drained > 2 * h.settings.lease_seconds, drained  # the check is only worth this much
