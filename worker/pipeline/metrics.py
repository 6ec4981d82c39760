"""Prometheus metrics of one worker. Base units, `_total` counters, no camera label on histograms.

Every metric takes the registry it is created in, so tests build a fresh `CollectorRegistry` and
read values with `get_sample_value`. Labelled counters start at 0 for every label value known in
advance (dead-letter reasons, configured alert rules, stages), so `rate()` and `increase()` see the
first event; per-camera series are removed when the camera leaves this worker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sized
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.alerts import Alert
from schemas.messages import REASONS
from worker.pipeline.evidence import alert_id as alert_id_of

# Model steps on this 2-core machine: ~2-3 ms per camera-frame with LiteRT, 20-200 ms for a TF
# batch; buckets span 1 ms to 2.5 s so both backends' distributions are resolved.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Capture to publish: the target is under one 200 ms slot; the tail matters up to a few seconds,
# beyond which the camera is simply behind (input lag tells how far).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# Cameras per model call: powers of two up to the largest TF batch, and more.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Where a frame's time goes (`movinet_stage_seconds_total{stage}`), in data-path order.
STAGES = ("redis_read", "decode", "state", "convert", "model", "publish")
# A camera the worker has had no input from for this long is silent: its lag is left out of the
# sum KEDA scales on (it would add workers for a camera that sends nothing), and the rules treat it
# as silent rather than behind (MovinetCameraSilent, not MovinetCameraInputLagHigh). 10 s is 50
# slots at 5 fps: far longer than any gap a healthy camera leaves, short enough to be told early.
SILENT_SECONDS = 10.0


class CameraState(Protocol):
    """What the per-camera gauges read of a camera (`worker.pipeline.cameras.Camera`), read-only."""

    @property
    def name(self) -> str: ...
    @property
    def owned(self) -> bool: ...
    @property
    def resumed(self) -> bool: ...
    @property
    def timeline(self) -> object | None: ...
    @property
    def published_slot(self) -> int | None: ...
    @property
    def pending(self) -> Sized: ...
    @property
    def in_model(self) -> int: ...
    @property
    def seen_at(self) -> float: ...  # time.monotonic() of the last entry read
    @property
    def clock(self) -> Any: ...


CHECKPOINT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.frames_received = Counter(
            "movinet_frames_received_total", "Frame entries read from input streams", registry=r
        )
        self.frames_stepped = Counter(
            "movinet_frames_stepped_total",
            "Camera slots stepped through the model (per window state)",
            registry=r,
        )
        self.frames_dropped = Counter(
            "movinet_frames_dropped_total",
            "Frames not used: a second frame in a slot already filled, or older than the camera's clock",
            registry=r,
        )
        self.frames_repeated = Counter(
            "movinet_frames_repeated_total", "Missing slots filled by repeating the last frame", registry=r
        )
        self.frames_deadlettered = Counter(
            "movinet_frames_deadlettered_total",
            "Entries moved to the dead-letter stream",
            ["reason"],
            registry=r,
        )
        self.predictions = Counter("movinet_predictions_published_total", "Predictions published", registry=r)
        self.slots_late = Counter(
            "movinet_slots_late_total",
            "Slots published more than one slot after their end (the worker is behind)",
            registry=r,
        )
        self.batch_size = Histogram(
            "movinet_batch_size", "Camera states per model step", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "movinet_model_step_seconds",
            "Wall time of one model step over a batch",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        # Where a frame's time goes, in wall seconds per stage (`movinet-worker bench` reads it):
        # redis_read (XREAD round trips), decode, state (gathering and advancing window states),
        # convert (images to the model's float input), model (the backend's step), publish (which
        # overlaps the next round's model step).
        self.stage_seconds = Counter(
            "movinet_stage_seconds_total",
            "Wall time spent in each stage of the data path",
            ["stage"],
            registry=r,
        )
        self.latency = Histogram(
            "movinet_capture_to_publish_seconds",
            "From a frame's capture time to its prediction's publication",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cameras = Gauge("movinet_cameras_active", "Cameras with live state on this worker", registry=r)
        self.input_lag = Gauge(
            "movinet_input_lag_seconds",
            "Per camera with state: wall clock minus the start of its newest published slot, every "
            "second (it grows while the camera is silent)",
            ["camera"],
            registry=r,
        )
        self.input_lag_total = Gauge(
            "movinet_worker_input_lag_seconds",
            f"Sum of movinet_input_lag_seconds over this worker's cameras not silent (input within "
            f"{SILENT_SECONDS:g} s): how far behind it is; KEDA scales on it",
            registry=r,
        )
        self.last_input = Gauge(
            "movinet_camera_last_input_timestamp_seconds",
            "Per owned camera: Unix time the worker last had input from it (an entry read, or slots "
            "still queued); time() minus it is how long the camera has been silent",
            ["camera"],
            registry=r,
        )
        self.up = Gauge(
            "movinet_worker_ready",
            (
                "1 while ready (/readyz): model loaded, serving, every task running and progressing, "
                "Redis answering"
            ),
            registry=r,
        )
        self.task_restarts = Counter(
            "movinet_task_restarts_total",
            "Worker tasks restarted after an unexpected failure (logged with its traceback)",
            ["task"],
            registry=r,
        )
        for task in ("owner", "reader", "control", "stepper"):
            self.task_restarts.labels(task)
        self.invalid_streams = Counter(
            "movinet_invalid_stream_keys_total",
            "Stream keys found whose camera name breaks the camera-ID rule (logged once each, skipped)",
            registry=r,
        )
        self.cameras_unassigned = Gauge(
            "movinet_cameras_unassigned",
            "Cameras publishing that no live worker has room for (every worker counts them alike): scale out",
            registry=r,
        )
        self.capacity = Gauge(
            "movinet_worker_capacity_cameras",
            "The most cameras this worker takes (configured or measured from its load; -1: no limit yet)",
            registry=r,
        )
        self.load = Gauge(
            "movinet_worker_load",
            "Busy fraction of the model or decode thread over the last 10 s window (the higher), or "
            "1 / the share of its cameras' time it kept up with, when under 90%",
            registry=r,
        )
        self.slots_skipped = Counter(
            "movinet_slots_skipped_total",
            "Slots skipped by cameras that fell further behind their stream than max_lag_seconds",
            registry=r,
        )
        self.cameras_clock_ahead = Gauge(
            "movinet_cameras_clock_ahead",
            "Cameras whose newest entry ID is ahead of the wall clock by more than clock_ahead_seconds",
            registry=r,
        )
        self.redis_errors = Counter(
            "movinet_redis_errors_total", "Redis calls that failed (then retried with backoff)", registry=r
        )

        self.cameras_owned = Gauge(
            "movinet_cameras_owned", "Cameras whose lease this worker holds", registry=r
        )
        self.leases_acquired = Counter(
            "movinet_leases_acquired_total", "Camera leases taken (start, rebalance, takeover)", registry=r
        )
        self.leases_lost = Counter(
            "movinet_leases_lost_total",
            "Camera leases found lost (expired, or fenced at publish)",
            registry=r,
        )
        self.leases_taken_over = Counter(
            "movinet_leases_taken_over_total", "Cameras taken over from another worker", registry=r
        )
        self.takeover_replay_frames = Counter(
            "movinet_takeover_replay_frames_total",
            "Entries re-read to rebuild windows after taking a camera",
            registry=r,
        )
        self.takeover_replay_seconds = Histogram(
            "movinet_takeover_replay_seconds",
            "From taking a camera's lease to its first new prediction",
            buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
            registry=r,
        )

        # Labelled by rule: the operator's rule set bounds the number of series.
        self.alerts_opened = Counter(
            "movinet_alerts_opened_total", "Action alerts opened", ["rule"], registry=r
        )
        self.alerts_closed = Counter(
            "movinet_alerts_closed_total", "Action alerts closed", ["rule"], registry=r
        )
        self.alerts_active = Gauge("movinet_alerts_active", "Action alerts open now", ["rule"], registry=r)
        # Three series per open action alert, only on the worker that owns its camera: at most
        # (cameras owned) x (rules per camera) per worker, in practice the few alerts open now.
        self.open_alert_peak = Gauge(
            "movinet_action_alert_peak_score",
            "Per open action alert (camera, rule, and the label it opened on): its peak score as last "
            "published; removed when it closes or its camera leaves this worker",
            ["camera", "rule", "label"],
            registry=r,
        )
        self.open_alert_start = Gauge(
            "movinet_action_alert_start_timestamp_seconds",
            "Per open action alert: Unix time of its start (its alert ID is <camera>:<rule>:<start in ms>); "
            "removed with it",
            ["camera", "rule", "label"],
            registry=r,
        )
        # Its alert ID as a label, for the dashboard's table (`movinet-worker explain ALERT_ID`).
        self.open_alert_info = Gauge(
            "movinet_action_alert_info",
            "1 per open action alert, with its alert ID; removed with it",
            ["camera", "rule", "label", "alert_id"],
            registry=r,
        )
        self._open_alerts: dict[tuple[str, str], str] = {}  # (camera, rule) -> its series' label
        self._open_alert_ids: dict[tuple[str, str], tuple[str, str]] = {}  # -> (label, alert ID)
        # Evidence kept per alert (worker.pipeline.evidence): bounded by evidence_max_camera_bytes per camera.
        self.evidence_bytes = Gauge(
            "movinet_evidence_bytes",
            "Bytes of alert evidence kept for the camera in Redis, as of the last publish with an alert open",
            ["camera"],
            registry=r,
        )
        self.evidence_dropped = Counter(
            "movinet_evidence_dropped_total",
            "Evidence entries not kept because an alert's or a camera's evidence cap was reached",
            registry=r,
        )

        self._lag_cameras: set[str] = set()
        self._input_cameras: set[str] = set()
        for reason in REASONS:
            self.frames_deadlettered.labels(reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage)

    def know_rules(self, names: Iterable[str]) -> None:
        """Alert rules configured (at start-up, or on the control stream): their series exist from 0."""
        for name in names:
            self.alerts_opened.labels(name)
            self.alerts_closed.labels(name)
            self.alerts_active.labels(name)

    def watch_readiness(self, ready: Callable[[], bool]) -> None:
        """`movinet_worker_ready` reads `ready` at each scrape: the same answer as /readyz."""
        self.up.set_function(lambda: 1.0 if ready() else 0.0)

    def forget_camera(self, camera: str) -> None:
        """Drop a departed camera's label series so they do not linger at their last value."""
        with contextlib.suppress(KeyError):
            self.input_lag.remove(camera)
        with contextlib.suppress(KeyError):
            self.evidence_bytes.remove(camera)
        self.keep_open_alerts(camera, ())

    def alert_published(self, event: Alert) -> None:
        """An alert event the fenced script wrote: its open-alert series follow it.

        The series keep the label the alert opened on (a group rule's peak label may move later:
        the `alerts` stream's events carry it), so one action alert is one series for its life.
        """
        key = (event.camera, event.rule)
        label = self._open_alerts.get(key)
        if event.event == "close" or (event.event == "open" and label is not None):
            self._drop_open_alert(key)
            label = None
        if event.event == "close":
            return
        self._set_open_alert(key, label or event.label, event.start_ms, event.peak_score)

    def restore_open_alerts(self, camera: str, alerts: Iterable[tuple[str, str, int, float]]) -> None:
        """A camera taken (or rebuilt) with its stored alert state: its open alerts' series, as
        (rule, label, start_ms, peak score), replace whatever this worker had for it."""
        alerts = list(alerts)
        self.keep_open_alerts(camera, ())
        for rule, label, start_ms, peak in alerts:
            self._set_open_alert((camera, rule), label, start_ms, peak)

    def keep_open_alerts(self, camera: str, rules: Iterable[str]) -> None:
        """Remove the camera's open-alert series except those of `rules` (its rules changed, or none)."""
        keep = set(rules)
        for key in [k for k in self._open_alerts if k[0] == camera and k[1] not in keep]:
            self._drop_open_alert(key)

    def _set_open_alert(self, key: tuple[str, str], label: str, start_ms: int, peak: float) -> None:
        self._open_alerts[key] = label
        self.open_alert_peak.labels(*key, label).set(min(max(peak, 0.0), 1.0))
        self.open_alert_start.labels(*key, label).set(start_ms / 1000)
        ids = (label, alert_id_of(*key, start_ms))
        if self._open_alert_ids.get(key, ids) != ids:
            self._drop_open_alert_id(key)
        self._open_alert_ids[key] = ids
        self.open_alert_info.labels(*key, *ids).set(1)

    def _drop_open_alert(self, key: tuple[str, str]) -> None:
        label = self._open_alerts.pop(key, None)
        if label is None:
            return
        self._drop_open_alert_id(key)
        for gauge in (self.open_alert_peak, self.open_alert_start):
            with contextlib.suppress(KeyError):
                gauge.remove(*key, label)

    def _drop_open_alert_id(self, key: tuple[str, str]) -> None:
        ids = self._open_alert_ids.pop(key, None)
        if ids is not None:
            with contextlib.suppress(KeyError):
                self.open_alert_info.remove(*key, *ids)

    def observe_cameras(
        self, cameras: Iterable[CameraState], now: float | None = None, mono: float | None = None
    ) -> None:
        """Per-camera lag and last input from the cameras' state, whether or not anything was published.

        Called on a timer. A camera with state has a lag series (wall clock minus the start of its
        newest published slot); an owned camera has a last-input series; every other series of these
        two families is removed (unsubscribed, handed over, lease lost, evicted).
        """
        now = time.time() if now is None else now
        mono = time.monotonic() if mono is None else mono
        lags: dict[str, float] = {}
        inputs: dict[str, float] = {}
        busy = 0.0
        for cam in cameras:
            if not (cam.owned and cam.resumed):
                continue
            had_input = mono if cam.pending or cam.in_model else cam.seen_at
            inputs[cam.name] = now - (mono - had_input)
            if cam.timeline is not None and cam.published_slot is not None:
                lag = max(0.0, now - cam.clock.start_ms(cam.published_slot) / 1000)
                lags[cam.name] = lag
                if mono - had_input <= SILENT_SECONDS:
                    busy += lag
        self._lag_cameras = _keep_only(self.input_lag, lags, self._lag_cameras)
        self._input_cameras = _keep_only(self.last_input, inputs, self._input_cameras)
        self.input_lag_total.set(busy)


def _keep_only(gauge: Gauge, values: dict[str, float], before: set[str]) -> set[str]:
    """Set `gauge{camera}` to `values` and remove the children set `before` that are not in it."""
    for name, value in values.items():
        gauge.labels(name).set(value)
    for name in before - values.keys():
        with contextlib.suppress(KeyError):
            gauge.remove(name)
    return set(values)


# ---- the metrics table of docs/design.md, generated from the registry ------------------------------------

README_BEGIN = (
    "<!-- metrics table: generated from worker/pipeline/metrics.py by "
    "`python -m worker.pipeline.metrics docs/design.md` -->"
)
README_END = "<!-- end of metrics table -->"


class CheckpointMetrics:
    """The checkpoints' metrics (worker.pipeline.checkpoint), here so that the table lists them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.written = Counter(
            "movinet_checkpoints_written_total",
            "Model state checkpoints written (periodic: with a publish; release: on a hand-over or stop)",
            ["reason"],
            registry=registry,
        )
        self.bytes = Counter(
            "movinet_checkpoint_bytes_total", "Bytes of checkpoints written to Redis", registry=registry
        )
        self.seconds = Histogram(
            "movinet_checkpoint_encode_seconds",
            "Time to serialize one checkpoint",
            buckets=CHECKPOINT_SECONDS_BUCKETS,
            registry=registry,
        )
        self.resumes = Counter(
            "movinet_checkpoint_resumes_total",
            "Cameras picked up with replay to rebuild: restored from a checkpoint, or why not "
            "(none, model, settings, corrupt, trimmed, older, ahead)",
            ["result"],
            registry=registry,
        )


def metrics_table() -> str:
    """A Markdown table of every metric a worker exports: name (with labels), type, help text."""
    lines = ["| metric | type | what |", "|---|---|---|"]
    metrics = {**vars(Metrics()), **vars(CheckpointMetrics(CollectorRegistry()))}
    for metric in metrics.values():
        if not isinstance(metric, Counter | Gauge | Histogram):
            continue
        described = next(iter(metric.describe()))
        name = described.name + ("_total" if described.type == "counter" else "")
        labels = getattr(metric, "_labelnames", ())  # the wrapper's label names: none has a public accessor
        shown = f"`{name}{{{', '.join(labels)}}}`" if labels else f"`{name}`"
        lines.append(f"| {shown} | {described.type} | {described.documentation} |")
    return "\n".join(lines) + "\n"


def with_table(readme: str) -> str:
    """`readme` with the text between the table's markers replaced by `metrics_table()`."""
    head, begin, rest = readme.partition(README_BEGIN)
    _, end, tail = rest.partition(README_END)
    if not begin or not end:
        raise ValueError(f"the README has no {README_BEGIN!r} ... {README_END!r} section")
    return f"{head}{begin}\n{metrics_table()}{end}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if len(sys.argv) != 2:
        print(metrics_table(), end="")
    else:
        path = Path(sys.argv[1])
        path.write_text(with_table(path.read_text()))
