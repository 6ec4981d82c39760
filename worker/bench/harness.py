"""What every part of `movinet-worker bench` shares inside a backend's process.

- the job a backend's process is sent, and the temporal modes it measures;
- CPU and memory meters (this process, Redis, the publishers, the rest of the machine);
- a real `Worker` serving in a thread of its own (its own event loop, as in production) against the
  bench's private Redis, under a key prefix of its own that is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import redis.asyncio as aioredis

from schemas.messages import Frame, Prediction
from worker.config import Settings, prefixed_keys
from worker.model.backends import Backend
from worker.pipeline.cameras import Camera
from worker.pipeline.metrics import Metrics
from worker.pipeline.publishing import Row
from worker.pipeline.worker import Worker

STAGES = ("redis_read", "decode", "state", "convert", "model", "publish")
Temporal = Literal["windows", "ema"]
TEMPORAL_MODES: tuple[Temporal, ...] = ("windows", "ema")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class BackendJob:
    """Everything one backend's process measures; sent to it pickled."""

    backend: str  # "tfhub" or "litert"
    model: str
    redis_url: str
    redis_pid: int
    cameras: int
    duration: float
    steps: int
    warmup: int
    jpegs: list[bytes]
    frame_size: tuple[int, int]
    layouts: list[tuple[int, int]] = dataclasses.field(default_factory=lambda: [(1, 1)])
    batch_sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    temporal: list[Temporal] = dataclasses.field(default_factory=lambda: list(TEMPORAL_MODES))
    baseline_cameras: int = 0  # 0: no baseline in this process
    baseline_only: bool = False
    live_start: int = 0  # 0: from the model-only estimate
    live_max: int = 256
    live_budget: float = 180.0  # per temporal mode
    live_warmup: float = 4.0
    latency_budgets: list[float] = dataclasses.field(default_factory=lambda: [200.0, 1000.0])  # ms
    progress: bool | None = None


@dataclasses.dataclass(frozen=True)
class Mode:
    """A temporal mode as the worker runs it: model steps per camera-frame, and the EMA hold."""

    temporal: Temporal
    per_slot: int  # model steps per camera-frame: 2 (two windows) or 1 (one EMA state)
    hold: int | None  # EMA: the frame count every state is held at (`Backend.step(..., hold)`)


def mode_of(settings: Settings, backend: Backend) -> Mode:
    """What a `Worker` with these settings steps per camera-frame (the drain checks the real one)."""
    hold, _ = settings.ema_plan(settings.window or backend.info.clip_frames)
    return Mode(settings.temporal, 1 if hold else 2, hold)


def progress_off(job: BackendJob) -> bool | None:
    """tqdm's `disable`: None shows bars on a terminal only."""
    return None if job.progress is None else not job.progress


# ---- processes and memory -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine have been busy (user, system, irq, steal)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]  # idle, iowait
    guest = sum(fields[8:10])  # already counted in user
    return (sum(fields) - idle - guest) / TICKS


class CpuMeter:
    """CPU taken by some processes between `start` and `stop`, in cores (1.0 = one core busy).

    `other` is what the rest of the machine took meanwhile: a busy neighbour skews every figure.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.begin: dict[str, float] = {}
        self.began = 0.0
        self.result: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {"machine": machine_busy_seconds()} | {n: cpu_seconds(pid) for n, pid in self.pids.items()}

    def start(self) -> None:
        self.began = time.monotonic()
        self.begin = self._now()

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self.began, 1e-9)
        now = self._now()
        used = {name: (now[name] - self.begin[name]) / wall for name in now}
        machine = used.pop("machine")
        self.result = {**used, "other": max(0.0, machine - sum(used.values()))}
        return self.result


def _nbytes(value: Any) -> int:
    size = getattr(value, "nbytes", None)
    if isinstance(size, int):
        return size
    return int(np.prod(value.shape)) * int(value.dtype.size)  # a TF tensor


def _arrays(state: Any) -> list[Any]:
    held = getattr(state, "arrays", None)
    if held is None:
        held = getattr(state, "tensors", {})
    return list(held.values())


def state_bytes(backend: Backend) -> int:
    """The size of one state (the zero state's tensors): one window's, or one camera's in EMA mode."""
    return sum(_nbytes(a) for a in _arrays(backend.init_state()))


def held_per_camera(worker: Worker) -> dict[str, float]:
    """Per camera: the states the worker holds (not the shared zero state), their bytes, and images.

    Run in the worker's loop thread. Tensors are counted once however many states share them; a TF
    state that is a slice of a batch's output may keep the whole batch buffer alive, which this
    nominal count does not see (the process RSS does).
    """
    zero = {id(a) for a in _arrays(worker.backend.init_state())}
    seen: set[int] = set(zero)
    held = states = images = cameras = 0
    for cam in worker.cameras.values():
        if cam.timeline is None:
            continue
        cameras += 1
        for window in cam.timeline.windows:
            own = [a for a in _arrays(window.state) if id(a) not in zero]
            held += bool(own)  # a window at its zero state holds nothing of its own
            for array in own:
                if id(array) not in seen:
                    seen.add(id(array))
                    states += _nbytes(array)
        pictures = [cam.timeline.last_image, *(w.image for w in cam.pending)]
        for image in pictures:
            if image is not None and id(image) not in seen:
                seen.add(id(image))
                images += image.nbytes
    per = max(cameras, 1)
    return {
        "cameras": cameras,
        "states_per_camera": held / per,
        "state_bytes_per_camera": states / per,
        "image_bytes_per_camera": images / per,
    }


# ---- frames ---------------------------------------------------------------------------------------


def camera_names(count: int) -> list[str]:
    return [f"cam{i:04d}" for i in range(count)]


def frame_templates(
    names: Sequence[str], jpegs: Sequence[bytes], size: tuple[int, int]
) -> list[list[dict[str, Any]]]:
    """Per camera, one Frame field map per JPEG; `seq` and `capture_ms` are set when published."""
    return [
        [
            Frame(
                camera=name, seq=0, capture_ms=0, encoding="jpeg", width=size[1], height=size[0], data=data
            ).to_fields()
            for data in jpegs
        ]
        for name in names
    ]


# ---- a worker in a thread ----------------------------------------------------------------------


class BenchWorker(Worker):
    """A Worker that also records each prediction's exact capture-to-publish latency.

    The time is taken after the publishing script returned, so it includes the publish round trip
    (the worker's own histogram is stamped when publishing starts).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.latencies: list[tuple[int, int]] = []  # (published ms, capture-to-publish ms)
        self.publisher.listeners.append(self._published)

    def _published(self, cam: Camera, row: Row, prediction: Prediction, now_ms: int) -> None:
        if not row.work.repeated:
            done = time.time_ns() // 1_000_000
            self.latencies.append((done, done - row.work.capture_ms))


def bench_settings(
    redis_url: str,
    prefix: str,
    temporal: Temporal = "windows",
    latency_budget_ms: float | None = None,
    backlog: bool = False,
) -> Settings:
    """A worker's settings in the bench; `latency_budget_ms` None: the worker's default (one slot).

    `backlog`: the worker replays frames published beforehand, up to minutes of capture time behind
    the newest, so nothing is trimmed for its age and no camera skips ahead to recent frames (with
    the defaults a fast machine's drain, over 60 s of frames, lost its oldest ones and never ended).
    """
    replay: dict[str, Any] = {"input_retention_seconds": 0.0, "max_lag_seconds": 86_400.0} if backlog else {}
    return Settings(
        redis_url=redis_url,
        metrics_port=0,
        discover_interval_seconds=0.1,
        worker_id="bench-" + uuid.uuid4().hex[:6],
        log_level="WARNING",
        grace_seconds=5.0,  # an overloaded live trial stops without draining its whole backlog
        temporal=temporal,
        latency_budget_ms=latency_budget_ms,
        target_load=1.0,  # never shed: a drain is busy by construction, a live trial counts what it serves
        **replay,
        **prefixed_keys(prefix),
    )


class ThreadedWorker:
    """A BenchWorker serving in a thread of its own with its own event loop, until `stop`."""

    def __init__(self, settings: Settings, backend: Backend, mode: Mode | None = None) -> None:
        labels = [f"class {i}" for i in range(backend.info.num_classes)]
        self.metrics = Metrics()
        self.settings = settings
        self.backend, self.labels = backend, labels
        self.mode = mode
        self.worker: BenchWorker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.failure: list[BaseException] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="bench-worker", daemon=True)

    def _main(self) -> None:
        async def serve() -> None:
            client = aioredis.from_url(self.settings.redis_url or "")
            self.worker = BenchWorker(self.settings, self.backend, self.labels, client, self.metrics)
            self.loop = asyncio.get_running_loop()
            self._ready.set()
            try:
                await self.worker.run()
            finally:
                await client.aclose()

        try:
            asyncio.run(serve())
        except BaseException as exc:  # reported by the thread that waits for it
            self.failure.append(exc)
            self._ready.set()

    def start(self) -> ThreadedWorker:
        self._thread.start()
        if not self._ready.wait(30) or self.failure:
            raise RuntimeError(f"the bench worker did not start: {self.failure}")
        assert self.worker is not None
        if self.mode is not None:  # the bench's units must be what the worker really does
            real = (self.worker.plan.per_slot, self.worker.plan.ema_frames)
            if real != (self.mode.per_slot, self.mode.hold):
                self.stop()
                raise RuntimeError(f"the worker steps {real}, the bench assumed {self.mode}")
        return self

    def call(self, fn: Callable[[BenchWorker], Any], timeout: float = 10) -> Any:
        """Run `fn(worker)` in the worker's loop thread, between two of its steps' awaits."""
        assert self.loop is not None and self.worker is not None
        worker = self.worker

        async def run() -> Any:
            return fn(worker)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self, timeout: float = 60) -> None:
        if self.loop is not None and self.worker is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.worker.request_stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            frame = sys._current_frames().get(self._thread.ident or 0)
            where = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)"
            try:  # read from this thread while the loop is stuck: good enough for a diagnosis
                for task in asyncio.all_tasks(self.loop) if self.loop is not None else ():
                    stack = task.get_stack(limit=4)
                    where += (
                        f"task {task.get_name()}: "
                        + " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(stack))
                        + "\n"
                    )
            except RuntimeError:
                pass
            raise RuntimeError(
                f"the bench worker did not stop in {timeout:.0f} s; its thread is at:\n{where}"
            )
        if self.failure:
            raise RuntimeError("the bench worker failed") from self.failure[0]

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def stages(self) -> dict[str, float]:
        return {s: self.value("movinet_stage_seconds_total", stage=s) for s in STAGES}

    def rounds(self) -> tuple[float, float]:
        """Model steps so far, and the states they stepped."""
        return self.value("movinet_batch_size_count"), self.value("movinet_batch_size_sum")

    def __enter__(self) -> ThreadedWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def delete_prefix(client: Any, prefix: str) -> None:
    batch: list[Any] = []
    for key in client.scan_iter(match=prefix + ":*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)
