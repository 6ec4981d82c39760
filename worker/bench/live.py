"""Live capacity for `movinet-worker bench`: the most cameras one worker serves in real time.

N cameras are published at the model's rate by a separate process (capture time = now); a worker in
this process serves them in one temporal mode with a latency budget (`latency_budget_ms`: how long
its stepper may hold slots to batch more cameras), and every prediction's exact capture-to-publish
latency is recorded. A trial passes when p99 is under the budget and nearly every prediction due was
published; the search doubles N until a trial fails, then bisects. Every wait is bounded.

Each trial also records what sizing beyond one machine needs (`bench_sizing`): Redis's CPU, the bytes
through its network interface per camera-frame, and the memory one frame and one prediction entry
take in their streams.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import os
import queue
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
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
    progress_off,
    rss_bytes,
)
from worker.model.backends import Backend

# A live trial passes when p99 capture-to-publish is under its latency budget and the worker published
# at least this share of the predictions due (a worker that falls behind publishes fewer, and late).
LIVE_MIN_PUBLISHED = 0.95
# Live cameras are spread over a slot in this many phase groups, away from its edges, so publisher
# jitter does not move a frame into the next slot.
PHASE_GROUPS = 20
SLOT_MARGIN_S = 0.01
MEMORY_SNAPSHOTS = 3


def steady_start(slot: int, backend: Backend, mode: Mode) -> int:
    """The first slot at or after `slot` where cameras that start together are in steady state.

    Windows: the last slot before a window reset. A camera's two windows start together and stay
    equal (one batch for TF) until one of them is reset; in steady state they never are, so cameras
    start just before a reset. EMA: any slot (one state per camera, never reset).
    """
    if mode.hold is not None:
        return slot
    half = backend.info.clip_frames // 2
    return slot + (half - 1 - slot) % half


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


def redis_counters(client: Any) -> dict[str, float]:
    """Bytes Redis has received and sent so far, and the memory it uses."""
    stats, memory = client.info("stats"), client.info("memory")
    return {
        "net_in_bytes": float(stats.get("total_net_input_bytes", 0)),
        "net_out_bytes": float(stats.get("total_net_output_bytes", 0)),
        "used_memory": float(memory.get("used_memory", 0)),
    }


def entry_bytes(client: Any, key: str) -> float | None:
    """Redis memory per entry of one stream (MEMORY USAGE over every node, / XLEN); None if empty."""
    length = client.xlen(key)
    used = client.memory_usage(key, samples=0) if length else None
    return used / length if used else None


def live_trial(
    job: BackendJob, backend: Backend, cameras: int, mode: Mode, budget_ms: float
) -> dict[str, Any]:
    """One worker with a latency budget serving N live cameras; p99 capture-to-publish over a window
    after a warm-up."""
    ctx = mp.get_context("spawn")
    prefix = "bench:live:" + uuid.uuid4().hex[:8]
    settings = bench_settings(job.redis_url, prefix, mode.temporal, budget_ms)
    client = redis.Redis.from_url(job.redis_url)
    fps = backend.info.fps
    stop, results = ctx.Event(), ctx.Queue()
    total_seconds = job.live_warmup + job.duration + 30
    first_slot = steady_start(math.floor((time.time() + 1.0) * fps), backend, mode)
    feed = LiveFeed(
        job.redis_url, settings.frames_key, cameras, fps, job.jpegs, job.frame_size, total_seconds, first_slot
    )
    publisher = ctx.Process(
        target=publish_live, args=(feed, stop, results), name="bench-publisher", daemon=True
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
        with ThreadedWorker(settings, backend, mode) as tw:
            time.sleep(job.live_warmup)
            published0 = tw.value("movinet_predictions_published_total")
            stages0, rounds0 = tw.stages(), tw.rounds()
            begin_ms = time.time_ns() // 1_000_000
            counters0 = redis_counters(client)
            meter.start()
            memory: dict[str, float] = {}
            for _ in range(MEMORY_SNAPSHOTS):  # the largest of a few: resets come and go
                time.sleep(job.duration / MEMORY_SNAPSHOTS)
                held = tw.call(held_per_camera)
                if held["state_bytes_per_camera"] >= memory.get("state_bytes_per_camera", -1.0):
                    memory = held
            cpu = meter.stop()
            end_ms = time.time_ns() // 1_000_000
            counters1 = redis_counters(client)
            name = camera_names(1)[0]
            stored = {
                "frame_entry_bytes": entry_bytes(client, settings.frames_stream(name)),
                "prediction_entry_bytes": entry_bytes(client, settings.predictions_stream(name)),
                "checkpoint_bytes": client.memory_usage(settings.checkpoint(name), samples=0),
            }
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
    frames = max(published, 1)
    return {
        "temporal": mode.temporal,
        "latency_budget_ms": budget_ms,
        "cameras": cameras,
        "seconds": window,
        "predictions_due": due,
        "predictions_published": published,
        "p50_ms": float(np.percentile(samples, 50)) if samples else math.inf,
        "p99_ms": p99,
        "max_ms": float(max(samples)) if samples else math.inf,
        "sustained": bool(p99 < budget_ms and published >= LIVE_MIN_PUBLISHED * due),
        "cpu_cores": cpu,
        "stage_ms_per_camera_frame": {s: 1e3 * (stages1[s] - stages0[s]) / max(published, 1) for s in STAGES},
        "states_per_round": (rounds1[1] - rounds0[1]) / max(rounds1[0] - rounds0[0], 1),
        "frames_dropped": dropped,
        "frames_repeated": repeated,
        "publisher": sent,
        "held": memory,
        "rss_delta_per_camera": (rss - rss0) / cameras,
        "redis": {
            "net_in_bytes_per_camera_frame": (counters1["net_in_bytes"] - counters0["net_in_bytes"]) / frames,
            "net_out_bytes_per_camera_frame": (counters1["net_out_bytes"] - counters0["net_out_bytes"])
            / frames,
            "cpu_ms_per_camera_frame": 1e3 * cpu.get("redis", 0.0) * window / frames,
            "used_memory": counters1["used_memory"],
            **stored,
        },
    }


def live_search(
    job: BackendJob, trial: Callable[[int], dict[str, Any]], start: int, label: str = ""
) -> dict[str, Any]:
    """The largest N sustained: double from `start` until a trial fails, then bisect; within the budget."""
    from tqdm import tqdm

    deadline = time.monotonic() + job.live_budget
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    worst: dict[str, Any] | None = None  # the smallest N that failed
    n = max(1, min(start, job.live_max))
    desc = f"{label or job.backend} live"
    with tqdm(desc=desc, unit="trial", disable=progress_off(job), leave=False) as bar:
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
