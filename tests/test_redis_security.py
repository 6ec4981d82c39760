"""Redis as operators run it: the documented ACL user, TLS with a private CA, no secret in any output,
and no call that hangs forever."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import redis

from tests.cluster import RedisServer, free_port
from tests.conftest import ROOT, run_cli
from tests.harness import Harness
from worker.config import Settings, redact_url

T0 = 1_700_000_000_000
IMAGE = np.full((172, 172, 3), 80, np.uint8)


def documented_acl() -> str:
    text = (ROOT / "deploy" / "README.md").read_text()
    found = re.search(r"^ACL SETUSER movinet .*$", text, re.M)
    assert found, "deploy/README.md gives no ACL SETUSER line"
    return found.group(0)


def default_keys() -> dict[str, Any]:
    """The shipped key names (the ACL is written for them), not the tests' usual private prefixes."""
    return {
        name: field.default
        for name, field in Settings.model_fields.items()
        if name.endswith(("_key", "_stream"))
    }


def acl_user(server: RedisServer, password: str, drop: str = "") -> str:
    line = documented_acl().replace("PASSWORD", password)
    if drop:
        assert f" +{drop}" in line
        line = line.replace(f" +{drop}", "")
    admin = server.client()
    admin.execute_command(*line.split())
    return f"redis://movinet:{password}@127.0.0.1:{server.port}/0"


def serve_one_camera(
    url: str, backend: Any, labels: list[str], admin: redis.Redis, **overrides: Any
) -> Harness:
    h = Harness(url, backend, labels, **default_keys(), **overrides)
    h.client.close()
    h.client = admin  # the test reads predictions as the admin; the worker alone runs as the ACL user
    for i in range(10):
        frame_key = h.settings.frames_stream("cam")
        from schemas.messages import Frame

        frame = Frame(
            camera="cam",
            seq=i,
            capture_ms=T0 + 200 * i,
            encoding="rgb24",
            width=172,
            height=172,
            data=IMAGE.tobytes(),
        )
        admin.xadd(frame_key, frame.to_fields(), id=f"{T0 + 200 * i}-0")
    return h.start()


def test_the_worker_runs_as_the_documented_acl_user_without_a_denial(lite_backend, labels600) -> None:
    with RedisServer() as server:
        url = acl_user(server, "s3cret-acl")
        admin = server.client()
        admin.acl_log_reset()
        h = serve_one_camera(url, lite_backend, labels600, admin)
        try:
            h.wait_for(lambda: len(h.predictions("cam")) == 10, what="predictions as the ACL user")
            h.wait_for(lambda: h.worker is not None and h.worker.ready()[0], what="ready")
            h.stop()
            denials = admin.acl_log()
            assert denials == [], denials
            holder = admin.pttl(h.settings.owner("cam") + ":holder")
            assert holder > 0, "holder keys must expire"
            assert admin.pttl(h.settings.checkpoint("cam")) > 0, "the drain writes an expiring checkpoint"
            h = Harness(url, lite_backend, labels600, **default_keys()).start()  # restores it
            h.wait_for(lambda: h.worker is not None and h.worker.ready()[0], what="ready again")
            resumes, restored = "movinet_checkpoint_resumes_total", {"result": "restored"}
            h.wait_for(
                lambda: h.metrics.registry.get_sample_value(resumes, restored) == 1,
                what="the checkpoint restored",
            )
            h.stop()
            assert admin.acl_log() == [], admin.acl_log()
        finally:
            if h._thread is not None and h._thread.is_alive():
                h.kill()


def test_a_worker_denied_a_command_is_not_ready_and_names_it(lite_backend, labels600, caplog) -> None:
    with RedisServer() as server:
        url = acl_user(server, "s3cret-acl", drop="xtrim")
        admin = server.client()
        h = serve_one_camera(url, lite_backend, labels600, admin, input_retention_seconds=1.0)
        try:
            h.wait_for(
                lambda: (
                    h.worker is not None
                    and h.worker.ready()[1] != "serving"
                    and "xtrim" in h.worker.ready()[1]
                ),
                what="not ready, naming xtrim",
            )
            assert any("xtrim" in r.getMessage() and "denies" in r.getMessage() for r in caplog.records)
            assert h.metrics.registry.get_sample_value("movinet_worker_ready") == 0
        finally:
            h.kill()


def make_ca(tmp: Path) -> tuple[Path, Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=tmp)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (tmp / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    )
    return tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"


def test_tls_with_a_private_ca(lite_backend, labels600, tmp_path: Path) -> None:
    ca, cert, key = make_ca(tmp_path)
    port = free_port()
    args = (
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(ca),
        "--tls-auth-clients",
        "no",
    )
    with RedisServer(*args) as server:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
        admin = redis.Redis.from_url(url)
        h = serve_one_camera(url, lite_backend, labels600, admin)
        try:
            h.wait_for(lambda: len(h.predictions("cam")) == 10, what="predictions over TLS")
            h.stop()
        finally:
            if h._thread is not None and h._thread.is_alive():
                h.kill()
            admin.close()
        # Without the CA the certificate is refused: TLS is really checked.
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(f"rediss://127.0.0.1:{port}/0", socket_timeout=5).ping()
        assert server.port


PASSWORD = "pl4nted-S3CRET"


class ReadyMetrics:
    """An HTTP server saying `movinet_worker_ready 1`, so that `check --redis` goes on to Redis."""

    def __enter__(self) -> str:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"movinet_worker_ready 1.0\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/metrics"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_no_command_prints_the_redis_password(models, labels600, tmp_path: Path) -> None:
    """Every command that takes a Redis URL, pointed at a server that refuses it: the planted
    password is in no output, and each fails within its timeout instead of hanging (`ingest`, which
    keeps its cameras through a Redis outage, runs for a few seconds and is stopped)."""
    with RedisServer("--requirepass", "the-real-one") as server, ReadyMetrics() as metrics_url:
        url = f"redis://user:{PASSWORD}@127.0.0.1:{server.port}/0"
        labels = tmp_path / "labels.txt"
        labels.write_text("\n".join(labels600) + "\n")
        clip = tmp_path / "clip.mp4"
        with av.open(str(clip), "w") as out:
            stream = out.add_stream("mpeg4", rate=5)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for i in range(4):
                image = np.full((48, 64, 3), 40 * i, np.uint8)
                out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            out.mux(stream.encode(None))
        model = ("--model", str(models.tflite), "--labels", str(labels))
        env_url = ("--redis-url", url)
        commands = [
            ("config", *env_url),
            ("check", "--redis", *env_url, "--url", metrics_url),
            ("run", *env_url, "--model", str(models.tflite), "--labels", str(labels), "--metrics-port", "0"),
            ("tail", "cam", *env_url, "--count", "1"),
            ("alerts", *env_url, "--count", "1"),
            ("publish", str(tmp_path / "missing.mp4"), "--camera", "cam", *env_url),
            ("publish", str(clip), "--camera", "cam", *env_url),
            ("plot", "--camera", "cam", *env_url, "--out", str(tmp_path / "plot.png")),
            ("explain", "cam:rule:1700000000000", *env_url, *model),
            ("demo", *env_url, *model, "--source", str(clip), "--timeout", "20"),
        ]
        for args in commands:
            started = time.monotonic()
            proc = run_cli(*args, timeout=120, check=False)
            took = time.monotonic() - started
            output = proc.stdout + proc.stderr
            assert PASSWORD not in output, (args[0], output[-2000:])
            assert took < 90, (args[0], took)
        cameras = tmp_path / "cameras.yaml"
        cameras.write_text("cameras:\n  - id: cam1\n    url: http://127.0.0.1:1/nothing.ts\n")
        ingest = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "ingest",
                "--config",
                str(cameras),
                *env_url,
                "--metrics-port",
                "0",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(6)
        ingest.terminate()
        output, _ = ingest.communicate(timeout=30)
        assert "user:***@" in output or "Redis:" in output, output[-2000:]  # it did try Redis
        assert PASSWORD not in output, output[-2000:]


def test_redact_url() -> None:
    assert redact_url("redis://u:p@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("rediss://:p@h/0?ssl_ca_certs=/x") == "rediss://***@h/0?ssl_ca_certs=/x"
    assert redact_url("redis://h:1/0?password=p&db=1") == "redis://h:1/0?password=***&db=1"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_a_redis_that_never_answers_fails_the_call_instead_of_hanging(
    models, labels600, tmp_path: Path
) -> None:
    """A TCP peer that accepts and says nothing: `check --redis` and `run` give up with a message."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        url = f"redis://127.0.0.1:{port}/0"
        started = time.monotonic()
        with ReadyMetrics() as metrics_url:
            proc = run_cli(
                "check",
                "--redis",
                "--redis-url",
                url,
                "--url",
                metrics_url,
                "--timeout",
                "2",
                timeout=60,
                check=False,
            )
        assert proc.returncode != 0 and "does not answer" in proc.stderr, proc.stderr
        labels = tmp_path / "labels.txt"
        labels.write_text("\n".join(labels600) + "\n")
        proc = run_cli(
            "run",
            "--redis-url",
            url,
            "--model",
            str(models.tflite),
            "--labels",
            str(labels),
            "--metrics-port",
            "0",
            "--redis-timeout-seconds",
            "2",
            timeout=120,
            check=False,
        )
        assert proc.returncode != 0 and "Redis" in proc.stderr and "Timeout" in proc.stderr, proc.stderr[
            -2000:
        ]
        assert time.monotonic() - started < 100
    finally:
        listener.close()
        for conn in held:
            conn.close()


def test_evidence_is_kept_as_the_documented_acl_user(lite_backend, labels600) -> None:
    """An alert open from the first slots: the publish script copies its evidence, denied nothing."""
    from schemas.rules import AlertRule

    # The best of all labels scores at least 1/600: open from the first slot, and never closed.
    rule = AlertRule(name="any", labels=tuple(labels600), threshold=0.001, open_after=1)
    with RedisServer() as server:
        admin = server.client()
        url = acl_user(server, "s3cret-acl")
        h = serve_one_camera(url, lite_backend, labels600, admin, alert_rules=[rule])
        try:
            h.wait_for(lambda: len(h.predictions("cam")) == 10, what="predictions as the ACL user")
            h.stop()
            assert admin.acl_log() == [], admin.acl_log()
            index = admin.hgetall(h.settings.evidence_index("cam"))
            assert len(index) == 1
            key = next(iter(index)).decode()
            assert admin.xlen(key + ":frames") == 10 and admin.xlen(key + ":predictions") == 10
            assert admin.pttl(key) > 0
        finally:
            if h._thread is not None and h._thread.is_alive():
                h.kill()
