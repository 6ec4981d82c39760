"""One backend's process for `movinet-worker bench`: model only, drain and live, per temporal mode.

For each layout (LiteRT: interpreters x threads; TF: one), in each temporal mode:

- model only: `Backend.step` over the states a worker round passes. Windows: two per camera, whose
  frame counts differ, so TF runs them as two batches, as the worker does. EMA: one per camera, all
  held at `c` frames (`hold=c`), the steady state, one TF batch;

then at the best layout, in each mode:

- drain: N cameras' JPEG frames preloaded in the bench's Redis, one worker (`Settings(temporal=mode)`)
  turning them into predictions;
- live, at each latency budget: the most cameras held with p99 capture-to-publish under the budget,
  the worker's stepper batching within it (`bench_live`).

Every wait is bounded by a deadline.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import traceback
import uuid
from typing import Any

import redis

from worker.bench.harness import (
    STAGES,
    BackendJob,
    CpuMeter,
    Mode,
    ThreadedWorker,
    bench_settings,
    camera_names,
    delete_prefix,
    frame_templates,
    held_per_camera,
    mode_of,
    progress_off,
    state_bytes,
)
from worker.bench.live import live_search, live_trial, steady_start
from worker.bench.model import _frames, _time_steps, baseline
from worker.model.backends import Backend, LiteRTOptions, TFHubOptions, load_stream_model
from worker.pipeline.timeline import Clock

# ---- model only ---------------------------------------------------------------------------------


def model_only(backend: Backend, cameras: int, steps: int, warmup: int, mode: Mode) -> dict[str, Any]:
    """Median time of the model step of one worker round of N cameras in `mode`.

    Windows: 2N states of two frame counts (a camera's second window one frame ahead). EMA: N states
    at `c` frames, stepped with `hold=c`: one camera is brought to `c` frames and every camera starts
    from its state (steps never modify their input states), so the timed steps are the steady state.
    """
    info = backend.info
    frames = _frames(mode.per_slot * cameras, info.height, info.width)
    zero = backend.init_state()
    if mode.hold is None:
        _, ahead = backend.step(frames[:cameras], [zero] * cameras)
        states = [s for pair in zip([zero] * cameras, ahead, strict=True) for s in pair]
    else:
        state = zero
        for _ in range(mode.hold):
            _, (state,) = backend.step(frames[:1], [state], mode.hold)
        states = [state] * cameras

    def step() -> None:
        nonlocal states
        _, states = backend.step(frames, states, mode.hold)

    meter = CpuMeter({"bench": os.getpid()})
    meter.start()
    seconds = _time_steps(step, steps, warmup)
    rate = cameras / seconds
    return {
        "temporal": mode.temporal,
        "ema_frames": mode.hold,
        "cpu_cores": meter.stop(),
        "cameras": cameras,
        "states_per_step": mode.per_slot * cameras,
        "seconds_per_round": seconds,
        "model_steps_per_second": mode.per_slot * rate,
        "camera_frames_per_second": rate,
    }


def warm_batches(backend: Backend, states: int, done: set[int]) -> None:
    """Make the TF backend meet every padded batch size a round of `states` may use (seconds each).

    Windows: a camera's two windows share one batch until the first of them is reset, so a round of
    N cameras has up to 2N states in a batch; EMA: N.
    """
    sizes: list[int] = list(getattr(backend, "batch_sizes", []))
    if not sizes:
        return
    largest = next((s for s in sizes if s >= states), sizes[-1])
    frames = _frames(largest, backend.info.height, backend.info.width)
    for size in sizes:
        if size <= largest and size not in done:
            backend.step(frames[:size], [backend.init_state()] * size)
            done.add(size)


# ---- drain ----------------------------------------------------------------------------------------


def drain(
    job: BackendJob, backend: Backend, frames_per_camera: int, layout: str, mode: Mode
) -> dict[str, Any]:
    """Preload N cameras' frames on consecutive slots; time one worker turning them into predictions.

    The rate and CPU are taken from the first prediction to the last, so start-up (discovery, leases,
    the first read) is left out; stage times are over the whole run, every frame passing each once.
    """
    from tqdm import tqdm

    prefix = "bench:drain:" + uuid.uuid4().hex[:8]
    settings = bench_settings(job.redis_url, prefix, mode.temporal, backlog=True)
    client = redis.Redis.from_url(job.redis_url)
    names = camera_names(job.cameras)
    templates = frame_templates(names, job.jpegs, job.frame_size)
    clock = Clock.of(backend.info.fps)
    first = steady_start(clock.slot(int(time.time() * 1000)) - frames_per_camera - 60, backend, mode)
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
        meter = CpuMeter({"worker": os.getpid(), "redis": job.redis_pid})
        deadline = time.monotonic() + max(120.0, 10 * job.duration)
        memory: dict[str, float] = {}
        desc = f"{job.backend}/{mode.temporal} drain"
        with (
            ThreadedWorker(settings, backend, mode) as tw,
            tqdm(total=total, desc=desc, unit="frame", disable=progress_off(job), leave=False) as bar,
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
            stages = tw.stages()  # from zero: all frames are read, decoded and stepped once
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
        "temporal": mode.temporal,
        "ema_frames": mode.hold,
        "cameras": job.cameras,
        "camera_frames": int(frames),
        "seconds": seconds,
        "camera_frames_per_second": rate,
        "model_steps_per_second": mode.per_slot * rate,
        "stage_ms_per_camera_frame": {s: 1e3 * stages[s] / total for s in STAGES},
        "states_per_round": stepped / max(rounds, 1),
        "cpu_cores": cpu,
        "cpu_ms_per_camera_frame": {k: 1e3 * v * seconds / frames for k, v in cpu.items()},
        "held_during_backlog": memory,
    }


# ---- one backend's process ----------------------------------------------------------------------


def _load(job: BackendJob, layout: tuple[int, int]) -> Backend:
    if job.backend == "litert":
        return load_stream_model(job.model, "litert", LiteRTOptions(*layout))
    return load_stream_model(job.model, "tfhub", TFHubOptions(tuple(job.batch_sizes)))


def _layout_name(job: BackendJob, backend: Backend, layout: tuple[int, int]) -> str:
    if job.backend == "litert":
        return f"{layout[0]} interpreter(s) x {layout[1]} thread(s)"
    sizes = getattr(backend, "batch_sizes", [])
    return f"batched by frame count, padded to {','.join(map(str, sizes))}"


def _baseline(job: BackendJob, backend: Backend) -> dict[str, Any]:
    """The tutorial's loop on the same restored object the TF backend calls."""
    meter = CpuMeter({"bench": os.getpid()})
    meter.start()
    model = getattr(backend, "model", None)
    tutorial = baseline(job.model, job.baseline_cameras, job.steps, job.warmup, model=model)
    return {**dataclasses.asdict(tutorial), "cameras": job.baseline_cameras, "cpu_cores": meter.stop()}


def run_backend(job: BackendJob) -> dict[str, Any]:
    """Baseline (TF's process only); model only at each layout in each mode; drain and live per mode.

    The layout kept is the one with the most model-only camera-frames/s in the first mode asked for.
    """
    result: dict[str, Any] = {"backend": job.backend, "model": job.model}
    warmed: set[int] = set()  # TF batch sizes the kept backend has run
    rows: list[dict[str, Any]] = []
    best: tuple[float, Backend, str] | None = None
    modes: list[Mode] = []
    for layout in job.layouts if job.backend == "litert" else [(0, 0)]:
        backend = _load(job, layout)
        name = _layout_name(job, backend, layout)
        try:
            modes = [mode_of(bench_settings(job.redis_url, "bench", t), backend) for t in job.temporal]
            if job.baseline_cameras:
                result["baseline"] = _baseline(job, backend)
            if job.baseline_only:
                backend.close()
                return {**result, "skip": True}
            warm_batches(backend, max(m.per_slot for m in modes) * job.cameras, warmed)
            mine = [model_only(backend, job.cameras, job.steps, job.warmup, m) for m in modes]
        except BaseException:
            backend.close()
            raise
        for row in mine:
            row.update(backend=job.backend, model=job.model, layout=name)
        rows += mine
        score = mine[0]["camera_frames_per_second"]
        if best is None or score > best[0]:
            if best is not None:
                best[1].close()
            best = (score, backend, name)
        else:
            backend.close()
    assert best is not None
    backend, chosen = best[1], best[2]
    for row in rows:
        row["best"] = row["layout"] == chosen
    result["model_only"] = rows
    result["modes"] = []
    try:
        result["state_bytes"] = state_bytes(backend)
        result["fps"] = float(backend.info.fps)
        for mode in modes:
            row = next(r for r in rows if r["best"] and r["temporal"] == mode.temporal)
            rate = row["camera_frames_per_second"]  # camera-frames/s the model alone allows
            frames_per_camera = max(20, math.ceil(job.duration * rate / job.cameras))
            e2e = drain(job, backend, frames_per_camera, chosen, mode)

            estimate = rate / backend.info.fps
            start = job.live_start or 2 ** max(0, math.floor(math.log2(max(1.0, estimate / 2))))
            lives = []
            for budget in job.latency_budgets:

                def trial(n: int, mode: Mode = mode, budget: float = budget) -> dict[str, Any]:
                    warm_batches(backend, mode.per_slot * n, warmed)
                    return live_trial(job, backend, n, mode, budget)

                label = f"{job.backend}/{mode.temporal} {budget:.0f} ms"
                live = live_search(job, trial, start, label)
                live.update(layout=chosen, temporal=mode.temporal, latency_budget_ms=budget)
                lives.append(live)
            result["modes"].append({"temporal": mode.temporal, "end_to_end": e2e, "live": lives})
    finally:
        backend.close()
    return result


def backend_process(job: BackendJob, results: Any) -> None:
    """Entry point of a backend's process: its result, or the error as text, goes on `results`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        results.put(run_backend(job))
    except BaseException:
        results.put({"backend": job.backend, "error": traceback.format_exc()})
