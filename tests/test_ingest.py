"""`movinet-worker ingest` against real network cameras: ffmpeg serving HTTP MPEG-TS and GStreamer's
RTSP server, each dropped and restored, with a real Redis and (when ../shared is there) a worker with
the real int8 model downstream. The ingest runs as its own process, so its signals are real."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from schemas import Frame
from schemas.messages import ControlMessage
from tests.conftest import ASSETS, ROOT
from tests.harness import Harness
from tests.test_observability import Exposition, dashboard_exprs, metric_names
from worker.config import key_env
from worker.ingest.feed import Backoff
from worker.ingest.settings import ConfigError, IngestSettings, add_ingest_arguments, load_cameras
from worker.testing import free_port

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-gst-1.0 (the venv has no GStreamer)
CLIP = ASSETS / "videos" / "carving_ice_android.mp4"
INGEST_RULES = ROOT / "deploy" / "prometheus" / "ingest_rules.yml"
INGEST_DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "movinet-ingest.json"
needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None, reason="ffmpeg not installed (.ci/run installs it)"
)


# ---- pure parts -----------------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() -> None:
    lows = Backoff(0.5, 5.0, rand=lambda: 0.0)
    assert [lows.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.5, 2.5]
    highs = Backoff(0.5, 5.0, rand=lambda: 0.999999)
    assert [round(highs.next(), 3) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    highs.reset()
    assert round(highs.next(), 3) == 0.5


def test_camera_list_is_strict(tmp_path: Path) -> None:
    path = tmp_path / "cameras.yaml"
    path.write_text(
        "cameras:\n  - {id: a, url: rtsp://x/1, size: 224x224, fps: 2}\n  - {id: b, url: y.mp4}\n"
    )
    a, b = load_cameras(path)
    assert (a.id, a.size, a.fps, b.size, b.fps) == ("a", (224, 224), 2.0, None, None)
    for text, fragment in [
        ("cameras:\n  - {id: a, url: u}\n  - {id: a, url: v}\n", "more than once: a"),
        ("cameras:\n  - {id: 'a{b}', url: u}\n", "cameras.0.id"),
        ("cameras:\n  - {id: a, url: u, size: 12}\n", "cameras.0.size"),
        ("cameras:\n  - {id: a, url: u, colour: red}\n", "cameras.0.colour"),
        ("cameras: [\n", "cameras.yaml"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=fragment.replace("{", r"\{").replace("}", r"\}")):
            load_cameras(path)


def test_settings_layer_env_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.config import load_settings

    parser = argparse.ArgumentParser()
    add_ingest_arguments(parser)
    monkeypatch.setenv("MOVINET_FPS", "2")
    monkeypatch.setenv("MOVINET_FRAMES_KEY", "f:{{{camera}}}")
    monkeypatch.setenv("MOVINET_RETENTION_SECONDS", "60")
    s = load_settings(IngestSettings, parser.parse_args(["--fps", "3", "--size", "full", "--no-announce"]))
    assert (s.fps, s.size, s.announce, s.retention_seconds) == (3.0, None, False, 60.0)
    assert s.frames_stream("x") == "f:{x}" and s.control_stream == "cameras"
    with pytest.raises(SystemExit, match="frames_key"):
        load_settings(IngestSettings, parser.parse_args(["--frames-key", "no-camera"]))


def ingest_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(INGEST_RULES.read_text())["groups"] for r in g["rules"]]


def test_ingest_alerts_pass_promtool_and_each_is_tested_firing_and_not() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus); CI installs it")
    for args in (["check", "rules", INGEST_RULES.name], ["test", "rules", "ingest_rules_test.yml"]):
        proc = subprocess.run(
            [promtool, *args], cwd=INGEST_RULES.parent, capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    tests = yaml.safe_load((INGEST_RULES.parent / "ingest_rules_test.yml").read_text())["tests"]
    tested: dict[str, set[bool]] = {}
    for group in tests:
        for case in group.get("alert_rule_test", []):
            tested.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    alerts = [r for r in ingest_rules() if "alert" in r]
    assert {"MovinetCameraDown", "MovinetCameraFlapping"} <= {a["alert"] for a in alerts}
    headings = re.findall(r"^#+\s+(.+?)\s*$", (ROOT / "deploy" / "README.md").read_text(), flags=re.MULTILINE)
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}
    for alert in alerts:
        assert tested.get(alert["alert"]) == {True, False}, alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        assert alert["annotations"]["runbook"].split("#", 1)[1] in anchors, alert["alert"]
    prometheus = yaml.safe_load((INGEST_RULES.parent / "prometheus.yml").read_text())
    assert INGEST_RULES.name in prometheus["rule_files"]


# ---- real sources ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h264(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The carving-ice clip (a test pattern without ../shared) as H.264 with a keyframe every 0.5 s,
    in MPEG-TS for ffmpeg's HTTP server and, 6 passes long, in Matroska for the RTSP server."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed (.ci/run installs it)")
    out = tmp_path_factory.mktemp("h264")

    def source(passes: int) -> list[str]:
        if CLIP.is_file():
            return ["-stream_loop", str(passes - 1), "-i", str(CLIP)]
        return ["-f", "lavfi", "-i", f"testsrc=size=360x360:rate=30:duration={6 * passes}"]

    enc = ["-an", "-c:v", "libx264", "-preset", "ultrafast", "-g", "15", "-pix_fmt", "yuv420p"]
    paths = {"ts": out / "cam.ts", "mkv": out / "cam.mkv"}
    for path, passes in ((paths["ts"], 1), (paths["mkv"], 6)):
        subprocess.run(
            ["ffmpeg", "-v", "error", "-y", *source(passes), *enc, str(path)], check=True, timeout=120
        )
    return paths


class Camera:
    """A network camera that can be dropped (killed), frozen (SIGSTOP) and restored."""

    def __init__(self, kind: str, files: dict[str, Path], port: int) -> None:
        self.kind, self.files, self.port = kind, files, port
        self.proc: subprocess.Popen[bytes] | None = None
        if kind == "http":
            self.url = f"http://127.0.0.1:{port}/cam.ts"
        else:
            self.url = f"rtsp://127.0.0.1:{port}/cam"

    def start(self) -> None:
        if self.kind == "http":
            # As a user would: `ffmpeg -re -stream_loop -1 ... -listen 1 http://...` (copying, not
            # re-encoding, to spare the shared machine's CPU).
            cmd = ["ffmpeg", "-v", "error", "-re", "-stream_loop", "-1", "-i", str(self.files["ts"])]
            cmd += ["-c", "copy", "-f", "mpegts", "-listen", "1", self.url]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        else:
            cmd = [
                SYSTEM_PYTHON,
                str(ROOT / "tests" / "rtsp_server.py"),
                str(self.port),
                str(self.files["mkv"]),
            ]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
            assert self.proc.stdout is not None
            assert self.proc.stdout.readline().strip() == b"ready"

    def drop(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def close(self) -> None:
        if self.proc is not None:
            self.drop()


def rtsp_available() -> bool:
    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    try:
        return (
            subprocess.run(
                [SYSTEM_PYTHON, "-c", probe], check=False, capture_output=True, timeout=30
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


class Ingest:
    """`movinet-worker ingest` as a process, with keys under a test prefix."""

    def __init__(
        self, tmp: Path, prefix: str, redis_url: str, cameras: list[dict[str, Any]], **flags: Any
    ) -> None:
        self.config = tmp / "cameras.yaml"
        self.write(cameras)
        self.port = free_port()
        self.log = tmp / "ingest.log"
        args = [sys.executable, "-m", "worker", "ingest", "--config", str(self.config)]
        args += ["--metrics-host", "127.0.0.1", "--metrics-port", str(self.port)]
        for name, value in flags.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        env = {**os.environ, **key_env(prefix), "REDIS_URL": redis_url}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def write(self, cameras: list[dict[str, Any]]) -> None:
        self.config.write_text(yaml.safe_dump({"cameras": cameras}))

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=3) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (urllib.error.URLError, OSError):
            return 0, ""  # not listening yet

    def metric(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of `name` whose labels include `labels`; None when there is none."""
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in self.get("/metrics")[1].splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
            if all(w in line for w in wanted)
        ]
        return sum(values) if values else None

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, ingest: Ingest | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    log = ingest.log.read_text()[-3000:] if ingest is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{log}")


def entries(client: redis.Redis, key: str) -> list[tuple[tuple[int, int], Frame]]:
    out = []
    for entry_id, fields in client.xrange(key):
        ms, seq = entry_id.decode().split("-")
        out.append(((int(ms), int(seq)), Frame.from_fields(fields)))
    return out


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        (thing.kill if isinstance(thing, Ingest) else thing.close)()


def _drop_and_restore(
    kind: str,
    *,
    h264: dict[str, Path],
    r: tuple[redis.Redis, str],
    redis_url: str,
    cleanup: list[Any],
    tmp_path: Path,
) -> None:
    client, prefix = r
    camera = Camera(kind, h264, free_port())
    cleanup.append(camera)
    worker = None
    if CLIP.is_file():
        from worker.model.backends import load_stream_model

        backend = load_stream_model(str(ASSETS / "movinet_int8.tflite"), "litert")
        labels = (ASSETS / "kinetics600_label_map.txt").read_text().splitlines()
        worker = Harness(redis_url, backend, labels, prefix=prefix, discover=False)
        worker.start()
    # Started before its camera: a dead URL at start-up is retried, not fatal.
    # Beside it a camera that never drops (a file, looped): the other camera's drops never touch it.
    cameras = [{"id": "cam", "url": camera.url}, {"id": "steady", "url": str(h264["ts"])}]
    ingest = Ingest(tmp_path, prefix, redis_url, cameras, stall_seconds=2)
    cleanup.append(ingest)
    key = f"{prefix}:frames:{{cam}}"
    wait_for(
        lambda: (ingest.metric("movinet_ingest_reconnects_total", reason="open") or 0) >= 1,
        10,
        "a failed open",
        ingest,
    )
    assert (
        ingest.get("/readyz")[0] == 200
        and ingest.metric("movinet_ingest_camera_connected", camera="cam") == 0
    )
    camera.start()
    wait_for(lambda: client.xlen(key) >= 15, 15, "frames from the camera", ingest)
    wait_for(
        lambda: ingest.metric("movinet_ingest_cameras_connected") == 2, 5, "both cameras connected", ingest
    )

    resumed = []
    for how in ("drop", "freeze"):
        reconnects = ingest.metric("movinet_ingest_reconnects_total", camera="cam") or 0
        if how == "drop":
            camera.drop()  # the server goes away: the connection ends
        else:
            camera.freeze()  # the server hangs with the connection open: only the stall timeout sees it
            wait_for(
                lambda: ingest.metric("movinet_ingest_reconnects_total", reason="stall"), 6, "a stall", ingest
            )
            camera.drop()
        steady = client.xlen(f"{prefix}:frames:{{steady}}")
        time.sleep(3)
        assert client.xlen(f"{prefix}:frames:{{steady}}") >= steady + 10  # 5 fps through the outage
        assert ingest.metric("movinet_ingest_camera_connected", camera="cam") == 0
        assert (ingest.metric("movinet_ingest_last_frame_age_seconds", camera="cam") or 0) >= 2.5
        restored_ms = time.time_ns() // 1_000_000
        camera.start()
        first = wait_for(
            lambda: client.xrange(key, min=f"{restored_ms}-0", count=1),  # noqa: B023 (called at once)
            10,
            f"frames after the {how}",
            ingest,
        )
        resumed.append((int(first[0][0].decode().split("-")[0]) - restored_ms) / 1000)
        assert (ingest.metric("movinet_ingest_reconnects_total", camera="cam") or 0) > reconnects
        wait_for(lambda: client.xlen(key) >= 15 + 15 * len(resumed), 15, "frames flowing again", ingest)
    print(f"\n{kind}: frames resumed {resumed[0]:.2f} s after the restore (drop), {resumed[1]:.2f} s (stall)")
    assert max(resumed) < 5.0

    assert ingest.metric("movinet_ingest_connections_total", camera="steady") == 1
    assert ingest.metric("movinet_ingest_reconnects_total", camera="steady") == 0
    assert ingest.metric("movinet_ingest_connections_total", camera="cam") == 3  # start, 2 restores
    got = entries(client, key)
    ids = [i for i, _ in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [f.seq for _, f in got] == list(range(len(got)))  # no frame lost between XADD and the stream
    assert all((f.width, f.height, f.encoding) == (172, 172, "jpeg") for _, f in got)
    subscribed = [ControlMessage.from_fields(f) for _, f in client.xrange(f"{prefix}:cameras")]
    assert sorted((m.camera, m.action) for m in subscribed) == [("cam", "subscribe"), ("steady", "subscribe")]

    if worker is not None:
        resumed_ms = int(first[0][0].decode().split("-")[0])

        def settled() -> list[Any]:  # windows begun after the last restore, with 5 s of its frames
            assert worker is not None
            preds = [p for _, p in worker.predictions("cam")]
            return [p for p in preds if p.window_start_ms >= resumed_ms and p.frames >= 25]

        worker.wait_for(lambda: len(settled()) >= 5, 40, "predictions on the restored stream")
        worker.stop()
        seen = [(p.frames, p.top[0].label, round(p.top[0].score, 2)) for p in settled()]
        assert all(label == "carving ice" and score >= 0.5 for _, label, score in seen), seen
        scores = [score for _, _, score in seen]
        print(f"{kind}: {len(seen)} predictions after the restore, carving ice {min(scores)}..{max(scores)}")
        worker.cleanup()
    assert ingest.stop() == 0
    if worker is None:
        pytest.skip("ingest checks passed; the real-model worker downstream needs ../shared/assets")


@needs_ffmpeg
def test_http_camera_dropped_frozen_and_restored(h264, r, redis_url, cleanup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _drop_and_restore("http", h264=h264, r=r, redis_url=redis_url, cleanup=cleanup, tmp_path=tmp_path)


@needs_ffmpeg
@pytest.mark.skipif(
    not rtsp_available(), reason="no GStreamer RTSP server (.ci/run installs gir1.2-gst-rtsp-server-1.0)"
)
def test_rtsp_camera_dropped_frozen_and_restored(h264, r, redis_url, cleanup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _drop_and_restore("rtsp", h264=h264, r=r, redis_url=redis_url, cleanup=cleanup, tmp_path=tmp_path)


@needs_ffmpeg
def test_sighup_adds_and_removes_a_camera_without_touching_the_others(  # type: ignore[no-untyped-def]
    h264, r, redis_url, cleanup, tmp_path
) -> None:
    client, prefix = r
    a = {"id": "a", "url": str(h264["ts"])}  # files loop at their own pace: cheap stand-ins here
    b = {"id": "b", "url": str(h264["ts"]), "fps": 2, "size": "64x96"}
    ingest = Ingest(tmp_path, prefix, redis_url, [a], retention_seconds=2)
    cleanup.append(ingest)
    wait_for(
        lambda: ingest.metric("movinet_ingest_frames_published_total", camera="a"), 15, "camera a", ingest
    )

    ingest.write([a, b])
    ingest.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: client.xlen(f"{prefix}:frames:{{b}}") >= 3, 10, "camera b after SIGHUP", ingest)
    _, frame = entries(client, f"{prefix}:frames:{{b}}")[-1]
    assert (frame.height, frame.width) == (64, 96)
    ingest.write(
        [{"id": "a", "url": str(h264["ts"])}, {**b, "url": "http://127.0.0.1:9/not-there"}, {"id": "bad"}]
    )
    ingest.proc.send_signal(signal.SIGHUP)  # an invalid list is refused and the running one kept
    wait_for(
        lambda: ingest.metric("movinet_ingest_config_reloads_total", result="error"),
        10,
        "a refused reload",
        ingest,
    )
    assert ingest.metric("movinet_ingest_cameras_configured") == 2

    # Every metric the alert rules and the dashboard name is one this process exports.
    page = Exposition(ingest.get("/metrics")[1])
    named = {n for r in ingest_rules() for n in metric_names(r["expr"])} | {
        n for e in dashboard_exprs(json.loads(INGEST_DASHBOARD.read_text())) for n in metric_names(e)
    }
    recorded = {r["record"] for r in ingest_rules() if "record" in r}
    assert named and not {n for n in named - recorded if not page.exports(n)}

    ingest.write([a])
    ingest.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: ingest.metric("movinet_ingest_cameras_configured") == 1, 10, "camera b removed", ingest)
    assert ingest.metric("movinet_ingest_frames_published_total", camera="b") is None  # its series are gone
    assert ingest.metric("movinet_ingest_connections_total", camera="a") == 1  # a was never restarted
    control = [ControlMessage.from_fields(f) for _, f in client.xrange(f"{prefix}:cameras")]
    assert [(m.camera, m.action) for m in control] == [
        ("a", "subscribe"),
        ("b", "subscribe"),
        ("b", "unsubscribe"),
    ]

    # Trimming: with 2 s of retention, the oldest entry of camera a is never much older than that.
    time.sleep(3)
    oldest = int(client.xrange(f"{prefix}:frames:{{a}}", count=1)[0][0].decode().split("-")[0])
    newest = int(client.xrevrange(f"{prefix}:frames:{{a}}", count=1)[0][0].decode().split("-")[0])
    published = ingest.metric("movinet_ingest_frames_published_total", camera="a") or 0
    assert newest - oldest < 2000 + 2000 and client.xlen(f"{prefix}:frames:{{a}}") < published
    status, body = ingest.get("/healthz")
    assert status == 200 and '"a"' in body
    started = time.monotonic()
    assert ingest.stop() == 0 and time.monotonic() - started < 5


def test_a_source_that_is_not_video_counts_decode_errors_and_is_retried(
    r: tuple[redis.Redis, str], redis_url: str, cleanup: list[Any], tmp_path: Path
) -> None:
    import http.server
    import threading

    class Garbage(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # a login page where the stream should be
            body = b"<html><body>Please log in</body></html>" * 200
            self.send_response(200)
            self.send_header("Content-Type", "video/mp2t")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cam.ts"
        ingest = Ingest(tmp_path, r[1], redis_url, [{"id": "bad", "url": url}])
        cleanup.append(ingest)
        wait_for(
            lambda: (ingest.metric("movinet_ingest_decode_errors_total") or 0) >= 2,
            15,
            "decode errors",
            ingest,
        )
        assert (ingest.metric("movinet_ingest_reconnects_total", reason="open") or 0) >= 2
        assert ingest.metric("movinet_ingest_frames_published_total", camera="bad") == 0
        assert ingest.get("/readyz")[0] == 200  # a bad camera is not a reason to restart the process
        assert ingest.proc.poll() is None and ingest.stop() == 0
    finally:
        server.shutdown()
        server.server_close()


def _redis_server(port: int, tmp: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed (.ci/run installs it)")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    wait_for(lambda: proc.poll() is None and _pings(client), 10, "redis-server")
    client.close()
    return proc


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@needs_ffmpeg
def test_a_redis_outage_drops_frames_counted_and_publishing_resumes(  # type: ignore[no-untyped-def]
    h264, cleanup, tmp_path
) -> None:
    port = free_port()
    server = _redis_server(port, tmp_path)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        ingest = Ingest(tmp_path, "t", url, [{"id": "c", "url": str(h264["ts"])}])
        cleanup.append(ingest)
        client = redis.Redis(port=port)
        wait_for(lambda: client.xlen("t:frames:{c}") >= 5, 15, "frames", ingest)
        client.close()
        server.kill()
        server.wait(10)
        wait_for(
            lambda: ingest.metric("movinet_ingest_frames_dropped_total", reason="redis"), 10, "drops", ingest
        )
        wait_for(lambda: ingest.get("/readyz")[0] == 503, 10, "not ready", ingest)
        assert ingest.get("/healthz")[0] == 200  # alive: no restart for an outage it waits out
        assert ingest.metric("movinet_ingest_reconnects_total", camera="c") == 0  # the camera is fine
        server = _redis_server(port, tmp_path)  # empty: nothing was kept
        client = redis.Redis(port=port)
        wait_for(lambda: client.xlen("t:frames:{c}") >= 5, 15, "frames after the outage", ingest)
        wait_for(lambda: ingest.get("/readyz")[0] == 200, 10, "ready again", ingest)
        wait_for(lambda: client.xlen("t:cameras") >= 1, 5, "the camera announced again", ingest)
        assert ControlMessage.from_fields(client.xrange("t:cameras")[0][1]).camera == "c"
        client.close()
        assert ingest.stop() == 0
    finally:
        server.kill()
        server.wait(10)
