"""Prometheus metrics of one worker. Base units, `_total` counters, no camera label on histograms.

Every metric takes the registry it is created in, so tests build a fresh `CollectorRegistry` and
read values with `get_sample_value`.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Model steps on this 2-core machine: ~2-3 ms per camera-frame with LiteRT, 20-200 ms for a TF
# batch; buckets span 1 ms to 2.5 s so both backends' distributions are resolved.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Capture to publish: the target is under one 200 ms slot; the tail matters up to a few seconds,
# beyond which the camera is simply behind (input lag tells how far).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# Cameras per model call: powers of two up to the largest TF batch, and more.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
            "Per camera: wall clock minus the time of the newest frame processed",
            ["camera"],
            registry=r,
        )
        self.input_lag_total = Gauge(
            "movinet_input_lag_seconds_sum", "Sum of input lag over this worker's cameras", registry=r
        )
        self.up = Gauge("movinet_worker_ready", "1 once the model is loaded and Redis answers", registry=r)
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

    def forget_camera(self, camera: str) -> None:
        """Drop a departed camera's label series so they do not linger at their last value."""
        with contextlib.suppress(KeyError):
            self.input_lag.remove(camera)
