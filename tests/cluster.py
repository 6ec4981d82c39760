"""Helpers for multi-worker fault tests: private Redis servers and clusters, real worker processes,
a real-time camera publisher, a prediction watcher, and the checks every run must pass.

Everything here talks to loopback addresses only, bounds every wait in time and cleans up after
itself (processes stopped, temporary directories and keys removed), so a failing test leaves
nothing running. Keys live under a per-test prefix (`KeySpace`) with the camera in a Redis Cluster
hash tag, `<prefix>:frames:{<camera>}`, so a camera's keys share a cluster slot and tests never
collide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, TypeAlias

import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.cluster import RedisCluster
from redis.exceptions import ClusterDownError, ResponseError, TryAgainError

from schemas.messages import Frame, Prediction
from worker.config import key_env

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
FPS = 5
SIZE = (172, 172)  # height, width: the A0 model's input, so rgb24 frames need no resize
# Errors after which a call is simply tried again (a connection cut, a cluster still settling).
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError, OSError)
RedisClient: TypeAlias = "redis.Redis | RedisCluster"
Top = list[tuple[str, float]]
Reference = dict[str, dict[int, Top]]


# ---- small utilities ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy (returned) or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def slot_of(ms: int, fps: float = FPS) -> int:
    """The model-clock slot of an entry ID's millisecond part: slot k covers [k/fps, (k+1)/fps)."""
    return math.floor(ms * Fraction(fps).limit_denominator(1000) / 1000)


def slot_start_ms(slot: int, fps: float = FPS) -> int:
    return math.ceil(slot * 1000 / Fraction(fps).limit_denominator(1000))


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install redis-server)")
    return path


def _stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGCONT (it may be stopped), SIGTERM, then SIGKILL after `timeout`: only this process."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log at {path}: {exc})"


def _ping(host: str, port: int) -> bool:
    client = redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


# ---- keys ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeySpace:
    """Every key one test uses, under its own prefix; the camera stays inside the hash tag."""

    prefix: str

    @classmethod
    def new(cls, tag: str = "ft") -> KeySpace:
        return cls(f"{tag}{uuid.uuid4().hex[:10]}")

    def frames(self, camera: str) -> str:
        return f"{self.prefix}:frames:{{{camera}}}"

    def predictions(self, camera: str) -> str:
        return f"{self.prefix}:predictions:{{{camera}}}"

    def owner(self, camera: str) -> str:
        return f"{self.prefix}:owner:{{{camera}}}"

    def alert_state(self, camera: str) -> str:
        return f"{self.prefix}:alertstate:{{{camera}}}"

    def alerts(self, camera: str | None = None) -> str:
        """The alerts stream: one per camera in a cluster (`camera` given), else one for all."""
        return f"{self.prefix}:alerts" if camera is None else f"{self.prefix}:alerts:{{{camera}}}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def control(self) -> str:
        return f"{self.prefix}:cameras"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}:deadletter"

    def env(self, cluster: bool = False) -> dict[str, str]:
        """The worker's key settings as environment variables (templates: braces doubled). In a
        cluster the alerts stream is per camera too (the worker requires it: one shard per camera).
        Settings a worker does not know are ignored by it."""
        env = key_env(self.prefix)
        if cluster:
            env["MOVINET_ALERTS_KEY"] = self.prefix + ":alerts:{{{camera}}}"
        return env

    def cleanup(self, client: RedisClient) -> int:
        """Delete every key under the prefix (one by one: in a cluster they live on several nodes)."""
        deleted = 0
        with contextlib.suppress(*TRANSIENT):
            for key in list(client.scan_iter(match=f"{self.prefix}:*", count=1000)):
                deleted += int(client.delete(key))
        return deleted


def owner_worker(value: bytes | str | None) -> str | None:
    """The worker named by a lease value `<worker_id>:<token>` (None when no lease is held)."""
    if value is None:
        return None
    return _text(value).rsplit(":", 1)[0]


def owners(client: RedisClient, keys: KeySpace, cameras: Iterable[str]) -> dict[str, str | None]:
    """Each camera's lease holder right now."""
    cameras = list(cameras)
    pipe = client.pipeline(transaction=False)
    for camera in cameras:
        pipe.get(keys.owner(camera))
    return {c: owner_worker(v) for c, v in zip(cameras, pipe.execute(), strict=True)}


def owned_by(client: RedisClient, keys: KeySpace, cameras: Iterable[str]) -> dict[str, list[str]]:
    """Worker -> the cameras whose lease it holds."""
    out: dict[str, list[str]] = {}
    for camera, worker in owners(client, keys, cameras).items():
        if worker is not None:
            out.setdefault(worker, []).append(camera)
    return out


def registered_workers(client: RedisClient, keys: KeySpace) -> list[str]:
    return [_text(m) for m in client.zrange(keys.workers, 0, -1)]


def wait_balanced(
    client: RedisClient, keys: KeySpace, cameras: Sequence[str], workers: Sequence[str], timeout: float
) -> dict[str, list[str]]:
    """Wait until every camera is leased by one of `workers`, none holding more than ceil(C/W)."""
    bound = math.ceil(len(cameras) / len(workers))
    last: dict[str, list[str]] = {}

    def settled() -> bool:
        nonlocal last
        with contextlib.suppress(*TRANSIENT):
            last = owned_by(client, keys, cameras)
        held = sum(len(v) for w, v in last.items() if w in workers)
        return held == len(cameras) and max((len(v) for v in last.values()), default=0) <= bound

    try:
        wait_for(settled, timeout, f"{len(cameras)} cameras balanced over {list(workers)}", interval=0.1)
    except AssertionError as exc:
        counts = {w: len(v) for w, v in last.items()}
        raise AssertionError(f"{exc}; leases held: {counts} (at most {bound} each)") from None
    return last


# ---- Redis servers ------------------------------------------------------------------------------


class RedisServer:
    """A private `redis-server` on a free loopback port, nothing kept on disk; stopped on exit."""

    def __init__(self, *extra_args: str, start_timeout: float = 10.0) -> None:
        self.extra_args = extra_args
        self.start_timeout = start_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._clients: list[redis.Redis] = []

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> RedisServer:
        binary = _binary("redis-server")
        for _ in range(3):  # a free port can be taken between finding it and binding it
            self._dir = tempfile.TemporaryDirectory(prefix="redis-test-")
            self.port = free_port()
            args = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
            args += ["--dir", self._dir.name, "--logfile", str(Path(self._dir.name) / "redis.log")]
            self._proc = subprocess.Popen([*args, *self.extra_args], stdout=subprocess.DEVNULL)
            deadline = time.monotonic() + self.start_timeout
            while self._proc.poll() is None and time.monotonic() < deadline:
                if _ping(LOOPBACK, self.port):
                    return self
                time.sleep(0.05)
            self.stop()
        raise RuntimeError("redis-server did not start on a free loopback port")

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client closed when the server stops."""
        options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5, **kwargs}
        client = redis.Redis(host=LOOPBACK, port=self.port, **options)
        self._clients.append(client)
        return client

    def cut_connections(self) -> int:
        """`CLIENT KILL TYPE normal` from a separate admin client: every other connection is cut."""
        admin = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5)
        try:
            return int(admin.client_kill_filter(_type="normal", skipme=True))
        finally:
            admin.close()

    def log_tail(self, lines: int = 30) -> str:
        return _tail(Path(self._dir.name) / "redis.log", lines) if self._dir else ""

    def stop(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        _stop_process(self._proc)
        self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        if port not in taken and port + 10000 not in taken and _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster3:
    """Three `redis-server --cluster-enabled yes` masters on loopback, no replicas; stopped on exit."""

    def __init__(self, start_timeout: float = 30.0, node_timeout_ms: int = 5000) -> None:
        self.start_timeout = start_timeout
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._dirs: list[tempfile.TemporaryDirectory[str]] = []
        self._clients: list[RedisCluster] = []

    @property
    def url(self) -> str:
        """Any node: a cluster client discovers the others."""
        return f"redis://{LOOPBACK}:{self.ports[0]}/0"

    @property
    def urls(self) -> list[str]:
        return [f"redis://{LOOPBACK}:{p}/0" for p in self.ports]

    def start(self) -> RedisCluster3:
        binary = _binary("redis-server")
        deadline = time.monotonic() + self.start_timeout
        try:
            for _ in range(3):
                port = _free_cluster_port(set(self.ports))
                folder = tempfile.TemporaryDirectory(prefix="redis-cluster-")
                self._dirs.append(folder)
                args = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
                args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
                args += ["--cluster-node-timeout", str(self.node_timeout_ms), "--dir", folder.name]
                args += ["--logfile", str(Path(folder.name) / "redis.log")]
                self._procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
                self.ports.append(port)
            for port, proc in zip(self.ports, self._procs, strict=True):
                while not _ping(LOOPBACK, port):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"cluster node on port {port} did not start:\n{self.log_tail()}")
                    time.sleep(0.05)
            nodes = [f"{LOOPBACK}:{p}" for p in self.ports]
            create = [_binary("redis-cli"), "--cluster", "create", *nodes]
            create += ["--cluster-replicas", "0", "--cluster-yes"]
            made = subprocess.run(
                create,
                check=False,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
            )
            if made.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{made.stdout}\n{made.stderr}")
            wait_for(self.healthy, max(1.0, deadline - time.monotonic()), "cluster_state:ok on every node")
        except BaseException:
            self.stop()
            raise
        return self

    def info(self, port: int) -> dict[str, str]:
        """`CLUSTER INFO` of one node as a dict."""
        client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=2)
        try:
            raw = client.execute_command("CLUSTER INFO")
        finally:
            client.close()
        if isinstance(raw, dict):  # redis-py parses it
            return {_text(k): _text(v) if isinstance(v, bytes) else str(v) for k, v in raw.items()}
        return dict(line.split(":", 1) for line in _text(raw).split() if ":" in line)

    def healthy(self) -> bool:
        try:
            infos = [self.info(port) for port in self.ports]
        except redis.RedisError:
            return False
        return all(
            i.get("cluster_state") == "ok"
            and i.get("cluster_slots_ok") == "16384"
            and i.get("cluster_known_nodes") == str(len(self.ports))
            for i in infos
        )

    def client(self, **kwargs: Any) -> RedisCluster:
        """A `redis.cluster.RedisCluster` client, closed when the cluster stops."""
        options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5, **kwargs}
        client = RedisCluster(host=LOOPBACK, port=self.ports[0], **options)
        self._clients.append(client)
        return client

    def keyslot(self, key: str) -> int:
        client = redis.Redis(host=LOOPBACK, port=self.ports[0], socket_timeout=2)
        try:
            return int(client.execute_command("CLUSTER KEYSLOT", key))
        finally:
            client.close()

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(
            f"-- node {port}:\n{_tail(Path(d.name) / 'redis.log', lines)}"
            for port, d in zip(self.ports, self._dirs, strict=False)
        )

    def stop(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        for proc in self._procs:
            _stop_process(proc)
        self._procs.clear()
        for folder in self._dirs:
            folder.cleanup()
        self._dirs.clear()

    def __enter__(self) -> RedisCluster3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- worker processes ---------------------------------------------------------------------------


def write_labels(path: Path, labels: Sequence[str] | None = None) -> Path:
    """A label file: the given names, or 600 placeholders (the test models have random weights)."""
    names = list(labels) if labels is not None else [f"class {i}" for i in range(600)]
    path.write_text("\n".join(names) + "\n")
    return path


class WorkerProcess:
    """`python -m worker run` as a subprocess with its own metrics port; its log goes to a file."""

    def __init__(
        self,
        worker_id: str,
        redis_url: str,
        keys: KeySpace,
        *,
        model: Path | str,
        labels: Path,
        log_dir: Path,
        window: int | None = 10,
        lease_seconds: float | None = 3.0,
        heartbeat_seconds: float | None = 0.5,
        grace_seconds: float | None = None,
        cluster: bool = False,
        interpreters: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.keys = keys
        self.metrics_port = free_port()
        self.log_path = log_dir / f"worker-{worker_id}.log"
        settings = {
            "REDIS_URL": redis_url,
            "MOVINET_MODEL": str(model),
            "MOVINET_LABELS": str(labels),
            "MOVINET_WORKER_ID": worker_id,
            "MOVINET_METRICS_PORT": str(self.metrics_port),
            "MOVINET_METRICS_HOST": LOOPBACK,
            "MOVINET_BLOCK_MS": "20",
            "MOVINET_DISCOVER_INTERVAL_SECONDS": "0.2",
            **keys.env(cluster),
        }
        optional = {
            "MOVINET_WINDOW": window,
            "MOVINET_LEASE_SECONDS": lease_seconds,
            "MOVINET_HEARTBEAT_SECONDS": heartbeat_seconds,
            "MOVINET_GRACE_SECONDS": grace_seconds,
            "MOVINET_INTERPRETERS": interpreters,
        }
        settings.update({k: str(v) for k, v in optional.items() if v is not None})
        if cluster:
            settings["MOVINET_REDIS_CLUSTER"] = "1"
        settings.update(env or {})
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def environment(self) -> dict[str, str]:
        """The parent's environment minus any worker settings of its own, plus this worker's."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("MOVINET_") and k != "REDIS_URL"}
        return {**base, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **self.settings}

    def start(self) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=self.environment(),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def sigkill(self) -> None:
        self._signal(signal.SIGKILL)

    def sigterm(self) -> None:
        self._signal(signal.SIGTERM)

    def sigstop(self) -> None:
        self._signal(signal.SIGSTOP)

    def sigcont(self) -> None:
        self._signal(signal.SIGCONT)

    def wait(self, timeout: float) -> int:
        """The exit code; an AssertionError (with the log's tail) if still running after `timeout`."""
        assert self.proc is not None, "not started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.worker_id} still running after {timeout:.1f}s:\n{self.log_tail()}"
            ) from None

    def scrape(self, timeout: float = 2.0) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as response:
            text: str = response.read().decode()
            return text

    def metrics(self, timeout: float = 2.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample: (name, sorted labels) -> value."""
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(self.scrape(timeout)):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(
        self, name: str, labels: Mapping[str, str] | None = None, timeout: float = 2.0
    ) -> float | None:
        """A sample's value: the sum over the samples named `name` whose labels include `labels`
        (so a labelled metric without `labels` gives its total); None when there is no such sample."""
        wanted = set((labels or {}).items())
        values = [v for (n, ls), v in self.metrics(timeout).items() if n == name and wanted <= set(ls)]
        return sum(values) if values else None

    def ready(self, timeout: float = 60.0) -> WorkerProcess:
        """Wait until `/metrics` says `movinet_worker_ready 1`; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise AssertionError(
                    f"worker {self.worker_id} exited ({self.returncode}) before it was ready:\n"
                    f"{self.log_tail()}"
                )
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                if self.metric("movinet_worker_ready", timeout=1.0) == 1.0:
                    return self
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"worker {self.worker_id} not ready after {timeout:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def close(self) -> None:
        _stop_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> WorkerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Fleet:
    """The worker processes of one test, started alike; all stopped on exit, their logs' tails
    printed when the block fails (pytest shows them with the failure)."""

    def __init__(
        self, redis_url: str, keys: KeySpace, model: Path | str, labels: Path, log_dir: Path, **common: Any
    ) -> None:
        self.redis_url, self.keys, self.model, self.labels = redis_url, keys, model, labels
        self.log_dir = log_dir
        self.common = common
        self.workers: dict[str, WorkerProcess] = {}

    def start(
        self, worker_id: str, ready: bool = True, timeout: float = 60.0, **overrides: Any
    ) -> WorkerProcess:
        options = {**self.common, **overrides}
        worker = WorkerProcess(
            worker_id,
            self.redis_url,
            self.keys,
            model=self.model,
            labels=self.labels,
            log_dir=self.log_dir,
            **options,
        )
        self.workers[worker_id] = worker.start()
        return worker.ready(timeout) if ready else worker

    def start_all(self, worker_ids: Iterable[str], timeout: float = 60.0) -> list[WorkerProcess]:
        """Start together, then wait for each to be ready (the model loads in parallel)."""
        started = [self.start(w, ready=False) for w in worker_ids]
        return [w.ready(timeout) for w in started]

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if w.alive]

    def stop_all(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every live worker (resumed first if stopped) and wait; returns the exit codes."""
        for worker in self.alive():
            worker.sigcont()
            worker.sigterm()
        deadline = time.monotonic() + timeout
        for worker in self.workers.values():
            if worker.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.proc.wait(max(0.1, deadline - time.monotonic()))
        codes = {w.worker_id: w.returncode for w in self.workers.values()}
        self.close()
        return codes

    def tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"---- {w.worker_id} ({w.log_path}):\n{w.log_tail(lines)}" for w in self.workers.values()
        )

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            print(f"\nworker logs (test failed: {exc_type.__name__}):\n{self.tails()}")
        self.close()


# ---- the publisher ------------------------------------------------------------------------------


def frame_image(camera: str, seq: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A deterministic uint8 [H, W, 3] image per (camera, seq): seeded blocks of 4x4 pixels."""
    rng = np.random.default_rng([zlib.crc32(camera.encode()), seq])
    h, w = size
    small = rng.integers(0, 256, ((h + 3) // 4, (w + 3) // 4, 3), dtype=np.uint8)
    return np.ascontiguousarray(small.repeat(4, axis=0).repeat(4, axis=1)[:h, :w])


@dataclasses.dataclass(frozen=True)
class Published:
    entry_id: str
    seq: int
    ms: int
    wall: float  # time.time() after Redis accepted it


class LivePublisher:
    """Cameras publishing rgb24 frames in real time, `fps` each, from a background thread.

    Frames are sent at the middle of each slot of the wall clock (one frame per slot), with capture
    time = now and an explicit, increasing entry ID `<now_ms>-<seq>`. Images are deterministic per
    (camera, seq) (`frame_image`). A cut connection is retried with the same ID; `published` records
    what Redis accepted.
    """

    def __init__(
        self,
        client: RedisClient,
        keys: KeySpace,
        cameras: Sequence[str],
        *,
        fps: float = FPS,
        size: tuple[int, int] = SIZE,
        retry_seconds: float = 10.0,
    ) -> None:
        self.client, self.keys, self.cameras = client, keys, list(cameras)
        self.fps, self.size, self.retry_seconds = fps, size, retry_seconds
        self.published: dict[str, list[Published]] = {c: [] for c in self.cameras}
        self.errors = 0  # failed calls, retried
        self.skipped = 0  # frames given up on
        self.started_at: float | None = None
        self._seq = dict.fromkeys(self.cameras, 0)
        self._last_ms = dict.fromkeys(self.cameras, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._lock = threading.Lock()

    def start(self) -> LivePublisher:
        self.started_at = time.time()
        self._thread = threading.Thread(target=self._run, name="live-publisher", daemon=True)
        self._thread.start()
        return self

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.time() - self.started_at

    def run_until(self, seconds: float) -> None:
        """Sleep until the publisher has run `seconds` (it keeps publishing)."""
        time.sleep(max(0.0, seconds - self.elapsed()))
        self.check()

    def check(self) -> None:
        if self._failure is not None:
            raise AssertionError(f"publisher failed: {self._failure!r}") from self._failure

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "publisher thread did not stop"
        self.check()

    def __enter__(self) -> LivePublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    # -- what was published

    def count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.published.values())

    def last_slots(self) -> dict[str, int]:
        with self._lock:
            return {c: slot_of(v[-1].ms, self.fps) for c, v in self.published.items() if v}

    def first_slots(self) -> dict[str, int]:
        with self._lock:
            return {c: slot_of(v[0].ms, self.fps) for c, v in self.published.items() if v}

    # -- the thread

    def _run(self) -> None:
        period_ms = 1000 / self.fps
        try:
            while not self._stop.is_set():
                now_ms = time.time() * 1000
                # The middle of the next slot of the wall clock.
                target = (math.floor(now_ms / period_ms) + 1.5) * period_ms
                if self._stop.wait(max(0.0, (target - now_ms) / 1000)):
                    return
                self._tick()
        except BaseException as exc:  # reported by stop() / check()
            self._failure = exc

    def _tick(self) -> None:
        now_ms = int(time.time() * 1000)
        batch: dict[str, tuple[str, int, int, dict[str, Any]]] = {}
        h, w = self.size
        for camera in self.cameras:
            seq = self._seq[camera]
            self._seq[camera] = seq + 1
            ms = max(now_ms, self._last_ms[camera])
            self._last_ms[camera] = ms
            image = frame_image(camera, seq, self.size)
            fields = Frame(
                camera=camera,
                seq=seq,
                capture_ms=ms,
                encoding="rgb24",
                width=w,
                height=h,
                data=image.tobytes(),
            ).to_fields()
            batch[camera] = (f"{ms}-{seq}", seq, ms, fields)
        deadline = time.monotonic() + self.retry_seconds
        while batch and not self._stop.is_set():
            try:
                pipe = self.client.pipeline(transaction=False)
                for camera, (entry_id, _, _, fields) in batch.items():
                    pipe.xadd(self.keys.frames(camera), fields, id=entry_id)
                results = pipe.execute(raise_on_error=False)
            except TRANSIENT:
                self.errors += 1
                if time.monotonic() > deadline:
                    self.skipped += len(batch)
                    return
                time.sleep(0.05)
                continue
            wall = time.time()
            for (camera, (entry_id, seq, ms, _)), result in zip(list(batch.items()), results, strict=True):
                if isinstance(result, TRANSIENT) and time.monotonic() < deadline:
                    self.errors += 1
                    continue  # sent again
                del batch[camera]
                # A refused ID that is there: an earlier try went through before the connection was cut.
                done = not isinstance(result, Exception) or (
                    isinstance(result, ResponseError) and self._exists(camera, entry_id)
                )
                if not done:
                    self.skipped += 1
                    continue
                with self._lock:
                    self.published[camera].append(Published(entry_id, seq, ms, wall))

    def _exists(self, camera: str, entry_id: str) -> bool:
        with contextlib.suppress(*TRANSIENT):
            return bool(self.client.xrange(self.keys.frames(camera), entry_id, entry_id))
        return False


# ---- the watcher --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Seen:
    camera: str
    entry_id: str
    slot: int
    worker: str
    wall: float  # when the watcher first saw it (time.time())
    poll: int  # index of the poll that saw it


@dataclasses.dataclass(frozen=True)
class Gap:
    seconds: float
    camera: str
    before: int  # slot
    after: int  # slot
    start: float  # when the prediction before the gap was first seen (time.time())

    def __str__(self) -> str:
        return f"{self.seconds:.2f}s ({self.camera} slots {self.before}->{self.after})"


class PredictionWatcher:
    """Polls every camera's predictions stream (XRANGE after the last ID seen) from a thread and
    records, per prediction, when it was first seen and which worker published it.

    With `track_owners`, each poll first reads every camera's lease (in the same pipeline, before the
    XRANGE), so a prediction can be checked against who held the lease around when it appeared.
    """

    def __init__(
        self,
        client: RedisClient,
        keys: KeySpace,
        cameras: Sequence[str],
        *,
        interval: float = 0.05,
        track_owners: bool = True,
        fps: float = FPS,
    ) -> None:
        self.client, self.keys, self.cameras = client, keys, list(cameras)
        self.interval, self.track_owners, self.fps = interval, track_owners, fps
        self.seen: dict[str, list[Seen]] = {c: [] for c in self.cameras}
        self.polls = 0
        self.errors = 0
        self.poll_walls: list[float] = []
        # owners[camera][poll] = the worker holding the lease at that poll (None: no lease)
        self.owner_log: dict[str, list[str | None]] = {c: [] for c in self.cameras}
        self._last = dict.fromkeys(self.cameras, "-")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._lock = threading.Lock()

    def start(self) -> PredictionWatcher:
        self._thread = threading.Thread(target=self._run, name="prediction-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "watcher thread did not stop"
        if self._failure is not None:
            raise AssertionError(f"watcher failed: {self._failure!r}") from self._failure

    def __enter__(self) -> PredictionWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.poll_once()
                except TRANSIENT:
                    self.errors += 1
                self._stop.wait(self.interval)
        except BaseException as exc:
            self._failure = exc

    def poll_once(self) -> int:
        """One poll (also callable directly, without the thread); returns how many were new."""
        pipe = self.client.pipeline(transaction=False)
        for camera in self.cameras:
            if self.track_owners:
                pipe.get(self.keys.owner(camera))
            start = self._last[camera]
            pipe.xrange(self.keys.predictions(camera), min=start if start == "-" else "(" + start, count=5000)
        results = iter(pipe.execute())
        wall = time.time()
        new = 0
        with self._lock:
            poll = self.polls
            for camera in self.cameras:
                owner = owner_worker(next(results)) if self.track_owners else None
                self.owner_log[camera].append(owner)
                for entry_id, fields in next(results):
                    eid = _text(entry_id)
                    self._last[camera] = eid
                    slot = int(_text(fields.get(b"slot", b"-1")))
                    worker = _text(fields.get(b"worker"))
                    self.seen[camera].append(Seen(camera, eid, slot, worker, wall, poll))
                    new += 1
            self.poll_walls.append(wall)
            self.polls += 1
        return new

    # -- what was seen

    def all_seen(self) -> list[Seen]:
        with self._lock:
            return sorted((s for v in self.seen.values() for s in v), key=lambda s: s.wall)

    def count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.seen.values())

    def workers_seen(self, since: float | None = None, camera: str | None = None) -> Counter[str]:
        """How many predictions each worker published (first seen at or after `since`)."""
        return Counter(
            s.worker
            for s in self.all_seen()
            if (since is None or s.wall >= since) and (camera is None or s.camera == camera)
        )

    def max_gap(self, since: float | None = None) -> Gap | None:
        """The longest wall-clock gap between a camera's consecutive predictions (by slot), counting
        only pairs whose later one was seen at or after `since`: the takeover time."""
        best: Gap | None = None
        with self._lock:
            for camera, seen in self.seen.items():
                ordered = sorted(seen, key=lambda s: s.slot)
                for a, b in itertools.pairwise(ordered):
                    if since is not None and b.wall < since:
                        continue
                    if best is None or b.wall - a.wall > best.seconds:
                        best = Gap(b.wall - a.wall, camera, a.slot, b.slot, a.wall)
        return best

    def max_delay(self, from_slots: Mapping[str, int] | None = None) -> tuple[float, Seen | None]:
        """The longest time from a slot's end (wall clock) to its prediction being seen, over slots at
        or after `from_slots[camera]`."""
        worst: tuple[float, Seen | None] = (0.0, None)
        for s in self.all_seen():
            if from_slots is not None and s.slot < from_slots.get(s.camera, 0):
                continue
            delay = s.wall - slot_start_ms(s.slot + 1, self.fps) / 1000
            if delay > worst[0]:
                worst = (delay, s)
        return worst

    def caught_up(self, cameras: Iterable[str], since: float, within: float = 1.0) -> float | None:
        """Seconds from `since` until every one of `cameras` was live again: a prediction seen at most
        `within` seconds after its slot's end. None if one never was."""
        latest = 0.0
        for camera in cameras:
            with self._lock:
                live = [
                    s.wall
                    for s in self.seen[camera]
                    if s.wall >= since and s.wall - slot_start_ms(s.slot + 1, self.fps) / 1000 <= within
                ]
            if not live:
                return None
            latest = max(latest, min(live) - since)
        return round(latest, 2)

    def fencing_violations(self) -> list[Seen]:
        """Predictions whose publisher held the camera's lease at none of the polls just before, at
        and just after the one that saw it: published by a worker that had lost (or never had) it."""
        if not self.track_owners:
            raise ValueError("watcher was not tracking owners")
        bad: list[Seen] = []
        with self._lock:
            for camera, seen in self.seen.items():
                log = self.owner_log[camera]
                for s in seen:
                    around = {log[p] for p in (s.poll - 1, s.poll, s.poll + 1) if 0 <= p < len(log)}
                    if s.worker not in around:
                        bad.append(s)
        return bad


# ---- reference and checks -----------------------------------------------------------------------


def read_predictions(client: RedisClient, keys: KeySpace, camera: str) -> list[tuple[str, Prediction]]:
    out: list[tuple[str, Prediction]] = []
    start = "-"
    while True:
        batch = client.xrange(keys.predictions(camera), min=start, count=2000)
        out.extend((_text(e), Prediction.from_fields(f)) for e, f in batch)
        if len(batch) < 2000:
            return out
        start = "(" + _text(batch[-1][0])


def last_predicted_slots(
    client: RedisClient, keys: KeySpace, cameras: Iterable[str]
) -> dict[str, int | None]:
    cameras = list(cameras)
    pipe = client.pipeline(transaction=False)
    for camera in cameras:
        pipe.xrevrange(keys.predictions(camera), count=1)
    out: dict[str, int | None] = {}
    for camera, entries in zip(cameras, pipe.execute(), strict=True):
        out[camera] = int(_text(entries[0][1][b"slot"])) if entries else None
    return out


def wait_drained(client: RedisClient, keys: KeySpace, last_slots: Mapping[str, int], timeout: float) -> None:
    """Wait until every camera's prediction for its last frame's slot is out."""
    behind: dict[str, tuple[int | None, int]] = dict.fromkeys(last_slots, (None, 0))

    def drained() -> bool:
        nonlocal behind
        with contextlib.suppress(*TRANSIENT):
            got = last_predicted_slots(client, keys, last_slots)
            behind = {c: (got[c], s) for c, s in last_slots.items() if (got[c] or -1) < s}
        return not behind

    try:
        wait_for(drained, timeout, "every camera's last slot to be predicted", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (last published, last frame) per camera behind: {behind}") from None


def copy_frames(source: RedisClient, src: KeySpace, target: redis.Redis, dst: KeySpace, camera: str) -> int:
    """Copy a camera's frame entries (same IDs, same fields); returns how many."""
    copied, start = 0, "-"
    while True:
        batch = source.xrange(src.frames(camera), min=start, count=100)
        if not batch:
            return copied
        pipe = target.pipeline(transaction=False)
        for entry_id, fields in batch:
            pipe.xadd(dst.frames(camera), fields, id=entry_id)
        pipe.execute()
        copied += len(batch)
        start = "(" + _text(batch[-1][0])


def reference_predictions(
    source: RedisClient,
    keys: KeySpace,
    cameras: Sequence[str],
    *,
    redis_url: str,
    model: Path | str,
    labels: Path,
    log_dir: Path,
    window: int = 10,
    timeout: float = 180.0,
    fps: float = FPS,
) -> Reference:
    """What one uninterrupted worker predicts from the same frames.

    Every camera's frame entries are copied (same IDs and fields) from `source` under `keys` into a
    fresh key prefix on the standalone Redis at `redis_url`; one worker process runs over them until
    each camera's last slot is published; its predictions are returned as
    {camera: {slot: [(label, score), ...]}} and the copy is deleted.
    """
    target = redis.Redis.from_url(redis_url, socket_timeout=30)
    ref = KeySpace.new("ref")
    try:
        last: dict[str, int] = {}
        for camera in cameras:
            if copy_frames(source, keys, target, ref, camera):
                entries = target.xrevrange(ref.frames(camera), count=1)
                last[camera] = slot_of(int(_text(entries[0][0]).split("-")[0]), fps)
        with WorkerProcess(
            "reference",
            redis_url,
            ref,
            model=model,
            labels=labels,
            log_dir=log_dir,
            window=window,
            interpreters=None,
        ) as worker:
            try:
                worker.ready(60)
                wait_drained(target, ref, last, timeout)
            except AssertionError as exc:
                raise AssertionError(f"reference run: {exc}\n{worker.log_tail()}") from None
            worker.sigterm()
            worker.wait(30)
        return {
            camera: {
                p.slot: [(t.label, t.score) for t in p.top] for _, p in read_predictions(target, ref, camera)
            }
            for camera in cameras
        }
    finally:
        ref.cleanup(target)
        target.close()


@dataclasses.dataclass
class RunCheck:
    """Counts over every camera's predictions, compared with an uninterrupted reference run."""

    cameras: int = 0
    checked: int = 0  # slots compared with the reference
    lost: int = 0  # slots missing after each camera's first full window
    duplicated: int = 0  # slots published more than once
    mismatched: int = 0  # slots that differ from the reference (or that it does not have)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checked > 0 and not (self.lost or self.duplicated or self.mismatched)

    def note(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)

    def __str__(self) -> str:
        head = (
            f"{self.cameras} cameras, {self.checked} slots checked: lost {self.lost}, "
            f"duplicated {self.duplicated}, mismatched {self.mismatched}"
        )
        return "\n  ".join([head, *self.problems])


def same_top(got: Top, want: Top, tolerance: float = 1e-4) -> str | None:
    """None when two top-k lists agree: scores rank by rank within `tolerance`, and each label where
    the reference has it within `tolerance` (labels may only differ where scores tie that closely).
    Otherwise what differs."""
    if len(got) != len(want):
        return f"{len(got)} labels, reference {len(want)}"
    for rank, ((_, a), (_, b)) in enumerate(zip(got, want, strict=True)):
        if abs(a - b) > tolerance:
            return f"rank {rank}: score {a:.6f}, reference {b:.6f}"
    ref = dict(want)
    floor = want[-1][1]
    for label, score in got:
        if label in ref:
            if abs(ref[label] - score) > tolerance:
                return f"{label!r}: score {score:.6f}, reference {ref[label]:.6f}"
        elif score > floor + tolerance:
            return f"{label!r} ({score:.6f}) is not in the reference's top {len(want)}"
    return None


def check_run(
    client: RedisClient,
    keys: KeySpace,
    reference: Reference,
    window: int,
    tolerance: float = 1e-4,
) -> RunCheck:
    """Every camera: no duplicate slot, no missing slot from W slots after its first one (the first
    full window) to its last, and every prediction equal to the reference's (scores within
    `tolerance`)."""
    result = RunCheck()
    for camera, want in sorted(reference.items()):
        result.cameras += 1
        if not want:
            result.note(f"{camera}: the reference has no predictions")
            result.mismatched += 1
            continue
        live = read_predictions(client, keys, camera)
        slots = Counter(p.slot for _, p in live)
        for slot, n in sorted(slots.items()):
            if n > 1:
                result.duplicated += n - 1
                result.note(f"{camera}: slot {slot} published {n} times")
        first, last = min(want), max(want)
        missing = [s for s in range(first + window, last + 1) if s not in slots]
        result.lost += len(missing)
        if missing:
            result.note(
                f"{camera}: {len(missing)} slots missing, first {missing[:5]} (slots {first}..{last})"
            )
        done: set[int] = set()
        for _, p in live:
            if p.slot in done:
                continue
            done.add(p.slot)
            result.checked += 1
            if p.slot not in want:
                result.mismatched += 1
                result.note(f"{camera}: slot {p.slot} (by {p.worker}) is not in the reference")
                continue
            why = same_top([(t.label, t.score) for t in p.top], want[p.slot], tolerance)
            if why is not None:
                result.mismatched += 1
                result.note(f"{camera}: slot {p.slot} (by {p.worker}, {p.frames} frames): {why}")
    return result
