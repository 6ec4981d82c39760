"""`movinet-worker render`: the tutorial's animation, a clip beside its live top-K bar chart.

The clip is decoded twice with the same resampling: once at the model's resolution for the model
(exactly as `classify` feeds it), once at display size for the picture. Each model frame is one output
frame: the display frame on the left, a horizontal bar chart of the top-K probabilities after that
frame on the right. The chart is one matplotlib Agg figure whose artists are updated per frame.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from worker.model.backends import Backend, BackendName, load_model
from worker.model.labels import check_labels, load_labels, softmax, top_k
from worker.options import model_options, positive_int, top_k_option
from worker.tools.video import VideoError, expected_frames, open_source, read_frames, to_model_input

DPI = 100
BAR_COLOR = "#9ecae1"
TOP_COLOR = "#4292c6"
FORMATS = (".gif", ".mp4")


class RenderError(ValueError):
    """A request render cannot serve: a base model, an unknown output format, an empty clip."""


@dataclasses.dataclass(frozen=True)
class RenderResult:
    out: Path
    frames: int
    fps: float
    width: int
    height: int
    top: list[tuple[str, float]]  # after the last frame


class BarChart:
    """A top-K horizontal bar chart rendered to RGB arrays; one figure, artists updated in place."""

    def __init__(self, width: int, height: int, k: int) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # a second to import: not at start-up
        from matplotlib.figure import Figure

        self.width, self.height = width, height
        self.fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
        self.canvas = FigureCanvasAgg(self.fig)
        font = max(7.0, height / 34)
        ax = self.fig.add_axes((0.04, 0.13, 0.92, 0.74))
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(k - 0.5, -0.5)  # highest on top
        ax.set_yticks([])
        ax.tick_params(labelsize=font * 0.8)
        ax.set_xlabel("probability", fontsize=font * 0.85)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        self.bars = list(ax.barh(range(k), [0.0] * k, height=0.78, color=BAR_COLOR))
        self.bars[0].set_color(TOP_COLOR)
        self.names = [ax.text(0.012, i, "", va="center", ha="left", fontsize=font) for i in range(k)]
        self.values = [
            ax.text(0.988, i, "", va="center", ha="right", fontsize=font * 0.9, family="monospace")
            for i in range(k)
        ]
        self.caption = self.fig.text(0.5, 0.965, "", ha="center", va="top", fontsize=font)

    def draw(self, top: list[tuple[str, float]], caption: str) -> np.ndarray:
        """uint8 `[height, width, 3]` of the chart showing `top` (label, probability), highest first."""
        for i, bar in enumerate(self.bars):
            label, score = top[i] if i < len(top) else ("", 0.0)
            bar.set_width(score)
            self.names[i].set_text(label)
            self.values[i].set_text(f"{score:.3f}" if label else "")
        self.caption.set_text(caption)
        self.canvas.draw()  # type: ignore[no-untyped-call]
        rgba = np.asarray(self.canvas.buffer_rgba())  # type: ignore[no-untyped-call]
        return np.ascontiguousarray(rgba[: self.height, : self.width, :3])


class FrameWriter(Protocol):
    def write(self, image: np.ndarray) -> None: ...

    def close(self) -> None: ...


class GifWriter:
    """Pillow GIF, an adaptive palette per frame; frames are kept until `close` (GIF is for short clips)."""

    def __init__(self, out: Path, fps: float) -> None:
        self.out, self.fps = out, fps
        self.frames: list[Any] = []

    def write(self, image: np.ndarray) -> None:
        from PIL import Image

        self.frames.append(Image.fromarray(image).quantize(256, method=Image.Quantize.FASTOCTREE))

    def close(self) -> None:
        if not self.frames:
            return
        first, *rest = self.frames
        # GIF delays are centiseconds: 5 fps is exact, 12 fps becomes 8 cs.
        first.save(self.out, save_all=True, append_images=rest, duration=1000 / self.fps, loop=0)


class VideoWriter:
    """MP4 through PyAV: H.264 (libx264) when FFmpeg has it, else MPEG-4 part 2; frame rate = `fps`."""

    def __init__(self, out: Path, fps: float, width: int, height: int) -> None:
        import av

        self.rate = Fraction(fps).limit_denominator(1001)
        self.container = av.open(str(out), "w")
        self.codec = "libx264" if _has_encoder("libx264") else "mpeg4"
        stream = self.container.add_stream(self.codec, rate=self.rate)
        assert isinstance(stream, av.VideoStream)
        self.stream = stream
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        if self.codec == "libx264":
            self.stream.options = {"crf": "20", "preset": "medium"}
        else:
            self.stream.bit_rate = 4_000_000
        self.count = 0

    def write(self, image: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = self.count, 1 / self.rate
        self.count += 1
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        self.container.mux(self.stream.encode(None))
        self.container.close()


def _has_encoder(name: str) -> bool:
    import av

    try:
        av.codec.Codec(name, "w")
    except Exception:  # FFmpeg builds without it raise UnknownCodecError (a ValueError)
        return False
    return True


def _even(n: float) -> int:
    return max(2, round(n / 2) * 2)


def display_size(source_width: int, source_height: int, height: int) -> tuple[int, int]:
    """(height, width) of the drawn frame: `height` tall, the source's aspect ratio, even sides (yuv420p)."""
    return _even(height), _even(height * source_width / max(source_height, 1))


def render(
    source: str,
    model: str | Backend,
    out: str | os.PathLike[str],
    *,
    labels: list[str] | str | None = None,
    fps: float | None = None,
    top: int = 5,
    backend: BackendName = "auto",
    height: int = 360,
    progress: bool | None = None,
) -> RenderResult:
    """Write SOURCE with its live top-K chart to `out` (.gif or .mp4); one output frame per model frame."""
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise RenderError(f"{path}: write a .gif or an .mp4 (the suffix picks the format)")
    names = labels if isinstance(labels, list) else load_labels(labels)
    net = load_model(model, backend) if isinstance(model, str) else model
    try:
        if not isinstance(net, Backend):
            raise RenderError(f"{net.info.source} is a base model; render needs a stream model")
        check_labels(names, net.info.num_classes, net.info.source)
        rate = fps or net.info.fps
        return _render(
            source, net, names=names, path=path, rate=rate, k=top, height=height, progress=progress
        )
    finally:
        if isinstance(model, str) and isinstance(net, Backend):
            net.close()


def _render(
    source: str,
    net: Backend,
    *,
    names: list[str],
    path: Path,
    rate: float,
    k: int,
    height: int,
    progress: bool | None,
) -> RenderResult:
    from tqdm import tqdm

    container = open_source(source)
    codec = container.streams.video[0].codec_context
    size = display_size(codec.width, codec.height, height)
    chart = BarChart(_even(max(size[0] * 1.25, 320)), size[0], k)
    width = size[1] + chart.width
    path.parent.mkdir(parents=True, exist_ok=True)
    writer: FrameWriter = (
        GifWriter(path, rate) if path.suffix.lower() == ".gif" else VideoWriter(path, rate, width, size[0])
    )
    model_frames = read_frames(source, (net.info.height, net.info.width), rate, container=container)
    shown_frames = read_frames(source, size, rate)
    state = net.init_state()
    result: list[tuple[str, float]] = []
    count = 0
    disable = None if progress is None else not progress
    total = expected_frames(container, rate)
    bar = tqdm(total=total, unit="frame", disable=disable, file=sys.stderr, leave=False)
    try:
        for frame, shown in zip(model_frames, shown_frames, strict=True):
            logits, (state,) = net.step(to_model_input(frame.image[None]), [state])
            result = top_k(softmax(logits[0]), names, k)
            count += 1
            caption = f"frame {count}   t = {frame.time:.2f} s   top {k}"
            writer.write(np.concatenate([shown.image, chart.draw(result, caption)], axis=1))
            bar.update(1)
    finally:
        bar.close()
        writer.close()
        container.close()
    if count == 0:
        path.unlink(missing_ok=True)
        raise RenderError(f"{source}: no frames decoded")
    return RenderResult(path, count, rate, width, size[0], result)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="video file or GIF")
    model_options(p, "stream model")
    p.add_argument(
        "--fps",
        type=_positive_float,
        default=None,
        metavar="F",
        help="frames per second fed to the model and of the output (default: the model's training "
        "rate, 5 for A0-A2)",
    )
    top_k_option(p, "bars in the chart")
    p.add_argument(
        "--height",
        type=positive_int,
        default=360,
        metavar="PX",
        help="height in pixels of the drawn frame and of the chart (default 360); the frame keeps the "
        "source's aspect ratio",
    )
    p.add_argument(
        "--out",
        "-o",
        required=True,
        type=Path,
        metavar="FILE",
        help="animation to write: .gif (Pillow; short clips) or .mp4 (H.264 via PyAV, else MPEG-4)",
    )
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def cmd_render(args: argparse.Namespace) -> int:
    if not args.model:
        print("no model: pass --model (a stream model) or set MOVINET_MODEL", file=sys.stderr)
        return 2
    try:
        result = render(
            args.source,
            args.model,
            args.out,
            labels=args.labels,
            fps=args.fps,
            top=args.top_k,
            backend=args.backend,
            height=args.height,
            progress=False if args.no_progress else None,
        )
    except (RenderError, VideoError) as exc:
        print(f"movinet-worker render: {exc}", file=sys.stderr)
        return 1
    best = ", ".join(f"{label} {score:.3f}" for label, score in result.top[:3])
    print(
        f"{result.out}: {result.frames} frames at {result.fps:g} fps, {result.width}x{result.height}; "
        f"last: {best}"
    )
    return 0
