"""Shared fixtures: real MoViNet graphs exported once and cached, and the real reference assets."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
# Bump when what the tests export changes; the export code's own hash is part of the key too.
EXPORT_RECIPE = 1


def _cache_root() -> Path:
    from worker.constants import cache_dir

    return Path(os.environ.get("MOVINET_TEST_MODELS", cache_dir() / "test-models"))


def run_cli(
    *args: str, timeout: float = 900, check: bool = True, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"movinet-worker {' '.join(args)} exited {proc.returncode}:\n"
            f"stdout (end):\n{proc.stdout[-3000:]}\nstderr (end):\n{proc.stderr[-3000:]}"
        )
    return proc


class Models:
    """A random-weight A0 stream model, its causal base twin (same weights) and a float TFLite copy.

    Exported with (2+1)D convolutions and 2plus3d squeeze-excitation, as TF Hub's lite models are,
    because TFLite has no 3D convolution or pooling kernels.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stream = root / "a0_stream"
        self.base = root / "a0_base"
        self.tflite = root / "a0_stream.tflite"

    def complete(self) -> bool:
        return (self.root / "done.json").is_file()

    def export(self) -> None:
        lite = ["--conv-type", "2plus1d", "--se-type", "2plus3d"]
        run_cli(
            "export-model",
            "--id",
            "a0",
            "--mode",
            "stream",
            "--random-weights",
            "--seed",
            "7",
            *lite,
            "--tflite",
            "--out",
            str(self.stream),
        )
        run_cli(
            "export-model",
            "--id",
            "a0",
            "--mode",
            "base",
            "--causal",
            *lite,
            "--checkpoint",
            str(self.stream / "checkpoint" / "ckpt-1"),
            "--out",
            str(self.base),
        )
        (self.root / "done.json").write_text(json.dumps({"recipe": EXPORT_RECIPE}))


@pytest.fixture(scope="session")
def models() -> Models:
    """Exported once per cache key (minutes), then reused by every test and later sessions."""
    import tensorflow as tf

    code = (ROOT / "worker" / "model" / "export.py").read_bytes()
    key = hashlib.sha256(code + f"{EXPORT_RECIPE}-{tf.__version__}".encode()).hexdigest()[:12]
    root = _cache_root() / key
    root.mkdir(parents=True, exist_ok=True)
    m = Models(root)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel sessions wait for one export
        if not m.complete():
            m.export()
    return m


@pytest.fixture(scope="session")
def assets() -> Path:
    if not (ASSETS / "movinet_int8.tflite").is_file():
        pytest.skip(f"real reference assets not found at {ASSETS} (they live outside the repository)")
    return ASSETS


@pytest.fixture(scope="session")
def tf_backend(models: Models):  # type: ignore[no-untyped-def]
    from worker.model.backends import load_stream_model

    return load_stream_model(str(models.stream), "tfhub")


@pytest.fixture(scope="session")
def base_model(models: Models):  # type: ignore[no-untyped-def]
    from worker.model.backends import load_model

    return load_model(str(models.base), "tfhub")


@pytest.fixture(scope="session")
def lite_backend(models: Models):  # type: ignore[no-untyped-def]
    from worker.model.backends import LiteRTOptions, load_stream_model

    backend = load_stream_model(str(models.tflite), "litert", LiteRTOptions(interpreters=2))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The machine's Redis (or MOVINET_TEST_REDIS_URL); a private redis-server when none answers."""
    import redis

    url = os.environ.get("MOVINET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
        yield url
        return
    except redis.RedisError:
        pass
    from worker.testing import local_redis

    with local_redis() as private:
        yield private


@pytest.fixture(scope="session")
def real_backend(assets: Path):  # type: ignore[no-untyped-def]
    from worker.model.backends import load_stream_model

    backend = load_stream_model(str(assets / "movinet_int8.tflite"), "litert")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def labels600() -> list[str]:
    """Kinetics-600 names: the real file when present, else placeholders (the model is random anyway)."""
    path = ASSETS / "kinetics600_label_map.txt"
    if path.is_file():
        return path.read_text().splitlines()
    return [f"class {i}" for i in range(600)]


@pytest.fixture
def r(redis_url: str) -> Iterator[tuple[Any, str]]:
    """A client and a key prefix private to one test; its keys are deleted afterwards."""
    import uuid

    import redis

    client = redis.Redis.from_url(redis_url)
    prefix = f"test:{uuid.uuid4().hex}"
    yield client, prefix
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def harnesses() -> Iterator[list[Any]]:
    """In-process workers made by a test; killed if still running, and their keys deleted."""
    made: list[Any] = []
    yield made
    for h in made:
        if h._thread is not None and h._thread.is_alive():
            h.kill()
        h.cleanup()


# ---- deploy tests (tests/test_deploy_*.py) ---------------------------------------------------


@pytest.fixture(scope="session")
def model_file(request: pytest.FixtureRequest) -> Path:
    """A LiteRT stream model: the real int8 A0 when the shared assets exist, else the test export."""
    real = ASSETS / "movinet_int8.tflite"
    if real.is_file():
        return real
    return Path(request.getfixturevalue("models").tflite)


@pytest.fixture(scope="session")
def labels_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    real = ASSETS / "kinetics600_label_map.txt"
    if real.is_file():
        return real
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("".join(f"class {i}\n" for i in range(600)))
    return path


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every deploy/k8s target rendered by kustomize: name -> objects."""
    from tests.support.deploy import render_targets

    return render_targets(tmp_path_factory.mktemp("kustomize"))
