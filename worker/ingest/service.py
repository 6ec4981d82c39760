"""The set of camera feeds of one process: started from the camera list, changed on SIGHUP without
touching the cameras that did not change, stopped on SIGTERM. The list is also re-read when its file
changes, so that editing a Kubernetes ConfigMap adds and removes cameras with no signal sent."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from schemas.messages import ControlMessage
from worker.ingest.feed import Feed
from worker.ingest.health import HealthServer
from worker.ingest.metrics import IngestMetrics
from worker.ingest.settings import CameraSpec, ConfigError, IngestSettings, load_cameras

log = logging.getLogger("movinet.ingest")
# The supervisor's beat: Redis is pinged and /healthz refreshed this often; a beat missed for
# HEALTHY_SECONDS means the process is wedged.
TICK_SECONDS = 1.0
HEALTHY_SECONDS = 15.0


class Ingest:
    def __init__(self, settings: IngestSettings, redis: Redis, metrics: IngestMetrics | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.metrics = metrics or IngestMetrics()
        self.feeds: dict[str, Feed] = {}
        self.redis_ok = False
        self.loaded = False
        self.beat = time.monotonic()
        self.stopping = threading.Event()
        self.reload_requested = threading.Event()
        self._config_seen = self._config_bytes()  # the camera list as last applied

    # ---- the camera set --------------------------------------------------------------------

    def apply(self, specs: list[CameraSpec]) -> None:
        """Make the running feeds match `specs`: stop the removed and changed, start the new and changed."""
        wanted = {spec.id: spec for spec in specs}
        gone = {
            cam: self.feeds.pop(cam) for cam, feed in list(self.feeds.items()) if wanted.get(cam) != feed.spec
        }
        self._stop(gone)
        for cam in gone:
            self.metrics.forget_camera(cam)
            if cam not in wanted:
                self._unsubscribe(cam)
            log.info("camera %s: stopped", cam)
        for cam, spec in wanted.items():
            if cam not in self.feeds:
                feed = Feed(spec, self.settings, self.redis, self.metrics)
                self.feeds[cam] = feed
                feed.start()
                log.info("camera %s: started (%s)", cam, spec.url)
        self.metrics.cameras_configured.set(len(self.feeds))
        self.loaded = True

    def _stop(self, feeds: dict[str, Feed]) -> None:
        """Stop feeds together, waiting for all of them at most the grace period."""
        for feed in feeds.values():
            feed.stop()
        deadline = time.monotonic() + self.settings.grace_seconds
        for cam, feed in feeds.items():
            if not feed.join(max(0.0, deadline - time.monotonic())):
                log.warning("camera %s: feed still blocked in a read; left to end on its own", cam)

    def _unsubscribe(self, camera: str) -> None:
        if not self.settings.announce:
            return
        try:
            fields = ControlMessage(camera=camera, action="unsubscribe").to_fields()
            self.redis.xadd(self.settings.control_stream, fields)
        except RedisError as exc:
            log.warning("camera %s: unsubscribe not sent, Redis: %s", camera, exc)

    def _config_bytes(self) -> bytes | None:
        try:
            return Path(self.settings.config or "").read_bytes()
        except OSError:
            return None

    def reload(self) -> bool:
        """Re-read the camera list; a bad one is logged and counted, and the running set kept."""
        assert self.settings.config is not None
        self._config_seen = self._config_bytes()
        try:
            specs = load_cameras(self.settings.config)
        except ConfigError as exc:
            log.error("camera list not reloaded, keeping %d cameras: %s", len(self.feeds), exc)
            self.metrics.reloads.labels("error").inc()
            return False
        self.apply(specs)
        self.metrics.reloads.labels("ok").inc()
        log.info("camera list reloaded: %d cameras", len(self.feeds))
        return True

    # ---- running ---------------------------------------------------------------------------

    def status(self) -> tuple[bool, bool, dict[str, Any]]:
        now = time.monotonic()
        cameras = {
            cam: {
                "connected": feed.connected,
                "last_frame_age_seconds": round(now - feed.last_frame, 3),
                "frames": feed.seq,
            }
            for cam, feed in list(self.feeds.items())
        }
        return now - self.beat < HEALTHY_SECONDS, self.redis_ok and self.loaded, {"cameras": cameras}

    def tick(self) -> None:
        self.beat = time.monotonic()
        try:
            self.redis.ping()
            if not self.redis_ok and self.loaded:
                # Back after an outage, maybe empty (a restarted Redis keeps no control stream):
                # each camera announces itself again with its next frame; a repeat is harmless.
                for feed in list(self.feeds.values()):
                    feed.announced = False
            self.redis_ok = True
        except RedisError as exc:
            if self.redis_ok:
                log.warning("Redis does not answer: %s", exc)
            self.redis_ok = False
        self.metrics.ready.set(float(self.redis_ok))
        self.metrics.cameras_connected.set(sum(f.connected for f in self.feeds.values()))

    def run(self) -> None:
        """Serve until `stopping` is set: reloads when asked, then stops every feed within the grace."""
        while not self.stopping.is_set():
            # SIGHUP, or the file changed (a Kubernetes ConfigMap is updated in place, unsignalled).
            if self.reload_requested.is_set() or self._config_bytes() not in (self._config_seen, None):
                self.reload_requested.clear()
                self.reload()
            self.tick()
            self.stopping.wait(TICK_SECONDS)
        self.shutdown()

    def shutdown(self) -> None:
        self._stop(self.feeds)

    def install_signal_handlers(self) -> None:
        """Handlers only set events; the supervisor loop acts on them."""
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())


def serve(settings: IngestSettings) -> int:
    if not settings.config:
        raise SystemExit(
            "invalid configuration:\n  config (--config / MOVINET_CONFIG): required: the camera list"
        )
    if not settings.redis_url:
        raise SystemExit("invalid configuration:\n  redis_url (--redis-url / REDIS_URL): required")
    try:
        specs = load_cameras(settings.config)
    except ConfigError as exc:
        raise SystemExit(f"invalid configuration:\n  {exc}") from None
    # One client (a thread-safe connection pool) for every camera: a connection per busy thread.
    redis = Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=10
    )
    ingest = Ingest(settings, redis)
    ingest.install_signal_handlers()
    http = None
    if settings.metrics_port:
        http = HealthServer(
            settings.metrics_host, settings.metrics_port, ingest.metrics.registry, ingest.status
        )
        http.start()
    ingest.tick()
    ingest.apply(specs)
    log.info("ingest serving %d cameras (metrics on :%d)", len(specs), settings.metrics_port)
    try:
        ingest.run()
    finally:
        if http is not None:
            http.close()
        redis.close()
    log.info("ingest stopped")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from worker.config import load_settings
    from worker.runner import configure_logging

    settings = load_settings(IngestSettings, args)
    configure_logging(settings.log_level)
    return serve(settings)
