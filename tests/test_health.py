"""Health endpoints, metrics that count from the first event and tell the truth about lag, the README's
metrics table, and new cameras served from an announcement: fast checks beside test_prometheus_live."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from schemas.messages import REASONS, ControlMessage
from tests.harness import Harness
from worker.pipeline.cameras import Camera
from worker.pipeline.health import LOOP_STALL_SECONDS, Health, probe, start_server
from worker.pipeline.metrics import SILENT_SECONDS, Metrics, metrics_table, with_table
from worker.pipeline.timeline import Clock
from worker.testing import free_port

ROOT = Path(__file__).resolve().parents[1]


# ---- Health ---------------------------------------------------------------------------------------


def test_ready_only_when_loaded_serving_and_redis_answered_recently() -> None:
    h = Health(redis_window_seconds=8)
    assert h.ready() == (False, "model not loaded yet")
    h.model_loaded = True
    assert h.ready() == (False, "not serving yet")
    h.start_serving()
    assert h.ready() == (False, "Redis has not answered yet")
    h.redis_answered()
    assert h.ready() == (True, "ready")
    now = time.monotonic()
    ok, why = h.ready(now + 9)
    assert not ok and why.startswith("Redis has not answered for 9")
    h.fault("reader", "task failed 3 times")
    assert h.ready() == (False, "reader: task failed 3 times")
    h.recovered("reader")
    assert h.ready()[0]
    h.stop_serving()
    assert h.ready() == (False, "stopping: draining the slots in flight")


def test_alive_unless_the_event_loop_stalls_while_serving() -> None:
    h = Health(8)
    assert h.alive() == (True, "starting")  # loading the model: alive, not ready
    h.start_serving()
    now = time.monotonic()
    assert h.alive(now + LOOP_STALL_SECONDS - 1)[0]
    ok, why = h.alive(now + LOOP_STALL_SECONDS + 1)
    assert not ok and "stalled" in why
    h.beat()
    assert h.alive()[0]
    h.stop_serving()
    assert h.alive(time.monotonic() + 10 * LOOP_STALL_SECONDS) == (True, "stopping")


@pytest.fixture
def server() -> Iterator[tuple[str, Health, Metrics]]:
    health, metrics = Health(8), Metrics()
    metrics.watch_readiness(lambda: health.ready()[0])
    port = free_port()
    httpd = start_server("127.0.0.1", port, metrics.registry, health)
    yield f"http://127.0.0.1:{port}", health, metrics
    httpd.shutdown()
    httpd.server_close()


def status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_http_endpoints_answer_from_health_and_metrics_agree(server: tuple[str, Health, Metrics]) -> None:
    url, health, metrics = server
    assert status(f"{url}/healthz") == (200, "starting\n")
    assert status(f"{url}/readyz") == (503, "model not loaded yet\n")
    code, text = status(f"{url}/metrics")
    assert code == 200 and "movinet_worker_ready 0.0" in text
    health.model_loaded = True
    health.start_serving()
    health.redis_answered()
    assert status(f"{url}/readyz") == (200, "ready\n")
    assert "movinet_worker_ready 1.0" in status(f"{url}/metrics")[1]
    assert probe(f"{url}/readyz") == (True, "ready")
    health.stop_serving()
    ok, why = probe(f"{url}/readyz")
    assert not ok and "503 stopping" in why
    assert metrics.registry.get_sample_value("movinet_worker_ready") == 0


def test_a_readiness_probe_costs_well_under_a_millisecond_of_cpu(server: tuple[str, Health, Metrics]) -> None:
    url, health, _ = server
    health.model_loaded = True
    health.start_serving()
    health.redis_answered()
    n = 200
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        assert status(f"{url}/readyz")[0] == 200
    cpu_ms = (time.process_time() - cpu) / n * 1000  # client and server: both in this process
    wall_ms = (time.perf_counter() - wall) / n * 1000
    print(f"/readyz: {wall_ms:.2f} ms wall, {cpu_ms:.2f} ms CPU per probe (client and server)")
    assert cpu_ms < 5 and wall_ms < 50


# ---- metrics --------------------------------------------------------------------------------------


def test_labelled_counters_exist_at_zero_from_start_up() -> None:
    m = Metrics(CollectorRegistry())
    for reason in REASONS:
        assert m.registry.get_sample_value("movinet_frames_deadlettered_total", {"reason": reason}) == 0
    assert m.registry.get_sample_value("movinet_alerts_opened_total", {"rule": "door"}) is None
    m.know_rules(["door"])
    for family in ("movinet_alerts_opened_total", "movinet_alerts_closed_total", "movinet_alerts_active"):
        assert m.registry.get_sample_value(family, {"rule": "door"}) == 0, family


def camera(name: str, *, owned: bool = True, published_slot: int | None = None) -> Camera:
    cam = Camera(name=name, stream=f"f:{name}", out=f"p:{name}", clock=Clock.of(5), top_k=5)
    cam.owned = cam.resumed = owned
    cam.published_slot = published_slot
    cam.timeline = object() if published_slot is not None else None  # type: ignore[assignment]
    return cam


def test_lag_grows_while_a_camera_is_silent_and_series_leave_with_the_camera() -> None:
    m = Metrics(CollectorRegistry())
    get = m.registry.get_sample_value
    now, mono = 1_700_000_000.0, 1000.0
    slot = Clock.of(5).slot(int(now * 1000))  # published up to now
    live, quiet = camera("live", published_slot=slot), camera("quiet", published_slot=slot - 100)
    live.seen_at, quiet.seen_at = mono, mono - 30  # quiet sent its last frame 30 s ago
    m.observe_cameras([live, quiet], now, mono)
    assert get("movinet_input_lag_seconds", {"camera": "quiet"}) == pytest.approx(20.0)
    m.observe_cameras([live, quiet], now + 5, mono + 5)  # nothing published: the lag still moves
    assert get("movinet_input_lag_seconds", {"camera": "quiet"}) == pytest.approx(25.0)
    assert get("movinet_input_lag_seconds", {"camera": "live"}) == pytest.approx(5.0)
    assert get("movinet_camera_last_input_timestamp_seconds", {"camera": "quiet"}) == pytest.approx(now - 30)
    # The aggregate KEDA scales on leaves the silent camera out: it needs no more workers.
    assert mono + 5 - quiet.seen_at > SILENT_SECONDS
    assert get("movinet_worker_input_lag_seconds") == pytest.approx(5.0)
    # Queued slots are input: a camera with a backlog is behind, never silent.
    quiet.in_model = 1
    m.observe_cameras([live, quiet], now + 5, mono + 5)
    assert get("movinet_worker_input_lag_seconds") == pytest.approx(30.0)
    # State freed (idle): no lag, still owned and silent. Handed over: nothing left.
    quiet.timeline, quiet.in_model = None, 0
    m.observe_cameras([live, quiet], now + 6, mono + 6)
    assert get("movinet_input_lag_seconds", {"camera": "quiet"}) is None
    assert get("movinet_camera_last_input_timestamp_seconds", {"camera": "quiet"}) == pytest.approx(now - 30)
    quiet.owned = False
    m.observe_cameras([live, quiet], now + 7, mono + 7)
    assert get("movinet_camera_last_input_timestamp_seconds", {"camera": "quiet"}) is None
    m.observe_cameras([], now + 8, mono + 8)
    assert get("movinet_input_lag_seconds", {"camera": "live"}) is None
    assert get("movinet_worker_input_lag_seconds") == 0


def test_readme_metrics_table_is_the_registry() -> None:
    readme = (ROOT / "docs" / "design.md").read_text()
    assert with_table(readme) == readme, (
        "run `python -m worker.pipeline.metrics docs/design.md`, commit the result"
    )
    table = metrics_table()
    names = ("movinet_alerts_active{rule}", "movinet_alerts_opened_total{rule}", "movinet_worker_ready")
    for name in (*names, "movinet_checkpoint_resumes_total{result}"):
        assert f"`{name}`" in table
    assert len(table.splitlines()) - 2 == sum(
        1 for line in readme.splitlines() if line.startswith("| `movinet_")
    )


# ---- a worker in-process, real Redis --------------------------------------------------------------


def test_an_announced_camera_is_served_within_one_slot_and_its_rules_count_from_zero(
    harnesses: list[Harness], redis_url: str, lite_backend: Any, labels600: list[str]
) -> None:
    # Discovery is on but hourly: only the announcement can explain serving within a slot.
    h = Harness(redis_url, lite_backend, labels600, discover_interval_seconds=3600)
    harnesses.append(h)
    # An announcement older than idle_timeout_seconds (history replayed at start-up) is ignored.
    old = int(time.time() * 1000) - int(h.settings.idle_timeout_seconds * 1000) - 5000
    gone = ControlMessage(camera="gone", action="announce").to_fields()
    h.client.xadd(h.settings.control_stream, gone, id=f"{old}-0")
    h.start()
    h.wait_for(lambda: h.worker is not None and h.worker.health.ready()[0], 30, "ready")
    assert h.worker is not None and "gone" not in h.worker.cameras
    rules = json.dumps([{"name": "porch", "labels": [labels600[1]], "threshold": 0.9}])
    subscribe = ControlMessage.from_fields(
        {"v": "1", "camera": "porch", "action": "subscribe", "rules": rules}
    )
    h.client.xadd(h.settings.control_stream, subscribe.to_fields())
    opened = {"rule": "porch"}
    h.wait_for(lambda: h.metrics.registry.get_sample_value("movinet_alerts_opened_total", opened) == 0, 10)
    time.sleep(2.5)  # past one heartbeat: the owner rests when the announcement comes
    h.client.xadd(h.settings.control_stream, ControlMessage(camera="gate", action="announce").to_fields())
    rng = np.random.default_rng(1)
    first = time.time()
    sent, served = 0, None
    while served is None and time.time() - first < 5:
        if time.time() >= first + 0.2 * sent:
            now_ms = int(time.time() * 1000)
            h.publish_rgb("gate", now_ms, (rng.random((172, 172, 3)) * 255).astype(np.uint8), seq=sent)
            sent += 1
        if h.client.xlen(h.settings.predictions_stream("gate")):
            served = time.time()
        time.sleep(0.01)
    assert served is not None, "no prediction within 5 s"
    print(f"first prediction {served - first:.3f} s after the first frame")
    assert served - first <= 1.0, f"first prediction {served - first:.2f} s after the first frame"
