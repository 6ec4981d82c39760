"""Prometheus metrics of one ingest process, per camera; a camera's series go when the camera does."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

# Why a connection ended and another was tried: `eof` (a live source ended), `error` (network or
# demuxer error), `stall` (no frame or no data for stall_seconds), `open` (the URL could not be opened).
RECONNECT_REASONS = ("eof", "error", "stall", "open")
# Frames decoded but not published: `rate` (above the camera's fps), `redis` (the XADD failed).
DROP_REASONS = ("rate", "redis")


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.published = Counter(
            "movinet_ingest_frames_published_total", "Frames added to frame streams", ["camera"], registry=r
        )
        self.dropped = Counter(
            "movinet_ingest_frames_dropped_total",
            "Decoded frames not published: above the camera's fps (rate), or the XADD failed (redis)",
            ["camera", "reason"],
            registry=r,
        )
        self.reconnects = Counter(
            "movinet_ingest_reconnects_total",
            "Connection attempts after the first, by why the previous one ended",
            ["camera", "reason"],
            registry=r,
        )
        self.connections = Counter(
            "movinet_ingest_connections_total", "Connections opened to a camera", ["camera"], registry=r
        )
        self.decode_errors = Counter(
            "movinet_ingest_decode_errors_total",
            "Connections ended by data the decoder could not read",
            ["camera"],
            registry=r,
        )
        self.last_frame_age = Gauge(
            "movinet_ingest_last_frame_age_seconds",
            "Seconds since the camera's last frame (since its feed started, before the first)",
            ["camera"],
            registry=r,
        )
        self.connected = Gauge(
            "movinet_ingest_camera_connected", "1 while the camera's source is open", ["camera"], registry=r
        )
        self.cameras_connected = Gauge(
            "movinet_ingest_cameras_connected", "Cameras whose source is open", registry=r
        )
        self.cameras_configured = Gauge(
            "movinet_ingest_cameras_configured", "Cameras in the camera list", registry=r
        )
        self.reloads = Counter(
            "movinet_ingest_config_reloads_total",
            "Camera list reloads (SIGHUP), by result",
            ["result"],
            registry=r,
        )
        self.ready = Gauge("movinet_ingest_ready", "1 while Redis answers", registry=r)

    def add_camera(self, camera: str, age: Callable[[], float], connected: Callable[[], float]) -> None:
        """Create the camera's series at zero, so rates and alerts see it before its first event."""
        self.published.labels(camera)
        self.connections.labels(camera)
        self.decode_errors.labels(camera)
        for reason in DROP_REASONS:
            self.dropped.labels(camera, reason)
        for reason in RECONNECT_REASONS:
            self.reconnects.labels(camera, reason)
        self.last_frame_age.labels(camera).set_function(age)
        self.connected.labels(camera).set_function(connected)

    def forget_camera(self, camera: str) -> None:
        for metric in (
            self.published,
            self.connections,
            self.decode_errors,
            self.last_frame_age,
            self.connected,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(camera)
        for reason in DROP_REASONS:
            with contextlib.suppress(KeyError):
                self.dropped.remove(camera, reason)
        for reason in RECONNECT_REASONS:
            with contextlib.suppress(KeyError):
                self.reconnects.remove(camera, reason)
