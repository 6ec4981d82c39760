"""Alert rules on synthetic score sequences, and on the real model through a worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from schemas.alerts import Alert
from schemas.rules import AlertRule
from worker.pipeline.alerting import AlertTracker

LABELS = ["jumping jacks", "zumba", "yoga"]
SLOT_MS = 200


def tracker(**rule: object) -> AlertTracker:
    values: dict[str, object] = {
        "name": "jj",
        "labels": ["jumping jacks"],
        "threshold": 0.5,
        "open_after": 2,
        "close_after": 2,
        "min_duration_seconds": 0,
        "cooldown_seconds": 0,
        "update_delta": 0,
    }
    values.update(rule)
    return AlertTracker("cam", [AlertRule(**values)], LABELS, "w")  # type: ignore[arg-type]


def feed(t: AlertTracker, scores: list[float], first_slot: int = 0) -> list[Alert]:
    events = []
    for i, score in enumerate(scores):
        slot = first_slot + i
        probs = np.array([score, (1 - score) / 2, (1 - score) / 2])
        events += t.evaluate(slot, slot * SLOT_MS, (slot + 1) * SLOT_MS, probs)
    return events


def kinds(events: list[Alert]) -> list[tuple[str, int]]:
    return [(e.event, e.slot) for e in events]


def test_hysteresis_opens_after_n_above_and_closes_after_m_below() -> None:
    events = feed(tracker(), [0.9, 0.2, 0.9, 0.9, 0.3, 0.9, 0.1, 0.1, 0.1])
    assert kinds(events) == [("open", 3), ("close", 7)]  # one dip inside the alert does not close it
    opened, closed = events
    assert opened.start_ms == 2 * SLOT_MS and closed.end_ms == 6 * SLOT_MS
    assert closed.alert_id == opened.alert_id and closed.peak_score == pytest.approx(0.9)


def test_minimum_duration_keeps_a_short_alert_open() -> None:
    events = feed(tracker(min_duration_seconds=2.0), [0.9, 0.9] + [0.1] * 12)
    assert kinds(events) == [("open", 1), ("close", 9)]  # 2 s after the start at slot 0


def test_cooldown_suppresses_a_new_alert_right_after_a_close() -> None:
    t = tracker(cooldown_seconds=2.0)
    events = feed(t, [0.9, 0.9, 0.1, 0.1] + [0.9] * 4 + [0.1] * 2 + [0.9] * 12)
    assert [e.event for e in events] == ["open", "close", "open"]
    assert events[2].slot >= 12  # cooldown ends 2 s after the first alert's last slot above (slot 1)


def test_updates_report_a_growing_peak() -> None:
    events = feed(tracker(update_delta=0.1), [0.6, 0.6, 0.65, 0.75, 0.9, 0.95, 0.1, 0.1])
    assert kinds(events) == [("open", 1), ("update", 3), ("update", 4), ("close", 7)]
    assert [round(e.peak_score, 2) for e in events] == [0.6, 0.75, 0.9, 0.95]


def test_a_group_rule_takes_the_best_label() -> None:
    t = AlertTracker(
        "cam",
        [AlertRule(name="ex", group="exercise", threshold=0.5, open_after=1)],
        ["jumping jacks", "push up", "yoga"],
        "w",
    )
    events = t.evaluate(0, 0, 200, np.array([0.1, 0.8, 0.1]))
    assert events[0].label == "push up"


def test_unknown_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="not in the model's label list"):
        AlertTracker("cam", [AlertRule(name="x", labels=["no such thing"])], LABELS, "w")


def test_state_survives_a_failover_without_reopening_or_losing_the_alert() -> None:
    scores = [0.9, 0.9, 0.9, 0.8, 0.1, 0.9, 0.1, 0.1, 0.1]
    whole = feed(tracker(), scores)
    first = tracker()
    before = feed(first, scores[:5])
    second = tracker()  # the new owner loads what the old one persisted with its last slot
    second.load(first.dump())
    after = feed(second, scores[3:], first_slot=3)  # replayed slots 3-4 are ignored, not re-evaluated
    assert kinds(before + after) == kinds(whole) == [("open", 1), ("close", 7)]


def test_a_gap_counts_as_slots_below() -> None:
    t = tracker()
    events = feed(t, [0.9, 0.9])
    events += t.evaluate(10, 10 * SLOT_MS, 11 * SLOT_MS, np.array([0.1, 0.45, 0.45]))
    assert kinds(events) == [("open", 1), ("close", 10)]


def test_real_model_one_alert_per_activity(harnesses, redis_url, real_backend, assets: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.test_worker import new
    from worker.tools.publish import publish

    labels = (assets / "kinetics600_label_map.txt").read_text().splitlines()
    rules = [
        AlertRule(name="jumping", labels=("jumping jacks",), threshold=0.8, open_after=3, close_after=3),
        AlertRule(name="yoga", labels=("yoga",), threshold=0.5),
    ]
    h = new(harnesses, redis_url, real_backend, labels, alert_rules=rules, idle_timeout_seconds=1.5)
    h.start()
    key = h.frames_key("gym")
    for _ in range(4):  # 6 s of jumping jacks, back to back on the clock
        stats = publish(
            h.client,
            str(assets / "videos" / "jumpingjack.gif"),
            "gym",
            key=key,
            fps=5.0,
            size=(172, 172),
            realtime=False,
            progress=False,
        )
    last_slot = int(stats.last_id.split("-")[0]) // 200
    h.wait_for(lambda: any(p.slot == last_slot for _, p in h.predictions("gym")), what="predictions")

    def events() -> list[Alert]:
        return [Alert.from_fields(f) for _, f in h.client.xrange(h.settings.alerts_stream("gym"))]

    h.wait_for(
        lambda: any(e.event == "close" for e in events()), timeout=20, what="the close after going quiet"
    )
    h.stop()
    got = [(e.event, e.rule) for e in events() if e.event != "update"]
    assert got == [("open", "jumping"), ("close", "jumping")]
    opened, closed = events()[0], events()[-1]
    assert opened.label == "jumping jacks" and closed.peak_score >= 0.9
    assert closed.end_ms is not None and closed.end_ms > opened.start_ms
    registry = h.metrics.registry
    assert registry.get_sample_value("movinet_alerts_opened_total", {"rule": "jumping"}) == 1
    assert registry.get_sample_value("movinet_alerts_closed_total", {"rule": "jumping"}) == 1
    assert registry.get_sample_value("movinet_alerts_active", {"rule": "jumping"}) == 0


def test_alerts_command_prints_events(r) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import run_cli

    client, prefix = r
    key = prefix + ":alerts"
    base = {
        "alert_id": "gym:jumping:1000",
        "camera": "gym",
        "rule": "jumping",
        "label": "jumping jacks",
        "start_ms": 1000,
        "slot": 7,
        "score": 0.9,
        "peak_score": 0.95,
        "peak_ms": 1200,
        "worker": "w",
    }
    client.xadd(key, Alert(event="open", **base).to_fields())  # type: ignore[arg-type]
    client.xadd(key, Alert(event="close", end_ms=5000, **base).to_fields())  # type: ignore[arg-type]
    client.xadd(key, Alert(event="open", **{**base, "camera": "door", "alert_id": "door:x:1"}).to_fields())  # type: ignore[arg-type]
    kw = client.connection_pool.connection_kwargs
    url = f"redis://{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
    proc = run_cli(
        "alerts",
        "--camera",
        "gym",
        "--key",
        key,
        "--redis-url",
        url,
        "--from-start",
        "--count",
        "2",
        timeout=60,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("OPEN") and lines[1].startswith("CLOSE")
    assert "jumping jacks" in lines[1] and "peak 0.950" in lines[1] and "door" not in proc.stdout


def test_open_alert_series_live_on_the_camera_owner_only(  # type: ignore[no-untyped-def]
    harnesses, redis_url, real_backend, assets: Path
) -> None:
    """`movinet_action_alert_*{camera, rule, label}` exist while the alert is open, on the worker that
    owns the camera: gone from one that hands it over (SIGTERM drain), back on the one that takes it
    (from the stored alert state, the same alert), and gone when it closes there."""
    from tests.test_worker import new
    from worker.tools.publish import publish

    labels = (assets / "kinetics600_label_map.txt").read_text().splitlines()
    rules = [AlertRule(name="jumping", labels=("jumping jacks",), threshold=0.8, open_after=3, close_after=3)]
    first = new(harnesses, redis_url, real_backend, labels, alert_rules=rules, idle_timeout_seconds=60)
    first.start()
    for _ in range(4):
        stats = publish(
            first.client,
            str(assets / "videos" / "jumpingjack.gif"),
            "gym",
            key=first.frames_key("gym"),
            fps=5.0,
            size=(172, 172),
            realtime=False,
            progress=False,
        )
    last_slot = int(stats.last_id.split("-")[0]) // 200
    first.wait_for(lambda: any(p.slot == last_slot for _, p in first.predictions("gym")), what="predictions")
    opened = Alert.from_fields(first.client.xrange(first.settings.alerts_stream("gym"))[0][1])
    assert opened.event == "open" and opened.label == "jumping jacks"
    series = {"camera": "gym", "rule": "jumping", "label": "jumping jacks"}

    def sample(h, name: str) -> float | None:  # type: ignore[no-untyped-def]
        value: float | None = h.metrics.registry.get_sample_value(name, series)
        return value

    # Still open (the camera is not idle yet): the owner has the series, the peak as last published.
    events = [Alert.from_fields(f) for _, f in first.client.xrange(first.settings.alerts_stream("gym"))]
    assert [e.event for e in events if e.event != "update"] == ["open"]
    assert sample(first, "movinet_action_alert_peak_score") == pytest.approx(events[-1].peak_score)
    assert sample(first, "movinet_action_alert_start_timestamp_seconds") == opened.start_ms / 1000
    first.stop()  # drain: checkpoint, release, leave
    assert sample(first, "movinet_action_alert_peak_score") is None
    assert sample(first, "movinet_action_alert_start_timestamp_seconds") is None

    second = new(
        harnesses,
        redis_url,
        real_backend,
        labels,
        prefix=first.prefix,
        alert_rules=rules,
        idle_timeout_seconds=5,
    )
    second.start()
    second.wait_for(
        lambda: sample(second, "movinet_action_alert_start_timestamp_seconds") is not None,
        timeout=20,
        what="the open alert's series on the new owner",
    )
    assert sample(second, "movinet_action_alert_start_timestamp_seconds") == opened.start_ms / 1000
    assert sample(second, "movinet_action_alert_peak_score") == pytest.approx(events[-1].peak_score)

    def closed() -> list[Alert]:
        stored = [Alert.from_fields(f) for _, f in second.client.xrange(second.settings.alerts_stream("gym"))]
        return [e for e in stored if e.event == "close"]

    second.wait_for(closed, timeout=30, what="the close once the camera is idle")
    assert closed()[0].alert_id == opened.alert_id and closed()[0].worker == second.settings.worker_id
    second.wait_for(
        lambda: sample(second, "movinet_action_alert_peak_score") is None, timeout=5, what="series removed"
    )
    assert sample(second, "movinet_action_alert_start_timestamp_seconds") is None
    second.stop()
