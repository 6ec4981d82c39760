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
from worker.bench import _temporal
from worker.bench_harness import STAGES, BackendJob, Mode
from worker.bench_live import live_search, steady_start

SECTIONS = ("baseline", "model_only", "end_to_end", "live", "breakdown", "memory", "targets")
PAIRS = {(b, t) for b in ("tfhub", "litert") for t in ("windows", "ema")}
STEPS_PER_CAMERA_FRAME = {"windows": 2, "ema": 1}
STATES_PER_CAMERA = {"windows": 2.0, "ema": 1.0}


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
    assert doc["settings"]["temporal"] == ["windows", "ema"]  # the default: both modes
    for section in SECTIONS:
        assert doc[section], f"section {section} is empty"
    assert doc["baseline"]["backend"] == "tutorial" and doc["baseline"]["camera_frames_per_second"] > 0
    for section in ("model_only", "end_to_end", "live", "breakdown", "memory"):
        assert {(row["backend"], row["temporal"]) for row in doc[section]} == PAIRS, section
    for section in ("end_to_end", "live", "memory"):  # one row per backend and mode
        assert len(doc[section]) == len(PAIRS), section
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
        assert trial["predictions_published"] > 0 and trial["p99_ms"] is not None
        assert set(trial["cpu_cores"]) == {"worker", "redis", "publisher", "other"}
    for b in doc["breakdown"]:
        stages = b["stage_ms_per_camera_frame"]
        assert set(stages) == set(STAGES)
        assert stages["model"] > 0 and stages["decode"] > 0 and stages["publish"] > 0
    for mem in doc["memory"]:
        assert mem["state_bytes"] > 0 and mem["state_bytes_per_camera"] > 0
        assert mem["states_per_camera"] == STATES_PER_CAMERA[mem["temporal"]], mem
    assert {t["target"].split(":")[0] for t in doc["targets"]} == {f"{b}/{t}" for b, t in PAIRS}
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
