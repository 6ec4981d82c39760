"""`movinet-worker bench`: the tutorial's loop, the model alone, and the whole worker, in one run.

One command on one machine measures, for each backend and each temporal mode (--temporal):

1. baseline: the TF Hub object called frame by frame, batch 1, camera after camera (the tutorial);
2. model only: `Backend.step` over one worker round of N cameras (LiteRT at its best layout);
3. end to end: a private Redis preloaded with N cameras' JPEG frames, one worker draining it;
4. live: N cameras published at the model's rate in real time; at each latency budget (200 ms and
   1 s: the worker's --latency-budget, within which its stepper holds slots to batch more cameras)
   the largest N with p99 capture-to-publish under the budget, and the live efficiency
   (N x fps / model-only camera-frames/s);
5. where the time goes per camera-frame, CPU of the worker, Redis and the publishers, and the memory
   the worker holds per camera.

Temporal modes: "windows" keeps two staggered window states per camera (two model steps per
camera-frame, of two frame counts); "ema" keeps one state per camera held at c frames (one step per
camera-frame; all cameras share the frame count, so TF steps them in one batch).

Units: a camera-frame is one camera's frame on one slot, i.e. one prediction; a model step is one
state stepped by one frame (2 per camera-frame in windows mode, 1 in ema mode and in the tutorial).
Both are reported; ratios compare the same unit on both sides.

Each backend runs in a process of its own (a LiteRT worker never loads TensorFlow, whose presence
slows LiteRT down), one after the other, against one private `redis-server` on a free loopback port.
Modules: this one (options, running), `bench_worker` (a backend's process: model only, drain),
`bench_live` (live trials and search), `bench_harness` (meters, a worker in a thread),
`bench_report` (sections, targets, tables), `bench_sizing` (`--sizing`: workers and Redis shards
for many cameras from a bench JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import queue
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from worker.bench.harness import TEMPORAL_MODES, BackendJob, Temporal
from worker.bench.model import machine
from worker.bench.report import finite, format_report, merge, targets
from worker.bench.worker import backend_process
from worker.options import alias

QUICK = {
    "cameras": 2,
    "duration": 2.0,
    "steps": 2,
    "warmup": 1,
    "baseline_cameras": 1,
    "live_start": 1,
    "live_max": 2,
    "live_budget": 1.0,
    "live_warmup": 2.0,
}
SYNTHETIC_FRAMES = 16
SOURCE_FRAMES = 64


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _budgets(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected a comma list of milliseconds > 0, got {text!r}")
    return sorted(set(values))


def _layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        interpreters, _, threads = item.strip().partition("x")
        out.append((int(interpreters), int(threads or 1)))
    return out


def _temporal(text: str) -> list[Temporal]:
    modes: list[Temporal] = []
    for item in text.split(","):
        mode = next((m for m in TEMPORAL_MODES if m == item.strip()), None)
        if mode is None:
            raise argparse.ArgumentTypeError(f"expected a comma list of windows, ema; got {text!r}")
        if mode not in modes:
            modes.append(mode)
    return modes


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    if not (height.isdigit() and width.isdigit()):
        raise argparse.ArgumentTypeError(f"expected HxW such as 172x172, got {text!r}")
    return int(height), int(width)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tf-model", help="stream SavedModel folder or handle: the baseline and the tfhub backend"
    )
    parser.add_argument("--tflite", help="TFLite stream model: the litert backend")
    parser.add_argument(
        "--backend",
        action="append",
        choices=("tfhub", "litert"),
        help="backends to measure (repeatable; default: each one given a model; the baseline runs "
        "with --tf-model whatever this says)",
    )
    parser.add_argument(
        "--temporal",
        type=_temporal,
        default=list(TEMPORAL_MODES),
        metavar="MODES",
        help="temporal modes to measure, comma list (default windows,ema): 'windows' = two window "
        "states per camera, 2 model steps per camera-frame; 'ema' = one state held at window/2 frames, "
        "1 step. Every section is measured in each; the LiteRT layout is chosen by the first one",
    )
    parser.add_argument(
        "--cameras", type=int, default=32, help="N for model only and end to end (default 32)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds: the drain is sized to about this long, and each live trial measures this long",
    )
    parser.add_argument("--steps", type=int, default=30, help="timed model steps (median) per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed model steps first")
    parser.add_argument("--baseline-cameras", type=int, default=4, help="cameras in the tutorial's loop")
    parser.add_argument(
        "--layouts",
        type=_layouts,
        default=[(1, 1), (1, 2), (2, 1)],
        help="LiteRT interpreters x threads each to try; the best is used end to end (default 1x1,1x2,2x1)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=[1, 2, 4, 8, 16, 32, 64],
        help="TF backend: padded batch sizes, as the worker's --batch-sizes (default 1,2,...,64)",
    )
    parser.add_argument(
        "--live-start", type=int, default=0, help="first N of the live search (default: from model only)"
    )
    parser.add_argument("--live-max", type=int, default=256, help="largest N the live search tries")
    parser.add_argument(
        "--live-budget",
        type=float,
        default=180.0,
        help="seconds of live trials per backend, temporal mode and latency budget (default 180)",
    )
    parser.add_argument(
        "--live-warmup", type=float, default=4.0, help="seconds each live trial runs before measuring"
    )
    parser.add_argument(
        "--latency-budgets",
        type=_budgets,
        default=[200.0, 1000.0],
        metavar="MS",
        help="live capacity is searched at each of these worker latency budgets, comma list in ms "
        "(default 200,1000); a trial passes with p99 capture-to-publish under its budget",
    )
    parser.add_argument(
        "--sizing",
        metavar="BENCH_JSON",
        help="print workers and Redis Cluster shards for --sizing-cameras from a bench JSON "
        "(--json-out of an earlier run) and exit; no model needed (docs/capacity.md)",
    )
    parser.add_argument(
        "--sizing-cameras", type=_int_list, default=[1000, 10_000], help="camera counts --sizing plans for"
    )
    parser.add_argument(
        "--sizing-fps", type=float, default=5.0, help="frames/s per camera --sizing plans for"
    )
    parser.add_argument(
        "--source",
        help="video whose frames the cameras publish (default: synthetic frames); e.g. a clip in "
        "../shared/assets/videos",
    )
    parser.add_argument(
        "--frame-size",
        type=_size,
        default=(172, 172),
        metavar="HxW",
        help="size of the published JPEGs (default 172x172, as `publish`)",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of published frames")
    parser.add_argument(
        "--json-out", dest="json_path", metavar="FILE", help="also write every figure to this JSON file"
    )
    alias(parser, "json_path", "--json")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI: 2 cameras, short runs, one live trial per backend and mode; checks that the bench runs, "
        "not a speed",
    )
    parser.add_argument("--no-progress", action="store_true", help="never show progress bars")


# ---- frames -------------------------------------------------------------------------------------


def synthetic_images(count: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """A moving disc over a gradient with sensor-like noise: JPEGs of a camera's typical size."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (h + w) * 255], -1)
    images = []
    for i in range(count):
        angle = 2 * math.pi * i / count
        cy, cx = h / 2 + h / 4 * math.sin(angle), w / 2 + w / 4 * math.cos(angle)
        image = base.copy()
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < (min(h, w) / 6) ** 2] = (220, 60, 40)
        image += rng.normal(0, 4, image.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def jpeg_frames(source: str | None, size: tuple[int, int], quality: int) -> list[bytes]:
    from worker.pipeline.codec import encode_jpeg

    if source is None:
        images = synthetic_images(SYNTHETIC_FRAMES, size)
    else:
        from worker.tools.video import read_frames

        images = []
        for frame in read_frames(source, size, None):
            images.append(frame.image)
            if len(images) >= SOURCE_FRAMES:
                break
        if not images:
            raise SystemExit(f"bench: no frames in {source}")
    return [encode_jpeg(image, quality) for image in images]


# ---- running ------------------------------------------------------------------------------------


def run_job(job: BackendJob, timeout: float) -> dict[str, Any]:
    """One backend in a fresh process; its result, or an error entry if it failed or ran out of time."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=backend_process, args=(job, results), name=f"bench-{job.backend}")
    proc.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                result: dict[str, Any] = results.get(timeout=1.0)
                return result
            except queue.Empty:
                if not proc.is_alive():
                    return {"backend": job.backend, "error": f"process exited with {proc.exitcode}"}
                if time.monotonic() > deadline:
                    return {"backend": job.backend, "error": f"no result within {timeout:.0f} s"}
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
            proc.join(10)


def job_timeout(job: BackendJob) -> float:
    """Generous: loading and tracing, every model-only setting, and per mode the drain and live budget."""
    trial = job.live_warmup + job.duration + 60
    live = len(job.latency_budgets) * (job.live_budget + 2 * trial)
    return 600 + len(job.temporal) * (20 * job.duration + live)


def collect(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(redis_url)
    info = client.info("server")
    client.close()
    jpegs = jpeg_frames(args.source, args.frame_size, args.quality)
    backends = args.backend or [b for b, m in (("tfhub", args.tf_model), ("litert", args.tflite)) if m]
    doc: dict[str, Any] = {
        "machine": machine(),
        "redis": {"version": info.get("redis_version"), "url": redis_url},
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "frames": {"count": len(jpegs), "mean_jpeg_bytes": sum(map(len, jpegs)) / len(jpegs)},
        "units": {
            "camera_frame": "one camera's frame on one slot: one prediction",
            "model_step": "one state stepped by one frame; the worker steps 2 per camera-frame in "
            "windows mode (two window states), 1 in ema mode (one state), the tutorial's loop 1",
            "temporal": "every row but the baseline's is of one temporal mode: windows or ema",
            "ratios": "same unit on both sides",
        },
        "baseline": None,
        "model_only": [],
        "end_to_end": [],
        "live": [],
        "breakdown": [],
        "memory": [],
        "errors": [],
    }
    for name in ("tfhub", "litert"):
        model = args.tf_model if name == "tfhub" else args.tflite
        wants_baseline = name == "tfhub" and args.tf_model
        if not model or (name not in backends and not wants_baseline):
            continue
        job = BackendJob(
            backend=name,
            model=model,
            redis_url=redis_url,
            redis_pid=int(info["process_id"]),
            cameras=args.cameras,
            duration=args.duration,
            steps=args.steps,
            warmup=args.warmup,
            jpegs=jpegs,
            frame_size=args.frame_size,
            layouts=args.layouts,
            batch_sizes=args.batch_sizes,
            temporal=args.temporal,
            baseline_cameras=args.baseline_cameras if name == "tfhub" else 0,
            live_start=args.live_start,
            live_max=args.live_max,
            live_budget=args.live_budget,
            live_warmup=args.live_warmup,
            latency_budgets=args.latency_budgets,
            progress=False if args.no_progress else None,
        )
        job.baseline_only = name not in backends
        merge(doc, run_job(job, job_timeout(job)))
    doc["targets"] = targets(doc)
    return doc


def cmd_bench(args: argparse.Namespace) -> int:
    from worker.testing import local_redis

    if args.sizing:
        from worker.bench.sizing import print_sizing

        return print_sizing(args.sizing, args.sizing_cameras, args.sizing_fps)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.layouts = args.layouts[:1]
    if not args.tf_model and not args.tflite:
        raise SystemExit("bench needs --tf-model and/or --tflite")
    started = time.monotonic()
    with local_redis() as url:
        doc = collect(args, url)
    doc["seconds"] = time.monotonic() - started
    print(format_report(doc))
    print(f"(bench took {doc['seconds']:.0f} s)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(finite(doc), indent=2, default=str) + "\n")
    for err in doc["errors"]:  # also where a caller that keeps only stderr sees it
        print(f"bench: {err['backend']} failed: {err['error']}", file=sys.stderr)
    return 1 if doc["errors"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="movinet-worker bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_bench_arguments(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
