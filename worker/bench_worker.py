"""The worker under load for `movinet-worker bench`, run in a process of one backend's own.

A real `Worker` runs in a thread of this process (its own event loop, as in production) against the
bench's private Redis, with keys under a prefix of its own that are deleted afterwards:

- model only: `Backend.step` over the states the worker passes per round (two windows per camera,
  whose frame counts differ, so TF runs them as two batches, as the worker does);
- drain: N cameras' JPEG frames preloaded, one worker turning them into predictions;
- live: N cameras published at the model's rate by a separate process, capture time = now, and the
  exact capture-to-publish latency of every prediction.

Every wait is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import redis
import redis.asyncio as aioredis

from schemas.messages import Frame, Prediction
from worker.backends import Backend, load_stream_model
from worker.bench_model import _frames, _time_steps, baseline
from worker.camera import Clock
from worker.config import Settings, prefixed_keys
from worker.metrics import Metrics
from worker.publishing import Row
from worker.runtime import Camera
from worker.service import Worker

STAGES = ("redis_read", "decode", "state", "convert", "model", "publish")
# A live trial passes when p99 capture-to-publish is under one slot and the worker published at least
# this share of the predictions due (a worker that falls behind publishes fewer, and late).
LIVE_P99_LIMIT_MS = 200.0
LIVE_MIN_PUBLISHED = 0.95
# Live cameras are spread over a slot in this many phase groups, away from its edges, so publisher
# jitter does not move a frame into the next slot.
PHASE_GROUPS = 20
SLOT_MARGIN_S = 0.01
MEMORY_SNAPSHOTS = 3
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
    baseline_cameras: int = 0  # 0: no baseline in this process
    baseline_only: bool = False
    live_start: int = 0  # 0: from the model-only estimate
    live_max: int = 256
    live_budget: float = 180.0
    live_warmup: float = 4.0
    progress: bool | None = None


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
    """The size of one camera-window state (the zero state's tensors)."""
    return sum(_nbytes(a) for a in _arrays(backend.init_state()))


def held_per_camera(worker: Worker) -> dict[str, float]:
    """Bytes the worker holds per camera: window states (not the shared zero state) and images.

    Run in the worker's loop thread. Tensors are counted once however many states share them; a TF
    state that is a slice of a batch's output may keep the whole batch buffer alive, which this
    nominal count does not see (the process RSS does).
    """
    zero = {id(a) for a in _arrays(worker.backend.init_state())}
    seen: set[int] = set(zero)
    states = images = cameras = 0
    for cam in worker.cameras.values():
        if cam.timeline is None:
            continue
        cameras += 1
        for window in cam.timeline.windows:
            for array in _arrays(window.state):
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

    def _observe(self, cam: Camera, row: Row, prediction: Prediction, now_ms: int) -> None:
        super()._observe(cam, row, prediction, now_ms)
        if not row.work.repeated:
            done = time.time_ns() // 1_000_000
            self.latencies.append((done, done - row.work.capture_ms))


def bench_settings(redis_url: str, prefix: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        metrics_port=0,
        discover_interval_seconds=0.1,
        worker_id="bench-" + uuid.uuid4().hex[:6],
        log_level="WARNING",
        grace_seconds=5.0,  # an overloaded live trial stops without draining its whole backlog
        **prefixed_keys(prefix),
    )


class ThreadedWorker:
    """A BenchWorker serving in a thread of its own with its own event loop, until `stop`."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        labels = [f"class {i}" for i in range(backend.info.num_classes)]
        self.metrics = Metrics()
        self.settings = settings
        self.backend, self.labels = backend, labels
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
            raise RuntimeError("the bench worker did not stop in time")
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


# ---- model only ---------------------------------------------------------------------------------


def model_only(backend: Backend, cameras: int, steps: int, warmup: int) -> dict[str, Any]:
    """Median time of one step over the 2N states of a worker round (two frame counts)."""
    frames = _frames(2 * cameras, backend.info.height, backend.info.width)
    zero = [backend.init_state()] * cameras
    _, ahead = backend.step(frames[:cameras], zero)  # the second window: one frame further on
    states = [s for pair in zip(zero, ahead, strict=True) for s in pair]

    def step() -> None:
        nonlocal states
        _, states = backend.step(frames, states)

    meter = CpuMeter({"bench": os.getpid()})
    meter.start()
    seconds = _time_steps(step, steps, warmup)
    return {
        "cpu_cores": meter.stop(),
        "cameras": cameras,
        "states_per_step": 2 * cameras,
        "seconds_per_round": seconds,
        "model_steps_per_second": 2 * cameras / seconds,
        "camera_frames_per_second": cameras / seconds,
    }


def warm_batches(backend: Backend, cameras: int, done: set[int]) -> None:
    """Make the TF backend meet every padded batch size a round of `cameras` may use (seconds each).

    A camera's two windows share one batch until the first of them is reset, so up to 2N states.
    """
    sizes: list[int] = list(getattr(backend, "batch_sizes", []))
    if not sizes:
        return
    largest = next((s for s in sizes if s >= 2 * cameras), sizes[-1])
    frames = _frames(largest, backend.info.height, backend.info.width)
    for size in sizes:
        if size <= largest and size not in done:
            backend.step(frames[:size], [backend.init_state()] * size)
            done.add(size)


# ---- drain ----------------------------------------------------------------------------------------


def drain(job: BackendJob, backend: Backend, frames_per_camera: int, layout: str) -> dict[str, Any]:
    """Preload N cameras' frames on consecutive slots; time one worker turning them into predictions.

    The rate and CPU are taken from the first prediction to the last, so start-up (discovery, leases,
    the first read) is left out; stage times are over the whole run, every frame passing each once.
    """
    from tqdm import tqdm

    prefix = "bench:drain:" + uuid.uuid4().hex[:8]
    settings = bench_settings(job.redis_url, prefix)
    client = redis.Redis.from_url(job.redis_url)
    names = camera_names(job.cameras)
    templates = frame_templates(names, job.jpegs, job.frame_size)
    clock = Clock.of(backend.info.fps)
    first = _steady_start(clock.slot(int(time.time() * 1000)) - frames_per_camera - 60, backend)
    total = job.cameras * frames_per_camera
    try:
        pipe = client.pipeline(transaction=False)
        for c, name in enumerate(names):
            for k in range(frames_per_camera):
                fields = dict(templates[c][(k + c) % len(job.jpegs)])
                ms = clock.start_ms(first + k)
                fields["seq"], fields["capture_ms"] = str(k), str(ms)
                pipe.xadd(settings.frames_stream(name), fields, id=f"{ms}-0")
            if len(pipe) >= 2000:
                pipe.execute()
        pipe.execute()
        pids = {"worker": os.getpid(), "redis": job.redis_pid}
        meter = CpuMeter(pids)
        deadline = time.monotonic() + max(120.0, 10 * job.duration)
        memory: dict[str, float] = {}
        stages0 = dict.fromkeys(STAGES, 0.0)  # all frames are read, decoded and stepped once
        with (
            ThreadedWorker(settings, backend) as tw,
            tqdm(
                total=total, desc=f"{job.backend} drain", unit="frame", disable=_disabled(job), leave=False
            ) as bar,
        ):
            t0 = count0 = count = 0.0
            while count < total:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"drain of {total} frames did not finish in time ({count:.0f} done)")
                time.sleep(0.02)
                count = tw.value("movinet_predictions_published_total")
                bar.update(int(count) - bar.n)
                if not t0 and count > 0:
                    t0, count0 = time.monotonic(), count
                    meter.start()
                if not memory and count >= total / 2:
                    memory = tw.call(held_per_camera)
            seconds = time.monotonic() - t0
            cpu = meter.stop()
            stages1 = tw.stages()
            rounds, stepped = tw.rounds()
        frames = count - count0
    finally:
        delete_prefix(client, prefix)
        client.close()
    rate = frames / seconds
    return {
        "backend": job.backend,
        "model": job.model,
        "layout": layout,
        "cameras": job.cameras,
        "camera_frames": int(frames),
        "seconds": seconds,
        "camera_frames_per_second": rate,
        "model_steps_per_second": 2 * rate,
        "stage_ms_per_camera_frame": {s: 1e3 * (stages1[s] - stages0[s]) / total for s in STAGES},
        "states_per_round": stepped / max(rounds, 1),
        "cpu_cores": cpu,
        "cpu_ms_per_camera_frame": {k: 1e3 * v * seconds / frames for k, v in cpu.items()},
        "held_during_backlog": memory,
    }


def _steady_start(slot: int, backend: Backend) -> int:
    """The first slot at or after `slot` that is the last before a window reset.

    A camera's two windows start together and stay equal (one batch for TF) until one of them is
    reset; in steady state they never are, so cameras start just before a reset.
    """
    half = backend.info.clip_frames // 2
    return slot + (half - 1 - slot) % half


# ---- live ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class LiveFeed:
    """What the live publisher process sends."""

    redis_url: str
    key_template: str
    cameras: int
    fps: float
    jpegs: list[bytes]
    size: tuple[int, int]
    seconds: float  # the longest it runs, whatever happens to its parent
    first_slot: int  # the slot the cameras start on


def publish_live(feed: LiveFeed, stop: Any, results: Any) -> None:
    """N cameras at `fps` each in real time, capture time = now, entry ID `*`; until `stop` or `seconds`.

    Cameras are spread over the slot in phase groups (real cameras are not synchronised), each group
    sent as one pipelined round trip.
    """
    cameras, fps, jpegs = feed.cameras, feed.fps, feed.jpegs
    client = redis.Redis.from_url(feed.redis_url)
    names = camera_names(cameras)
    keys = [feed.key_template.format(camera=n) for n in names]
    templates = frame_templates(names, jpegs, feed.size)
    period = 1.0 / fps
    groups = min(cameras, PHASE_GROUPS)
    spacing = (period - 2 * SLOT_MARGIN_S) / groups
    start = feed.first_slot / fps + SLOT_MARGIN_S
    end = start + feed.seconds
    sent = tick = 0
    late = 0.0
    try:
        while not stop.is_set():
            slot, group = divmod(tick, groups)
            due = start + slot * period + group * spacing
            if due > end:
                break
            wait = due - time.time()
            if wait > 0:
                time.sleep(wait)
            else:
                late = max(late, -wait)
            now_ms = str(time.time_ns() // 1_000_000)
            pipe = client.pipeline(transaction=False)
            for c in range(group, cameras, groups):
                fields = dict(templates[c][(slot + c) % len(jpegs)])
                fields["seq"], fields["capture_ms"] = str(slot), now_ms
                pipe.xadd(keys[c], fields)
            pipe.execute()
            sent += len(range(group, cameras, groups))
            tick += 1
    finally:
        client.close()
        results.put({"frames": sent, "max_late_ms": 1e3 * late})


def live_trial(job: BackendJob, backend: Backend, cameras: int) -> dict[str, Any]:
    """One worker serving N live cameras; p99 capture-to-publish over a window after a warm-up."""
    ctx = mp.get_context("spawn")
    prefix = "bench:live:" + uuid.uuid4().hex[:8]
    settings = bench_settings(job.redis_url, prefix)
    client = redis.Redis.from_url(job.redis_url)
    fps = backend.info.fps
    stop, results = ctx.Event(), ctx.Queue()
    total_seconds = job.live_warmup + job.duration + 30
    first_slot = _steady_start(math.floor((time.time() + 1.0) * fps), backend)
    publisher = ctx.Process(
        target=publish_live,
        args=(
            LiveFeed(
                job.redis_url,
                settings.frames_key,
                cameras,
                fps,
                job.jpegs,
                job.frame_size,
                total_seconds,
                first_slot,
            ),
            stop,
            results,
        ),
        name="bench-publisher",
        daemon=True,
    )
    rss0 = rss_bytes(os.getpid())
    publisher.start()
    try:
        keys = [settings.frames_stream(n) for n in camera_names(cameras)]
        deadline = time.monotonic() + 30 + backend.info.clip_frames / fps
        while client.exists(*keys) < cameras:
            if time.monotonic() > deadline or not publisher.is_alive():
                raise RuntimeError("the live publisher did not start its cameras")
            time.sleep(0.05)
        assert publisher.pid is not None
        meter = CpuMeter({"worker": os.getpid(), "redis": job.redis_pid, "publisher": publisher.pid})
        with ThreadedWorker(settings, backend) as tw:
            time.sleep(job.live_warmup)
            published0 = tw.value("movinet_predictions_published_total")
            stages0, rounds0 = tw.stages(), tw.rounds()
            begin_ms = time.time_ns() // 1_000_000
            meter.start()
            memory: dict[str, float] = {}
            for _ in range(MEMORY_SNAPSHOTS):  # the largest of a few: resets come and go
                time.sleep(job.duration / MEMORY_SNAPSHOTS)
                held = tw.call(held_per_camera)
                if held["state_bytes_per_camera"] >= memory.get("state_bytes_per_camera", -1.0):
                    memory = held
            cpu = meter.stop()
            end_ms = time.time_ns() // 1_000_000
            published1 = tw.value("movinet_predictions_published_total")
            stages1, rounds1 = tw.stages(), tw.rounds()
            rss = rss_bytes(os.getpid())
            stop.set()
            assert tw.worker is not None
            samples = [lat for done, lat in list(tw.worker.latencies) if begin_ms <= done < end_ms]
            dropped = tw.value("movinet_frames_dropped_total")
            repeated = tw.value("movinet_frames_repeated_total")
        try:
            sent = results.get(timeout=15)
        except queue.Empty:
            sent = {"error": f"no report from the publisher (exit code {publisher.exitcode})"}
    finally:
        stop.set()
        publisher.join(15)
        if publisher.is_alive():
            publisher.terminate()
            publisher.join(5)
        delete_prefix(client, prefix)
        client.close()
    window = (end_ms - begin_ms) / 1000
    due = cameras * fps * window
    published = published1 - published0
    p99 = float(np.percentile(samples, 99)) if samples else math.inf
    return {
        "cameras": cameras,
        "seconds": window,
        "predictions_due": due,
        "predictions_published": published,
        "p50_ms": float(np.percentile(samples, 50)) if samples else math.inf,
        "p99_ms": p99,
        "max_ms": float(max(samples)) if samples else math.inf,
        "sustained": bool(p99 < LIVE_P99_LIMIT_MS and published >= LIVE_MIN_PUBLISHED * due),
        "cpu_cores": cpu,
        "stage_ms_per_camera_frame": {s: 1e3 * (stages1[s] - stages0[s]) / max(published, 1) for s in STAGES},
        "states_per_round": (rounds1[1] - rounds0[1]) / max(rounds1[0] - rounds0[0], 1),
        "frames_dropped": dropped,
        "frames_repeated": repeated,
        "publisher": sent,
        "held": memory,
        "rss_delta_per_camera": (rss - rss0) / cameras,
    }


def live_search(job: BackendJob, trial: Callable[[int], dict[str, Any]], start: int) -> dict[str, Any]:
    """The largest N sustained: double from `start` until a trial fails, then bisect; within the budget."""
    from tqdm import tqdm

    deadline = time.monotonic() + job.live_budget
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    worst: dict[str, Any] | None = None  # the smallest N that failed
    n = max(1, min(start, job.live_max))
    with tqdm(desc=f"{job.backend} live", unit="trial", disable=_disabled(job), leave=False) as bar:
        while n and time.monotonic() < deadline:
            bar.set_postfix(cameras=n)
            result = trial(n)
            bar.update()
            trials.append(result)
            if result["sustained"]:
                best = result if best is None or n > best["cameras"] else best
            else:
                worst = result if worst is None or n < worst["cameras"] else worst
            low = best["cameras"] if best else 0
            if worst is None:
                n = min(2 * n, job.live_max) if n < job.live_max else 0
            else:
                high = worst["cameras"]
                n = (low + high) // 2 if high - low > max(1, low // 16) else 0
                n = 0 if n <= low else n
    return {
        "max_cameras": best["cameras"] if best else 0,
        "first_failing": worst["cameras"] if worst else None,
        "at_max": best,
        "budget_exhausted": time.monotonic() >= deadline,
        "trials": trials,
    }


# ---- one backend's process ----------------------------------------------------------------------


def _disabled(job: BackendJob) -> bool | None:
    return None if job.progress is None else not job.progress


def _load(job: BackendJob, layout: tuple[int, int]) -> Backend:
    if job.backend == "litert":
        return load_stream_model(job.model, "litert", interpreters=layout[0], threads=layout[1])
    return load_stream_model(job.model, "tfhub", batch_sizes=job.batch_sizes)


def run_backend(job: BackendJob) -> dict[str, Any]:
    """Baseline (TF's process only), model only at each layout, drain and live at the best one."""
    result: dict[str, Any] = {"backend": job.backend, "model": job.model}
    warmed: set[int] = set()  # TF batch sizes the kept backend has run
    rows: list[dict[str, Any]] = []
    best: tuple[float, Backend, str] | None = None
    for layout in job.layouts if job.backend == "litert" else [(0, 0)]:
        backend = _load(job, layout)
        name = _layout_name(job, backend, layout)
        try:
            if job.baseline_cameras:  # the same restored object, called as the tutorial does
                model = getattr(backend, "model", None)
                meter = CpuMeter({"bench": os.getpid()})
                meter.start()
                tutorial = baseline(job.model, job.baseline_cameras, job.steps, job.warmup, model=model)
                result["baseline"] = {
                    **dataclasses.asdict(tutorial),
                    "cameras": job.baseline_cameras,
                    "cpu_cores": meter.stop(),
                }
            if job.baseline_only:
                backend.close()
                return {**result, "skip": True}
            warm_batches(backend, job.cameras, warmed)
            row = model_only(backend, job.cameras, job.steps, job.warmup)
        except BaseException:
            backend.close()
            raise
        row.update(backend=job.backend, model=job.model, layout=name)
        rows.append(row)
        if best is None or row["model_steps_per_second"] > best[0]:
            if best is not None:
                best[1].close()
            best = (row["model_steps_per_second"], backend, name)
        else:
            backend.close()
    assert best is not None
    rate, backend, chosen = best[0] / 2, best[1], best[2]  # camera-frames/s the model alone allows
    for row in rows:
        row["best"] = row["layout"] == chosen
    result["model_only"] = rows
    try:
        result["state_bytes"] = state_bytes(backend)
        frames_per_camera = max(20, math.ceil(job.duration * rate / job.cameras))
        result["end_to_end"] = drain(job, backend, frames_per_camera, chosen)

        def trial(n: int) -> dict[str, Any]:
            warm_batches(backend, n, warmed)
            return live_trial(job, backend, n)

        estimate = rate / backend.info.fps
        start = job.live_start or 2 ** max(0, math.floor(math.log2(max(1.0, estimate / 2))))
        result["live"] = live_search(job, trial, start)
        result["live"]["layout"] = chosen
    finally:
        backend.close()
    return result


def _layout_name(job: BackendJob, backend: Backend, layout: tuple[int, int]) -> str:
    if job.backend == "litert":
        return f"{layout[0]} interpreter(s) x {layout[1]} thread(s)"
    sizes = getattr(backend, "batch_sizes", [])
    return f"batched by frame count, padded to {','.join(map(str, sizes))}"


def backend_process(job: BackendJob, results: Any) -> None:
    """Entry point of a backend's process: its result, or the error as text, goes on `results`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        results.put(run_backend(job))
    except BaseException:
        results.put({"backend": job.backend, "error": traceback.format_exc()})
