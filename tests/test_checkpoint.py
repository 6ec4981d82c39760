"""Model state checkpoints: hand-overs in both temporal modes give the predictions of one
uninterrupted worker, on both backends; a checkpoint of another model or a corrupt one is refused."""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest

from schemas.messages import Prediction
from tests.harness import Harness
from tests.test_worker import T0, new
from worker.pipeline.checkpoint import ZMAGIC, Refused, Snapshot, decode, encode, model_identity, state_layout

CAMERAS = ["c0", "c1", "c2", "c3"]
BASE = T0 // 200
# Phases of frames (slots after BASE): one worker; a second joins (rebalance); the first stops
# (SIGTERM drain); the second is killed (crash) and a third takes over from periodic checkpoints.
PHASES = [range(0, 12), range(12, 22), range(22, 32), range(32, 42)]
# Per camera, slots without a frame: c1's gap is repeated (2 <= max_gap), c2's restarts (4 > 2).
MISSING = {"c1": {24, 25}, "c2": {26, 27, 28, 29}}
MODES = {
    "windows": {"temporal": "windows", "window": 8},
    "ema": {"temporal": "ema", "window": 8, "ema_frames": 3, "ema_replay_slots": 4},
}
FAST = {
    "lease_seconds": 1.0,
    "heartbeat_seconds": 0.2,
    "max_gap_slots": 2,
    "checkpoint_every_slots": 4,
    "top_k": 5,
}


def images(size: tuple[int, int]) -> dict[str, dict[int, np.ndarray]]:
    rng = np.random.default_rng(20)
    return {
        cam: {
            s: (rng.random((*size, 3)) * rng.random((1, 1, 3)) * 255).astype(np.uint8)
            for s in range(PHASES[-1][-1] + 1)
            if s not in MISSING.get(cam, ())
        }
        for cam in CAMERAS
    }


def publish(h: Harness, frames: dict[str, dict[int, np.ndarray]], slots: range) -> None:
    for cam in CAMERAS:
        for s in slots:
            if s in frames[cam]:
                h.publish_rgb(cam, (BASE + s) * 200, frames[cam][s], seq=s)


def reached(h: Harness, slot: int) -> bool:
    return all((p := h.predictions(cam)) and p[-1][1].slot == BASE + slot for cam in CAMERAS)


def sample(h: Harness, name: str, **labels: str) -> float:
    return h.metrics.registry.get_sample_value(name, labels) or 0.0


def assert_same(got: list[Prediction], want: list[Prediction], cam: str) -> None:
    assert [p.slot for p in got] == [p.slot for p in want], cam  # none lost, none twice
    for g, w in zip(got, want, strict=True):
        where = (cam, g.slot - BASE)
        assert (g.window_start_ms, g.frames) == (w.window_start_ms, w.frames), where
        gs, ws = [t.score for t in g.top], [t.score for t in w.top]
        np.testing.assert_allclose(gs, ws, rtol=0, atol=1e-5, err_msg=str(where))
        for i, (a, b) in enumerate(zip(g.top, w.top, strict=True)):
            near = [abs(ws[i] - ws[j]) < 2e-5 for j in (i - 1, i + 1) if 0 <= j < len(ws)]
            assert a.label == b.label or any(near), where  # only near-ties may swap


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("which", ["litert", "tfhub"])
def test_hand_overs_and_a_crash_give_the_uninterrupted_predictions(
    which: str, mode: str, harnesses, redis_url, request
) -> None:
    backend = request.getfixturevalue("lite_backend" if which == "litert" else "tf_backend")
    labels600 = request.getfixturevalue("labels600")
    options = {**FAST, **MODES[mode]}
    frames = images((backend.info.height, backend.info.width))
    last = PHASES[-1][-1]

    reference = new(harnesses, redis_url, backend, labels600, **options)
    for phase in PHASES:
        publish(reference, frames, phase)
    reference.start()
    reference.wait_for(lambda: reached(reference, last), timeout=240, what="the reference run")
    reference.stop()

    a = new(harnesses, redis_url, backend, labels600, **options)
    publish(a, frames, PHASES[0])
    a.start()
    a.wait_for(lambda: reached(a, PHASES[0][-1]), timeout=120, what="the first worker")
    b = new(harnesses, redis_url, backend, labels600, prefix=a.prefix, **options).start()
    # Rebalance: two of the four cameras move to b, each handed over with a checkpoint.
    b.wait_for(
        lambda: sample(b, "movinet_checkpoint_resumes_total", result="restored") == 2,
        what="two cameras restored by the second worker",
    )
    assert sample(a, "movinet_checkpoints_written_total", reason="release") == 2
    publish(a, frames, PHASES[1])
    a.wait_for(lambda: reached(a, PHASES[1][-1]), timeout=120, what="both workers")
    a.stop()  # drained: its two cameras are checkpointed and released
    assert sample(a, "movinet_checkpoints_written_total", reason="release") == 4
    b.wait_for(
        lambda: sample(b, "movinet_checkpoint_resumes_total", result="restored") == 4,
        what="the drained worker's cameras restored",
    )
    publish(b, frames, PHASES[2])
    b.wait_for(lambda: reached(b, PHASES[2][-1]), timeout=120, what="the second worker alone")
    assert sample(b, "movinet_checkpoints_written_total", reason="periodic") > 0
    b.kill()  # a crash: its leases expire, its cameras resume from its periodic checkpoints
    refused = {}
    if mode == "windows":  # the windows replay is exact without one: refuse two checkpoints there
        key = a.settings.checkpoint("c0")
        blob = bytearray(a.client.get(key) or b"")
        blob[len(blob) // 2] ^= 0xFF
        a.client.set(key, bytes(blob))
        other = encode(
            Snapshot(BASE, (), frames["c1"][0], T0), backend, "another-model", "?", int(time.time() * 1000)
        )
        a.client.set(a.settings.checkpoint("c1"), other)
        refused = {"corrupt": 1, "model": 1}
    c = new(harnesses, redis_url, backend, labels600, prefix=a.prefix, **options).start()
    publish(c, frames, PHASES[3])
    c.wait_for(lambda: reached(c, last), timeout=120, what="the third worker")
    c.stop()

    assert sample(c, "movinet_checkpoint_resumes_total", result="restored") == 4 - len(refused)
    for reason, count in refused.items():
        assert sample(c, "movinet_checkpoint_resumes_total", result=reason) == count
    # Replay after the crash: from the newest periodic checkpoint (every 4 slots), not the windows.
    assert sample(c, "movinet_takeover_replay_frames_total") <= 4 * 4 + 2 * 11
    for cam in CAMERAS:
        got = [p for _, p in c.predictions(cam)]
        want = [p for _, p in reference.predictions(cam)]
        assert_same(got, want, cam)
    workers = {p.worker for cam in CAMERAS for _, p in c.predictions(cam)}
    assert {a.settings.worker_id, b.settings.worker_id, c.settings.worker_id} <= workers


@pytest.mark.parametrize("which", ["litert", "tfhub"])
def test_a_checkpoint_restores_the_exact_state_and_refuses_another_model_or_corruption(
    which: str, tf_backend, lite_backend
) -> None:
    backend, other = (lite_backend, tf_backend) if which == "litert" else (tf_backend, lite_backend)
    rng = np.random.default_rng(3)
    size = (backend.info.height, backend.info.width)
    clips = rng.random((6, 1, 1, *size, 3), dtype=np.float32)
    state = backend.init_state()
    for clip in clips[:4]:
        _, (state,) = backend.step(clip, [state], 3)
    model, setup = model_identity(backend), "ema/3 window=8 max_gap=2 fps=5"
    image = (clips[3, 0, 0] * 255).astype(np.uint8)
    blob = encode(Snapshot(7, ((state, 4, 4),), image, T0), backend, model, setup, 0)
    snap = decode(blob, backend, model, setup, state_layout(backend))
    assert (snap.slot, snap.capture_ms, snap.windows[0][1:]) == (7, T0, (4, 4))
    np.testing.assert_array_equal(snap.image, image)
    restored = snap.windows[0][0]
    assert restored.frames == state.frames == 3
    for clip in clips[4:]:  # stepping on from the restored state is bit for bit the same
        want, (state,) = backend.step(clip, [state], 3)
        got, (restored,) = backend.step(clip, [restored], 3)
        np.testing.assert_array_equal(got, want)

    def reason(data: bytes, model_: str = model, setup_: str = setup) -> str:
        with pytest.raises(Refused) as caught:
            decode(data, backend, model_, setup_, state_layout(backend))
        return caught.value.reason

    assert model_identity(other) != model
    foreign = encode(
        Snapshot(7, ((other.init_state(), 0, 0),), image, T0), other, model_identity(other), setup, 0
    )
    assert reason(foreign) == "model"
    assert reason(blob, setup_="windows window=8 max_gap=2 fps=5") == "settings"
    for at in (0, len(blob) // 3, len(blob) - 1):
        broken = bytearray(blob)
        broken[at] ^= 0x01
        assert reason(bytes(broken)) == "corrupt", at
    assert reason(blob[: len(blob) // 2]) == "corrupt"
    deflated = ZMAGIC + zlib.compress(blob, 1)  # as a worker stores it when compression pays
    assert decode(deflated, backend, model, setup, state_layout(backend)).slot == 7
    broken = bytearray(deflated)
    broken[len(deflated) // 2] ^= 0x01
    assert reason(bytes(broken)) == "corrupt"
    assert reason(b"") == "corrupt"
