"""The wire contract from outside Python: `schemas/asyncapi.yaml` through the AsyncAPI parser, and a
Node.js client (`tests/node`: ioredis + ajv, from the document alone) against a live worker process
and a real Redis, every entry it finds validated; then `tail --json` and `alerts --json` on the same
streams against the decoded schemas."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from schemas.alerts import Alert
from schemas.generate import MODELS, SCHEMA_DIR
from schemas.messages import ControlMessage, DeadLetter, Frame, MessageError, Prediction, StreamMessage
from tests.conftest import ROOT, Models
from tests.contract import wire, wire_errors

NODE_DIR = ROOT / "tests" / "node"
ASYNCAPI = SCHEMA_DIR / "asyncapi.yaml"
CHANNEL_MESSAGES = {"frames": "frame", "predictions": "prediction", "alerts": "alert"}
CHANNEL_MESSAGES |= {"deadletter": "dead_letter", "cameras": "control_message"}


@pytest.fixture(scope="session")
def node() -> str:
    """node, with tests/node's packages installed from the committed lock (`npm ci`, as CI does)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        if os.environ.get("MOVINET_REQUIRE_NODE"):
            pytest.fail("node and npm are required here (MOVINET_REQUIRE_NODE is set)")
        pytest.skip("node/npm not found: install Node.js 18+ (.ci/run installs Debian's nodejs and npm)")
    if not (NODE_DIR / "node_modules" / ".package-lock.json").is_file():
        subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=600
        )
    return node


def _validate(node: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(NODE_DIR / "validate-asyncapi.mjs"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_asyncapi_document_is_valid_and_names_every_stream(node: str, tmp_path: Path) -> None:
    proc = _validate(node, ASYNCAPI)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    for line in [
        "frames: frames:{cameraTag} -> frame",
        "predictions: predictions:{cameraTag} -> prediction",
        "alerts: alerts -> alert",
        "deadletter: deadletter -> deadLetter",
        "cameras: cameras -> controlMessage",
    ]:
        assert line in proc.stdout
    assert "valid AsyncAPI 3" in proc.stdout

    # The parser is a real check: a parameter the address does not use and a broken wire schema fail.
    shutil.copytree(SCHEMA_DIR / "wire", tmp_path / "wire")
    text = ASYNCAPI.read_text().replace("      cameraTag:\n        $ref", "      cam:\n        $ref", 1)
    (tmp_path / "asyncapi.yaml").write_text(text)
    schema = json.loads((tmp_path / "wire" / "prediction.schema.json").read_text())
    schema["properties"]["slot"]["type"] = "text"
    (tmp_path / "wire" / "prediction.schema.json").write_text(json.dumps(schema))
    broken = _validate(node, tmp_path / "asyncapi.yaml")
    assert broken.returncode == 1, broken.stdout
    assert "asyncapi3-channel-parameters" in broken.stderr and "properties.slot.type" in broken.stderr


def synthetic_frames(out: Path, n: int) -> Path:
    """A moving pattern, JPEG-encoded by the project's publisher's encoder (no clip needed)."""
    from worker.pipeline.codec import encode_jpeg

    out.mkdir()
    y, x = np.mgrid[0:172, 0:172]
    for i in range(n):
        image = np.stack([(x + 6 * i) % 256, (y * 2 + 3 * i) % 256, ((x + y) // 2 + 9 * i) % 256], axis=-1)
        (out / f"{i:05d}.jpg").write_bytes(encode_jpeg(image.astype(np.uint8)))
    return out


def clip_frames(out: Path, source: Path, passes: int) -> Path:
    """A real clip at 5 fps and 172x172, as `movinet-worker publish` reads it, `passes` times over."""
    from worker.pipeline.codec import encode_jpeg
    from worker.tools.video import read_frames

    out.mkdir()
    images = [f.image for f in read_frames(str(source), (172, 172), 5.0)]
    for i, image in enumerate(images * passes):
        (out / f"{i:05d}.jpg").write_bytes(encode_jpeg(image))
    return out


class LiveWorker:
    """`movinet-worker run` as a process, on keys private to one test."""

    def __init__(self, redis_url: str, model: Path, labels: list[str], tmp_path: Path) -> None:
        from tests.harness import settings_for
        from worker.config import key_env
        from worker.keys import as_written
        from worker.testing import free_port

        self.prefix = "nc" + uuid.uuid4().hex[:10]
        self.settings = settings_for(redis_url, self.prefix)
        self.redis_url = redis_url
        (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
        self.port = free_port()
        self.as_written = as_written
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "MOVINET_MODEL": str(model),
            "MOVINET_LABELS": str(tmp_path / "labels.txt"),
            "MOVINET_METRICS_PORT": str(self.port),
            **key_env(self.prefix),
            "MOVINET_DISCOVER": "false",  # served once the client subscribes it, with its rules
            "MOVINET_IDLE_TIMEOUT_SECONDS": "2",  # a quiet camera closes its alerts
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        self.log = tmp_path / "worker.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--block-ms", "20"],
            env=env,
            stderr=self.log.open("w"),
            cwd=ROOT,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        from worker.runner import check

        deadline = time.monotonic() + timeout
        while not check(f"http://127.0.0.1:{self.port}/metrics", self.redis_url, 1)[0]:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "worker not ready"
            time.sleep(0.2)

    def keys(self, camera: str) -> dict[str, str]:
        s = self.settings
        return {
            "frames": s.frames_stream(camera),
            "predictions": s.predictions_stream(camera),
            "alerts": s.alerts_stream(camera),
            "deadletter": s.deadletter_stream,
            "cameras": s.control_stream,
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        client = redis.Redis.from_url(self.redis_url)
        keys = list(client.scan_iter(match=self.prefix + ":*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


class Live:
    """node and Redis for one test, and the worker processes it starts."""

    def __init__(self, node: str, redis_url: str) -> None:
        self.node, self.redis_url = node, redis_url
        self.workers: list[LiveWorker] = []

    def worker(self, model: Path, labels: list[str], tmp_path: Path) -> LiveWorker:
        self.workers.append(LiveWorker(self.redis_url, model, labels, tmp_path))
        return self.workers[-1]


@pytest.fixture
def live(node: str, redis_url: str) -> Iterator[Live]:
    """Workers made by a test are stopped and their keys deleted afterwards."""
    made = Live(node, redis_url)
    yield made
    for w in made.workers:
        w.stop()


def run_conformance(
    node: str, worker: LiveWorker, frames: Path, rules: list[dict[str, Any]], tmp_path: Path
) -> dict[str, Any]:
    camera = "node-cam.1"
    config = {
        "redis_url": worker.redis_url,
        "asyncapi": str(ASYNCAPI),
        "camera": camera,
        "keys": worker.keys(camera),
        "frames_dir": str(frames),
        "fps": 5.0,
        "rules": rules,
        "timeout_seconds": 90,
    }
    (tmp_path / "conformance.json").write_text(json.dumps(config))
    worker.wait_ready()
    proc = subprocess.run(
        [node, str(NODE_DIR / "conformance.mjs"), str(tmp_path / "conformance.json")],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{proc.stdout}\n{proc.stderr}\nworker log:\n{worker.log.read_text()[-3000:]}"
    )
    summary: dict[str, Any] = json.loads(proc.stdout)
    print("node conformance:", json.dumps(summary))
    return summary


def check_from_python(worker: LiveWorker, camera: str, summary: dict[str, Any]) -> dict[str, list[Any]]:
    """The same entries, read by Python: the wire schema and the reader agree on every one."""
    client = redis.Redis.from_url(worker.redis_url)
    readers: dict[str, type[StreamMessage]] = {
        "frame": Frame,
        "prediction": Prediction,
        "alert": Alert,
        "dead_letter": DeadLetter,
        "control_message": ControlMessage,
    }
    decoded: dict[str, list[Any]] = {}
    for channel, key in worker.keys(camera).items():
        name = CHANNEL_MESSAGES[channel]
        valid = []
        for _, fields in client.xrange(key):
            errors = wire_errors(wire(name), fields)
            try:
                message = readers[name].from_fields(fields)
            except MessageError:
                assert errors, f"{key}: the reader refuses an entry the wire schema accepts: {fields}"
                continue
            assert errors == [], f"{key}: the reader accepts an entry the wire schema refuses: {errors}"
            valid.append(message)
        assert len(valid) == summary["streams"][channel]["valid"], channel
        decoded[channel] = valid
    client.close()
    return decoded


def check_json_outputs(worker: LiveWorker, camera: str, decoded: dict[str, list[Any]]) -> None:
    """`tail --json` and `alerts --json` print every message so that the decoded schema accepts it."""
    import jsonschema

    from tests.conftest import run_cli

    keys = worker.keys(camera)
    for command, key_flag, channel, name in [
        ("tail", "--predictions-key", "predictions", "prediction"),
        ("alerts", "--alerts-key", "alerts", "alert"),
    ]:
        template = worker.settings.predictions_key if channel == "predictions" else keys["alerts"]
        count = len(decoded[channel])
        proc = run_cli(
            command,
            "--redis-url",
            worker.redis_url,
            key_flag,
            worker.as_written(template),  # as a user writes it: <prefix>:predictions:{<camera>}
            "--camera",
            camera,
            "--from-start",
            "--json",
            "--count",
            str(count),
            "--timeout",
            "20",
            timeout=60,
        )
        lines = proc.stdout.splitlines()
        assert len(lines) == count, proc.stdout[-2000:]
        schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
        for line in lines:
            assert ": null" not in line and ":null" not in line, line
            jsonschema.validate(json.loads(line), schema)
        assert [json.loads(line) for line in lines] == [
            json.loads(m.model_dump_json(exclude_none=True)) for m in decoded[channel]
        ]


def _expected_counts(summary: dict[str, Any], frames: int) -> None:
    streams = summary["streams"]
    assert summary["failures"] == []
    assert streams["predictions"] == {"entries": frames, "valid": frames, "invalid_as_expected": 0}
    # Three bad frames: two the wire schema refuses, one (not a JPEG) that only decoding can tell.
    assert streams["frames"] == {"entries": frames + 3, "valid": frames + 1, "invalid_as_expected": 2}
    assert streams["deadletter"] == {"entries": 4, "valid": 4, "invalid_as_expected": 0}
    assert streams["cameras"] == {"entries": 3, "valid": 2, "invalid_as_expected": 1}
    events = summary["alert_events"]
    assert events[0] == "open" and events[-1] == "close" and streams["alerts"]["valid"] == len(events)


@pytest.mark.slow
def test_node_client_against_a_live_worker(
    live: Live, models: Models, labels600: list[str], tmp_path: Path
) -> None:
    """CI's run: the random-weight TFLite model, frames made here; a rule over every label opens."""
    worker = live.worker(models.tflite, labels600, tmp_path)
    frames = synthetic_frames(tmp_path / "frames", 30)
    rule = {"name": "any", "labels": labels600, "threshold": 0.001, "open_after": 2, "close_after": 2}
    rule |= {"min_duration_seconds": 0, "cooldown_seconds": 0, "update_delta": 0.0001}
    summary = run_conformance(live.node, worker, frames, [rule], tmp_path)
    _expected_counts(summary, 30)
    decoded = check_from_python(worker, "node-cam.1", summary)
    check_json_outputs(worker, "node-cam.1", decoded)


@pytest.mark.slow
def test_node_client_publishes_a_real_clip(live: Live, assets: Path, tmp_path: Path) -> None:
    """The real int8 A0 model on the real jumping-jacks clip, four times over: an exercise alert."""
    labels = (assets / "kinetics600_label_map.txt").read_text().splitlines()
    worker = live.worker(assets / "movinet_int8.tflite", labels, tmp_path)
    frames = clip_frames(tmp_path / "frames", assets / "videos" / "jumpingjack.gif", passes=4)
    n = len(list(frames.glob("*.jpg")))
    rule = {"name": "exercise", "group": "exercise", "threshold": 0.5, "open_after": 3, "close_after": 3}
    rule |= {"min_duration_seconds": 0, "cooldown_seconds": 0}
    summary = run_conformance(live.node, worker, frames, [rule], tmp_path)
    _expected_counts(summary, n)
    decoded = check_from_python(worker, "node-cam.1", summary)
    top1 = [p.top[0].label for p in decoded["predictions"]]
    print(f"real clip: {n} frames, top-1 jumping jacks in {top1.count('jumping jacks')}")
    assert top1.count("jumping jacks") > n // 2
    assert {a.label for a in decoded["alerts"]} == {"jumping jacks"}
    check_json_outputs(worker, "node-cam.1", decoded)


def test_every_stream_entry_has_a_wire_schema_in_the_document() -> None:
    import yaml

    document = yaml.safe_load(ASYNCAPI.read_text())
    refs = {
        name: message["payload"]["schema"]["$ref"]
        for name, message in document["components"]["messages"].items()
    }
    streams = sorted(n for n, m in MODELS.items() if issubclass(m, StreamMessage))
    assert sorted(r.removeprefix("./wire/").removesuffix(".schema.json") for r in refs.values()) == streams
    assert {c["address"] for c in document["channels"].values()} == {
        "frames:{cameraTag}",
        "predictions:{cameraTag}",
        "alerts",
        "deadletter",
        "cameras",
    }


def readme_node_snippet() -> str:
    text = (ROOT / "docs" / "design.md").read_text()  # the README's front page links to it
    block = text.split("<!-- node-snippet -->\n```js\n", 1)[1]
    return block.split("```", 1)[0]


def test_readme_node_snippet_reads_and_validates_predictions(
    node: str, redis_url: str, tmp_path: Path
) -> None:
    """docs/design.md's Node consumer, run as printed: three predictions shown, then a bad entry refused."""
    from tests.test_schemas import PREDICTION

    (tmp_path / "follow.mjs").write_text(readme_node_snippet())
    (tmp_path / "node_modules").symlink_to(NODE_DIR / "node_modules")
    camera = "readme-" + uuid.uuid4().hex[:8]
    key = f"predictions:{{{camera}}}"
    client = redis.Redis.from_url(redis_url)
    try:
        for i in range(3):
            p = PREDICTION.model_copy(
                update={
                    "camera": camera,
                    "slot": PREDICTION.slot + i,
                    "start_ms": PREDICTION.start_ms + 200 * i,
                }
            )
            p = p.model_copy(update={"end_ms": p.start_ms + 200})
            client.xadd(key, p.to_fields(), id=f"{p.start_ms}-0")
        client.xadd(key, {**p.to_fields(), "repeated": "yes"}, id=f"{p.end_ms}-0")
        proc = subprocess.run(
            [node, str(tmp_path / "follow.mjs")],
            env={**os.environ, "REDIS_URL": redis_url, "CAMERA": camera, "FROM": "0-0"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        client.delete(key)
        client.close()
    slot = PREDICTION.slot
    assert proc.stdout.splitlines() == [f"{camera} slot {slot + i}: jumping jacks 0.875" for i in range(3)]
    assert proc.returncode == 1 and f"{p.end_ms}-0: data/repeated must be equal to one of" in proc.stderr


def test_config_prints_key_templates_as_a_user_writes_them() -> None:
    from tests.conftest import run_cli
    from worker.config import Settings

    proc = run_cli("config", "--frames-key", "cams:{<camera>}:in", "--owner-key", "lease:{{{camera}}}")
    printed = json.loads(proc.stdout)
    assert printed["frames_key"] == "cams:{<camera>}:in"
    assert printed["owner_key"] == "lease:{<camera>}"  # the str.format spelling is still accepted
    assert printed["predictions_key"] == "predictions:{<camera>}" and printed["alerts_key"] == "alerts"
    assert "{{" not in proc.stdout
    settings = Settings(frames_key="cams:{<camera>}:in", alerts_key="alerts:{<camera>}")
    assert settings.frames_stream("lobby-1") == "cams:{lobby-1}:in"
    assert settings.alerts_stream("lobby-1") == "alerts:{lobby-1}"
    assert settings.camera_from_frames_key("cams:{lobby-1}:in") == "lobby-1"
