"""The model runtime against real exported MoViNet graphs (random weights, TF Hub format)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.model.backends.base import Backend

TOL = 1e-4


def clips(n: int, frames: int, seed: int) -> np.ndarray:
    """Noise with a colour cast that changes every frame, so clips differ in time, not just texture."""
    rng = np.random.default_rng(seed)
    noise = rng.random((n, frames, 172, 172, 3), dtype=np.float32)
    return noise * rng.random((n, frames, 1, 1, 3), dtype=np.float32)


def stream_alone(backend: Backend, clip: np.ndarray) -> list[np.ndarray]:
    """Logits after each frame of one camera stepped by itself."""
    states = [backend.init_state()]
    out = []
    for t in range(clip.shape[0]):
        logits, states = backend.step(clip[t : t + 1][:, None], states)
        out.append(logits[0])
    return out


def test_metadata(tf_backend, lite_backend, base_model) -> None:
    for m in (tf_backend, lite_backend, base_model):
        info = m.info
        assert (info.model_id, info.height, info.width) == ("a0", 172, 172)
        assert (info.fps, info.clip_frames, info.num_classes) == (5.0, 50, 600)
    assert tf_backend.info.kind == "stream" and base_model.info.kind == "base"


def test_stream_equals_base_on_the_same_clip(tf_backend, base_model) -> None:
    clip = clips(1, 8, seed=1)[0]
    stream = stream_alone(tf_backend, clip)[-1]
    base = base_model.classify_clip(clip)
    assert np.abs(stream - base).max() < TOL
    # The comparison can fail: a frame missing, or another clip, is far outside the tolerance.
    assert np.abs(base_model.classify_clip(clip[:7]) - base).max() > 10 * TOL
    assert np.abs(base_model.classify_clip(clips(1, 8, seed=2)[0]) - base).max() > 100 * TOL


def test_batched_cameras_equal_each_alone(tf_backend) -> None:
    cams = clips(3, 5, seed=3)
    states = [tf_backend.init_state()] * 3
    for t in range(5):
        batched, states = tf_backend.step(cams[:, t : t + 1], states)
    assert [s.frames for s in states] == [5, 5, 5]
    for c in range(3):
        assert np.abs(batched[c] - stream_alone(tf_backend, cams[c])[-1]).max() < TOL


def test_cameras_with_different_frame_counts_are_grouped_not_mixed(tf_backend) -> None:
    import tensorflow as tf

    cams = clips(2, 4, seed=4)
    old = [tf_backend.init_state()]
    for t in range(3):
        _, old = tf_backend.step(cams[0:1, t : t + 1], old)
    fresh = tf_backend.init_state()
    frames = np.stack([cams[0, 3:4], cams[1, 0:1]])
    logits, states = tf_backend.step(frames, [old[0], fresh])
    assert [s.frames for s in states] == [4, 1]
    assert np.abs(logits[0] - stream_alone(tf_backend, cams[0])[3]).max() < TOL
    assert np.abs(logits[1] - stream_alone(tf_backend, cams[1][:1])[0]).max() < TOL

    # What grouping prevents: one call with both states uses the first camera's frame count for both.
    mixed = {
        name: old[0].tensors[name]
        if name.endswith("_frame_count")
        else tf.concat([old[0].tensors[name], fresh.tensors[name]], 0)
        for name in tf_backend.state_names
    }
    wrong, _ = tf_backend.model({**mixed, "image": tf.constant(frames)})
    assert np.abs(wrong.numpy()[1] - logits[1]).max() > 100 * TOL


def test_padding_to_a_bucket_does_not_change_results(models) -> None:
    from worker.model.backends import TFHubOptions, load_stream_model

    padded = load_stream_model(str(models.stream), "tfhub", TFHubOptions((4,)))
    cams = clips(3, 2, seed=5)
    states = [padded.init_state()] * 3
    for t in range(2):
        logits, states = padded.step(cams[:, t : t + 1], states)
    for c in range(3):
        assert np.abs(logits[c] - stream_alone(padded, cams[c])[-1]).max() < TOL


def test_tf_and_litert_agree_over_ten_frames(tf_backend, lite_backend) -> None:
    clip = clips(1, 10, seed=6)[0]
    tf_logits = stream_alone(tf_backend, clip)
    lite_logits = stream_alone(lite_backend, clip)
    for a, b in zip(tf_logits, lite_logits, strict=True):
        assert np.abs(a - b).max() < 1e-3
    assert np.abs(tf_logits[0] - tf_logits[-1]).max() > 1e-2  # the state changed the answer


def test_litert_parallel_interpreters_equal_sequential(models, lite_backend) -> None:
    from worker.model.backends import LiteRTOptions, load_stream_model

    single = load_stream_model(str(models.tflite), "litert", LiteRTOptions(interpreters=1))
    cams = clips(5, 3, seed=8)
    par = [lite_backend.init_state()] * 5
    seq = [single.init_state()] * 5
    for t in range(3):
        lp, par = lite_backend.step(cams[:, t : t + 1], par)
        ls, seq = single.step(cams[:, t : t + 1], seq)
    assert lite_backend.interpreters == 2
    np.testing.assert_array_equal(lp, ls)
    assert [s.frames for s in par] == [3] * 5


def test_step_rejects_wrong_frame_shape(tf_backend, lite_backend) -> None:
    for backend in (tf_backend, lite_backend):
        with pytest.raises(ValueError, match="frames must be shaped"):
            backend.step(np.zeros((1, 1, 100, 100, 3), np.float32), [backend.init_state()])


def test_a_base_model_is_not_accepted_as_a_stream_model(models) -> None:
    from worker.model.backends import ModelLoadError, load_stream_model

    with pytest.raises(ModelLoadError, match="base model"):
        load_stream_model(str(models.base))


def test_each_backend_takes_its_own_typed_options() -> None:
    from worker.config import Settings
    from worker.model.backends import LiteRTOptions, TFHubOptions, load_model, options_for

    settings = Settings(model="m.tflite", interpreters=3, threads=2, batch_sizes=[1, 8])
    assert options_for("m.tflite", "auto", settings) == LiteRTOptions(interpreters=3, threads=2)
    assert options_for("a0_stream", "auto", settings) == TFHubOptions(batch_sizes=(1, 8))
    assert options_for("m.tflite", "tfhub", settings) == TFHubOptions(batch_sizes=(1, 8))
    with pytest.raises(TypeError, match="TFHubOptions given for the litert backend"):
        load_model("m.tflite", "auto", TFHubOptions())
