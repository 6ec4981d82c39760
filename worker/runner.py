"""Starting and checking a worker process: `run`, `check`, `config`."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from worker.config import TEMPLATE_FIELDS, Settings, redact_url
from worker.keys import as_written
from worker.model.backends import load_stream_model, options_for
from worker.model.labels import check_labels, load_labels
from worker.pipeline.alerting import AlertTracker
from worker.pipeline.clients import connect
from worker.pipeline.health import Health, start_server
from worker.pipeline.metrics import Metrics
from worker.probe import READY_METRIC, check

__all__ = ["READY_METRIC", "check", "configure_logging", "print_config", "serve"]  # check: worker.probe

log = logging.getLogger("movinet.worker")


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
    options = options_for(settings.model, settings.backend, settings)
    return load_stream_model(settings.model, settings.backend, options, fps=settings.fps)


async def serve(
    settings: Settings, metrics: Metrics | None = None, started: Any = None, signals: bool = True
) -> int:
    """Load everything, then serve until SIGTERM/SIGINT; returns the exit code.

    The metrics server starts first, so /healthz answers (and /readyz says why not ready) while the
    model loads.
    """
    check_settings(settings)
    metrics = metrics or Metrics()
    health = Health(settings.lease_seconds)
    metrics.watch_readiness(lambda: health.ready()[0])
    server = None
    if settings.metrics_port:
        server = start_server(settings.metrics_host, settings.metrics_port, metrics.registry, health)
    try:
        return await _serve(settings, metrics, health, started, signals)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


async def _serve(settings: Settings, metrics: Metrics, health: Health, started: Any, signals: bool) -> int:
    from worker.pipeline.worker import Worker

    labels = load_labels(settings.labels)  # cheap and likely to be wrong: before the slow model
    backend = await asyncio.to_thread(load_backend, settings)
    check_labels(labels, backend.info.num_classes, backend.info.source)
    try:
        AlertTracker("check", settings.alert_rules, labels, settings.worker_id)
    except ValueError as exc:
        raise SystemExit(
            f"invalid configuration:\n  alert_rules (--alert-rules / MOVINET_ALERT_RULES): {exc}"
        ) from None
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
    client = connect(settings)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        raise SystemExit(f"redis at {redact_url(settings.redis_url)} does not answer: {exc}") from None
    health.redis_answered()
    worker = Worker(settings, backend, labels, client, metrics, health=health)
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
    return worker.exit_code


def print_config(settings: Settings) -> None:
    """The effective settings as JSON, key templates as a user writes them (`frames:{<camera>}`)."""
    data = settings.redacted()
    data.update({name: as_written(data[name]) for name in TEMPLATE_FIELDS})
    print(json.dumps(data, indent=2, default=str))
