"""Small utilities, constants and the per-test key space (cameras in Redis Cluster hash tags)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeAlias

import redis
from redis.cluster import RedisCluster
from redis.exceptions import ClusterDownError, TryAgainError

from worker.config import key_env

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
FPS = 5
SIZE = (172, 172)  # height, width: the A0 model's input, so rgb24 frames need no resize
# Errors after which a call is simply tried again (a connection cut, a cluster still settling).
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError, OSError)
RedisClient: TypeAlias = "redis.Redis | RedisCluster"
Top = list[tuple[str, float]]
Reference = dict[str, dict[int, Top]]


# ---- small utilities ----------------------------------------------------------------------------


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
    except (redis.ResponseError, redis.AuthenticationError):
        return True  # it answered (NOAUTH: a server with requirepass is up too)
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
