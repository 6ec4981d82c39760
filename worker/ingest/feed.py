"""One camera's feed: a thread that opens the source, samples, resizes, encodes and publishes, and
opens it again after whatever ended it.

Decoding is the cost (H.264 at the camera's full rate); PyAV releases the GIL while it decodes, so a
thread per camera lets cameras use every core of the process. Frames are sampled and resized exactly
as `movinet-worker publish` does for a URL (`read_frames`, `jpeg_frame`) and stamped on arrival.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import av
from redis import Redis
from redis.exceptions import RedisError

from schemas.messages import ControlMessage
from worker.ingest.metrics import IngestMetrics
from worker.ingest.settings import CameraSpec, IngestSettings
from worker.tools.publish import is_live, jpeg_frame
from worker.tools.video import VideoError, open_source, read_frames

log = logging.getLogger("movinet.ingest")
# A connection that has delivered frames this long is healthy again: the next failure starts the
# backoff from its minimum. Shorter connections keep growing it, so a flapping camera is not hammered.
STABLE_SECONDS = 10.0
# One log line per camera per this many seconds for repeated publish failures (Redis down).
LOG_EVERY_SECONDS = 30.0


class Backoff:
    """Capped exponential backoff with jitter: waits in [d/2, d], d doubling from `low` up to `high`.

    The jitter spreads the reconnects of many cameras behind one failed switch or NVR.
    """

    def __init__(self, low: float, high: float, rand: Callable[[], float] = random.random) -> None:
        self.low, self.high, self.rand = low, max(low, high), rand
        self.failures = 0

    def next(self) -> float:
        ceiling = min(self.high, self.low * 2**self.failures)
        self.failures += 1
        return float(ceiling * (0.5 + 0.5 * self.rand()))

    def reset(self) -> None:
        self.failures = 0


class _Stop(Exception):
    """Raised from inside the decode loop: the feed is stopping."""


class _Stalled(Exception):
    """Raised from inside the decode loop: frames decode but none was kept for stall_seconds."""


class Feed:
    def __init__(
        self, spec: CameraSpec, settings: IngestSettings, redis: Redis, metrics: IngestMetrics
    ) -> None:
        self.spec = spec
        self.camera = spec.id
        self.settings = settings
        self.redis = redis
        self.metrics = metrics
        self.fps = spec.fps or settings.fps
        self.size = spec.size if "size" in spec.model_fields_set else settings.size
        self.quality = spec.quality or settings.quality
        self.key = settings.frames_stream(spec.id)
        options = dict(spec.options)
        if spec.url.lower().startswith(("rtsp://", "rtsps://")):
            options.setdefault("rtsp_transport", "tcp")  # no losses, and it passes NAT and firewalls
        self.options = options
        self.live = is_live(spec.url)
        self.seq = 0
        self.last_frame = time.monotonic()  # the feed's start until the first frame
        self._progress = self.last_frame  # the last frame or connection: what a stall is measured from
        self.connected = False
        self.announced = False
        self._last_error_log = 0.0
        self._last_published = 0.0
        self._looping = False  # reopening a file at its end: not a new connection
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ingest-{self.camera}", daemon=True)
        metrics.add_camera(
            self.camera, lambda: time.monotonic() - self.last_frame, lambda: float(self.connected)
        )

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        backoff = Backoff(self.settings.reconnect_min_seconds, self.settings.reconnect_max_seconds)
        self._announce()
        first = True
        while not self._stop.is_set():
            if not first:
                self._stop.wait(backoff.next())
                if self._stop.is_set():
                    break
            first = False
            try:
                reason, lasted = self._connection()
            except Exception:  # a bug must not end the camera for good: log it, count it, go on
                log.exception("camera %s: unexpected error in its feed", self.camera)
                reason, lasted = "error", 0.0
            if reason == "stopped":
                break
            if reason == "loop":  # a file played to its end: again at once, as the same connection
                first, self._looping = True, True
                continue
            if lasted >= STABLE_SECONDS:
                backoff.reset()
            self.metrics.reconnects.labels(self.camera, reason).inc()

    # ---- one connection --------------------------------------------------------------------

    def _connection(self) -> tuple[str, float]:  # noqa: PLR0911 (one return per way a connection ends)
        """Open, publish until the source ends; returns why it ended and how long frames flowed."""

        s = self.settings
        try:
            container = open_source(
                self.spec.url, self.options, timeout=(s.open_timeout_seconds, s.stall_seconds)
            )
        except VideoError as exc:
            log.warning("camera %s: %s", self.camera, exc)
            if isinstance(exc.__cause__, av.error.InvalidDataError):  # e.g. a login page, not video
                self.metrics.decode_errors.labels(self.camera).inc()
            return ("stopped" if self._stop.is_set() else "open"), 0.0
        self.connected = True
        if not self._looping:
            self.metrics.connections.labels(self.camera).inc()
        self._looping = False
        opened = time.monotonic()
        first_frame: float | None = None
        # The stall clock starts at the connection; the last-frame age does not (a camera that
        # accepts connections but never sends a frame must still show as down).
        self._progress = opened
        log.info("camera %s: connected to %s", self.camera, self.spec.url)
        try:
            for frame in read_frames(
                self.spec.url, self.size, self.fps, container=container, skipped=self._skipped
            ):
                if self._stop.is_set():
                    return "stopped", 0.0
                self.last_frame = self._progress = time.monotonic()
                first_frame = first_frame or self.last_frame
                self._publish(frame.image)
            if not self.live:
                return "loop", 0.0  # a file stands in for a camera that never ends
            log.warning("camera %s: stream ended", self.camera)
            return "eof", self._lasted(first_frame)
        except _Stop:
            return "stopped", 0.0
        except _Stalled:
            log.warning("camera %s: no frame for %.1f s", self.camera, s.stall_seconds)
            return "stall", self._lasted(first_frame)
        except VideoError as exc:
            return self._classify(exc), self._lasted(first_frame)
        finally:
            self.connected = False
            container.close()

    def _lasted(self, first_frame: float | None) -> float:
        return self.last_frame - first_frame if first_frame is not None else 0.0

    def _classify(self, exc: VideoError) -> str:
        cause = exc.__cause__
        if self._stop.is_set():
            return "stopped"
        if isinstance(cause, av.error.InvalidDataError):
            self.metrics.decode_errors.labels(self.camera).inc()
            log.warning("camera %s: undecodable data: %s", self.camera, exc)
            return "error"
        if time.monotonic() - self._progress >= self.settings.stall_seconds * 0.9:
            log.warning("camera %s: no data for %.1f s", self.camera, self.settings.stall_seconds)
            return "stall"  # the read timeout fired: the connection is open but silent
        log.warning("camera %s: %s", self.camera, exc)
        return "error"

    def _skipped(self) -> None:
        self.metrics.dropped.labels(self.camera, "rate").inc()
        if self._stop.is_set():
            raise _Stop
        if time.monotonic() - self._progress > self.settings.stall_seconds:
            raise _Stalled

    # ---- Redis -----------------------------------------------------------------------------

    def _trim(self) -> dict[str, Any]:
        s = self.settings
        if s.maxlen:
            return {"maxlen": s.maxlen, "approximate": True}
        if s.retention_seconds:
            return {
                "minid": time.time_ns() // 1_000_000 - int(s.retention_seconds * 1000),
                "approximate": True,
            }
        return {}

    def _publish(self, image: Any) -> None:
        if self.live:
            time_ms = time.time_ns() // 1_000_000
        else:  # a file plays at its own pace, as if it were a camera
            time.sleep(max(0.0, 1 / self.fps - (time.monotonic() - self._last_published)))
            time_ms = time.time_ns() // 1_000_000
        message = jpeg_frame(self.camera, self.seq, time_ms, image, self.quality)
        try:
            self.redis.xadd(self.key, message.to_fields(), id="*", **self._trim())
        except RedisError as exc:
            self.metrics.dropped.labels(self.camera, "redis").inc()
            now = time.monotonic()
            if now - self._last_error_log > LOG_EVERY_SECONDS:
                self._last_error_log = now
                log.warning("camera %s: frames dropped, Redis: %s", self.camera, exc)
            return
        self._last_published = time.monotonic()
        self.seq += 1
        self.metrics.published.labels(self.camera).inc()
        if not self.announced:
            self._announce()

    def _announce(self) -> None:
        if not self.settings.announce:
            return
        try:
            self.redis.xadd(
                self.settings.control_stream,
                ControlMessage(camera=self.camera, action="subscribe").to_fields(),
            )
        except RedisError as exc:
            log.warning("camera %s: not announced yet, Redis: %s", self.camera, exc)
            return
        self.announced = True
        log.info("camera %s: announced on %s", self.camera, self.settings.control_stream)
