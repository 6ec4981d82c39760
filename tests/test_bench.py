"""`movinet-worker bench --quick`: every section measured and reported, both backends, both modes.

The quick mode checks that the bench runs end to end (a private redis-server, a worker per backend,
live publishers), not a speed; the speeds come from a full run on the project's machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Models, run_cli
from worker.bench.harness import STAGES, BackendJob, Mode
from worker.bench.live import live_search, steady_start
from worker.bench.main import _budgets, _temporal
from worker.bench.model import vector_extensions
from worker.bench.sizing import size, sizing_table

SECTIONS = ("baseline", "model_only", "end_to_end", "live", "breakdown", "memory", "targets")
PAIRS = {(b, t) for b in ("tfhub", "litert") for t in ("windows", "ema")}
STEPS_PER_CAMERA_FRAME = {"windows": 2, "ema": 1}
STATES_PER_CAMERA = {"windows": 2.0, "ema": 1.0}
BUDGETS = [200.0, 1000.0]
VECTORS = {"AVX2", "AVX-512F", "AVX-512 VNNI", "AVX-VNNI"}


def test_quick_bench_measures_every_section_for_both_backends_and_modes(
    models: Models, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    proc = run_cli(
        *("bench", "--quick", "--no-progress", "--json", str(out)),
        *("--tf-model", str(models.stream), "--tflite", str(models.tflite)),
        timeout=450,
    )
    for heading in ("1-3. throughput", "4. live", "5. where the time goes", "memory held", "targets"):
        assert heading in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["errors"] == []
    # The machine line and the JSON name the CPU's vector extensions, as /proc/cpuinfo has them.
    flags = set(
        next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        .split(":")[1]
        .split()
    )
    has = doc["machine"]["vector_extensions"]
    assert (
        set(has) == VECTORS and has["AVX2"] == ("avx2" in flags) and has["AVX-512F"] == ("avx512f" in flags)
    )
    machine_line = proc.stdout.splitlines()[0]
    assert f"AVX2 {'yes' if has['AVX2'] else 'no'}, AVX-512F" in machine_line
    assert doc["settings"]["temporal"] == ["windows", "ema"]  # the default: both modes
    for section in SECTIONS:
        assert doc[section], f"section {section} is empty"
    assert doc["baseline"]["backend"] == "tutorial" and doc["baseline"]["camera_frames_per_second"] > 0
    for section in ("model_only", "end_to_end", "live", "breakdown", "memory"):
        assert {(row["backend"], row["temporal"]) for row in doc[section]} == PAIRS, section
    for section in ("end_to_end", "memory"):  # one row per backend and mode
        assert len(doc[section]) == len(PAIRS), section
    # Live: one row per backend, mode and latency budget (200 ms and 1 s by default).
    assert sorted((r["backend"], r["temporal"], r["latency_budget_ms"]) for r in doc["live"]) == sorted(
        (b, t, budget) for b, t in PAIRS for budget in BUDGETS
    )
    for row in doc["model_only"] + doc["end_to_end"]:
        # Model steps per camera-frame: two window states, or one EMA state held at c = window/2.
        per = STEPS_PER_CAMERA_FRAME[row["temporal"]]
        assert row["model_steps_per_second"] == per * row["camera_frames_per_second"] > 0
        assert row["ema_frames"] == (25 if row["temporal"] == "ema" else None)  # A0: 50-frame clips
    for row in doc["model_only"]:
        assert row["states_per_step"] == STEPS_PER_CAMERA_FRAME[row["temporal"]] * row["cameras"]
    for row in doc["end_to_end"]:
        # The ratios in the same unit on both sides, against model only in the same mode.
        best = next(
            r
            for r in doc["model_only"]
            if r["best"] and (r["backend"], r["temporal"]) == (row["backend"], row["temporal"])
        )
        assert row["model_only_camera_frames_per_second"] == best["camera_frames_per_second"]
        assert (
            row["share_of_model_only"]
            == row["camera_frames_per_second"] / row["model_only_camera_frames_per_second"]
        )
        assert row["x_baseline_camera_frames"] > 0 and row["camera_frames"] >= 2
        # Every round steps each camera's states: 2 per camera in windows mode, 1 in EMA mode.
        per = STEPS_PER_CAMERA_FRAME[row["temporal"]]
        assert per <= row["states_per_round"] <= per * row["cameras"]
    for live in doc["live"]:
        assert live["trials"] and live["trials"][0]["cameras"] == 1
        trial = live["trials"][0]
        assert trial["temporal"] == live["temporal"]
        assert trial["latency_budget_ms"] == live["latency_budget_ms"]
        assert trial["predictions_published"] > 0 and trial["p99_ms"] is not None
        assert trial["sustained"] == (
            trial["p99_ms"] < live["latency_budget_ms"]
            and trial["predictions_published"] >= 0.95 * trial["predictions_due"]
        )
        assert set(trial["cpu_cores"]) == {"worker", "redis", "publisher", "other"}
        # What sizing needs: Redis's share per camera-frame and per stored entry.
        redis = trial["redis"]
        assert redis["net_in_bytes_per_camera_frame"] > doc["frames"]["mean_jpeg_bytes"]  # the JPEG
        assert redis["net_out_bytes_per_camera_frame"] > 0 and redis["frame_entry_bytes"] > 0
        assert redis["prediction_entry_bytes"] > 0
        # Live efficiency: cameras held x fps against model only, same backend, mode and run.
        best = next(
            r
            for r in doc["model_only"]
            if r["best"] and (r["backend"], r["temporal"]) == (live["backend"], live["temporal"])
        )
        assert live["model_only_camera_frames_per_second"] == best["camera_frames_per_second"]
        assert live["efficiency"] == live["max_cameras"] * live["fps"] / best["camera_frames_per_second"]
    for b in doc["breakdown"]:
        stages = b["stage_ms_per_camera_frame"]
        assert set(stages) == set(STAGES)
        assert stages["model"] > 0 and stages["decode"] > 0 and stages["publish"] > 0
    for mem in doc["memory"]:
        assert mem["state_bytes"] > 0 and mem["state_bytes_per_camera"] > 0
        assert mem["states_per_camera"] == STATES_PER_CAMERA[mem["temporal"]], mem
    assert {t["target"].split(":")[0] for t in doc["targets"]} == {f"{b}/{t}" for b, t in PAIRS}
    for b, t in PAIRS:  # the live efficiency targets: 0.6 at 200 ms, 0.8 at 1 s
        wanted = {x["target"]: x["wanted"] for x in doc["targets"] if x["target"].startswith(f"{b}/{t}:")}
        assert wanted[f"{b}/{t}: live efficiency at 200 ms (cameras x fps / model only)"] == 0.6
        assert wanted[f"{b}/{t}: live efficiency at 1000 ms (cameras x fps / model only)"] == 0.8
        assert wanted[f"{b}/{t}: end to end / model only (camera-frames/s)"] == 0.85
    # The sizing table comes from this very JSON.
    sized = run_cli("bench", "--sizing", str(out), "--sizing-cameras", "1000,10000", timeout=60)
    for b, t in PAIRS:
        assert sum(line.startswith(f"{b}/{t} ") for line in sized.stdout.splitlines()) == 2, sized.stdout
    assert all((t["backend"], t["temporal"]) in PAIRS for t in doc["targets"])


def test_temporal_option_parses_a_comma_list_in_order() -> None:
    assert _temporal("ema") == ["ema"]
    assert _temporal("ema, windows,ema") == ["ema", "windows"]  # the first one chooses the layout
    with pytest.raises(argparse.ArgumentTypeError, match="windows, ema"):
        _temporal("windows,average")


def test_steady_start_waits_for_a_window_reset_only_in_windows_mode() -> None:
    class Info:
        clip_frames = 50

    class FakeBackend:
        info = Info()

    backend: Any = FakeBackend()
    windows, ema = Mode("windows", 2, None), Mode("ema", 1, 25)
    assert [steady_start(s, backend, windows) for s in (0, 23, 24, 25, 49, 50)] == [24, 24, 24, 49, 49, 74]
    assert [steady_start(s, backend, ema) for s in (0, 23, 49)] == [0, 23, 49]


def _job(**overrides: Any) -> BackendJob:
    values: dict[str, Any] = {
        "backend": "litert",
        "model": "m.tflite",
        "redis_url": "redis://unused",
        "redis_pid": 0,
        "cameras": 1,
        "duration": 1.0,
        "steps": 1,
        "warmup": 0,
        "jpegs": [],
        "frame_size": (172, 172),
        "progress": False,
    }
    values.update(overrides)
    return BackendJob(**values)


def test_live_search_doubles_then_bisects_to_the_largest_sustained_n() -> None:
    tried: list[int] = []

    def trial(n: int) -> dict[str, Any]:
        tried.append(n)
        return {"cameras": n, "sustained": n <= 37}

    found = live_search(_job(live_max=256), trial, start=4)
    # Bisection stops once the gap is within 1/16 of the best N: 36 passed and 38 failed.
    assert found["max_cameras"] == 36 and found["first_failing"] == 38
    assert tried == [4, 8, 16, 32, 64, 48, 40, 36, 38]  # doubling until a failure, then bisecting


def test_live_search_stops_at_the_budget_and_the_cap() -> None:
    tried: list[int] = []

    def trial(n: int) -> dict[str, Any]:
        tried.append(n)
        return {"cameras": n, "sustained": True}

    assert live_search(_job(live_max=20), trial, start=4)["max_cameras"] == 20
    assert tried == [4, 8, 16, 20]
    tried.clear()
    found = live_search(_job(live_budget=0.0), trial, start=4)
    assert found["max_cameras"] == 0 and found["budget_exhausted"] and tried == []


def test_latency_budgets_option_parses_milliseconds() -> None:
    assert _budgets("1000,200, 200") == [200.0, 1000.0]
    for bad in ("", "0", "fast", "200,-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="milliseconds"):
            _budgets(bad)


def test_vector_extensions_from_cpuinfo_flags() -> None:
    zen3 = vector_extensions({"sse4_2", "avx", "avx2", "fma"})
    assert zen3 == {"AVX2": True, "AVX-512F": False, "AVX-512 VNNI": False, "AVX-VNNI": False}
    zen4 = vector_extensions({"avx2", "avx512f", "avx512_vnni", "avx512bw"})
    assert zen4["AVX-512F"] and zen4["AVX-512 VNNI"] and not zen4["AVX-VNNI"]


COSTS = {
    "backend": "litert",
    "temporal": "ema",
    "latency_budget_ms": 1000.0,
    "fps": 5.0,
    "cameras_per_worker": 50,
    "worker_cpu_ms_per_camera_frame": 6.0,
    "redis_cpu_ms_per_camera_frame": 0.1,
    "wire_bytes_per_camera_frame": 25_000.0,
    "frame_entry_bytes": 10_000.0,
    "prediction_entry_bytes": 500.0,
    "checkpoint_bytes": 2_000_000.0,
}


def test_sizing_from_per_camera_costs() -> None:
    plan = size(COSTS, 10_000, 5.0)
    assert plan["workers"] == 200  # 50 cameras per worker
    assert plan["worker_cores"] == pytest.approx(300.0)  # 50,000 camera-frames/s x 6 ms
    assert plan["redis_cores"] == pytest.approx(5.0)  # x 0.1 ms: 9 shards at 0.6 core each
    # Per camera: 60 s of frames at 5 fps (3 MB), 10,000 predictions (5 MB), a checkpoint (2 MB).
    assert plan["redis_memory_bytes"] == pytest.approx(10_000 * 10e6)  # 100 GB: 13 shards of 8 GB
    assert plan["wire_bytes_per_second"] == pytest.approx(1.25e9)  # 10 Gbit/s: 2 at 5 Gbit/s each
    assert plan["shards_by"] == {"Redis CPU": 9, "Redis memory": 13, "network": 2}
    assert plan["shards"] == 13 and plan["first_bottleneck"] == "Redis memory"
    # Windows mode keeps no checkpoint; at 1,000 cameras Redis CPU is the first bound.
    small = size({**COSTS, "checkpoint_bytes": 0.0, "redis_cpu_ms_per_camera_frame": 1.0}, 1000, 5.0)
    assert small["shards_by"] == {"Redis CPU": 9, "Redis memory": 1, "network": 1}
    assert small["first_bottleneck"] == "Redis CPU"


def test_sizing_table_refuses_a_json_without_live_costs() -> None:
    with pytest.raises(ValueError, match="no live rows"):
        sizing_table({"live": []})
    old = {"live": [{"latency_budget_ms": 200.0, "at_max": {"cameras": 3}}], "memory": []}
    with pytest.raises(ValueError, match="no Redis costs"):
        sizing_table(old)


def test_a_drain_of_more_than_a_minute_of_frames_predicts_every_one(
    lite_backend: Any, redis_url: str
) -> None:
    """The drain preloads a backlog: none of it may be trimmed for its age or skipped for its lag.

    400 frames per camera are 80 s of capture time, more than the default input retention (60 s) and
    max lag (20 s); on a fast machine the quick bench's drain lost its oldest frames and never ended.
    """
    import redis

    from worker.bench.harness import bench_settings, mode_of
    from worker.bench.main import synthetic_images
    from worker.bench.worker import drain
    from worker.pipeline.codec import encode_jpeg

    pid = int(redis.Redis.from_url(redis_url).info("server")["process_id"])
    jpegs = [encode_jpeg(image, 80) for image in synthetic_images(4, (172, 172))]
    job = _job(model="test.tflite", redis_url=redis_url, redis_pid=pid, cameras=2, jpegs=jpegs)
    mode = mode_of(bench_settings(redis_url, "unused", "ema"), lite_backend)
    row = drain(job, lite_backend, 400, "test layout", mode)
    # From the first prediction on: all but the frames published before the rate's clock started.
    assert 2 * 400 - 2 * 4 <= row["camera_frames"] < 2 * 400
    assert row["camera_frames_per_second"] > 0
