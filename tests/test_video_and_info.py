"""Decoding onto the model clock, and what is read off a model's name or shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.model.info import architecture_from_head, architecture_from_name, resolve_info
from worker.model.labels import softmax, top_k
from worker.tools.video import read_frames, slot_of, to_model_input


def test_jumpingjack_gif_resampled_to_5_fps(assets: Path) -> None:
    frames = list(read_frames(str(assets / "videos" / "jumpingjack.gif"), (172, 172), 5.0))
    assert [f.slot for f in frames] == list(range(8))
    # 8.33 fps source: the first frame in each 200 ms slot is kept.
    assert [f.index for f in frames] == [0, 2, 4, 5, 7, 8, 10, 12]
    assert frames[0].image.shape == (172, 172, 3) and frames[0].image.dtype == np.uint8


def test_every_frame_when_fps_is_not_given(assets: Path) -> None:
    frames = list(read_frames(str(assets / "videos" / "carving_ice_android.mp4"), (64, 48), None))
    assert len(frames) == 200 and frames[0].image.shape == (64, 48, 3)
    assert abs(frames[-1].time - 199 / 30) < 1e-6


def test_slot_boundaries_are_exact() -> None:
    assert [slot_of(t, 5.0) for t in (0.0, 0.1999, 0.2, 0.6, 1.0)] == [0, 0, 1, 3, 5]


def test_model_input_layout() -> None:
    x = to_model_input(np.full((2, 4, 4, 3), 255, np.uint8))
    assert x.shape == (2, 1, 4, 4, 3) and x.dtype == np.float32 and x.max() == 1.0


def test_architecture_from_head_and_name() -> None:
    assert architecture_from_head(480).model_id == "a0"
    assert architecture_from_head(992).model_id == "a5"
    assert architecture_from_head(123) is None
    assert (
        architecture_from_name(
            "https://tfhub.dev/tensorflow/movinet/a2/stream/kinetics-600/classification/3"
        ).model_id
        == "a2"
    )
    assert architecture_from_name("/models/movinet_a3_base").model_id == "a3"
    assert architecture_from_name("/models/data5") is None


def test_resolve_info_prefers_what_the_model_says() -> None:
    info = resolve_info(
        source="x.tflite",
        backend="litert",
        kind="stream",
        num_classes=600,
        head_filters=744,
        height=None,
        width=None,
    )
    assert (info.model_id, info.height, info.fps, info.clip_frames) == ("a3", 256, 12.0, 120)
    info = resolve_info(
        source="a2",
        backend="tfhub",
        kind="stream",
        num_classes=600,
        head_filters=None,
        height=200,
        width=200,
        fps=7.0,
    )
    assert (info.model_id, info.height, info.fps) == ("a2", 200, 7.0)


def test_top_k_orders_by_probability() -> None:
    probs = softmax(np.array([1.0, 3.0, 2.0, -1.0]))
    assert abs(probs.sum() - 1) < 1e-6
    assert [label for label, _ in top_k(probs, ["a", "b", "c", "d"], 3)] == ["b", "c", "a"]
