"""The lease keeper: registration and leases renewed from a thread of their own.

Leases must be renewed on time whatever the event loop is doing (decoding a burst, a long model
step, a stall): so the keeper renews them from its own thread, over its own connection. It also
watches the event loop: when the loop has made no progress for `stall_seconds`, the keeper stops
renewing, so that other workers take the cameras this worker cannot serve, and the worker reports
not ready until the loop runs again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from worker.config import Settings
from worker.pipeline.metrics import Metrics
from worker.pipeline.ownership import Ownership
from worker.pipeline.supervisor import REDIS_ERRORS, denied_command

log = logging.getLogger("movinet.worker")


class LeaseKeeper:
    def __init__(
        self,
        settings: Settings,
        ownership: Ownership,
        client: Any,
        metrics: Metrics,
        *,
        loop_tick: Callable[[], float],
        on_lost: Callable[[list[str]], None],
        on_stall: Callable[[str], None],
        on_denied: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.ownership = ownership
        self.client = client
        self.metrics = metrics
        self.loop_tick = loop_tick
        self.on_lost = on_lost
        self.on_stall = on_stall
        self.on_denied = on_denied
        self.renewed_at = time.monotonic()  # last time a full renewal went through
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.settings.redis_timeout_seconds + 1)
        self.client.close()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def once(self) -> None:
        stalled = time.monotonic() - self.loop_tick()
        if stalled > self.settings.stall_seconds:
            self.on_stall(f"event loop stalled for {stalled:.0f}s: leases left to expire")
            return
        self.on_stall("")
        self.ownership.heartbeat_sync(self.client)
        lost = self.ownership.renew_sync(self.client)
        self.renewed_at = time.monotonic()
        if lost:
            self.on_lost(lost)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self.once()
            except REDIS_ERRORS as exc:
                self.metrics.redis_errors.inc()
                log.warning("lease renewal failed (%s); retrying", exc)
            except Exception as exc:  # the keeper must outlive any single failure
                command = denied_command(exc)
                if command is not None:
                    self.on_denied(command)
                else:
                    self.metrics.task_restarts.labels("leases").inc()
                    log.error("lease renewal failed unexpectedly", exc_info=exc)
