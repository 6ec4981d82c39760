"""What operators see, proven end to end: a real Prometheus scraping a real worker and a real Redis.

Debian's `prometheus` (installed by .ci/run) is started on a free loopback port with a 1 s scrape and
evaluation interval and the shipped deploy/prometheus/rules.yml, whose alert `for:` durations are
divided by ten in a test copy (the expressions are the shipped ones, checked below). A `movinet-worker
run` process serves two live 5 fps cameras announced on the control stream (as `movinet-worker
publish` announces them), with discovery left at its 5 s default so that serving within one slot
comes from the announcement. The scenarios run in order on one worker, each asserted through
Prometheus' HTTP API, and the time from each event to the alert's `activeAt` (pending) is printed.

One run takes about two minutes: the 60 s healthy window, 20 s for a silent camera's state to be
freed (its alert pends after 10 s, the rule's threshold), the rest start-up and scenarios of a few
seconds each.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml

from schemas.messages import REASONS, ControlMessage, Frame
from tests.test_observability import DASHBOARD, RULES, all_panels, dashboard
from worker.config import Settings, key_env, prefixed_keys
from worker.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
ACTION_ALERTS = {"MovinetActionAlertActive", "MovinetActionAlertRateAnomaly"}
FOR_DIVISOR = 10
RULE = "watch"  # the worker's one configured action-alert rule
# Grafana's variables as a user with "All" selected sees them; $__rate_interval for a 1 s scrape.
GRAFANA_VARS = {"$__rate_interval": "10s", "$job": "movinet-worker", "$instance": ".+"}
# Dashboard queries that rightly return nothing on a healthy single worker, and why.
EXPECTED_EMPTY = {
    'sum by (rule) (movinet_alerts_active{job=~"$job", instance=~"$instance"}) > 0': (
        "only open action alerts are shown, and the random-weight model opens none"
    ),
    "histogram_quantile(0.95, sum by (le) (rate(movinet_takeover_replay_seconds_bucket"
    '{job=~"$job", instance=~"$instance"}[$__rate_interval])))': (
        "a replay time is observed only when a lease is taken; the last was at the cameras' start, "
        "more than a rate interval ago (0/0 is NaN, which Grafana leaves blank)"
    ),
    # The open action alerts' table and timeline: tests/test_notify.py checks them with one open.
    '1000 * max by (camera, rule, label) (movinet_action_alert_start_timestamp_seconds{job=~"$job", '
    'instance=~"$instance"})': "no action alert is open: the random-weight model opens none",
    'max by (camera, rule, label) (movinet_action_alert_peak_score{job=~"$job", instance=~"$instance"})': (
        "no action alert is open: the random-weight model opens none"
    ),
    'max by (alert_id, camera, rule, label) (movinet_action_alert_info{job=~"$job", '
    'instance=~"$instance"})': "no action alert is open: the random-weight model opens none",
}
RESULTS: list[tuple[str, str, str]] = []  # (scenario, what fired, time to pending) for the report


def need_prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: .ci/run installs Debian's prometheus package")
        pytest.skip("prometheus is not installed (Debian: apt-get install -y prometheus); CI installs it")
    return path


class Daemon:
    """A Prometheus-family server started by a test: its process, its log, its `/-/ready`."""

    name = "daemon"
    url: str
    log: Path
    proc: subprocess.Popen[bytes]

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            tail = self.log.read_text()[-3000:]
            raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Prometheus(Daemon):
    """A private Prometheus server: 1 s scrape and evaluation, the worker as job movinet-worker."""

    name = "prometheus"

    def __init__(self, folder: Path, target: str, alertmanager: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        shipped = yaml.safe_load(RULES.read_text())
        for group in shipped["groups"]:
            group.pop("interval", None)  # every group at the test's 1 s
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = f"{duration_seconds(rule['for']) / FOR_DIVISOR:g}s"
        (folder / "rules.yml").write_text(yaml.safe_dump(shipped, sort_keys=False))
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yml"],
            "scrape_configs": [{"job_name": "movinet-worker", "static_configs": [{"targets": [target]}]}],
        }
        if alertmanager is not None:  # where firing alerts go (tests/test_notify.py)
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = folder / "prometheus.log"
        with self.log.open("w") as sink:
            self.proc = subprocess.Popen(
                [
                    need_prometheus(),
                    f"--config.file={folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.get("/api/v1/alerts")["alerts"]
        return alerts


def duration_seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(text[:-1]) * units[text[-1]]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def active_at(alert: dict[str, Any]) -> float:
    return datetime.fromisoformat(alert["activeAt"].replace("Z", "+00:00")).timestamp()


class Camera:
    """A live camera: a 5 fps thread adding frames stamped on arrival, announced before its first."""

    def __init__(self, client: redis.Redis, settings: Settings, name: str) -> None:
        self.client, self.settings, self.name = client, settings, name
        self.first_frame_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"camera-{name}", daemon=True)

    def start(self) -> Camera:
        announce = ControlMessage(camera=self.name, action="announce")
        self.client.xadd(self.settings.control_stream, announce.to_fields())
        self._thread.start()
        return self

    def _run(self) -> None:
        rng = np.random.default_rng(abs(hash(self.name)) % 2**32)
        seq = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            image = (rng.random((172, 172, 3)) * 255).astype(np.uint8)
            now_ms = int(time.time() * 1000)
            frame = Frame(
                camera=self.name,
                seq=seq,
                capture_ms=now_ms,
                encoding="rgb24",
                width=172,
                height=172,
                data=image.tobytes(),
            )
            self.client.xadd(self.settings.frames_stream(self.name), frame.to_fields())
            if self.first_frame_at is None:
                self.first_frame_at = now_ms / 1000
            seq += 1
            next_at += 0.2
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        return time.time()


@pytest.fixture(scope="module")
def stack(
    redis_url: str, models: Any, labels600: list[str], tmp_path_factory: Any
) -> Iterator[dict[str, Any]]:
    need_prometheus()
    folder = tmp_path_factory.mktemp("prometheus-live")
    prefix = "t" + uuid.uuid4().hex[:10]
    labels = folder / "labels.txt"
    labels.write_text("\n".join(labels600) + "\n")
    port = free_port()
    rules = [{"name": RULE, "labels": [labels600[0]], "threshold": 0.9}]
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "MOVINET_MODEL": str(models.tflite),
        "MOVINET_LABELS": str(labels),
        "MOVINET_METRICS_PORT": str(port),
        "MOVINET_METRICS_HOST": "127.0.0.1",
        "MOVINET_ALERT_RULES": json.dumps(rules),
        "MOVINET_INTERPRETERS": "1",
        # A silent camera's state is freed (and its lag series removed) after 20 s, not 60.
        "MOVINET_IDLE_TIMEOUT_SECONDS": "20",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **key_env(prefix),
    }
    settings = Settings(redis_url=redis_url, **prefixed_keys(prefix))
    log = folder / "worker.log"
    with log.open("w") as sink:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"], env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT
        )
    prom = Prometheus(folder, f"127.0.0.1:{port}")
    client = redis.Redis.from_url(redis_url)
    cameras: list[Camera] = []
    try:
        yield {
            "worker": worker,
            "log": log,
            "prom": prom,
            "client": client,
            "settings": settings,
            "cameras": cameras,
            "metrics": f"http://127.0.0.1:{port}",
        }
    finally:
        for cam in cameras:
            cam.stop()
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        prom.stop()
        keys = list(client.scan_iter(match=prefix + ":*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
        if RESULTS:
            print("\nscenario | what fired | time to pending")
            for row in RESULTS:
                print(" | ".join(row))


def firing_or_pending(prom: Prometheus, ignore: set[str] = ACTION_ALERTS) -> list[str]:
    named = [(a["labels"].pop("alertname"), a) for a in prom.alerts()]
    return [f"{name}{a['labels']} {a['state']}" for name, a in named if name not in ignore]


def find_alert(prom: Prometheus, name: str, **labels: str) -> dict[str, Any] | None:
    for alert in prom.alerts():
        if alert["labels"]["alertname"] == name and all(
            alert["labels"].get(k) == v for k, v in labels.items()
        ):
            return alert
    return None


def page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
        return text


def test_operators_view_against_a_real_prometheus(stack: dict[str, Any]) -> None:
    prom: Prometheus = stack["prom"]
    worker: subprocess.Popen[bytes] = stack["worker"]
    client: redis.Redis = stack["client"]
    settings: Settings = stack["settings"]
    metrics_url = stack["metrics"]

    def worker_ready() -> bool:
        if worker.poll() is not None:
            raise AssertionError(f"worker exited {worker.returncode}:\n{stack['log'].read_text()[-3000:]}")
        try:
            return page(f"{metrics_url}/readyz").strip() == "ready"
        except OSError:
            return False

    wait_for(prom.ready, 60, "prometheus ready")
    wait_for(worker_ready, 180, "the worker's /readyz")
    wait_for(lambda: prom.value('movinet_worker_ready{job="movinet-worker"}') == 1, 30, "ready, scraped")
    # The worker was scraped not ready while it loaded its model: MovinetNoWorkerServing was pending
    # then, rightly. Scenarios start once the rules have seen it ready.
    wait_for(lambda: not firing_or_pending(prom), 10, "no alert once the worker is ready")

    # The shipped expressions, only `for:` scaled.
    copy = yaml.safe_load((Path(prom.log.parent) / "rules.yml").read_text())
    shipped = yaml.safe_load(RULES.read_text())
    for ours, theirs in zip(copy["groups"], shipped["groups"], strict=True):
        assert [r["expr"] for r in ours["rules"]] == [r["expr"] for r in theirs["rules"]]

    # Counters count from the first event: every reason and the configured rule exist at 0.
    for reason in REASONS:
        expr = f'movinet_frames_deadlettered_total{{reason="{reason}"}}'
        assert wait_for(lambda e=expr: prom.query(e), 10, expr)[0]["value"][1] == "0"
    for family in ("movinet_alerts_opened_total", "movinet_alerts_closed_total", "movinet_alerts_active"):
        assert prom.value(f'{family}{{rule="{RULE}"}}') == 0, family

    # New cameras are served within one slot: announced, not discovered (the SCAN runs every 5 s).
    cams = {name: Camera(client, settings, name).start() for name in ("healthy", "retired")}
    stack["cameras"].extend(cams.values())
    streams = {settings.predictions_stream(n): n for n in cams}
    served: dict[str, float] = {}
    deadline = time.monotonic() + 10
    while len(served) < len(cams) and time.monotonic() < deadline:
        for stream, name in streams.items():
            if name not in served and client.xlen(stream):
                served[name] = time.time()
        time.sleep(0.01)
    for name, cam in cams.items():
        assert name in served and cam.first_frame_at is not None, f"camera {name} not served in 10 s"
        delay = served[name] - cam.first_frame_at
        RESULTS.append((f"new camera {name}: first prediction", "-", f"{delay:.2f} s after its first frame"))
        assert delay <= 1.0, f"camera {name}: first prediction {delay:.2f} s after its first frame"

    # A healthy worker for 60 s: nothing pending or firing but action alerts.
    started = time.monotonic()
    seen: set[str] = set()
    while time.monotonic() - started < 60:
        seen.update(firing_or_pending(prom))
        time.sleep(1)
    RESULTS.append(("healthy cameras, 60 s", ", ".join(sorted(seen)) or "nothing", "-"))
    buckets = {
        r["metric"]["le"]: r["value"][1] for r in prom.query("movinet_capture_to_publish_seconds_bucket")
    }
    history = {
        e: prom.value(e)
        for e in (
            "min_over_time(up[90s])",
            "max_over_time(scrape_duration_seconds[90s])",
            "min_over_time(movinet_worker_ready[90s])",
            "count_over_time(movinet_worker_ready[90s])",
        )
    }
    history["ALERTS"] = prom.get("/api/v1/query", query="ALERTS[2m]")["result"]
    history["now"] = time.time()
    history["alerts"] = prom.alerts()
    assert not seen, f"alerts on a healthy worker: {sorted(seen)}; latency buckets {buckets}; {history}"

    # A live scrape passes promtool's check, and every dashboard query has data (or a reason not to).
    promtool = shutil.which("promtool")
    assert promtool is not None
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=page(f"{metrics_url}/metrics"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    check_dashboard(prom)

    # One bad frame: increase() sees it and MovinetDeadLetters goes pending.
    bad_at = time.time()
    client.xadd(settings.frames_stream("healthy"), {"v": "1", "camera": "healthy", "seq": "x"})
    wait_for(
        lambda: (prom.value("sum(increase(movinet_frames_deadlettered_total[15m]))") or 0) >= 1,
        20,
        "increase() of dead letters >= 1",
    )
    alert = wait_for(
        lambda: find_alert(prom, "MovinetDeadLetters", reason="bad_type"), 20, "MovinetDeadLetters"
    )
    RESULTS.append(
        ("one bad frame", "MovinetDeadLetters{reason=bad_type}", f"{active_at(alert) - bad_at:.1f} s")
    )

    # A camera stops: its lag grows and it is reported silent; an unsubscribed one is not.
    unsubscribe = ControlMessage(camera="retired", action="unsubscribe")
    client.xadd(settings.control_stream, unsubscribe.to_fields())
    cams["retired"].stop()
    stopped_at = cams["healthy"].stop()
    lag = 'movinet_input_lag_seconds{camera="healthy"}'
    first = wait_for(lambda: prom.value(lag), 10, "healthy's lag")
    time.sleep(6)
    later = prom.value(lag)
    # Grows with the wall clock, give or take a scrape and a refresh (1 s each), not frozen.
    assert later is not None and later >= first + 6 - 2.5, f"a silent camera's lag: {first} then {later}"
    RESULTS.append(("a camera stops: its lag 6 s later", "-", f"{first:.2f} s -> {later:.2f} s"))
    alert = wait_for(
        lambda: find_alert(prom, "MovinetCameraSilent", camera="healthy"), 30, "MovinetCameraSilent"
    )
    RESULTS.append(
        ("a camera stops", "MovinetCameraSilent{camera=healthy}", f"{active_at(alert) - stopped_at:.1f} s")
    )
    wait_for(lambda: prom.value(lag) is None, 40, "healthy's lag series removed once its state is freed", 1)
    for expr in (
        'movinet_input_lag_seconds{camera="retired"}',
        'movinet_camera_last_input_timestamp_seconds{camera="retired"}',
    ):
        assert prom.value(expr) is None, f"{expr} still there after the camera was unsubscribed"
    assert find_alert(prom, "MovinetCameraSilent", camera="retired") is None
    silent_for = time.time() - stopped_at
    RESULTS.append(("a camera unsubscribed", "nothing", f"- (watched {silent_for:.0f} s)"))
    assert find_alert(prom, "MovinetCameraSilent", camera="healthy") is not None, "silent camera not reported"

    # The worker is SIGKILLed: no worker serves, and this one is unavailable.
    worker.send_signal(signal.SIGKILL)
    killed_at = time.time()
    worker.wait(10)
    for name in ("MovinetNoWorkerServing", "MovinetWorkerUnavailable"):
        alert = wait_for(lambda n=name: find_alert(prom, n), 20, name)
        RESULTS.append(("worker SIGKILLed", name, f"{active_at(alert) - killed_at:.1f} s"))


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARS.items():
        expr = expr.replace(name, value)
    return expr


def check_dashboard(prom: Prometheus) -> None:
    board = dashboard()
    empty: dict[str, str] = {}
    for panel in all_panels(board["panels"]):
        for target in panel.get("targets", []):
            result = prom.query(substitute(target["expr"]))
            finite = [r for r in result if math.isfinite(float(r["value"][1]))]
            if not finite:
                empty[target["expr"]] = panel["title"]
    unexplained = {expr: title for expr, title in empty.items() if expr not in EXPECTED_EMPTY}
    assert not unexplained, f"{DASHBOARD.name}: queries with no data: {json.dumps(unexplained, indent=1)}"
    stale = set(EXPECTED_EMPTY) - set(empty)
    assert not stale, f"listed as expected-empty but returned data: {sorted(stale)}"
    for var in board["templating"]["list"]:
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else str(var["query"])
        metric, label = query.removeprefix("label_values(").removesuffix(")").rsplit(",", 1)
        values = {r["metric"].get(label.strip()) for r in prom.query(substitute(metric))}
        assert values - {None}, f"variable {var['name']} ({query}) has no values"
