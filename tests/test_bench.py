"""`movinet-worker bench --quick`: every section measured and reported, with both backends.

The quick mode checks that the bench runs end to end (a private redis-server, a worker per backend,
live publishers), not a speed; the speeds come from a full run on the project's machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import Models, run_cli
from worker.bench_worker import STAGES, BackendJob, live_search

SECTIONS = ("baseline", "model_only", "end_to_end", "live", "breakdown", "memory", "targets")


def test_quick_bench_measures_every_section_for_both_backends(models: Models, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_cli(
        *("bench", "--quick", "--no-progress", "--json", str(out)),
        *("--tf-model", str(models.stream), "--tflite", str(models.tflite)),
        timeout=300,
    )
    for heading in ("1-3. throughput", "4. live", "5. where the time goes", "memory held", "targets"):
        assert heading in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["errors"] == []
    for section in SECTIONS:
        assert doc[section], f"section {section} is empty"
    assert doc["baseline"]["backend"] == "tutorial" and doc["baseline"]["camera_frames_per_second"] > 0
    for section in ("model_only", "end_to_end", "live", "breakdown", "memory"):
        assert {row["backend"] for row in doc[section]} == {"tfhub", "litert"}, section
    for row in doc["end_to_end"]:
        # Two window states per camera-frame, and the ratios in the same unit on both sides.
        assert row["model_steps_per_second"] == 2 * row["camera_frames_per_second"]
        assert (
            row["share_of_model_only"]
            == row["model_steps_per_second"] / row["model_only_model_steps_per_second"]
        )
        assert row["x_baseline_camera_frames"] > 0 and row["camera_frames"] >= 2
    for live in doc["live"]:
        assert live["trials"] and live["trials"][0]["cameras"] == 1
        trial = live["trials"][0]
        assert trial["predictions_published"] > 0 and trial["p99_ms"] is not None
        assert set(trial["cpu_cores"]) == {"worker", "redis", "publisher", "other"}
    for b in doc["breakdown"]:
        stages = b["stage_ms_per_camera_frame"]
        assert set(stages) == set(STAGES)
        assert stages["model"] > 0 and stages["decode"] > 0 and stages["publish"] > 0
    for mem in doc["memory"]:
        assert mem["state_bytes"] > 0 and mem["state_bytes_per_camera"] > 0
    assert {t["target"].split(":")[0] for t in doc["targets"]} == {"tfhub", "litert"}


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
