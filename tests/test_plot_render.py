"""`plot` (scores over time from the prediction stream, alerts shaded) and `render` (clip + bar chart)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas.alerts import Alert
from schemas.messages import Prediction, TopLabel
from worker.tools.plot import (
    add_plot_arguments,
    alert_spans,
    build_figure,
    cmd_plot,
    parse_time,
    plot_predictions,
    score_series,
)
from worker.tools.render import RenderError, add_render_arguments, cmd_render, display_size, render

T0 = 1_714_564_800_000  # 2024-05-01T12:00:00Z
SLOT = 200


def prediction(k: int, scores: dict[str, float], camera: str = "cam1", t0: int = T0) -> Prediction:
    top = [TopLabel(label=n, score=s) for n, s in sorted(scores.items(), key=lambda kv: -kv[1])]
    start = t0 + k * SLOT
    return Prediction(
        camera=camera,
        slot=start // SLOT,
        start_ms=start,
        end_ms=start + SLOT,
        window_start_ms=t0,
        frames=k + 1,
        repeated=False,
        capture_ms=start,
        model="test",
        worker="w1",
        top=top,
    )


def alert(
    event: str, start_ms: int, end_ms: int | None = None, camera: str = "cam1", rule: str = "exercise"
) -> Alert:
    return Alert(
        event=event,  # type: ignore[arg-type]
        alert_id=f"{camera}:{rule}:{start_ms}",
        camera=camera,
        rule=rule,
        label="jumping jacks",
        start_ms=start_ms,
        end_ms=end_ms,
        slot=start_ms // SLOT,
        score=0.9,
        peak_score=0.95,
        peak_ms=start_ms,
        worker="w1",
    )


def synthetic(n: int = 60, t0: int = T0, camera: str = "cam1") -> list[Prediction]:
    """Jumping jacks rising, zumba fading, and labels that drop in and out of the top-3."""
    out = []
    for k in range(n):
        x = k / (n - 1)
        scores = {"jumping jacks": 0.1 + 0.85 * x, "zumba": 0.8 * (1 - x) + 0.01}
        scores["squat" if k % 3 else "robot dancing"] = 0.05 if k % 3 else 0.3
        out.append(prediction(k, scores, camera, t0))
    return out


def read_png(path: Path) -> np.ndarray:
    import matplotlib.image

    image: np.ndarray = matplotlib.image.imread(path)
    return image


def blue_pixels(image: np.ndarray) -> int:
    """Pixels of the first line's colour (matplotlib's C0, #1f77b4)."""
    rgb = image[..., :3] * 255
    return int((np.abs(rgb - [31, 119, 180]).max(axis=-1) < 30).sum())


# ---- plot --------------------------------------------------------------------------------------


def test_time_arguments_parse_all_forms() -> None:
    anchor = T0 + 3_600_000
    assert parse_time("10m").resolve(anchor) == anchor - 600_000
    assert parse_time("1h30m").resolve(anchor) == anchor - 5_400_000
    assert parse_time("90s").resolve(anchor) == anchor - 90_000
    assert parse_time(str(T0)).resolve(anchor) == T0
    assert parse_time("2024-05-01T12:00:00Z").resolve(anchor) == T0
    assert parse_time("2024-05-01 14:00:00+02:00").resolve(anchor) == T0
    assert parse_time("2024-05-01T12:00:00").resolve(anchor) == T0  # naive: UTC
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time("yesterday")


def test_alert_events_pair_by_id_and_an_open_one_runs_to_the_end() -> None:
    events = [
        alert("open", T0 + 1000),
        alert("update", T0 + 1000),
        alert("open", T0 + 9000, rule="fighting"),
        alert("close", T0 + 1000, T0 + 4000),
    ]
    spans = alert_spans(events, open_end_ms=T0 + 12_000)
    assert [(s.rule, s.start_ms - T0, s.end_ms - T0, s.closed) for s in spans] == [
        ("exercise", 1000, 4000, True),
        ("fighting", 9000, 12_000, False),
    ]


def test_a_label_missing_from_a_top_k_is_a_gap_not_zero() -> None:
    preds = synthetic(6)
    del preds[3]  # a slot without a prediction breaks the lines too
    times, values = score_series(preds, ["jumping jacks", "robot dancing"])
    assert np.isfinite(values[:, 0]).sum() == 5
    assert np.isnan(values[1, 1]) and values[0, 1] == pytest.approx(0.3)
    assert len(times) == 6 and np.isnan(values[3]).all()  # the inserted break


def test_plot_from_synthetic_predictions_and_alerts(tmp_path: Path) -> None:
    preds = synthetic()
    alerts = [alert("open", T0 + 2000), alert("close", T0 + 2000, T0 + 6000), alert("open", T0 + 10_000)]
    fig = build_figure(preds, alerts, 3, "camera cam1", size=(1000, 500))
    legend = fig.axes[0].get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == [
        "jumping jacks",
        "zumba",
        "robot dancing",
        "alert: exercise",
    ]
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any(t.startswith(" exercise\n") for t in texts) and any("(open)" in t for t in texts)
    assert fig.axes[0].get_ylabel() == "probability" and "UTC" in fig.axes[0].get_xlabel()
    assert fig.axes[0].xaxis.get_major_formatter()(fig.axes[0].get_xlim()[0]) == "12:00:00"

    out = plot_predictions(preds, alerts, tmp_path / "plot.png", 3, "camera cam1", size=(1000, 500))
    image = read_png(out)
    assert image.shape[:2] == (500, 1000)
    assert image[..., :3].std() > 0.05 and blue_pixels(image) > 200


def test_plot_command_reads_redis_with_key_templates(r: tuple[Any, str], tmp_path: Path, capsys: Any) -> None:
    client, prefix = r
    t0 = int(time.time() * 1000) // SLOT * SLOT - 60_000
    stream = f"{prefix}:predictions:{{cam1}}"
    for p in [*synthetic(50, t0), prediction(50, {"zumba": 0.5}, t0=t0)]:
        client.xadd(stream, p.to_fields(), id=f"{p.start_ms}-0")
    client.xadd(f"{prefix}:predictions:{{cam2}}", prediction(0, {"zumba": 1.0}, "cam2", t0).to_fields())
    for a in [
        alert("open", t0 + 2000),
        alert("close", t0 + 2000, t0 + 5000),
        alert("open", t0, camera="cam2"),
    ]:
        client.xadd(f"{prefix}:alerts", a.to_fields())
    client.xadd(f"{prefix}:alerts", {"v": "1", "event": "bogus"})  # unreadable: skipped, not fatal

    parser = argparse.ArgumentParser()
    add_plot_arguments(parser)
    keys = ["--predictions-key", prefix + ":predictions:{{{camera}}}", "--alerts-key", f"{prefix}:alerts"]
    out = tmp_path / "cam1.png"
    args = parser.parse_args(
        ["--camera", "cam1", "--since", "8s", "--out", str(out), "--size", "400x800", *keys]
    )
    assert cmd_plot(args) == 0
    said = capsys.readouterr().out
    # 8 s before the newest prediction's end: slots 11..50; cam2's alert and the bogus entry left out
    assert "40 predictions of cam1" in said and "1 alert\n" in said
    image = read_png(out)
    assert image.shape[:2] == (400, 800) and blue_pixels(image) > 100

    args = parser.parse_args(["--camera", "nobody", "--out", str(tmp_path / "x.png"), *keys])
    assert cmd_plot(args) == 1 and not (tmp_path / "x.png").exists()


# ---- render ------------------------------------------------------------------------------------


def count_frames(path: Path) -> tuple[int, tuple[int, int], float]:
    """Frames decoded by PyAV, the first one's (width, height), and the stream's frame rate."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        rate = float(stream.average_rate or 0)
    first = frames[0]
    assert first.std() > 10  # a picture, not a blank frame
    return len(frames), (first.shape[1], first.shape[0]), rate


def expected_size(height: int = 360) -> tuple[int, int]:
    shown_h, shown_w = display_size(300, 300, height)  # jumpingjack.gif is 300x300
    return shown_w + round(shown_h * 1.25 / 2) * 2, shown_h


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_render_the_real_model_to_gif_and_mp4(assets: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"jj{suffix}"
    result = render(
        str(assets / "videos" / "jumpingjack.gif"),
        str(assets / "movinet_int8.tflite"),
        out,
        labels=str(assets / "kinetics600_label_map.txt"),
        progress=False,
    )
    assert result.frames == 8 and result.fps == 5.0  # 1.5 s of GIF at the model's 5 fps
    assert result.top[0][0] == "jumping jacks" and result.top[0][1] > 0.95  # as `classify` says
    frames, size, rate = count_frames(out)
    assert frames == 8 and size == expected_size() == (result.width, result.height)
    if suffix == ".mp4":
        assert rate == 5.0
    else:
        from PIL import Image

        with Image.open(out) as gif:
            assert gif.info["duration"] == 200  # ms per frame: 5 fps


def test_render_command_with_random_weights(models: Any, labels600: list[str], tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(labels600))
    parser = argparse.ArgumentParser()
    add_render_arguments(parser)
    clip = Path(__file__).resolve().parents[2] / "shared" / "assets" / "videos" / "jumpingjack.gif"
    source = str(clip) if clip.is_file() else str(_synthetic_clip(tmp_path / "clip.mp4"))
    for suffix in (".mp4", ".gif"):
        out = tmp_path / f"random{suffix}"
        argv = [source, "--model", str(models.tflite), "--labels", str(labels), "--top", "3"]
        args = parser.parse_args([*argv, "--height", "240", "--out", str(out), "--no-progress"])
        assert cmd_render(args) == 0
        frames, size, _ = count_frames(out)
        assert frames == 8 and size[1] == 240


def _synthetic_clip(path: Path) -> Path:
    """1.5 s at 25 fps, 300x300 (jumpingjack.gif's length and size) when the assets are absent."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        assert isinstance(stream, av.VideoStream)
        stream.width = stream.height = 300
        stream.pix_fmt = "yuv420p"
        for i in range(38):
            image = np.full((300, 300, 3), (i * 6, 90, 200 - i * 5), np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_render_refuses_an_unknown_format(models: Any, labels600: list[str], tmp_path: Path) -> None:
    with pytest.raises(RenderError, match=r"\.gif or an \.mp4"):
        render("clip.gif", str(models.tflite), tmp_path / "out.avi", labels=labels600)


@pytest.mark.parametrize("h264", [True, False])
def test_mp4_writer_falls_back_to_mpeg4(monkeypatch: Any, tmp_path: Path, h264: bool) -> None:
    import av

    from worker.tools import render as render_module

    if not h264:
        monkeypatch.setattr(render_module, "_has_encoder", lambda name: False)
    writer = render_module.VideoWriter(tmp_path / "x.mp4", 12.5, 64, 48)
    for i in range(10):
        writer.write(np.full((48, 64, 3), (20 * i, 100, 50), np.uint8))
    writer.close()
    with av.open(str(tmp_path / "x.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == ("h264" if h264 else "mpeg4")
        assert stream.average_rate == 12.5
        assert sum(1 for _ in container.decode(stream)) == 10
