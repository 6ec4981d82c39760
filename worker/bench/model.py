"""`movinet-worker bench-model`: model-only speed per backend and batch, against the tutorial's loop.

Every figure comes from one process on one machine, so the ratios against the baseline (the TF Hub
object called with batch 1 for one camera after another, as the tutorial does) are fair.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from worker.model.backends import Backend, LiteRTOptions, TFHubOptions, load_stream_model


@dataclasses.dataclass
class Row:
    backend: str
    model: str
    layout: str
    batch: int
    ms_per_frame: float
    frames_per_second: float
    vs_baseline: float | None = None


def _frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, height, width, 3), dtype=np.float32)


def _time_steps(step: Callable[[], None], steps: int, warmup: int) -> float:
    """Median seconds of one call of `step`, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def baseline(handle: str, cameras: int, steps: int, warmup: int, model: Any = None) -> Row:
    """The tutorial's loop: `model({**states, 'image': frame})`, batch 1, camera after camera.

    `model` is the object `hub.load(handle)` returned, when the caller has it already.
    """
    import tensorflow as tf

    from worker.model.backends.tfhub import load_saved_model

    model = model if model is not None else load_saved_model(handle)
    spec = model.signatures["call"].structured_input_signature[1]["image"]
    height, width = spec.shape[2] or 172, spec.shape[3] or 172
    frames = _frames(cameras, height, width)
    states = [model.init_states(tf.constant([1, 1, height, width, 3])) for _ in range(cameras)]

    def step() -> None:
        for cam in range(cameras):
            _, states[cam] = model({**states[cam], "image": tf.constant(frames[cam : cam + 1])})

    per_frame = _time_steps(step, steps, warmup) / cameras
    return Row("tutorial", handle, "batch 1, camera by camera", 1, per_frame * 1e3, 1 / per_frame)


def bench_backend(
    backend: Backend, batches: Sequence[int], steps: int, warmup: int, layout: str
) -> list[Row]:
    rows = []
    info = backend.info
    for batch in batches:
        frames = _frames(batch, info.height, info.width, seed=batch)
        states = [backend.init_state() for _ in range(batch)]

        def step(frames: np.ndarray = frames) -> None:
            nonlocal states
            _, states = backend.step(frames, states)

        per_frame = _time_steps(step, steps, warmup) / batch
        rows.append(Row(backend.name, info.source, layout, batch, per_frame * 1e3, 1 / per_frame))
    return rows


def run(
    *,
    tf_models: Sequence[str],
    tflite_models: Sequence[str],
    batches: Sequence[int],
    steps: int,
    warmup: int,
    baseline_cameras: int,
    layouts: Sequence[tuple[int, int]],
    progress: bool | None = None,
) -> list[Row]:
    from tqdm import tqdm

    jobs: list[tuple[str, Callable[[], list[Row]]]] = []
    if tf_models:
        jobs.append(("baseline", lambda: [baseline(tf_models[0], baseline_cameras, steps, warmup)]))
    for handle in tf_models:

        def tf_job(handle: str = handle) -> list[Row]:
            backend = load_stream_model(handle, "tfhub", TFHubOptions(tuple(sorted(set(batches)))))
            return bench_backend(backend, batches, steps, warmup, "one batched call")

        jobs.append((f"tfhub {handle}", tf_job))
    for path in tflite_models:
        for interpreters, threads in layouts:

            def lite_job(
                path: str = path, interpreters: int = interpreters, threads: int = threads
            ) -> list[Row]:
                backend = load_stream_model(path, "litert", LiteRTOptions(interpreters, threads))
                try:
                    layout = f"{interpreters} interpreter(s) x {threads} thread(s)"
                    return bench_backend(backend, batches, steps, warmup, layout)
                finally:
                    backend.close()

            jobs.append((f"litert {path} {interpreters}x{threads}", lite_job))
    rows: list[Row] = []
    with tqdm(jobs, unit="config", disable=None if progress is None else not progress) as bar:
        for label, job in bar:
            bar.set_description(label[-50:])
            rows.extend(job())
    base = next((r for r in rows if r.backend == "tutorial"), None)
    for row in rows:
        row.vs_baseline = row.frames_per_second / base.frames_per_second if base else None
    return rows


# The CPU features int8 and fp32 inference speed depends on most, as /proc/cpuinfo spells them.
VECTOR_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI"}


def vector_extensions(flags: set[str]) -> dict[str, bool]:
    """Which of `VECTOR_FLAGS` a CPU has, by display name, from its /proc/cpuinfo `flags`."""
    return {name: flag in flags for flag, name in VECTOR_FLAGS.items()}


def machine() -> dict[str, Any]:
    cpu = ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "vector_extensions": vector_extensions(flags),
    }


def describe_vectors(m: dict[str, Any]) -> str:
    """`AVX2 yes, AVX-512F no, ...` for a machine line (`-` when the JSON is older than the field)."""
    found = m.get("vector_extensions") or {}
    return ", ".join(f"{name} {'yes' if has else 'no'}" for name, has in found.items()) or "-"


def format_table(rows: Sequence[Row]) -> str:
    head = ("backend", "model", "layout", "batch", "ms/frame", "frames/s", "x baseline")
    body = [
        (
            r.backend,
            Path(r.model).name or r.model,
            r.layout,
            str(r.batch),
            f"{r.ms_per_frame:.2f}",
            f"{r.frames_per_second:.0f}",
            f"{r.vs_baseline:.1f}" if r.vs_baseline else "-",
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str, rows: Sequence[Row], settings: dict[str, Any]) -> None:
    doc = {"machine": machine(), "settings": settings, "rows": [dataclasses.asdict(r) for r in rows]}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
