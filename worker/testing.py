"""Throwaway infrastructure on one machine, shared by the demo, the bench and the tests: a free
loopback port and a private `redis-server` that keeps nothing on disk."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import redis

LOOPBACK = "127.0.0.1"
REDIS_START_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
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
