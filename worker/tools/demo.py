"""`movinet-worker demo`: the whole path on one machine, then everything it started is stopped.

A local Redis (when REDIS_URL is unset), a worker, a clip published as a camera, and the
predictions printed as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from typing import TYPE_CHECKING, Any

import redis

from worker.config import Settings, redact_url
from worker.testing import local_redis

if TYPE_CHECKING:
    from worker.pipeline.worker import Worker

# The clip the tutorial downloads.
TUTORIAL_CLIP = (
    "https://github.com/tensorflow/models/raw/f8af2291cced43fc9f1d9b41ddbf772ae7b0d7d2/"
    "official/projects/movinet/files/jumpingjack.gif"
)


def run_demo(settings: Settings, source: str, camera: str, loops: int, timeout: float) -> int:
    from worker.runner import serve
    from worker.tools.publish import DEFAULT_SIZE, publish
    from worker.tools.tail import follow

    with contextlib.ExitStack() as stack:
        own_redis = not settings.redis_url
        url = settings.redis_url or stack.enter_context(local_redis())
        settings = settings.model_copy(update={"redis_url": url})
        client = redis.Redis.from_url(url)
        print(f"redis: {redact_url(url)}")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        worker_ref: dict[str, Worker] = {}
        failure: list[BaseException] = []

        def started(worker: Worker) -> None:
            worker_ref["worker"] = worker
            ready.set()

        def run_worker() -> None:
            try:
                loop.run_until_complete(serve(settings, started=started, signals=False))
            except BaseException as exc:  # reported in the main thread
                failure.append(exc)
                ready.set()

        thread = threading.Thread(target=run_worker, name="worker", daemon=True)
        thread.start()
        print(f"loading {settings.model} ...")
        ready.wait()
        if failure:
            raise failure[0]
        worker = worker_ref["worker"]
        key = settings.frames_stream(camera)
        out = settings.predictions_stream(camera)
        client.delete(key, out)
        size = (worker.plan.size[0], worker.plan.size[1]) if worker.plan.size else DEFAULT_SIZE
        print(f"publishing {source} as camera {camera!r} ({loops}x) ...")
        stats = publish(
            client,
            source,
            camera,
            key=key,
            fps=None,
            size=size,
            loop=loops > 1,
            limit=None,
            realtime=False,
            progress=False,
            announce=settings.control_stream,
        )
        for _ in range(loops - 1):
            stats = publish(client, source, camera, key=key, size=size, realtime=False, progress=False)
        assert stats.last_id is not None
        fps = worker.plan.fps
        last_slot = fps and int(int(stats.last_id.split("-")[0]) * fps // 1000)
        print(f"published {stats.frames} frames; predictions:")
        seen = follow(
            client,
            lambda: [out],
            from_start=True,
            timeout=timeout,
            on_prediction=lambda p: p.slot >= last_slot,
        )
        loop.call_soon_threadsafe(worker.request_stop)
        thread.join(timeout=settings.grace_seconds + 5)
        print(f"{seen} predictions; worker stopped" + (", local redis stopped" if own_redis else ""))
        return 0 if seen else 1


def demo_settings(**overrides: Any) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    values.setdefault("metrics_port", 0)
    values.setdefault("redis_url", os.environ.get("REDIS_URL"))
    return Settings(**values)
