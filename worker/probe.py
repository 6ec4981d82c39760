"""`movinet-worker check`: is the local worker ready? Light on purpose: a probe runs every few seconds,
so it imports neither the worker, the model runtimes nor numpy."""

from __future__ import annotations

import urllib.error
import urllib.request

from worker.config import redact_url

READY_METRIC = "movinet_worker_ready"

__all__ = ["READY_METRIC", "check"]


def check(url: str, redis_url: str | None, timeout: float = 3.0) -> tuple[bool, str]:
    """Is the worker at `url` ready, and does Redis answer (from here)?

    `url` is its /readyz (the answer and the reason) or its /metrics (`movinet_worker_ready`).
    """
    if url.rstrip("/").endswith("/readyz"):
        from worker.pipeline.health import probe

        ok, message = probe(url, timeout)
        if not ok:
            return False, f"worker not ready: {message}"
        return _check_redis(redis_url, timeout)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return False, f"no worker metrics at {url}: {exc}"
    ready = any(
        line.startswith(READY_METRIC + " ") and float(line.split()[1]) == 1.0 for line in text.splitlines()
    )
    if not ready:
        return False, f"worker at {url} is not ready ({READY_METRIC} is not 1)"
    return _check_redis(redis_url, timeout)


def _check_redis(redis_url: str | None, timeout: float) -> tuple[bool, str]:
    if redis_url:
        import redis

        try:
            redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout).ping()
        except redis.RedisError as exc:
            return False, f"redis at {redact_url(redis_url)} does not answer: {exc}"
    return True, "ready"
