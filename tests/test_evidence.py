"""Evidence kept per alert, and `explain` replaying the model on it.

Real parts only: a real Redis, the worker's own fenced script, the real int8 model on a real clip for
the replay's exactness, and the picture read back and looked at.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas.alerts import Alert
from schemas.messages import Prediction
from schemas.rules import AlertRule
from tests.conftest import run_cli
from tests.harness import Harness
from worker.keys import as_written
from worker.pipeline.evidence import parse_alert_id, read

JUMPING = AlertRule(name="jumping", labels=("jumping jacks",), threshold=0.8, open_after=3, close_after=3)


def new(harnesses: list[Harness], *args: Any, **kwargs: Any) -> Harness:
    h = Harness(*args, **kwargs)
    harnesses.append(h)
    return h


def events(h: Harness, camera: str) -> list[Alert]:
    return [Alert.from_fields(f) for _, f in h.client.xrange(h.settings.alerts_stream(camera))]


def publish_clip(h: Harness, assets: Path, camera: str, loops: int, start_ms: int | None = None) -> int:
    """The jumping-jacks clip `loops` times back to back on the clock; returns the last slot."""
    from worker.tools.publish import publish

    stats = None
    for _ in range(loops):
        stats = publish(
            h.client,
            str(assets / "videos" / "jumpingjack.gif"),
            camera,
            key=h.frames_key(camera),
            fps=5.0,
            size=(172, 172),
            realtime=False,
            progress=False,
        )
    assert stats is not None
    return int(stats.last_id.split("-")[0]) // 200


_CLIP: list[np.ndarray] = []


def clip(assets: Path) -> list[np.ndarray]:
    """The jumping-jacks clip's frames at 5 fps and 172x172 (decoded once)."""
    from worker.tools.video import read_frames

    if not _CLIP:
        _CLIP.extend(
            f.image for f in read_frames(str(assets / "videos" / "jumpingjack.gif"), (172, 172), 5.0)
        )
    return _CLIP


def publish_at(h: Harness, camera: str, images: list[np.ndarray], start_ms: int, loops: int = 1) -> int:
    """JPEG frames one slot (200 ms) apart from `start_ms`, as a camera sends them; returns the next ms."""
    from worker.tools.publish import jpeg_frame

    ms = start_ms
    pipe = h.client.pipeline(transaction=False)
    for _ in range(loops):
        for image in images:
            pipe.xadd(h.frames_key(camera), jpeg_frame(camera, 0, ms, image).to_fields(), id=f"{ms}-0")
            ms += 200
    pipe.execute()
    return ms


def input_entries(h: Harness, camera: str, lo_ms: int, hi_ms: int) -> dict[str, Any]:
    """The camera's input entries with IDs in [lo_ms, hi_ms]."""
    return {e.decode(): f for e, f in h.client.xrange(h.frames_key(camera), min=lo_ms, max=hi_ms)}


def publish_keys(prefix: str) -> list[str]:
    """The publish script's seven keys (see `ownership.PUBLISH`) for a camera `c` under `prefix`."""
    roles = ("owner", "predictions", "frames", "alertstate", "alerts", "checkpoint", "evidence")
    return [f"{prefix}:{role}:{{c}}" for role in roles]


def cli_url(h: Harness) -> str:
    kw = h.client.connection_pool.connection_kwargs
    return f"redis://{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def test_alerts_command_line_names_the_evidence_and_the_explain_command() -> None:
    from worker.tools.tail import format_alert

    alert = Alert(
        event="open",
        alert_id="door:1:fighting:1700000000000",
        camera="door:1",
        rule="fighting",
        label="punching person (boxing)",
        start_ms=1700000000000,
        slot=8500000000,
        score=0.9,
        peak_score=0.9,
        peak_ms=1700000000000,
        worker="w",
        evidence="evidence:{door:1}:fighting:1700000000000",
    )
    line = format_alert(alert)
    assert line.endswith(
        "evidence evidence:{door:1}:fighting:1700000000000: "
        "movinet-worker explain door:1:fighting:1700000000000"
    )
    assert "explain" not in format_alert(alert.model_copy(update={"evidence": None}))


def test_alert_id_parsing() -> None:
    assert parse_alert_id("door:1:jumping:1700000000000") == ("door:1", "jumping", 1700000000000)
    for bad in ("door", "door:jumping", "door:jumping:x", ":jumping:1", "door:Bad Rule:1"):
        with pytest.raises(ValueError, match="not an alert ID"):
            parse_alert_id(bad)


def test_real_clip_alert_keeps_evidence_and_explain_replays_it_exactly(
    harnesses: list[Harness], redis_url: str, real_backend: Any, assets: Path, tmp_path: Path
) -> None:
    labels = (assets / "kinetics600_label_map.txt").read_text().splitlines()
    h = new(harnesses, redis_url, real_backend, labels, alert_rules=[JUMPING], idle_timeout_seconds=1.5)
    h.start()
    last_slot = publish_clip(h, assets, "gym", 4)
    h.wait_for(lambda: any(p.slot == last_slot for _, p in h.predictions("gym")), what="predictions")
    h.wait_for(lambda: any(e.event == "close" for e in events(h, "gym")), timeout=20, what="the close")
    h.stop()
    got = events(h, "gym")
    opened = next(e for e in got if e.event == "open")
    assert all(e.evidence == opened.evidence for e in got) and opened.evidence
    ev = read(h.client, opened.evidence)
    assert ev is not None and ev.closed and ev.capped == ""
    # The frames as received: every input entry from the evidence's start to its last slot, bytes equal.
    first_ms = int(ev.meta["from_ms"])
    kept = {i: f for i, f in ev.frames}
    stream = h.client.xrange(h.frames_key("gym"), min=first_ms)
    last_ms = max(int(i.split("-")[0]) for i in kept)
    expected = {e.decode(): f for e, f in stream if int(e.split(b"-")[0]) <= last_ms}
    assert kept == expected
    # Predictions kept: the published ones over the same time, unchanged.
    published = {i: p for i, p in h.predictions("gym") if p.start_ms >= first_ms and p.start_ms <= last_ms}
    assert {i: Prediction.from_fields(f) for i, f in ev.predictions} == published

    out = tmp_path / "alert.png"
    proc = run_cli(
        "explain",
        opened.alert_id,
        "--redis-url",
        cli_url(h),
        "--evidence-key",
        as_written(h.settings.evidence_key),
        "--model",
        str(assets / "movinet_int8.tflite"),
        "--labels",
        str(assets / "kinetics600_label_map.txt"),
        "--out",
        str(out),
        timeout=300,
    )
    text = proc.stdout
    print(text)
    largest = float(text.split("largest difference: ")[1].split()[0])
    assert largest <= 1e-4, text
    assert "windows mode: the replay agrees" in text
    rows = [line for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == len(ev.predictions)
    assert out.is_file()


def test_evidence_is_complete_across_a_takeover(
    harnesses: list[Harness], redis_url: str, real_backend: Any, assets: Path
) -> None:
    """Worker A opens the alert and is killed mid-stream (slowed, so that frames are still unread); B
    takes the camera over and closes the alert: the evidence holds every input entry from its start to
    the close once, and the predictions of both workers."""
    from tests.harness import StepHook

    labels = (assets / "kinetics600_label_map.txt").read_text().splitlines()
    common: dict[str, Any] = {
        "alert_rules": [JUMPING],
        "lease_seconds": 1.0,
        "heartbeat_seconds": 0.2,
        "input_retention_seconds": 600.0,
    }
    slow = StepHook(real_backend, lambda n: time.sleep(0.08))
    a = new(harnesses, redis_url, slow, labels, idle_timeout_seconds=60, **common)
    a.start()
    start = (int(time.time() * 1000) // 200 - 150) * 200  # 30 s back: all of it readable at once
    end = publish_at(a, "gym", clip(assets), start, loops=4)
    a.wait_for(lambda: any(e.event == "open" for e in events(a, "gym")), what="the open", timeout=60)
    open_id = next(e for e in events(a, "gym") if e.event == "open").alert_id
    info = {"camera": "gym", "rule": "jumping", "label": "jumping jacks", "alert_id": open_id}
    a.wait_for(
        lambda: a.metrics.registry.get_sample_value("movinet_action_alert_info", info) == 1,
        what="the open alert's ID in the metrics",
    )
    a.kill()
    done_by_a = max(p.slot for _, p in a.predictions("gym"))
    assert done_by_a < (end - 200) // 200, "A finished the stream before it was killed: no takeover mid-alert"
    b = new(harnesses, redis_url, real_backend, labels, prefix=a.prefix, idle_timeout_seconds=1.5, **common)
    b.start()
    b.wait_for(lambda: any(e.event == "close" for e in events(b, "gym")), what="the close", timeout=60)
    b.stop()
    got = events(b, "gym")
    assert [e.event for e in got if e.event != "update"] == ["open", "close"]
    opened, closed = got[0], got[-1]
    assert opened.worker == a.settings.worker_id and closed.worker == b.settings.worker_id
    assert b.metrics.registry.get_sample_value("movinet_action_alert_info", info) is None  # closed
    assert opened.evidence is not None and closed.evidence == opened.evidence
    ev = read(b.client, opened.evidence)
    assert ev is not None and ev.closed and ev.capped == ""
    first_ms = int(ev.meta["from_ms"])
    kept = [i for i, _ in ev.frames]
    assert len(kept) == len(set(kept))
    last_slot_end = (closed.slot + 1) * 200
    assert max(int(i.split("-")[0]) for i in kept) == last_slot_end - 200  # up to the close's slot
    assert dict(ev.frames) == input_entries(b, "gym", first_ms, last_slot_end - 1)
    workers = {Prediction.from_fields(f).worker for _, f in ev.predictions}
    assert workers == {a.settings.worker_id, b.settings.worker_id}
    slots = [Prediction.from_fields(f).slot for _, f in ev.predictions]
    assert slots == list(range(slots[0], closed.slot + 1))  # every slot once, across the hand-over
    assert int(ev.meta["frames"]) == len(kept) and int(ev.meta["predictions"]) == len(slots)


def test_evidence_expires_and_explain_says_so(
    harnesses: list[Harness], redis_url: str, real_backend: Any, assets: Path
) -> None:
    labels = (assets / "kinetics600_label_map.txt").read_text().splitlines()
    h = new(
        harnesses,
        redis_url,
        real_backend,
        labels,
        alert_rules=[JUMPING],
        idle_timeout_seconds=1.0,
        evidence_seconds=2.0,
    )
    h.start()
    start = (int(time.time() * 1000) // 200 - 100) * 200
    publish_at(h, "gym", clip(assets), start, loops=3)
    h.wait_for(lambda: any(e.event == "close" for e in events(h, "gym")), what="the close", timeout=60)
    closed = events(h, "gym")[-1]
    assert closed.evidence is not None and read(h.client, closed.evidence) is not None
    ttl = h.client.pttl(closed.evidence)
    assert 0 < ttl <= 2000
    h.wait_for(lambda: h.client.exists(closed.evidence) == 0, timeout=10, what="the evidence to expire")
    assert not h.client.exists(closed.evidence + ":frames", closed.evidence + ":predictions")
    h.stop()
    proc = run_cli(
        "explain",
        closed.alert_id,
        "--redis-url",
        cli_url(h),
        "--evidence-key",
        as_written(h.settings.evidence_key),
        "--model",
        str(assets / "movinet_int8.tflite"),
        check=False,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no evidence for alert" in lines[0] and "expired" in lines[0]


def test_caps_per_alert_and_per_camera(
    harnesses: list[Harness], redis_url: str, real_backend: Any, assets: Path
) -> None:
    """Two alerts on one camera, a gap between them. Each alert's evidence stops at its cap (a prefix
    of the entries, never more bytes); the second alert needs the room of the first, closed one, which
    is deleted for it; the metric counts the camera's bytes and the entries left out."""
    labels = (assets / "kinetics600_label_map.txt").read_text().splitlines()
    per_alert, per_camera = 150_000, 250_000
    h = new(
        harnesses,
        redis_url,
        real_backend,
        labels,
        alert_rules=[JUMPING],
        idle_timeout_seconds=1.0,
        evidence_max_alert_bytes=per_alert,
        evidence_max_camera_bytes=per_camera,
    )
    h.start()
    start = (int(time.time() * 1000) // 200 - 250) * 200
    # 12 s later: after the rule's 10 s cooldown (and a restart of the windows: 60 slots without frames)
    gap_ms = publish_at(h, "gym", clip(assets), start, loops=3) + 12_000
    publish_at(h, "gym", clip(assets), gap_ms, loops=3)
    h.wait_for(lambda: sum(e.event == "close" for e in events(h, "gym")) == 2, what="two closes", timeout=60)
    registry = h.metrics.registry
    index_key = h.settings.evidence_index("gym")
    h.wait_for(  # the gauge as of the last publish, which wrote the index as it is now
        lambda: (
            registry.get_sample_value("movinet_evidence_bytes", {"camera": "gym"})
            == sum(int(v) for v in h.client.hvals(index_key))
        ),
        what="the evidence gauge",
    )
    total = registry.get_sample_value("movinet_evidence_bytes", {"camera": "gym"})
    h.stop()  # the camera leaves the worker: its series go
    assert registry.get_sample_value("movinet_evidence_bytes", {"camera": "gym"}) is None
    first, second = [e for e in events(h, "gym") if e.event == "open"]
    assert first.evidence != second.evidence
    assert read(h.client, first.evidence or "") is None  # evicted for the second
    ev = read(h.client, second.evidence or "")
    assert ev is not None and ev.capped == "alert"
    assert ev.bytes <= per_alert
    size = sum(len(i) + sum(len(k) + len(v) for k, v in f.items()) for i, f in ev.frames + ev.predictions)
    assert size == ev.bytes
    from_ms = int(ev.meta["from_ms"])
    last = max(int(i.split("-")[0]) for i, _ in ev.frames)
    assert dict(ev.frames) == input_entries(h, "gym", from_ms, last)  # a prefix: nothing skipped
    assert registry.get_sample_value("movinet_evidence_dropped_total") > 0
    assert total is not None and ev.bytes <= total <= per_camera
    index = {k.decode(): int(v) for k, v in h.client.hgetall(h.settings.evidence_index("gym")).items()}
    assert index == {second.evidence: ev.bytes}


def test_an_alert_larger_than_the_camera_cap_is_cut_there(
    harnesses: list[Harness], redis_url: str, real_backend: Any, assets: Path
) -> None:
    labels = (assets / "kinetics600_label_map.txt").read_text().splitlines()
    h = new(
        harnesses,
        redis_url,
        real_backend,
        labels,
        alert_rules=[JUMPING],
        idle_timeout_seconds=1.0,
        evidence_max_camera_bytes=100_000,
    )
    h.start()
    publish_at(h, "gym", clip(assets), (int(time.time() * 1000) // 200 - 100) * 200, loops=3)
    h.wait_for(lambda: any(e.event == "close" for e in events(h, "gym")), what="the close", timeout=60)
    h.stop()
    ev = read(h.client, events(h, "gym")[0].evidence or "")
    assert ev is not None and ev.capped == "camera" and 0 < ev.bytes <= 100_000


def test_picture_shows_frames_bars_and_the_alert_interval(
    harnesses: list[Harness], redis_url: str, real_backend: Any, assets: Path, tmp_path: Path
) -> None:
    """The picture, looked at: the PNG has the frames with bars above the curve, whose axes are
    labelled and whose shaded span is the alert's interval; the GIF has one image per slot."""
    from PIL import Image

    from worker.tools.explain import _curve, picture, replay
    from worker.tools.plot import _day

    labels = (assets / "kinetics600_label_map.txt").read_text().splitlines()
    h = new(harnesses, redis_url, real_backend, labels, alert_rules=[JUMPING], idle_timeout_seconds=1.0)
    h.start()
    publish_at(h, "gym", clip(assets), (int(time.time() * 1000) // 200 - 100) * 200, loops=3)
    h.wait_for(lambda: any(e.event == "close" for e in events(h, "gym")), what="the close", timeout=60)
    h.stop()
    closed = events(h, "gym")[-1]
    ev = read(h.client, closed.evidence or "")
    assert ev is not None and ev.event is not None and ev.event.event == "close"
    r = replay(ev, closed.alert_id, real_backend, labels)
    fig = _curve(r, (960, 420))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "time (UTC)" and ax.get_ylabel() == "probability"
    assert closed.alert_id in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "jumping jacks" in legend and "alert: jumping" in legend
    spans = [p for p in ax.patches if p.get_alpha() == 0.15]
    assert len(spans) == 1
    x0, x1 = spans[0].get_x(), spans[0].get_x() + spans[0].get_width()
    assert x0 == pytest.approx(float(_day(closed.start_ms))) and x1 == pytest.approx(
        float(_day(closed.end_ms))
    )
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and len(dashed[0].get_xdata()) == len(r.slots)
    png = picture(r, tmp_path / "alert.png", k=5, height=240)
    with Image.open(png) as image:
        assert image.width == 4 * 240 and image.height == 2 * 240 + 420
        pixels = np.asarray(image.convert("RGB"))
    frame = np.asarray(Image.open(png).convert("RGB"))[:240, :240]
    assert frame.std() > 20  # a photo, not an empty panel
    assert (pixels[480:] == 255).mean() > 0.5  # the curve's white page below
    gif = picture(r, tmp_path / "alert.gif", k=5, height=172)
    with Image.open(gif) as image:
        assert image.n_frames == len(r.slots)


def test_explain_in_ema_mode_says_what_is_approximate_and_how_much(
    harnesses: list[Harness], redis_url: str, real_backend: Any, assets: Path
) -> None:
    """The camera shows a still scene for 12 s before the activity: the published EMA state carries
    that history, the evidence (10 replay slots back) does not; explain says so and by how much."""
    labels = (assets / "kinetics600_label_map.txt").read_text().splitlines()
    h = new(
        harnesses,
        redis_url,
        real_backend,
        labels,
        alert_rules=[JUMPING],
        idle_timeout_seconds=1.0,
        temporal="ema",
        ema_replay_slots=10,
    )
    h.start()
    still = [clip(assets)[0]] * 60
    start = (int(time.time() * 1000) // 200 - 150) * 200
    publish_at(h, "gym", still + clip(assets) * 6, start)
    h.wait_for(lambda: any(e.event == "close" for e in events(h, "gym")), what="the close", timeout=60)
    h.stop()
    closed = events(h, "gym")[-1]
    ev = read(h.client, closed.evidence or "")
    assert ev is not None and int(ev.meta["from_ms"]) > start  # the still scene is not all kept
    proc = run_cli(
        "explain",
        closed.alert_id,
        "--redis-url",
        cli_url(h),
        "--evidence-key",
        as_written(h.settings.evidence_key),
        "--model",
        str(assets / "movinet_int8.tflite"),
        "--labels",
        str(assets / "kinetics600_label_map.txt"),
        timeout=300,
    )
    text = proc.stdout
    print(text)
    assert "ema mode: approximate" in text and "windows mode" not in text
    largest = float(text.split("largest difference: ")[1].split()[0])
    moved = float(text.split("scores moved by ")[1].split()[0])
    assert moved == largest and largest > 1e-4  # the missing history shows


def test_a_worker_that_lost_the_camera_writes_no_evidence(r: tuple[Any, str]) -> None:
    """The publish script itself: with a stale lease token nothing is written, evidence included; with
    the lease it copies the input entries and predictions in range, and a second call resumes after
    the last entry copied (no duplicate, nothing skipped)."""
    from worker.pipeline import evidence
    from worker.pipeline.ownership import PUBLISH
    from worker.pipeline.publishing import script_args

    client, prefix = r
    keys = publish_keys(prefix)
    owner, frames, index = keys[0], keys[2], keys[6]
    client.set(owner, "w2:token")
    t0 = 1_800_000_000_000
    for i in range(20):
        client.xadd(frames, {"v": "1", "data": b"x" * 100, "i": str(i)}, id=f"{t0 + 100 * i}-0")
    client.xgroup_create(frames, "g", id="0")
    op = evidence.Op(evidence.evidence_key(index, "r", t0), from_ms=t0 + 200, to_ms=t0 + 1000)
    ev_args = evidence.script_args(
        [op], {"fps": "10"}, keep_ms=60_000, max_alert=10**6, max_camera=10**6, max_ms=60_000
    )

    def call(token: str, ev: list[Any]) -> Any:
        args = script_args(token, "g", 100, commit="", trim="", predictions=[], evidence=ev)
        return client.eval(PUBLISH, 7, *keys, *args)

    assert call("w1:stale", ev_args) == -1
    assert client.exists(op.key, op.key + ":frames", index) == 0
    assert call("w2:token", ev_args) == [8 * (len(f"{t0}-0") + 1 + 1 + 4 + 100 + 1 + 1), 0]
    ids = [i.decode() for i, _ in client.xrange(op.key + ":frames")]
    assert ids == [f"{t0 + 100 * i}-0" for i in range(2, 10)]  # [from, to)
    op2 = evidence.Op(op.key, to_ms=t0 + 1500, closing=True)
    ev2 = evidence.script_args(
        [op2], {"fps": "10"}, keep_ms=60_000, max_alert=10**6, max_camera=10**6, max_ms=60_000
    )
    call("w2:token", ev2)
    ids = [i.decode() for i, _ in client.xrange(op.key + ":frames")]
    assert ids == [f"{t0 + 100 * i}-0" for i in range(2, 15)]
    meta = read(client, op.key)
    assert meta is not None and meta.closed and int(meta.meta["frames"]) == 13
    assert 0 < client.pttl(op.key) <= 60_000 and 0 < client.pttl(index) <= 60_000


def test_keys_of_another_type_in_the_way_cost_the_evidence_not_the_publish(r: tuple[Any, str]) -> None:
    from schemas.messages import TopLabel
    from worker.pipeline import evidence
    from worker.pipeline.ownership import PUBLISH
    from worker.pipeline.publishing import script_args

    client, prefix = r
    keys = publish_keys(prefix)
    owner, preds, frames, index = keys[0], keys[1], keys[2], keys[6]
    client.set(owner, "w:t")
    t0 = 1_800_000_000_000
    client.xadd(frames, {"v": "1"}, id=f"{t0}-0")
    prediction = Prediction(
        camera="c",
        slot=t0 // 200,
        start_ms=t0,
        end_ms=t0 + 200,
        window_start_ms=t0,
        frames=1,
        temporal="windows",
        repeated=False,
        capture_ms=t0,
        model="m",
        worker="w",
        top=[TopLabel(label="a", score=0.5)],
    )
    for in_the_way in (index, evidence.evidence_key(index, "r", t0)):
        client.delete(index, preds)
        client.set(in_the_way, "not a hash")
        op = evidence.Op(evidence.evidence_key(index, "r", t0), from_ms=t0, to_ms=t0 + 200)
        ev = evidence.script_args([op], {}, keep_ms=1000, max_alert=10**6, max_camera=10**6, max_ms=10**6)
        args = script_args("w:t", "g", 100, commit="", trim="", predictions=[prediction], evidence=ev)
        assert client.eval(PUBLISH, 7, *keys, *args)[0] == 1  # the prediction is published
        assert client.xlen(preds) == 1
        assert client.get(in_the_way) == b"not a hash"
        client.delete(in_the_way)


def test_evidence_stops_at_the_maximum_duration(r: tuple[Any, str]) -> None:
    from worker.pipeline import evidence
    from worker.pipeline.ownership import PUBLISH
    from worker.pipeline.publishing import script_args

    client, prefix = r
    keys = publish_keys(prefix)
    owner, frames, index = keys[0], keys[2], keys[6]
    client.set(owner, "w:t")
    t0 = 1_800_000_000_000
    for i in range(30):
        client.xadd(frames, {"i": str(i)}, id=f"{t0 + 100 * i}-0")
    key = evidence.evidence_key(index, "r", t0)
    for to_ms, from_ms in ((t0 + 1000, t0), (t0 + 3000, None)):  # opened, then 2 s more
        op = evidence.Op(key, from_ms=from_ms, to_ms=to_ms)
        ev = evidence.script_args([op], {}, keep_ms=60_000, max_alert=10**6, max_camera=10**6, max_ms=1500)
        client.eval(
            PUBLISH, 7, *keys, *script_args("w:t", "g", 100, commit="", trim="", predictions=[], evidence=ev)
        )
    kept = read(client, key)
    assert kept is not None and kept.capped == "duration"
    assert [i for i, _ in kept.frames] == [f"{t0 + 100 * i}-0" for i in range(15)]  # [t0, t0 + 1.5 s)
