"""Every user mistake ends in exit 2 and one line naming the problem and the fix: no traceback.

Table-driven: each case is a command line (run as a user runs it, in a subprocess) and words its one
line of stderr must hold. Cases that need a model take the real int8 model when ../shared is there,
else the small exported one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT.parent / "shared" / "assets"


@dataclass
class Env:
    """What a case's command line may refer to."""

    tmp: Path
    closed_port: int  # nothing listens there
    busy_port: int  # something listens there (not Redis, not ours)
    model: str = ""  # a stream .tflite
    labels: str = ""  # 600 labels, matching the model


@dataclass
class Case:
    name: str
    argv: Callable[[Env], list[str]]
    says: tuple[str, ...]  # each must be in the one line (case-insensitive)
    needs_model: bool = False
    env: dict[str, str] = field(default_factory=dict)


def _file(env: Env, name: str, data: bytes) -> str:
    path = env.tmp / name
    path.write_bytes(data)
    return str(path)


def _run(env: Env, *extra: str) -> list[str]:
    return ["run", "--model", env.model, "--labels", env.labels, "--log-level", "ERROR", *extra]


CASES = [
    Case(
        "run: wrong Redis port",
        lambda e: _run(e, "--redis-url", f"redis://127.0.0.1:{e.closed_port}/0", "--metrics-port", "0"),
        ("cannot reach redis", "--redis-url"),
        needs_model=True,
    ),
    Case(
        "tail: wrong Redis port",
        lambda e: ["tail", "--redis-url", f"redis://127.0.0.1:{e.closed_port}/0", "--timeout", "1"],
        ("cannot reach redis", "127.0.0.1:", "--redis-url"),
    ),
    Case(
        "alerts: wrong Redis port",
        lambda e: ["alerts", "--redis-url", f"redis://127.0.0.1:{e.closed_port}/0", "--timeout", "1"],
        ("cannot reach redis", "--redis-url"),
    ),
    Case(
        "tail: an http:// Redis URL",
        lambda e: ["tail", "--redis-url", "http://127.0.0.1:6379", "--timeout", "1"],
        ("not a redis url", "redis://host:port/db"),
    ),
    Case(
        "run: an http:// Redis URL (environment)",
        lambda e: _run(e, "--metrics-port", "0"),
        ("redis_url", "not a redis url", "redis://host:port/db"),
        needs_model=True,
        env={"REDIS_URL": "http://127.0.0.1:6379"},
    ),
    Case(
        "run: the metrics port in use",
        lambda e: _run(e, "--redis-url", "redis://127.0.0.1:6379/0", "--metrics-port", str(e.busy_port)),
        ("metrics port", "in use", "--metrics-port"),
        needs_model=True,
    ),
    Case(
        "classify: a binary file as --labels",
        lambda e: [
            "classify",
            _file(e, "clip.gif", b"GIF89a"),
            "--model",
            "m.tflite",
            "--labels",
            _file(e, "labels.bin", bytes(range(256)) * 4),
        ],
        ("not a utf-8 text file", "--labels"),
    ),
    Case(
        "classify: a missing source",
        lambda e: ["classify", str(e.tmp / "nope.mp4"), "--model", "m.tflite"],
        ("no such file", "nope.mp4", "url"),
    ),
    Case(
        "classify: no model",
        lambda e: ["classify", str(e.tmp / "nope.mp4")],
        ("no model", "--model", "MOVINET_MODEL"),
        env={"MOVINET_MODEL": ""},
    ),
    Case(
        "classify: a text file as --model",
        lambda e: [
            "classify",
            _file(e, "clip.gif", b"GIF89a"),
            "--model",
            _file(e, "model.txt", b"hello\n"),
            "--labels",
            e.labels,
        ],
        ("is a file, not a savedmodel folder", ".tflite"),
    ),
    Case(
        "demo: no --source, offline",
        lambda e: ["demo", "--model", e.model, "--labels", e.labels, "--timeout", "30"],
        ("--source", "offline", "jumpingjack"),
        needs_model=True,
        # the clip's download goes through a proxy that is not there: offline, whatever the machine
        env={"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "REDIS_URL": ""},
    ),
    Case(
        "config: a value out of range",
        lambda e: ["config", "--top-k", "0"],
        ("top_k", "--top-k", "MOVINET_TOP_K"),
    ),
    Case(
        "config: --alert-rules not JSON",
        lambda e: ["config", "--alert-rules", "[{name: exercise}]"],
        ("alert_rules", "not valid json"),
    ),
    Case(
        "config: --log-level not a choice",
        lambda e: ["config", "--log-level", "loud"],
        ("--log-level", "invalid choice", "--help"),
    ),
    Case(
        "tail: an unknown flag",
        lambda e: ["tail", "--bogus"],
        ("unrecognized arguments", "--bogus", "--help"),
    ),
    Case(
        "plot: a size that is not HxW",
        lambda e: ["plot", "--camera", "c", "--out", "x.png", "--size", "big"],
        ("--size", "hxw"),
    ),
    Case(
        "explain: not an alert ID",
        lambda e: ["explain", "door", "--model", "m.tflite"],
        ("not an alert id", "<camera>:<rule>:<start_ms>"),
    ),
    Case(
        "explain: a picture format it cannot write",
        lambda e: ["explain", "door:jumping:1700000000000", "--model", "m.tflite", "--out", "x.mp4"],
        ("--out", ".png or a .gif"),
    ),
    Case(
        "explain: no model",
        lambda e: ["explain", "door:jumping:1700000000000"],
        ("no model", "--model", "MOVINET_MODEL"),
    ),
    Case(
        "explain: wrong Redis port",
        lambda e: [
            "explain",
            "door:jumping:1700000000000",
            "--model",
            "m.tflite",
            "--redis-url",
            f"redis://127.0.0.1:{e.closed_port}/0",
        ],
        ("cannot reach redis", "--redis-url"),
    ),
]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _model(request: pytest.FixtureRequest) -> str:
    if (ASSETS / "movinet_int8.tflite").is_file():
        return str(ASSETS / "movinet_int8.tflite")
    return str(request.getfixturevalue("models").tflite)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_mistake_gets_exit_2_and_one_line(
    case: Case, tmp_path: Path, busy_port: int, request: pytest.FixtureRequest
) -> None:
    env = Env(tmp_path, _closed_port(), busy_port)
    env.labels = _file(env, "labels.txt", "".join(f"label {i}\n" for i in range(600)).encode())
    if case.needs_model:
        env.model = _model(request)
    argv = case.argv(env)
    process_env = {k: v for k, v in os.environ.items() if not k.startswith("MOVINET_")}
    process_env.update(TF_CPP_MIN_LOG_LEVEL="2", MOVINET_CACHE_DIR=str(tmp_path / "cache"))
    for name, value in case.env.items():
        if value:
            process_env[name] = value
        else:
            process_env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "worker", *argv],
        capture_output=True,
        text=True,
        timeout=180,
        env=process_env,
        cwd=tmp_path,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{proc.stderr[-3000:]}"
    for words in case.says:
        assert words.lower() in lines[0].lower(), f"{words!r} not in: {lines[0]}"
