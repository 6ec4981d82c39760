"""The ingest process's HTTP port: /metrics for Prometheus, /healthz and /readyz for probes.

/healthz: the supervisor loop has run recently (a wedged process is restarted). /readyz: Redis
answers and the camera list is loaded. Both answer with a JSON status of every camera.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Status = Callable[[], tuple[bool, bool, dict[str, Any]]]  # (healthy, ready, details)


class HealthServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, status: Status) -> None:
        registry_, status_ = registry, status

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry_), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    healthy, ready, details = status_()
                    ok = healthy if path == "/healthz" else healthy and ready
                    body = json.dumps({"ok": ok, "healthy": healthy, "ready": ready, **details}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no log
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="ingest-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
