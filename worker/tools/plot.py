"""`movinet-worker plot`: the tutorial's probability-over-time picture, from a camera's prediction stream.

Each label is a line of its score per slot; a slot whose published top-k lacks the label leaves a gap
(its score is unknown, not zero), and so does a stretch without predictions. Alert intervals of the
camera are shaded behind the lines with their rule's name. Drawn with matplotlib's Agg canvas only:
no pyplot, no display, no global state.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from schemas.alerts import Alert
from schemas.messages import MessageError, Prediction, StreamMessage
from worker import keys
from worker.keys import to_format
from worker.options import env_option, redis_url_option, size_hw, top_k_option

if TYPE_CHECKING:
    from matplotlib.figure import Figure

M = TypeVar("M", bound=StreamMessage)

UTC = dt.timezone.utc
DPI = 100
# A stretch longer than this many slots without a prediction breaks every line.
GAP_SLOTS = 1.5
PAGE = 1000  # entries per XRANGE call
# Alert entries are stamped when published (XADD *), not by slot: a recording published faster than
# real time has slot times ahead of the wall clock. Entries this far either side of the range are read.
ALERTS_MARGIN_MS = 3_600_000
ALERT_COLORS = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


@dataclasses.dataclass(frozen=True)
class TimeSpec:
    """A `--since`/`--until` value: an instant (`at_ms`) or a duration before an anchor (`before_ms`)."""

    text: str
    at_ms: int | None = None
    before_ms: int = 0

    def resolve(self, anchor_ms: int) -> int:
        return self.at_ms if self.at_ms is not None else anchor_ms - self.before_ms


def parse_time(text: str) -> TimeSpec:
    """ISO time (UTC unless it says otherwise), epoch ms, or a duration such as `10m`, `90s`, `1h30m`,
    `500ms` before the anchor. For argparse's `type=`."""
    value = text.strip()
    if value.isdigit():
        return TimeSpec(text, at_ms=int(value))
    if re.fullmatch(rf"(?:{_DURATION.pattern})+", value):
        total = sum(float(n) * _UNIT_MS[unit] for n, unit in _DURATION.findall(value))
        return TimeSpec(text, before_ms=round(total))
    try:
        when = dt.datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use ISO (2024-05-01T12:00:00Z), epoch ms or a duration (10m, 90s)"
        ) from None
    return TimeSpec(text, at_ms=round((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() * 1000))


@dataclasses.dataclass(frozen=True)
class AlertSpan:
    """One alert as an interval: its events paired by `alert_id`."""

    alert_id: str
    rule: str
    label: str
    start_ms: int
    end_ms: int
    closed: bool


def alert_spans(alerts: Sequence[Alert], open_end_ms: int) -> list[AlertSpan]:
    """Pair open/update/close events by alert ID; an alert with no close runs to `open_end_ms`."""
    events: dict[str, list[Alert]] = {}
    for alert in alerts:
        events.setdefault(alert.alert_id, []).append(alert)
    spans = []
    for alert_id, group in events.items():
        close = next((a for a in group if a.event == "close"), None)
        last = close or group[-1]
        start = min(a.start_ms for a in group)
        end = close.end_ms if close is not None and close.end_ms is not None else max(open_end_ms, start)
        spans.append(AlertSpan(alert_id, last.rule, last.label, start, end, close is not None))
    return sorted(spans, key=lambda s: (s.start_ms, s.rule))


def top_labels(predictions: Sequence[Prediction], n: int) -> list[str]:
    """The n labels with the highest peak score over `predictions`, highest first."""
    peaks: dict[str, float] = {}
    for p in predictions:
        for t in p.top:
            peaks[t.label] = max(t.score, peaks.get(t.label, 0.0))
    return [label for label, _ in sorted(peaks.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def score_series(predictions: Sequence[Prediction], labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Times (datetime64[ms], slot starts) and scores `[T, len(labels)]`, NaN where a label was not in
    a prediction's top-k; a NaN row is inserted in each stretch without predictions to break lines."""
    ordered = sorted(predictions, key=lambda p: p.start_ms)
    slot_ms = float(np.median([p.end_ms - p.start_ms for p in ordered])) if ordered else 0.0
    times: list[int] = []
    rows: list[list[float]] = []
    for p in ordered:
        if times and p.start_ms - times[-1] > GAP_SLOTS * slot_ms:
            times.append(times[-1] + round(slot_ms))
            rows.append([np.nan] * len(labels))
        scores = {t.label: t.score for t in p.top}
        times.append(p.start_ms)
        rows.append([scores.get(label, np.nan) for label in labels])
    values = np.array(rows, np.float64).reshape(len(rows), len(labels))
    return np.array(times, "datetime64[ms]"), values


def _day(ms: np.ndarray | int) -> Any:
    """Matplotlib's date numbers (days since its epoch) of times in ms since the Unix epoch."""
    from matplotlib import dates as mdates

    return mdates.date2num(np.asarray(ms, "datetime64[ms]"))  # type: ignore[no-untyped-call]


def _hms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S")


def range_title(camera: str, start_ms: int, end_ms: int) -> str:
    start = dt.datetime.fromtimestamp(start_ms / 1000, UTC)
    end = dt.datetime.fromtimestamp(end_ms / 1000, UTC)
    until = end.strftime("%H:%M:%S" if end.date() == start.date() else "%Y-%m-%d %H:%M:%S")
    return f"camera {camera}: {start:%Y-%m-%d %H:%M:%S} - {until} UTC"


def build_figure(
    predictions: Sequence[Prediction],
    alerts: Sequence[Alert],
    top: int,
    title: str,
    *,
    span: tuple[int, int] | None = None,
    size: tuple[int, int] = (1200, 600),
) -> Figure:
    """The picture as a Figure on an Agg canvas: `size` is (width, height) in pixels, `span` the time
    range in ms (default: the predictions' own)."""
    # Imported here: the CLI builds every command's parser, and matplotlib takes a second to import.
    from matplotlib import dates as mdates
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    if not predictions:
        raise ValueError("no predictions to plot")
    first = min(p.start_ms for p in predictions)
    last = max(p.end_ms for p in predictions)
    start_ms, end_ms = span or (first, last)
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = top_labels(predictions, top)
    times, values = score_series(predictions, labels)
    half_slot = np.timedelta64(round(np.median([p.end_ms - p.start_ms for p in predictions]) / 2), "ms")
    x = np.asarray(_day(times + half_slot), np.float64)  # each score drawn at the middle of its slot
    for i, label in enumerate(labels):
        color = f"C{i % 10}"
        column = values[:, i]
        ax.plot(x, column, color=color, linewidth=1.6, label=label)
        # A point between two gaps draws no line: mark it so it is still seen.
        known = np.isfinite(column)
        alone = known & ~np.r_[False, known[:-1]] & ~np.r_[known[1:], False]
        ax.plot(x[alone], column[alone], "o", color=color, markersize=4)
    handles, names = ax.get_legend_handles_labels()
    to_x = blended_transform_factory(ax.transData, ax.transAxes)
    rule_colors: dict[str, str] = {}
    for s in alert_spans(alerts, end_ms):
        if s.end_ms < start_ms or s.start_ms > end_ms:
            continue
        color = rule_colors.setdefault(s.rule, ALERT_COLORS[len(rule_colors) % len(ALERT_COLORS)])
        lo, hi = float(_day(max(s.start_ms, start_ms))), float(_day(min(s.end_ms, end_ms)))
        ax.axvspan(lo, hi, color=color, alpha=0.15, linewidth=0, zorder=0)
        note = s.rule if s.closed else f"{s.rule} (open)"
        ax.text(
            lo, 0.985, f" {note}\n {s.label}", transform=to_x, ha="left", va="top", fontsize=8, color=color
        )
    for rule, color in rule_colors.items():
        handles.append(Patch(color=color, alpha=0.25, label=f"alert: {rule}"))
        names.append(f"alert: {rule}")
    ax.xaxis_date(tz=UTC)
    ax.set_xlim(float(_day(start_ms)), float(_day(max(end_ms, start_ms + 1))))
    ax.set_ylim(0.0, 1.08)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=UTC))  # type: ignore[no-untyped-call]
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("probability")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if handles:
        ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return fig


def plot_predictions(
    predictions: list[Prediction],
    alerts: list[Alert],
    out: Path,
    top: int,
    title: str,
    *,
    span: tuple[int, int] | None = None,
    size: tuple[int, int] = (1200, 600),
) -> Path:
    """Draw `build_figure` into `out` (PNG, or any format matplotlib knows by the suffix)."""
    fig = build_figure(predictions, alerts, top, title, span=span, size=size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out


# ---- reading Redis --------------------------------------------------------------------------------


def _read(client: Any, key: str, low: str, high: str, kind: type[M]) -> Iterator[M]:
    """XRANGE [low, high] page by page, parsed as `kind`; unreadable entries are reported and skipped."""
    while True:
        batch = client.xrange(key, low, high, count=PAGE)
        for raw_id, fields in batch:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            try:
                yield kind.from_fields(fields)
            except MessageError as exc:
                print(f"{key} {entry_id}: skipped, unreadable {kind.__name__}: {exc}", file=sys.stderr)
        if len(batch) < PAGE:
            return
        low = f"({entry_id}"


def read_predictions(client: Any, key: str, since_ms: int | None, until_ms: int | None) -> list[Prediction]:
    """Predictions whose slot starts (entry IDs) lie in [since, until]."""
    low = "-" if since_ms is None else str(max(since_ms, 0))
    return list(_read(client, key, low, "+" if until_ms is None else str(max(until_ms, 0)), Prediction))


def read_alerts(client: Any, key: str, camera: str, span: tuple[int, int], margin_ms: int) -> list[Alert]:
    """The camera's alert events whose intervals touch `span`, from entries up to `margin_ms` either side."""
    start_ms, end_ms = span
    low, high = str(max(start_ms - margin_ms, 0)), str(end_ms + margin_ms)
    out = [a for a in _read(client, key, low, high, Alert) if a.camera == camera]
    spans = {s.alert_id for s in alert_spans(out, end_ms) if s.end_ms >= start_ms and s.start_ms <= end_ms}
    return [a for a in out if a.alert_id in spans]


KEY_HELP = "prediction stream of a camera, <camera> standing for its ID"


def add_plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--camera", required=True, metavar="ID", help="camera ID whose predictions to plot")
    when = "ISO time (UTC unless it has an offset), epoch ms, or a duration such as 10m or 90s"
    p.add_argument(
        "--since",
        type=parse_time,
        default=None,
        metavar="T",
        help=f"first slot to plot: {when} before the anchor (see --relative-to); default: the oldest kept",
    )
    p.add_argument(
        "--until",
        type=parse_time,
        default=None,
        metavar="T",
        help=f"last slot to plot: {when} (as for --since); default: the newest",
    )
    p.add_argument(
        "--relative-to",
        choices=("last", "now"),
        default="last",
        help="what durations count back from: the newest prediction's end (default; also right for "
        "published recordings) or the wall clock",
    )
    top_k_option(p, "labels to draw: the K with the highest peak")
    p.add_argument(
        "--out",
        "-o",
        required=True,
        type=Path,
        metavar="FILE",
        help="image to write (PNG; .svg/.pdf work too)",
    )
    p.add_argument(
        "--size",
        type=lambda text: size_hw(text, minimum=100),
        default=(600, 1200),
        metavar="HxW",
        help="height x width in pixels, each >= 100, as every command spells a size",
    )
    redis_url_option(p, "Redis to read from")
    env_option(
        p,
        "--predictions-key",
        env="MOVINET_PREDICTIONS_KEY",
        default=keys.PREDICTIONS_KEY,
        metavar="TEMPLATE",
        help=KEY_HELP,
    )
    env_option(
        p,
        "--alerts-key",
        env="MOVINET_ALERTS_KEY",
        default=keys.ALERTS_STREAM,
        metavar="KEY",
        help="alert events stream (may hold <camera>)",
    )


def _anchor_ms(client: Any, key: str, relative_to: str) -> int | None:
    """Where durations count from: the newest prediction's end (None: no predictions), or now."""
    if relative_to == "now":
        return int(time.time() * 1000)
    newest = client.xrevrange(key, "+", "-", count=1)
    return Prediction.from_fields(newest[0][1]).end_ms if newest else None


def cmd_plot(args: argparse.Namespace) -> int:
    import redis

    camera: str = args.camera
    key = to_format(args.predictions_key).format(camera=camera)
    alerts_template = to_format(args.alerts_key)
    alerts_key = alerts_template.format(camera=camera) if "{camera}" in alerts_template else alerts_template
    since_spec: TimeSpec | None = args.since
    until_spec: TimeSpec | None = args.until
    from worker.config import redact_url
    from worker.pipeline.clients import tool_client

    client = tool_client(args.redis_url)
    try:
        anchor = _anchor_ms(client, key, args.relative_to)
        since = since_spec.resolve(anchor) if since_spec and anchor is not None else None
        until = until_spec.resolve(anchor) if until_spec and anchor is not None else None
        predictions = read_predictions(client, key, since, until) if anchor is not None else []
        if not predictions:
            between = f"{since_spec.text if since_spec else 'the oldest'} and "
            between += until_spec.text if until_spec else "the newest"
            print(f"no predictions in {key} between {between}", file=sys.stderr)
            return 1
        start = since if since is not None else predictions[0].start_ms
        end = until if until is not None else max(p.end_ms for p in predictions)
        alerts = read_alerts(client, alerts_key, camera, (start, end), ALERTS_MARGIN_MS)
    except (redis.RedisError, MessageError) as exc:  # no Redis, or an unreadable newest prediction
        print(f"cannot read {key} at {redact_url(args.redis_url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    title = range_title(camera, start, end)
    out = plot_predictions(
        predictions, alerts, args.out, args.top_k, title, span=(start, end), size=(args.size[1], args.size[0])
    )
    spans = len({a.alert_id for a in alerts})
    shaded = f"{spans} alert{'' if spans == 1 else 's'}"
    print(f"{out}: {len(predictions)} predictions of {camera} ({_hms(start)}-{_hms(end)} UTC), {shaded}")
    return 0
