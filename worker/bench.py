"""`movinet-worker bench`: the tutorial's loop, the model alone, and the whole worker, in one run.

One command on one machine measures, for each backend:

1. baseline: the TF Hub object called frame by frame, batch 1, camera after camera (the tutorial);
2. model only: `Backend.step` over one worker round of N cameras (LiteRT at its best layout);
3. end to end: a private Redis preloaded with N cameras' JPEG frames, one worker draining it;
4. live: N cameras published at the model's rate in real time; the largest N with p99
   capture-to-publish under one slot (200 ms at 5 fps);
5. where the time goes per camera-frame, CPU of the worker, Redis and the publishers, and the memory
   the worker holds per camera.

Units: a camera-frame is one camera's frame on one slot, i.e. one prediction. The worker steps two
window states per camera-frame (two model steps); the tutorial steps one state per camera-frame. Both
are reported; ratios compare the same unit on both sides.

Each backend runs in a process of its own (a LiteRT worker never loads TensorFlow, whose presence
slows LiteRT down), one after the other, against one private `redis-server` on a free loopback port.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import queue
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from worker.bench_model import machine
from worker.bench_worker import LIVE_P99_LIMIT_MS, STAGES, BackendJob, backend_process

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
# The targets (A0 at 172x172 on the project's 2-core machine).
TARGET_E2E_SHARE = 0.8
TARGET_X_BASELINE = {"tfhub": 5.0, "litert": 12.0}
TARGET_LIVE_CAMERAS = {"tfhub": 20, "litert": 100}
TARGET_MEMORY_X_STATE = 2.5
STEPPER_STAGES = ("state", "convert", "model", "publish")  # one after the other in each round
SYNTHETIC_FRAMES = 16
SOURCE_FRAMES = 64


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        interpreters, _, threads = item.strip().partition("x")
        out.append((int(interpreters), int(threads or 1)))
    return out


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
        "--cameras", type=int, default=32, help="N for model only and end to end (default 32)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds: the drain is sized to about this long, and each live trial measures this long",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed model steps (median) per setting")
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
        "--live-budget", type=float, default=180.0, help="seconds of live trials per backend (default 180)"
    )
    parser.add_argument(
        "--live-warmup", type=float, default=4.0, help="seconds each live trial runs before measuring"
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
    parser.add_argument("--json", dest="json_path", help="also write every figure to this JSON file")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI: 2 cameras, short runs, one live trial; checks that the bench runs, not a speed",
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
    from worker.codec import encode_jpeg

    if source is None:
        images = synthetic_images(SYNTHETIC_FRAMES, size)
    else:
        from worker.video import read_frames

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
    """Generous: loading and tracing, every model-only setting, the drain, and the live budget."""
    trial = job.live_warmup + job.duration + 60
    return 600 + 20 * job.duration + job.live_budget + 2 * trial


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
            "model_step": "one state stepped by one frame; the worker steps 2 per camera-frame "
            "(two windows), the tutorial's loop 1",
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
            baseline_cameras=args.baseline_cameras if name == "tfhub" else 0,
            live_start=args.live_start,
            live_max=args.live_max,
            live_budget=args.live_budget,
            live_warmup=args.live_warmup,
            progress=False if args.no_progress else None,
        )
        job.baseline_only = name not in backends
        merge(doc, run_job(job, job_timeout(job)))
    doc["targets"] = targets(doc)
    return doc


def merge(doc: dict[str, Any], result: dict[str, Any]) -> None:
    """File one backend's result into the report's sections, with the ratios between them."""
    backend = result["backend"]
    if "error" in result:
        doc["errors"].append({"backend": backend, "error": result["error"]})
        return
    if result.get("baseline"):
        row = result["baseline"]
        doc["baseline"] = {
            "backend": "tutorial",
            "model": row["model"],
            "layout": row["layout"],
            "cameras": row["cameras"],
            "camera_frames_per_second": row["frames_per_second"],
            "model_steps_per_second": row["frames_per_second"],
            "cpu_cores": row["cpu_cores"],
        }
    if result.get("skip"):
        return
    base = doc["baseline"]
    best = next(r for r in result["model_only"] if r["best"])
    for row in result["model_only"]:
        doc["model_only"].append(_with_baseline(row, base))
    e2e = _with_baseline(result["end_to_end"], base)
    e2e["share_of_model_only"] = e2e["model_steps_per_second"] / best["model_steps_per_second"]
    e2e["model_only_model_steps_per_second"] = best["model_steps_per_second"]
    doc["end_to_end"].append(e2e)
    live = result["live"]
    doc["live"].append({"backend": backend, "model": result["model"], **live})
    seconds_per_frame = 1.0 / e2e["camera_frames_per_second"]
    stages = e2e["stage_ms_per_camera_frame"]
    model_only_ms = 2e3 / best["model_steps_per_second"]
    doc["breakdown"].append(
        {
            "backend": backend,
            "source": f"drain, {e2e['cameras']} cameras",
            "wall_ms_per_camera_frame": 1e3 * seconds_per_frame,
            "stage_ms_per_camera_frame": stages,
            "stepper_ms_per_camera_frame": sum(stages[s] for s in STEPPER_STAGES),
            "states_per_round": e2e["states_per_round"],
            "cpu_ms_per_camera_frame": e2e["cpu_ms_per_camera_frame"],
            "model_only_ms_per_camera_frame": model_only_ms,
        }
    )
    at_max = live.get("at_max") or {}
    if at_max:
        stages = at_max["stage_ms_per_camera_frame"]
        frames = max(at_max["predictions_published"], 1)
        doc["breakdown"].append(
            {
                "backend": backend,
                "source": f"live, {at_max['cameras']} cameras",
                "wall_ms_per_camera_frame": 1e3 * at_max["seconds"] / frames,
                "stage_ms_per_camera_frame": stages,
                "stepper_ms_per_camera_frame": sum(stages[s] for s in STEPPER_STAGES),
                "states_per_round": at_max["states_per_round"],
                "cpu_ms_per_camera_frame": {
                    k: 1e3 * v * at_max["seconds"] / frames for k, v in at_max["cpu_cores"].items()
                },
                "model_only_ms_per_camera_frame": model_only_ms,
            }
        )
    held = at_max.get("held") or e2e.get("held_during_backlog") or {}
    state = result["state_bytes"]
    doc["memory"].append(
        {
            "backend": backend,
            "measured": f"live, {at_max['cameras']} cameras" if at_max else "end to end backlog",
            "state_bytes": state,
            "state_bytes_per_camera": held.get("state_bytes_per_camera", 0.0),
            "image_bytes_per_camera": held.get("image_bytes_per_camera", 0.0),
            "x_state": (held.get("state_bytes_per_camera", 0.0) + held.get("image_bytes_per_camera", 0.0))
            / state,
            "rss_delta_per_camera": at_max.get("rss_delta_per_camera"),
            "backlog": e2e.get("held_during_backlog"),
        }
    )


def _with_baseline(row: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(row)
    if base:
        out["x_baseline_camera_frames"] = row["camera_frames_per_second"] / base["camera_frames_per_second"]
        out["x_baseline_model_steps"] = row["model_steps_per_second"] / base["model_steps_per_second"]
    return out


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, target: float, measured: float | None, higher: bool = True) -> None:
        met = measured is not None and (measured >= target if higher else measured <= target)
        out.append({"target": name, "wanted": target, "measured": measured, "met": met})

    for e2e in doc["end_to_end"]:
        b = e2e["backend"]
        add(f"{b}: end to end / model only (model steps/s)", TARGET_E2E_SHARE, e2e["share_of_model_only"])
        if b in TARGET_X_BASELINE:
            add(
                f"{b}: end to end x baseline (camera-frames/s)",
                TARGET_X_BASELINE[b],
                e2e.get("x_baseline_camera_frames"),
            )
    for live in doc["live"]:
        b = live["backend"]
        add(
            f"{b}: live cameras at 5 fps, p99 < {LIVE_P99_LIMIT_MS:.0f} ms",
            TARGET_LIVE_CAMERAS.get(b, 0),
            live["max_cameras"],
        )
    for mem in doc["memory"]:
        add(
            f"{mem['backend']}: memory held per camera (x one state)",
            TARGET_MEMORY_X_STATE,
            mem["x_state"],
            False,
        )
    return out


# ---- the report ---------------------------------------------------------------------------------


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)) for line in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def format_report(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    out = [
        f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; redis-server "
        f"{doc['redis']['version']} at {doc['redis']['url']} (private); "
        f"frames: {doc['frames']['count']} JPEGs of {doc['frames']['mean_jpeg_bytes'] / 1e3:.1f} kB",
        "camera-frame = one camera's frame on one slot (one prediction); the worker steps 2 window "
        "states per camera-frame, the tutorial 1",
        "",
        "1-3. throughput",
    ]
    rows: list[Sequence[str]] = []
    sections = [("baseline", [doc["baseline"]] if doc["baseline"] else [])]
    sections += [("model only", doc["model_only"]), ("end to end", doc["end_to_end"])]
    for section, items in sections:
        for r in items:
            mark = " *" if r.get("best") else ""
            rows.append(
                (
                    section,
                    r["backend"],
                    Path(r["model"]).name or r["model"],
                    r["layout"] + mark,
                    str(r["cameras"]),
                    _f(r["camera_frames_per_second"]),
                    _f(r["model_steps_per_second"]),
                    _f(r.get("x_baseline_camera_frames"), 2) if section != "baseline" else "1.00",
                    _f(r.get("x_baseline_model_steps"), 2) if section != "baseline" else "1.00",
                    _pct(r.get("share_of_model_only")),
                    _pct(r.get("cpu_cores", {}).get("other")),
                )
            )
    head: Sequence[str] = (
        "section",
        "backend",
        "model",
        "layout (* best)",
        "cameras",
        "camera-frames/s",
        "model steps/s",
        "x base (frames)",
        "x base (steps)",
        "e2e/model-only",
        "other CPU",
    )
    out += [_table(head, rows), "(other CPU: what the rest of the machine took meanwhile, 100% = a core)", ""]

    out.append(
        f"4. live: N cameras at 5 fps in real time, p99 capture-to-publish < {LIVE_P99_LIMIT_MS:.0f} ms"
    )
    rows = []
    for live in doc["live"]:
        at = live.get("at_max") or {}
        cpu = at.get("cpu_cores", {})
        trials = " ".join(
            f"{t['cameras']}:{_f(t['p99_ms'], 0)}{'' if t['sustained'] else '!'}" for t in live["trials"]
        )
        rows.append(
            (
                live["backend"],
                str(live["max_cameras"]),
                str(live["first_failing"] or "-"),
                _f(at.get("p50_ms"), 0),
                _f(at.get("p99_ms"), 0),
                _pct(cpu.get("worker")),
                _pct(cpu.get("redis")),
                _pct(cpu.get("publisher")),
                _pct(cpu.get("other")),
                trials,
            )
        )
    head = (
        "backend",
        "max N",
        "fails at",
        "p50 ms",
        "p99 ms",
        "worker CPU",
        "redis CPU",
        "publishers CPU",
        "other CPU",
        "trials (N:p99 ms, ! = not sustained)",
    )
    out += [
        _table(head, rows),
        "(CPU at max N, as a share of one core, 200% = both; other = the rest of the machine meanwhile)",
        "",
    ]

    out.append("5. where the time goes: ms per camera-frame (wall time in each stage)")
    rows = []
    for b in doc["breakdown"]:
        stages = b["stage_ms_per_camera_frame"]
        cpu = b["cpu_ms_per_camera_frame"]
        rows.append(
            (
                b["backend"],
                b["source"],
                *(_f(stages[s], 2) for s in STAGES),
                _f(b["stepper_ms_per_camera_frame"], 2),
                _f(b["model_only_ms_per_camera_frame"], 2),
                _f(b["wall_ms_per_camera_frame"], 2),
                _f(b["states_per_round"], 1),
                _f(cpu.get("worker"), 2),
                _f(cpu.get("redis"), 2),
                _f(cpu.get("publisher"), 2),
                _f(cpu.get("other"), 2),
            )
        )
    head = (
        "backend",
        "run",
        *STAGES,
        "stepper",
        "model only",
        "wall",
        "states/round",
        "worker CPU",
        "redis CPU",
        "publishers CPU",
        "other CPU",
    )
    out += [
        _table(head, rows),
        "(stepper = state + convert + model + publish, one after the other each round; redis_read and "
        "decode run beside it on the event loop; model only = the same step alone; wall = 1 / rate; "
        "CPU in ms per camera-frame; in live runs redis_read also holds the wait for the next frame, "
        "XREAD blocking until one arrives)",
        "",
    ]

    out.append("memory held per camera")
    rows = [
        (
            mem["backend"],
            mem["measured"],
            f"{mem['state_bytes'] / 1e6:.2f}",
            f"{mem['state_bytes_per_camera'] / 1e6:.2f}",
            f"{mem['image_bytes_per_camera'] / 1e6:.2f}",
            _f(mem["x_state"], 2),
        )
        for mem in doc["memory"]
    ]
    head = ("backend", "measured", "one state MB", "states MB", "images MB", "x one state")
    out += [
        _table(head, rows),
        "(between rounds; during a step a stepped camera's new states exist beside its old ones)",
        "",
    ]

    out.append("targets")
    rows = [
        (t["target"], _f(t["wanted"], 2), _f(t["measured"], 2), "met" if t["met"] else "MISSED")
        for t in doc["targets"]
    ]
    out.append(_table(("target", "wanted", "measured", ""), rows))
    for err in doc["errors"]:
        out += ["", f"{err['backend']} FAILED:", err["error"]]
    return "\n".join(out)


def _finite(value: Any) -> Any:
    """JSON has no infinity: a p99 that could not be measured is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def cmd_bench(args: argparse.Namespace) -> int:
    from worker.demo import local_redis

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
        Path(args.json_path).write_text(json.dumps(_finite(doc), indent=2, default=str) + "\n")
    return 1 if doc["errors"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="movinet-worker bench", description=__doc__)
    add_bench_arguments(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
