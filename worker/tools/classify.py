"""`movinet-worker classify`: the tutorial's job as a command, no Redis involved."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np

from worker.model.backends import Backend, BackendName, ClipModel, load_model
from worker.model.labels import check_labels, load_labels, softmax, top_k
from worker.tools.video import VideoFrame, expected_frames, open_source, read_frames, to_model_input


@dataclasses.dataclass
class FrameResult:
    index: int
    time: float
    top1: tuple[str, float]


@dataclasses.dataclass
class ClassifyResult:
    source: str
    model: str
    frames: int
    fps: float | None
    top: list[tuple[str, float]]
    per_frame: list[FrameResult]

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model": self.model,
            "frames": self.frames,
            "fps": self.fps,
            "top": [{"label": label, "score": score} for label, score in self.top],
            "per_frame": [
                {"index": f.index, "time": round(f.time, 4), "label": f.top1[0], "score": f.top1[1]}
                for f in self.per_frame
            ],
        }


def _progress(total: int | None, enabled: bool | None) -> Any:
    from tqdm import tqdm

    # disable=None shows the bar only on a terminal; short inputs finish before it matters.
    return tqdm(
        total=total,
        unit="frame",
        disable=None if enabled is None else not enabled,
        file=sys.stderr,
        leave=False,
    )


def classify(
    source: str,
    model: str | Backend | ClipModel,
    *,
    labels: list[str] | str | None = None,
    fps: float | None = None,
    top: int = 5,
    backend: BackendName = "auto",
    progress: bool | None = None,
    on_frame: Callable[[FrameResult], None] | None = None,
) -> ClassifyResult:
    """Classify a video with a stream model (frame by frame) or a base model (whole clip).

    `fps` None uses the model's training rate; 0 keeps every decoded frame.
    """
    names = labels if isinstance(labels, list) else load_labels(labels)  # before the slow part
    net = load_model(model, backend) if isinstance(model, str) else model
    check_labels(names, net.info.num_classes, net.info.source)
    rate = net.info.fps if fps is None else (fps or None)
    size = (net.info.height, net.info.width)
    container = open_source(source)
    per_frame: list[FrameResult] = []
    count = 0
    with _progress(expected_frames(container, rate), progress) as bar:
        frames = read_frames(source, size, rate, container=container)
        if isinstance(net, Backend):
            states = [net.init_state()]
            logits = np.zeros((1, net.info.num_classes), np.float32)
            for frame in frames:
                logits, states = net.step(to_model_input(frame.image[None]), states)
                count += 1
                bar.update(1)
                result = FrameResult(frame.index, frame.time, top_k(softmax(logits[0]), names, 1)[0])
                per_frame.append(result)
                if on_frame:
                    on_frame(result)
            final = logits[0]
        else:
            clip: list[VideoFrame] = []
            for frame in frames:
                clip.append(frame)
                bar.update(1)
            count = len(clip)
            if not clip:
                raise ValueError(f"{source}: no frames decoded")
            final = net.classify_clip(to_model_input(np.stack([f.image for f in clip]))[:, 0])
    container.close()
    if count == 0:
        raise ValueError(f"{source}: no frames decoded")
    return ClassifyResult(
        source, net.info.describe(), count, rate, top_k(softmax(final), names, top), per_frame
    )


def print_result(result: ClassifyResult, out: TextIO = sys.stdout) -> None:
    rate = f"{result.fps:g} fps" if result.fps else "every frame"
    print(f"{result.source}: {result.frames} frames ({rate}) through {result.model}", file=out)
    width = max(len(label) for label, _ in result.top)
    for label, score in result.top:
        print(f"  {label:<{width}}  {score:6.3f}", file=out)


def print_frame(result: FrameResult, out: TextIO = sys.stdout) -> None:
    label, score = result.top1
    print(f"frame {result.index:5d}  t={result.time:7.2f}s  {label} {score:.3f}", file=out)
