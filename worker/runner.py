"""Starting and checking a worker process: `run`, `check`, `config`."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import urllib.error
import urllib.request
from typing import Any

from worker.backends import load_stream_model
from worker.config import Settings
from worker.labels import check_labels, load_labels
from worker.metrics import Metrics

log = logging.getLogger("movinet.worker")
READY_METRIC = "movinet_worker_ready"


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def check_settings(settings: Settings) -> None:
    if not settings.model:
        raise SystemExit(
            "invalid configuration:\n  model (--model / MOVINET_MODEL): required: a TF Hub handle, "
            "a SavedModel folder or a .tflite file"
        )
    if not settings.redis_url:
        raise SystemExit("invalid configuration:\n  redis_url (--redis-url / REDIS_URL): required")


def load_backend(settings: Settings) -> Any:
    assert settings.model is not None
    return load_stream_model(
        settings.model,
        settings.backend,
        batch_sizes=settings.batch_sizes,
        interpreters=settings.interpreters,
        threads=settings.threads,
        fps=settings.fps,
    )


async def serve(
    settings: Settings, metrics: Metrics | None = None, started: Any = None, signals: bool = True
) -> int:
    """Load everything, then serve until SIGTERM/SIGINT; returns the exit code."""
    from prometheus_client import start_http_server

    from worker.service import Worker

    check_settings(settings)
    labels = load_labels(settings.labels)  # cheap and likely to be wrong: before the slow model
    backend = await asyncio.to_thread(load_backend, settings)
    check_labels(labels, backend.info.num_classes, backend.info.source)
    fps = settings.fps or backend.info.fps
    if settings.idle_timeout_seconds * fps <= settings.max_gap_slots + 1:
        raise SystemExit(
            "invalid configuration:\n  idle_timeout_seconds (--idle-timeout-seconds / "
            "MOVINET_IDLE_TIMEOUT_SECONDS): must be longer than max_gap_slots + 1 slots"
        )
    replayed = (settings.window or backend.info.clip_frames) + settings.max_gap_slots + 1
    retention = settings.input_retention_seconds
    if retention and retention * fps <= replayed:
        raise SystemExit(
            "invalid configuration:\n  input_retention_seconds (--input-retention-seconds / "
            f"MOVINET_INPUT_RETENTION_SECONDS): must cover more than the {replayed} slots "
            f"({replayed / fps:g} s) a takeover replays"
        )
    log.info("model: %s", backend.info.describe())
    metrics = metrics or Metrics()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.metrics_host, registry=metrics.registry)
    client = connect(settings)
    await client.ping()
    worker = Worker(settings, backend, labels, client, metrics)
    if signals:  # only possible in the main thread
        worker.install_signal_handlers()
    log.info("worker %s serving (metrics on :%d)", settings.worker_id, settings.metrics_port)
    if started is not None:
        started(worker)
    try:
        await worker.run()
    finally:
        await client.aclose()
        backend.close()
    log.info("worker %s stopped", settings.worker_id)
    return 0


def connect(settings: Settings) -> Any:
    """An asyncio client: a Redis Cluster client when --redis-cluster, else a plain one."""
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    url = settings.redis_url or ""
    if settings.redis_cluster:
        return RedisCluster.from_url(url, retry=Retry(ExponentialBackoff(cap=5.0), 3))
    return aioredis.from_url(url, health_check_interval=10, socket_keepalive=True)


def check(url: str, redis_url: str | None, timeout: float = 3.0) -> tuple[bool, str]:
    """Is the worker at `url` ready (model loaded, serving), and does Redis answer?"""
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
    if redis_url:
        import redis

        try:
            redis.Redis.from_url(redis_url, socket_timeout=timeout).ping()
        except redis.RedisError as exc:
            return False, f"redis at {redis_url} does not answer: {exc}"
    return True, "ready"


def print_config(settings: Settings) -> None:
    print(json.dumps(settings.redacted(), indent=2, default=str))
