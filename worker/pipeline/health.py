"""Is the worker alive, is it ready: the answers, the HTTP server that gives them, and a probe client.

The metrics server also answers `/healthz` (alive: the event loop turns) and `/readyz` (ready: the
model is loaded, the worker serves, Redis answered within a lease period, nothing reported a fault).
Both read in-memory state only, never Redis or the model, so a probe costs well under a millisecond
of the worker's time and its answer is bounded however loaded the worker is.

`Health` is the one place that says "ready": the worker's parts feed it (`redis_answered`, `beat`,
`fault` / `recovered` for supervised tasks), `/readyz`, `movinet_worker_ready` and `movinet-worker
check` all read `Health.ready()`.

`python -m worker.pipeline.health [readyz|healthz]` is the probe for images without curl: standard library
only, so it starts in tens of milliseconds, not the seconds `movinet-worker check` takes to import.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

# /healthz fails when the event loop has not turned for this long while serving: a stuck loop (a
# blocking call on it, a deadlock) that only a restart cures. Far above any pause a loaded worker
# shows (a model step runs in its own thread), and the liveness probe needs several failures on top.
LOOP_STALL_SECONDS = 30.0
DEFAULT_PORT = 9108
PATHS = ("/healthz", "/readyz")


class Health:
    """What the worker knows about itself, for probes. Written from the event loop, read from the
    HTTP server's threads: each field is one atomic assignment, and `ready()` reads a snapshot.
    """

    def __init__(self, redis_window_seconds: float, *, model_loaded: bool = False) -> None:
        self.redis_window_seconds = redis_window_seconds  # the lease period: past it, leases lapse
        self.model_loaded = model_loaded
        self.serving = False
        self.stopping = False
        self._redis_at: float | None = None
        self._beat_at: float | None = None
        self._faults: dict[str, str] = {}
        # The serving worker's own verdict (its tasks run and progress, its leases are renewed):
        # asked last, once everything above holds.
        self.check: Callable[[], tuple[bool, str]] | None = None

    def redis_answered(self) -> None:
        self._redis_at = time.monotonic()

    def beat(self) -> None:
        """The event loop turned (called on a timer by the worker)."""
        self._beat_at = time.monotonic()

    def start_serving(self) -> None:
        self.serving, self.stopping = True, False
        self.beat()

    def stop_serving(self) -> None:
        self.serving, self.stopping = False, True

    def fault(self, part: str, why: str) -> None:
        """A part of the worker cannot do its job (e.g. a supervised task keeps failing): not ready."""
        self._faults = {**self._faults, part: why}

    def recovered(self, part: str) -> None:
        self._faults = {k: v for k, v in self._faults.items() if k != part}

    def ready(self, now: float | None = None) -> tuple[bool, str]:
        """(True, "ready"), or (False, the first reason it is not), in the order a worker starts."""
        now = time.monotonic() if now is None else now
        redis_at, faults = self._redis_at, self._faults
        checks = (
            (self.model_loaded, "model not loaded yet"),
            (not self.stopping, "stopping: draining the slots in flight"),
            (self.serving, "not serving yet"),
            (not faults, "; ".join(f"{part}: {why}" for part, why in sorted(faults.items()))),
            (redis_at is not None, "Redis has not answered yet"),
            (
                redis_at is None or now - redis_at <= self.redis_window_seconds,
                f"Redis has not answered for {now - (redis_at or now):.1f} s",
            ),
        )
        failed = next(((False, why) for ok, why in checks if not ok), None)
        if failed is not None:
            return failed
        ok, why = self.check() if self.check is not None else (True, "ready")
        return (True, "ready") if ok else (False, why)

    def alive(self, now: float | None = None) -> tuple[bool, str]:
        now = time.monotonic() if now is None else now
        beat = self._beat_at
        if self.serving and beat is not None and now - beat > LOOP_STALL_SECONDS:
            return False, f"event loop stalled for {now - beat:.0f} s"
        return True, "alive" if self.serving else ("stopping" if self.stopping else "starting")


def app(registry: CollectorRegistry, health: Health) -> Any:
    """WSGI: /healthz and /readyz from `health`, anything else the Prometheus exposition."""
    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(registry)

    def handle(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in PATHS:
            result: Iterable[bytes] = metrics(environ, start_response)
            return result
        ok, why = health.alive() if path == "/healthz" else health.ready()
        body = (why + "\n").encode()
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        start_response("200 OK" if ok else "503 Service Unavailable", headers)
        return [body]

    return handle


def start_server(host: str, port: int, registry: CollectorRegistry, health: Health) -> WSGIServer:
    """Serve /metrics, /healthz and /readyz on a daemon thread; `shutdown()` the result to stop."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """A probe every few seconds is not worth a log line."""

    server = make_server(host, port, app(registry, health), Server, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def probe(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """GET `url`: (True, body) on 200, else (False, why)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return True, response.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code} {exc.read().decode().strip()}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker.pipeline.health [readyz|healthz] [URL]`: exit 0 when the local worker answers 200."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = args[0] if args else "readyz"
    if f"/{path}" not in PATHS:
        print(
            f"usage: python -m worker.pipeline.health [{'|'.join(p[1:] for p in PATHS)}] [URL]",
            file=sys.stderr,
        )
        return 2
    port = os.environ.get("MOVINET_METRICS_PORT", str(DEFAULT_PORT))
    url = args[1] if len(args) > 1 else f"http://127.0.0.1:{port}/{path}"
    ok, message = probe(url)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
