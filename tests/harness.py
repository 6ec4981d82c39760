"""A worker running in a background thread against real Redis, with keys private to one test."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import numpy as np
import redis
import redis.asyncio as aioredis

from schemas.messages import Frame, Prediction
from worker.config import Settings, prefixed_keys
from worker.pipeline.metrics import Metrics
from worker.pipeline.worker import Worker


class StepHook:
    """A real backend whose `step` first calls `before(call number)`: a slow or failing model, made
    from outside the worker. `close` is left to the session fixture that owns the real backend."""

    def __init__(self, inner: Any, before: Any) -> None:
        self.inner, self.before, self.calls = inner, before, 0

    def step(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.before(self.calls)
        return self.inner.step(*args, **kwargs)

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # info, init_state, export_state...: the real backend's
        return getattr(self.inner, name)


def settings_for(redis_url: str, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        **prefixed_keys(prefix),
        "metrics_port": 0,
        "block_ms": 20,
        "discover_interval_seconds": 0.1,
        "worker_id": "test-" + uuid.uuid4().hex[:6],
        # Never shed: these workers replay backlogs (busy all the time by construction) on a shared
        # machine; shedding is tested where it is the subject (test_overload, tests of Capacity).
        "target_load": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


class Harness:
    def __init__(
        self, redis_url: str, backend: Any, labels: list[str], prefix: str | None = None, **overrides: Any
    ) -> None:
        self.prefix = prefix or "t" + uuid.uuid4().hex[:10]
        self.settings = settings_for(redis_url, self.prefix, **overrides)
        self.backend, self.labels = backend, labels
        self.client = redis.Redis.from_url(redis_url)
        self.metrics = Metrics()
        self.worker: Worker | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def frames_key(self, camera: str) -> str:
        return self.settings.frames_stream(camera)

    def publish_rgb(self, camera: str, ms: int, image: np.ndarray, seq: int = 0) -> str:
        frame = Frame(
            camera=camera,
            seq=seq,
            capture_ms=ms,
            encoding="rgb24",
            width=image.shape[1],
            height=image.shape[0],
            data=image.tobytes(),
        )
        entry: bytes = self.client.xadd(self.frames_key(camera), frame.to_fields(), id=f"{ms}-{seq}")
        return entry.decode()

    def start(self) -> Harness:
        ready = threading.Event()

        async def main() -> None:
            client = aioredis.from_url(self.settings.redis_url or "")
            self.worker = Worker(self.settings, self.backend, self.labels, client, self.metrics)
            self._task = asyncio.current_task()
            ready.set()
            try:
                await self.worker.run()
            finally:
                await client.aclose()

        def thread() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(main())
            except asyncio.CancelledError:
                pass
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=thread, daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the worker's thread did not start its event loop within 30 s")
        return self

    def stop(self, timeout: float = 30) -> None:
        """Graceful: what SIGTERM does."""
        assert self._loop is not None and self.worker is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self.worker.request_stop)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "worker did not stop in time"

    def kill(self) -> None:
        """Abrupt: the worker's tasks are cancelled wherever they are, nothing drained."""
        assert self._loop is not None and self._thread is not None
        loop = self._loop
        loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
        self._thread.join(10)

    def predictions(self, camera: str) -> list[tuple[str, Prediction]]:
        entries = self.client.xrange(self.settings.predictions_stream(camera))
        return [(e.decode(), Prediction.from_fields(f)) for e, f in entries]

    def wait_for(self, condition: Any, timeout: float = 60, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def cleanup(self) -> None:
        keys = list(self.client.scan_iter(match=self.prefix + ":*", count=1000))
        if keys:
            self.client.delete(*keys)
        self.client.close()
