"""The EMA temporal mode, checked against its own definition (DESIGN.md).

The definition, applied here by hand to the raw model (the restored TF object, or a bare LiteRT
interpreter) one camera and one frame at a time: step the state; if its frame count passed `c`,
multiply every `*_pool_buffer` by `c / count` and set every `*_pool_frame_count` to `c`. The
backends (batched, grouped, on parallel interpreters) and the worker (through Redis, with late
starters, gaps and a restart) must give what the definition gives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.test_worker import T0, new
from worker.model.labels import softmax

TOL = 1e-4


def clips(cameras: int, frames: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random((cameras, 1, 1, 1, 3), dtype=np.float32)
    return (rng.random((cameras, frames, 172, 172, 3), dtype=np.float32) * base).astype(np.float32)


def hold_by_hand(states: dict[str, np.ndarray], c: int) -> dict[str, np.ndarray]:
    count = int(next(v for k, v in states.items() if k.endswith("_pool_frame_count"))[0])
    if count <= c:
        return states
    out = {}
    for name, value in states.items():
        if name.endswith("_pool_buffer"):
            out[name] = (value * np.float32(c / count)).astype(value.dtype)
        elif name.endswith("_pool_frame_count"):
            out[name] = np.full_like(value, c)
        else:
            out[name] = value
    return out


class RawTF:
    """The restored SavedModel called as the tutorial calls it, batch 1, numpy states in between."""

    def __init__(self, model: Any) -> None:
        import tensorflow as tf

        self.tf, self.model = tf, model

    def run(self, clip: np.ndarray, c: int | None) -> list[np.ndarray]:
        tf = self.tf
        states = {k: v.numpy() for k, v in self.model.init_states(tf.constant([1, 1, 172, 172, 3])).items()}
        out = []
        for t in range(len(clip)):
            logits, new = self.model({**states, "image": tf.constant(clip[None, t : t + 1])})
            states = {k: v.numpy() for k, v in new.items()}
            if c is not None:
                states = hold_by_hand(states, c)
            out.append(logits.numpy()[0])
        return out


class RawLite:
    """A bare LiteRT interpreter through its signature runner, state dicts in between."""

    def __init__(self, path: str) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=path)
        self.runner = self.interpreter.get_signature_runner()
        details = self.runner.get_input_details()
        self.zero = {n: np.zeros(d["shape"], d["dtype"]) for n, d in details.items() if n != "image"}

    def run(self, clip: np.ndarray, c: int | None) -> list[np.ndarray]:
        states = dict(self.zero)
        out = []
        for t in range(len(clip)):
            result = self.runner(image=clip[None, t : t + 1].astype(np.float32), **states)
            out.append(np.array(result.pop("logits")[0]))
            states = {k: np.array(v) for k, v in result.items()}
            if c is not None:
                states = hold_by_hand(states, c)
        return out


@pytest.fixture(scope="module")
def raw_lite(models: Any) -> RawLite:
    return RawLite(str(models.tflite))


@pytest.mark.parametrize("which", ["tfhub", "litert"])
def test_backend_hold_is_the_definition(which: str, tf_backend, lite_backend, raw_lite) -> None:
    backend = tf_backend if which == "tfhub" else lite_backend
    raw = RawTF(tf_backend.model) if which == "tfhub" else raw_lite
    c, steps = 3, 11
    cams = clips(3, steps, seed=31)
    starts = [0, 0, 2]  # the third camera starts late: warm-up counts differ, so batches split
    states: list[Any] = [backend.init_state()] * 3
    got: list[list[np.ndarray]] = [[], [], []]
    for t in range(steps):
        live = [i for i in range(3) if t >= starts[i]]
        frames = np.stack([cams[i, t - starts[i] : t - starts[i] + 1] for i in live])
        logits, new_states = backend.step(frames, [states[i] for i in live], c)
        for j, i in enumerate(live):
            states[i] = new_states[j]
            got[i].append(logits[j])
    assert [s.frames for s in states] == [c, c, c]
    for i in range(3):
        n = steps - starts[i]
        expected = raw.run(cams[i, :n], c)
        for t in range(n):
            assert np.abs(got[i][t] - expected[t]).max() < TOL, (i, t)
        # The check can fail: without the hold (the cumulative mean) the answer moves away.
        cumulative = raw.run(cams[i, :n], None)
        assert np.abs(cumulative[-1] - expected[-1]).max() > 10 * TOL
        # ... and until the count reaches c, the two are the same thing.
        assert np.abs(cumulative[c - 1] - expected[c - 1]).max() < TOL


def test_held_pooled_means_are_moving_averages(tf_backend) -> None:
    """The head's pooled mean moves 1/(c+1) of the way to each new frame's feature."""
    import tensorflow as tf

    c = 4
    clip = clips(1, 12, seed=33)[0]
    state = tf_backend.init_state()
    means = []
    for t in range(12):
        before = state
        _, (state,) = tf_backend.step(clip[None, t : t + 1], [before], c)
        buf = state.tensors["state_head_pool_buffer"].numpy()
        means.append(buf / state.frames)
        if t >= c:  # held: the new frame's feature is what the unheld step would have added
            _, (free,) = tf_backend.step(clip[None, t : t + 1], [before], None)
            feature = (
                free.tensors["state_head_pool_buffer"].numpy() - before.tensors["state_head_pool_buffer"]
            )
            expected = means[-2] * c / (c + 1) + feature / (c + 1)
            np.testing.assert_allclose(means[-1], expected, rtol=1e-5, atol=1e-6)
            assert int(tf.reduce_max(free.tensors["state_head_pool_frame_count"])) == c + 1
    assert state.frames == c


def reference_slots(frames: dict[int, np.ndarray], gap: int) -> list[tuple[int, int, np.ndarray]]:
    """(slot, start of its run, image) for each slot stepped: short gaps repeat, long ones restart."""
    out: list[tuple[int, int, np.ndarray]] = []
    for slot in sorted(frames):
        if out and slot - out[-1][0] - 1 <= gap:
            prev_slot, start, prev = out[-1]
            out += [(s, start, prev) for s in range(prev_slot + 1, slot)]
            out.append((slot, start, frames[slot]))
        else:
            out.append((slot, slot, frames[slot]))
    return out


def test_worker_ema_predictions_follow_the_definition_across_gaps_and_a_restart(
    harnesses, redis_url, lite_backend, raw_lite, labels600
) -> None:
    c, replay, gap = 3, 6, 2
    settings = {
        "temporal": "ema",
        "ema_frames": c,
        "ema_replay_slots": replay,
        "max_gap_slots": gap,
        "top_k": 5,
    }
    rng = np.random.default_rng(41)
    plan = {  # camera -> slots with a frame (after T0's)
        "early": [s for s in range(30) if s not in (9, 10)],  # a short gap: repeated
        "late": list(range(8, 18)) + list(range(24, 30)),  # a long gap: restarted
    }
    base = T0 // 200
    images = {
        cam: {
            base + s: (rng.random((172, 172, 3)) * rng.random((1, 1, 3)) * 255).astype(np.uint8)
            for s in slots
        }
        for cam, slots in plan.items()
    }
    split = {
        cam: sorted(images[cam])[len(slots) * 2 // 3] for cam, slots in plan.items()
    }  # 2nd part from here

    def publish(h: Any, second_part: bool) -> None:
        for cam in plan:
            for s, image in images[cam].items():
                if (s >= split[cam]) == second_part:
                    h.publish_rgb(cam, s * 200, image, seq=s)

    def reached(h: Any, upto: dict[str, int]) -> bool:
        return all((p := h.predictions(cam)) and p[-1][1].slot == upto[cam] for cam in plan)

    first = new(harnesses, redis_url, lite_backend, labels600, **settings)
    publish(first, False)
    first.start()
    before = {cam: max(s for s in images[cam] if s < split[cam]) for cam in plan}
    first.wait_for(lambda: reached(first, before), what="the first worker's predictions")
    first.stop()
    for cam in plan:  # the replay a camera falls back to without a checkpoint (test_checkpoint: with)
        assert first.client.delete(first.settings.checkpoint(cam)) == 1
    second = new(harnesses, redis_url, lite_backend, labels600, prefix=first.prefix, **settings)
    publish(second, True)
    second.start()
    second.wait_for(lambda: reached(second, {cam: max(images[cam]) for cam in plan}), what="all predictions")
    second.stop()
    fallback = {"result": "none"}
    assert second.metrics.registry.get_sample_value("movinet_checkpoint_resumes_total", fallback) == 2

    checked = rebuilt = 0
    for cam in plan:
        # The first worker's states run from the camera's start; the second's from its replay start.
        replay_from = before[cam] + 1 - replay - gap - 1
        uninterrupted = {s: (start, image) for s, start, image in reference_slots(images[cam], gap)}
        replayed = {
            s: (start, image)
            for s, start, image in reference_slots(
                {s: v for s, v in images[cam].items() if s >= replay_from}, gap
            )
        }
        preds = [p for _, p in second.predictions(cam)]
        assert [p.slot for p in preds] == sorted(uninterrupted)  # none lost, none twice
        for p in preds:
            stepped = uninterrupted if p.slot <= before[cam] else replayed
            start = stepped[p.slot][0]
            assert (p.window_start_ms // 200, p.frames) == (start, p.slot - start + 1), (cam, p.slot)
            assert (p.temporal, p.ema_frames) == ("ema", c)
            rebuilt += start != uninterrupted[p.slot][0]
            clip = np.stack([stepped[s][1] for s in range(start, p.slot + 1)]).astype(np.float32) / 255
            probs = softmax(raw_lite.run(clip, c)[-1])
            order = np.argsort(-probs)[:5]
            assert [t.label for t in p.top] == [labels600[i] for i in order], (cam, p.slot)
            np.testing.assert_allclose([t.score for t in p.top], probs[order], rtol=1e-4)
            checked += 1
    assert checked == 30 + 16  # "early" 0..29 with 9, 10 repeated; "late" 8..17 and 24..29
    assert rebuilt > 0  # the replay started later than the camera did: an approximate state
