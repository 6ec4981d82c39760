"""`movinet-worker demo`: the whole path on one machine, then everything it started is stopped.

A local Redis (when REDIS_URL is unset), a worker, a clip published as a camera, and the
predictions printed as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis

from worker.config import Settings

# The clip the tutorial downloads.
TUTORIAL_CLIP = (
    "https://github.com/tensorflow/models/raw/f8af2291cced43fc9f1d9b41ddbf772ae7b0d7d2/"
    "official/projects/movinet/files/jumpingjack.gif"
)
REDIS_START_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def local_redis(password: str | None = None) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, keeping nothing on disk; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            "no REDIS_URL set and no redis-server on PATH: install Redis (apt-get install redis-server) "
            "or point --redis-url / REDIS_URL at one"
        )
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
                *(["--requirepass", password] if password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        auth = f":{password}@" if password else ""
        url = f"redis://{auth}127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + REDIS_START_SECONDS
            while True:
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit(f"redis-server on port {port} did not start") from None
                    time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def run_demo(settings: Settings, source: str, camera: str, loops: int, timeout: float) -> int:
    from worker.publisher import DEFAULT_SIZE, publish
    from worker.runner import serve
    from worker.tail import follow

    with contextlib.ExitStack() as stack:
        own_redis = not settings.redis_url
        url = settings.redis_url or stack.enter_context(local_redis())
        settings = settings.model_copy(update={"redis_url": url})
        client = redis.Redis.from_url(url)
        print(f"redis: {url}")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        worker_ref: dict[str, Any] = {}
        failure: list[BaseException] = []

        def started(worker: Any) -> None:
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
        size = (worker.size[0], worker.size[1]) if worker.size else DEFAULT_SIZE
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
        )
        for _ in range(loops - 1):
            stats = publish(client, source, camera, key=key, size=size, realtime=False, progress=False)
        assert stats.last_id is not None
        last_slot = worker.fps and int(int(stats.last_id.split("-")[0]) * worker.fps // 1000)
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
