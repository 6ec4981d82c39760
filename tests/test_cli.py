"""The commands as a user runs them: classify on the real model and clips, errors that say what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli


def classify_json(*args: str) -> dict:  # type: ignore[type-arg]
    return json.loads(run_cli("classify", *args, "--json", "--no-progress").stdout)


def test_classify_jumping_jacks_with_the_real_int8_model(assets: Path) -> None:
    out = classify_json(
        str(assets / "videos" / "jumpingjack.gif"),
        "--model",
        str(assets / "movinet_int8.tflite"),
        "--labels",
        str(assets / "kinetics600_label_map.txt"),
    )
    assert out["top"][0]["label"] == "jumping jacks"
    assert out["top"][0]["score"] >= 0.95
    assert out["fps"] == 5.0 and out["frames"] == 8  # 1.5 s of GIF on the model's 5 fps clock
    assert [f["label"] for f in out["per_frame"]][-1] == "jumping jacks"


def test_classify_carving_ice_at_5_fps(assets: Path) -> None:
    out = classify_json(
        str(assets / "videos" / "carving_ice_android.mp4"),
        "--model",
        str(assets / "movinet_int8.tflite"),
        "--labels",
        str(assets / "kinetics600_label_map.txt"),
        "--fps",
        "5",
        "--top",
        "3",
    )
    assert out["top"][0]["label"] == "carving ice"
    assert out["top"][0]["score"] > 0.6
    assert len(out["top"]) == 3
    assert 33 <= out["frames"] <= 34  # 6.67 s at 5 fps


def test_classify_every_frame_prints_a_line_per_frame(assets: Path) -> None:
    proc = run_cli(
        "classify",
        str(assets / "videos" / "jumpingjack.gif"),
        "--model",
        str(assets / "movinet_int8.tflite"),
        "--labels",
        str(assets / "kinetics600_label_map.txt"),
        "--fps",
        "0",
        "--every-frame",
        "--no-progress",
    )
    frame_lines = [line for line in proc.stdout.splitlines() if line.startswith("frame ")]
    assert len(frame_lines) == 13
    assert "jumping jacks" in proc.stdout.splitlines()[-5]


def test_classify_with_a_base_model_runs_the_whole_clip(models, assets: Path) -> None:
    out = classify_json(
        str(assets / "videos" / "jumpingjack.gif"),
        "--model",
        str(models.base),
        "--labels",
        str(assets / "kinetics600_label_map.txt"),
    )
    assert out["frames"] == 8 and out["per_frame"] == []
    scores = [t["score"] for t in out["top"]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def test_offline_hub_handle_error_names_the_handle_and_the_fix(tmp_path: Path, assets: Path) -> None:
    handle = "https://tfhub.dev/tensorflow/movinet/a0/stream/kinetics-600/classification/3"
    proc = run_cli(
        "classify",
        str(assets / "videos" / "jumpingjack.gif"),
        "--model",
        handle,
        "--labels",
        str(assets / "kinetics600_label_map.txt"),
        check=False,
    )
    assert proc.returncode == 2
    assert handle in proc.stderr and "--model /path/to/folder" in proc.stderr


def test_missing_labels_offline_say_what_to_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.model.backends import ModelLoadError
    from worker.model.labels import load_labels

    monkeypatch.setenv("MOVINET_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match="Pass --labels PATH"):
        load_labels(url="http://127.0.0.1:9/labels.txt")  # a closed local port: offline, fast


def test_labels_are_cached_after_one_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server
    import threading

    from worker.model.labels import load_labels

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "labels.txt").write_text("a\nb\n\nc\n")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MOVINET_CACHE_DIR", str(tmp_path / "cache"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/labels.txt"
        assert load_labels(url=url) == ["a", "b", "c"]
    finally:
        server.shutdown()
    assert load_labels(url="http://127.0.0.1:9/gone") == ["a", "b", "c"]  # served from the cache


def test_label_count_must_match_the_model(assets: Path, tmp_path: Path) -> None:
    short = tmp_path / "labels.txt"
    short.write_text("one\ntwo\n")
    proc = run_cli(
        "classify",
        str(assets / "videos" / "jumpingjack.gif"),
        "--model",
        str(assets / "movinet_int8.tflite"),
        "--labels",
        str(short),
        check=False,
    )
    assert proc.returncode == 2 and "600 classes but the label file has 2" in proc.stderr


def test_bench_model_prints_every_backend_next_to_the_baseline(models, tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    proc = run_cli(
        "bench-model",
        "--tf-model",
        str(models.stream),
        "--tflite",
        str(models.tflite),
        "--batch",
        "1,2",
        "--layouts",
        "1x1,2x1",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--baseline-cameras",
        "2",
        "--json",
        str(report),
    )
    rows = json.loads(report.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["tutorial", "tfhub", "tfhub"] + ["litert"] * 4
    assert all(r["frames_per_second"] > 0 and r["vs_baseline"] > 0 for r in rows)
    assert "x baseline" in proc.stdout and "tutorial" in proc.stdout


def test_demo_runs_everything_with_its_own_redis(assets: Path) -> None:
    """The README's first command: a private redis-server, a worker, the clip, predictions, all stopped."""
    proc = run_cli(
        "demo",
        "--model",
        str(assets / "movinet_int8.tflite"),
        "--labels",
        str(assets / "kinetics600_label_map.txt"),
        "--source",
        str(assets / "videos" / "jumpingjack.gif"),
        timeout=300,
        unset=("REDIS_URL", "MOVINET_REDIS_URL"),
    )
    lines = proc.stdout.splitlines()
    predictions = [line for line in lines if line.startswith("demo ")]
    assert len(predictions) >= 8
    assert "jumping jacks" in predictions[-1].split("]")[-1].split("|")[0]
    assert lines[-1].endswith("worker stopped, local redis stopped")


def test_demo_without_a_model_says_what_to_pass() -> None:
    proc = run_cli("demo", check=False, unset=("MOVINET_MODEL",))
    assert proc.returncode != 0 and "--model PATH" in proc.stderr


def test_tail_prints_published_predictions(r) -> None:  # type: ignore[no-untyped-def]
    from schemas.messages import Prediction, TopLabel

    client, prefix = r
    key = prefix + ":predictions:{cam}"
    for slot in (10, 11):
        p = Prediction(
            camera="cam",
            slot=slot,
            start_ms=slot * 200,
            end_ms=slot * 200 + 200,
            window_start_ms=0,
            frames=slot,
            repeated=False,
            capture_ms=slot * 200,
            model="m",
            worker="w",
            top=[TopLabel(label="jumping jacks", score=0.9), TopLabel(label="zumba", score=0.1)],
        )
        client.xadd(key, p.to_fields(), id=f"{slot * 200}-0")
    url = client.connection_pool.connection_kwargs
    redis_url = f"redis://{url.get('host', '127.0.0.1')}:{url.get('port', 6379)}/{url.get('db', 0)}"
    proc = run_cli(
        "tail",
        "--camera",
        "cam",
        "--key-template",
        prefix + ":predictions:{{{camera}}}",
        "--redis-url",
        redis_url,
        "--from-start",
        "--count",
        "2",
        timeout=60,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and "slot 11" in lines[1] and "jumping jacks 0.900 | zumba 0.100" in lines[1]
