"""`movinet-worker explain ALERT_ID`: replay the model on an alert's evidence and compare its scores.

The evidence (`worker.pipeline.evidence`) holds the frames the worker read, as received, and the
predictions it published. The replay puts the frames on the same slot clock
(`timeline.CameraTimeline`: first frame per slot, gaps filled or restarted alike), steps a fresh
state from each published prediction's window start with the same model, and compares each slot's
published top-k scores with the replayed ones.
In windows mode a prediction is a pure function of its window's frames, so they agree to float noise;
in ema mode the published state carried the camera's whole history, of which the replay has only the
evidence: the difference says how much that history still weighed.

`--out` draws the alert: frames with their top-k bars above the score curve, the alert interval shaded
(a PNG of a few moments, or a GIF of every slot).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from schemas.messages import Frame, MessageError, Prediction
from worker.model.labels import softmax
from worker.pipeline.cameras import id_key, valid_camera
from worker.pipeline.evidence import Evidence, evidence_key, parse_alert_id, read
from worker.pipeline.timeline import CameraTimeline, Clock

WINDOWS_TOLERANCE = 1e-4
PICTURE_FORMATS = (".png", ".gif")


@dataclasses.dataclass
class SlotResult:
    slot: int
    start_ms: int
    window_start_ms: int  # as published
    window_start_slot: int  # of the replayed state
    frames: int
    published: list[tuple[str, float]]
    replayed: np.ndarray | None  # probabilities over every label; None: not replayable from the evidence

    def difference(self, labels: list[str]) -> float | None:
        if self.replayed is None:
            return None
        index = {name: i for i, name in enumerate(labels)}
        return max(abs(score - float(self.replayed[index[label]])) for label, score in self.published)


@dataclasses.dataclass
class Replay:
    evidence: Evidence
    alert_id: str
    temporal: str
    slots: list[SlotResult]
    images: dict[int, np.ndarray]  # slot -> model-size image, as the worker fed it
    first_slot: int  # first slot with an image in the evidence
    labels: list[str]

    def largest(self) -> tuple[float, SlotResult | None]:
        best: tuple[float, SlotResult | None] = (0.0, None)
        for s in self.slots:
            d = s.difference(self.labels)
            if d is not None and (best[1] is None or d > best[0]):
                best = (d, s)
        return best


def _decode(fields: dict[Any, Any], camera: str, size: tuple[int, int]) -> tuple[Frame, np.ndarray] | None:
    """An evidence entry's image at `size`, or None where the worker dead-lettered it too."""
    from worker.pipeline.codec import decode_image

    try:
        frame = Frame.from_fields(fields)
        if frame.camera != camera:
            return None
        return frame, decode_image(frame, size)
    except MessageError:
        return None


def replay(ev: Evidence, alert_id: str, backend: Any, labels: list[str]) -> Replay:
    """Step the model over the evidence as the worker did; one result per published prediction."""
    camera, _, _ = parse_alert_id(alert_id)
    info = ev.info
    clock = Clock(Fraction(info["fps"]))
    size = (backend.info.height, backend.info.width)
    ema_frames = info.get("ema_frames")
    timeline = CameraTimeline(
        camera,
        clock,
        int(info["window"]),
        int(info["max_gap"]),
        backend.init_state(),
        ema_replay=info.get("ema_replay") if ema_frames else None,
    )
    images: dict[int, np.ndarray] = {}
    for entry_id, fields in ev.frames:
        decoded = _decode(fields, camera, size)
        if decoded is None:
            continue
        ms = id_key(entry_id)[0]
        for work in timeline.accept(ms, entry_id, decoded[1], ms) or []:
            images[work.slot] = work.image
    predictions = [Prediction.from_fields(f) for _, f in ev.predictions]
    first = min(images, default=0)
    # Which state each published slot comes from: its window (ema: one state from the first frame kept).
    starts = [
        (clock.slot(p.window_start_ms) if not ema_frames else first, p)
        for p in sorted(predictions, key=lambda p: p.slot)
    ]
    wanted: dict[int, int] = {}  # window start slot -> last slot needed from it
    for start, p in starts:
        if start >= first and all(s in images for s in range(start, p.slot + 1)):
            wanted[start] = max(wanted.get(start, start), p.slot)
    probs: dict[tuple[int, int], np.ndarray] = {}
    states = {start: backend.init_state() for start in wanted}
    for slot in range(min(wanted, default=0), max(wanted.values(), default=-1) + 1):
        active = [start for start, last in wanted.items() if start <= slot <= last]
        if not active:
            continue
        batch = np.repeat(images[slot][None].astype(np.float32) * (1.0 / 255.0), len(active), axis=0)
        logits, new = backend.step(batch[:, None], [states[s] for s in active], ema_frames)
        for start, state, row in zip(active, new, softmax(np.asarray(logits)), strict=True):
            states[start] = state
            probs[start, slot] = row
    slots = [
        SlotResult(
            p.slot,
            p.start_ms,
            p.window_start_ms,
            start,
            p.frames,
            [(t.label, t.score) for t in p.top],
            probs.get((start, p.slot)),
        )
        for start, p in starts
    ]
    temporal = "ema" if ema_frames else "windows"
    return Replay(ev, alert_id, temporal, slots, images, first, labels)


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%H:%M:%S.%f")[:-3]


def report(r: Replay, model_name: str) -> str:
    """The slot-by-slot table and its summary."""
    ev, info, event = r.evidence, r.evidence.info, r.evidence.event
    lines = []
    about = f"camera {event.camera}, rule {event.rule}, label {event.label}, " if event else ""
    state = "closed" if ev.closed else "open"
    lines.append(f"alert {r.alert_id} ({about}{state})")
    capped = {
        "": "complete",
        "alert": "cut short: the per-alert byte cap was reached",
        "camera": "cut short: the camera's byte cap was reached",
        "duration": "cut short: evidence_max_alert_seconds was reached",
    }.get(ev.capped, ev.capped)
    lines.append(
        f"evidence {ev.key}: {len(ev.frames)} frames, {len(ev.predictions)} predictions, "
        f"{ev.bytes / 1e6:.2f} MB, {capped}"
    )
    mode = (
        f"ema mode (frame count held at {info.get('ema_frames')})" if r.temporal == "ema" else "windows mode"
    )
    lines.append(
        f"model {info.get('model')}, {mode}, window {info.get('window')} slots at {info.get('fps')} fps"
    )
    if model_name != info.get("model"):
        lines.append(f"note: replayed with {model_name}, published by {info.get('model')}: scores may differ")
    head = ("slot", "time (UTC)", "window", "label", "published", "replayed", "diff")
    lines.append("{:>12} {:>12} {:>7} {:<24} {:>9} {:>9} {:>9}".format(*head))
    for s in r.slots:
        label, score = s.published[0]
        diff = s.difference(r.labels)
        if s.replayed is None:
            replayed, shown = "-", "(window began before the evidence)"
        else:
            replayed, shown = f"{s.replayed[r.labels.index(label)]:.6f}", f"{diff:.2e}"
        lines.append(
            f"{s.slot:>12} {_when(s.start_ms):>12} {s.slot - s.window_start_slot + 1:>7} "
            f"{label[:24]:<24} {score:>9.6f} {replayed:>9} {shown:>9}"
        )
    largest, at = r.largest()
    done = sum(1 for s in r.slots if s.replayed is not None)
    diffs = [d for s in r.slots if (d := s.difference(r.labels)) is not None]
    mean = sum(diffs) / len(diffs) if diffs else 0.0
    if at is None:
        lines.append("no slot could be replayed: the evidence holds no complete window")
        return "\n".join(lines)
    lines.append(
        f"largest difference: {largest:.2e} at slot {at.slot} ({done} of {len(r.slots)} slots replayed)"
    )
    if r.temporal == "windows":
        verdict = "agrees" if largest <= WINDOWS_TOLERANCE else "DOES NOT agree"
        lines.append(f"windows mode: the replay {verdict} with the published scores to {WINDOWS_TOLERANCE:g}")
    else:
        held = int(info.get("ema_frames") or 1)
        clock = Clock(Fraction(info["fps"]))
        opened = clock.slot(event.start_ms) if event is not None else min(s.slot for s in r.slots)
        k = max(1, opened - r.first_slot + 1)
        lines.append(
            "ema mode: approximate. The published states carried the camera's history since "
            f"{_when(min(s.window_start_ms for s in r.slots))} UTC; the replay starts from a fresh state at "
            f"the evidence's first frame, so it lacks the history before it, which still weighed "
            f"({held}/{held + 1})^{k} = {(held / (held + 1)) ** k:.3f} of the published state at the "
            f"alert's start ({k} slots in) and less later: the scores moved by {largest:.2e} at most "
            f"({mean:.2e} on average)"
        )
    return "\n".join(lines)


# ---- the picture --------------------------------------------------------------------------------


def _display_frames(r: Replay, height: int) -> dict[int, np.ndarray]:
    """slot -> the frame as received (first of its slot), at display size; repeats keep the last."""
    from worker.pipeline.codec import decode_image
    from worker.tools.render import display_size

    camera, _, _ = parse_alert_id(r.alert_id)
    clock = Clock(Fraction(r.evidence.info["fps"]))
    out: dict[int, np.ndarray] = {}
    for entry_id, fields in r.evidence.frames:
        try:
            frame = Frame.from_fields(fields)
            if frame.camera != camera or frame.width is None or frame.height is None:
                size = (height, height)
            else:
                size = display_size(frame.width, frame.height, height)
            slot = clock.slot(id_key(entry_id)[0])
            if slot not in out:
                out[slot] = decode_image(frame, size)
        except MessageError:
            continue
    return out


def _curve(r: Replay, size: tuple[int, int]) -> Any:
    """The score curve (published, solid; replayed top label, dashed) with the alert shaded."""
    from matplotlib import dates as mdates

    from worker.tools.plot import _day, build_figure

    predictions = [Prediction.from_fields(f) for _, f in r.evidence.predictions]
    event = r.evidence.event
    alerts = [event] if event is not None else []
    title = f"alert {r.alert_id}: published scores, replayed (dashed)"
    fig = build_figure(predictions, alerts, 3, title, size=size)
    ax = fig.axes[0]
    # A tick per second crowds a short alert's narrow axis: at most one per ~120 px.
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=max(3, size[0] // 120), tz=dt.UTC))  # type: ignore[no-untyped-call]
    label = event.label if event is not None else r.slots[0].published[0][0]
    done = [s for s in r.slots if s.replayed is not None]
    if done:
        index = r.labels.index(label)
        half = (predictions[0].end_ms - predictions[0].start_ms) // 2
        x = _day(np.array([s.start_ms + half for s in done]))
        ax.plot(x, [float(s.replayed[index]) for s in done], "--", color="black", linewidth=1.2)  # type: ignore[index]
    return fig


def _canvas_array(fig: Any) -> np.ndarray:
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


def _panel(image: np.ndarray, chart: Any, top: list[tuple[str, float]], caption: str) -> np.ndarray:
    bars = chart.draw(top, caption)
    return np.concatenate([image, bars], axis=0)


def _top(s: SlotResult, labels: list[str], k: int) -> list[tuple[str, float]]:
    from worker.model.labels import top_k

    if s.replayed is None:
        return s.published[:k]
    return top_k(s.replayed, labels, k)


def _nearest(slots: list[SlotResult], ms: int) -> SlotResult:
    return min(slots, key=lambda s: abs(s.start_ms - ms))


def picture(r: Replay, out: Path, *, k: int = 5, height: int = 240, moments: int = 4) -> Path:
    """PNG: `moments` frames across the alert with their top-k bars, above the score curve; GIF: every
    slot, each frame with its bars above the curve, a line marking the slot."""
    from PIL import Image

    from worker.tools.plot import _day
    from worker.tools.render import BarChart, GifWriter

    frames = _display_frames(r, height)
    slots = [s for s in r.slots if s.slot in frames or any(f <= s.slot for f in frames)]
    if not slots:
        raise ValueError("the evidence holds no frame to draw")

    def frame_at(slot: int) -> np.ndarray:
        return frames[max(f for f in frames if f <= slot)]

    width = frame_at(slots[0].slot).shape[1]
    event = r.evidence.event
    if out.suffix.lower() == ".png":
        # The alert's start, peak and end, and one more between: the moments an operator asks about.
        marks = [event.start_ms, event.peak_ms, event.end_ms or slots[-1].start_ms] if event else []
        chosen = sorted({_nearest(slots, m).slot for m in marks})
        for s in np.linspace(0, len(slots) - 1, moments).round().astype(int):
            if len(chosen) < moments and slots[s].slot not in chosen:
                chosen = sorted({*chosen, slots[s].slot})
        by_slot = {s.slot: s for s in slots}
        chart = BarChart(width, height, k)
        panels = [
            _panel(frame_at(n), chart, _top(by_slot[n], r.labels, k), f"{_when(by_slot[n].start_ms)}")
            for n in chosen
        ]
        row = np.concatenate(panels, axis=1)
        curve = _canvas_array(_curve(r, (row.shape[1], 420)))
        image = np.concatenate([row, curve[:, : row.shape[1]]], axis=0)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out)
        return out
    total = max(2 * width, 800)  # room for the curve's legend
    fig = _curve(r, (total, 360))
    ax = fig.axes[0]
    cursor = ax.axvline(float(_day(slots[0].start_ms)), color="black", linewidth=1)
    chart = BarChart(total - width, height, k)
    writer = GifWriter(out, float(Fraction(r.evidence.info["fps"])))
    for s in slots:
        cursor.set_xdata([float(_day(s.start_ms))] * 2)
        top = np.concatenate([frame_at(s.slot), chart.draw(_top(s, r.labels, k), _when(s.start_ms))], axis=1)
        curve = _canvas_array(fig)
        writer.write(np.concatenate([top, curve], axis=0))
    writer.close()
    return out


# ---- the command --------------------------------------------------------------------------------


def add_explain_arguments(p: argparse.ArgumentParser) -> None:
    from worker.options import model_options, redis_url_option, top_k_option

    p.add_argument("alert_id", metavar="ALERT_ID", help="<camera>:<rule>:<start_ms>, as `alerts` prints it")
    redis_url_option(p, "Redis the worker publishes to")
    model_options(p, "the worker's stream model")
    top_k_option(p, "bars in the picture")
    p.add_argument(
        "--out",
        "-o",
        type=Path,
        default=None,
        metavar="FILE",
        help="also draw the alert: .png (a few moments above the score curve) or .gif (every slot)",
    )


def cmd_explain(args: argparse.Namespace, evidence_index: str) -> int:
    """`evidence_index`: the camera's evidence index key template (str.format, `{camera}`)."""
    from worker.model.backends import Backend, load_model
    from worker.model.labels import check_labels, load_labels
    from worker.pipeline.clients import tool_client

    try:
        camera, rule, start_ms = parse_alert_id(args.alert_id)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not valid_camera(camera):
        raise SystemExit(f"{args.alert_id!r}: {camera!r} is not a camera ID")
    if args.out is not None and args.out.suffix.lower() not in PICTURE_FORMATS:
        raise SystemExit(f"--out {args.out}: write a .png or a .gif (the suffix picks the format)")
    if not args.model:
        raise SystemExit("no model: pass --model (the worker's stream model) or set MOVINET_MODEL")
    key = evidence_key(evidence_index.format(camera=camera), rule, start_ms)
    try:
        ev = read(tool_client(args.redis_url), key)
    except (ValueError, KeyError, TypeError) as exc:  # a hash written by something else
        print(f"movinet-worker explain: the evidence at {key} is unreadable: {exc}", file=sys.stderr)
        return 1
    if ev is None:
        print(
            f"movinet-worker explain: no evidence for alert {args.alert_id} at {key}: it expired "
            "(kept evidence_seconds after the alert's last slot), was evicted by the camera's byte cap, "
            "or was never kept (evidence off, or an alert older than the feature)",
            file=sys.stderr,
        )
        return 1
    labels = load_labels(args.labels)
    backend = load_model(args.model, args.backend)
    try:
        if not isinstance(backend, Backend):
            raise SystemExit(
                f"{backend.info.source} is a base model; explain needs the worker's stream model"
            )
        check_labels(labels, backend.info.num_classes, backend.info.source)
        try:
            result = replay(ev, args.alert_id, backend, labels)
        except (MessageError, KeyError, ValueError, TypeError) as exc:
            print(f"movinet-worker explain: the evidence at {key} is unreadable: {exc!r}", file=sys.stderr)
            return 1
    finally:
        if isinstance(backend, Backend):
            backend.close()
    print(report(result, Path(backend.info.source).name or backend.info.source))
    if args.out is not None:
        print(f"picture: {picture(result, args.out, k=args.top_k)}")
    return 0
