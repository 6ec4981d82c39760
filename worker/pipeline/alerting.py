"""Alert rules applied to one camera's slots: hysteresis, minimum duration, cooldown.

The tracker's state is plain JSON, persisted in Redis by the same fenced script that publishes the
slot's prediction, so a worker that takes the camera over continues the same alert: it neither
reopens nor loses it (replayed slots do not re-evaluate rules; the stored state already holds them).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from schemas.alerts import Alert
from schemas.rules import AlertRule
from worker.pipeline.evidence import alert_id, evidence_key


@dataclasses.dataclass
class RuleState:
    open: bool = False
    above: int = 0  # consecutive slots at or above the threshold
    below: int = 0  # consecutive slots below it, while open
    run_start_ms: int = 0  # start of the current run of slots above
    run_peak: float = 0.0
    run_peak_ms: int = 0
    run_label: str = ""
    start_ms: int = 0  # the open alert's start
    peak: float = 0.0
    peak_ms: int = 0
    label: str = ""
    emitted_peak: float = 0.0  # peak in the last open/update event
    last_above_end_ms: int = 0
    cooldown_until_ms: int = 0
    last_slot: int | None = None


class AlertTracker:
    """All rules of one camera."""

    def __init__(self, camera: str, rules: Sequence[AlertRule], labels: Sequence[str], worker: str) -> None:
        self.camera = camera
        self.rules = list(rules)
        self.worker = worker
        index = {name: i for i, name in enumerate(labels)}
        self._watch = {}
        for rule in self.rules:
            unknown = [name for name in rule.labels if name not in index]
            present = [name for name in rule.watched() if name in index]
            if unknown or not present:
                raise ValueError(
                    f"alert rule {rule.name!r}: labels not in the model's label list: {unknown[:3]}"
                )
            # A group's labels the model lacks (a fine-tuned label set) are skipped; named ones must exist.
            self._watch[rule.name] = np.array([index[name] for name in present], np.int64)
        self.labels = list(labels)
        self.evidence: str | None = None  # the camera's evidence index key: events name their evidence
        self.states: dict[str, RuleState] = {rule.name: RuleState() for rule in self.rules}

    # ---- persistence -----------------------------------------------------------------------

    def dump(self) -> str:
        return json.dumps(
            {name: dataclasses.asdict(s) for name, s in self.states.items()}, separators=(",", ":")
        )

    def load(self, text: str | bytes | None) -> None:
        if not text:
            return
        stored: dict[str, Any] = json.loads(text)
        for name, values in stored.items():
            if name in self.states:  # rules removed since are forgotten
                self.states[name] = RuleState(**values)

    def open_alerts(self) -> list[tuple[str, int]]:
        """(rule, start_ms) of the alerts open now."""
        return [(name, s.start_ms) for name, s in self.states.items() if s.open]

    @property
    def active(self) -> dict[str, bool]:
        return {name: s.open for name, s in self.states.items()}

    # ---- evaluation ------------------------------------------------------------------------

    def _event(self, kind: str, rule: AlertRule, st: RuleState, slot: int, score: float) -> Alert:
        return Alert(
            event=kind,  # type: ignore[arg-type]
            alert_id=alert_id(self.camera, rule.name, st.start_ms),
            camera=self.camera,
            rule=rule.name,
            label=st.label,
            start_ms=st.start_ms,
            end_ms=st.last_above_end_ms if kind == "close" else None,
            slot=slot,
            score=min(max(score, 0.0), 1.0),
            peak_score=min(max(st.peak, 0.0), 1.0),
            peak_ms=st.peak_ms,
            worker=self.worker,
            evidence=evidence_key(self.evidence, rule.name, st.start_ms) if self.evidence else None,
        )

    def close_all(self, slot: int) -> list[Alert]:
        """Close open alerts (the camera went quiet): the activity is no longer seen."""
        events = []
        for rule in self.rules:
            st = self.states[rule.name]
            if st.open:
                events.append(self._close(rule, st, slot, 0.0))
        return events

    def _close(self, rule: AlertRule, st: RuleState, slot: int, score: float) -> Alert:
        event = self._event("close", rule, st, slot, score)
        st.open, st.above, st.below = False, 0, 0
        st.cooldown_until_ms = st.last_above_end_ms + int(rule.cooldown_seconds * 1000)
        return event

    def evaluate(self, slot: int, start_ms: int, end_ms: int, probs: np.ndarray) -> list[Alert]:
        events: list[Alert] = []
        for rule in self.rules:
            st = self.states[rule.name]
            if st.last_slot is not None and slot <= st.last_slot:
                continue  # already evaluated (before a restart)
            watched = self._watch[rule.name]
            best = int(watched[np.argmax(probs[watched])])
            score, label = float(probs[best]), self.labels[best]
            gap = slot - st.last_slot - 1 if st.last_slot is not None else 0
            st.last_slot = slot
            if gap > 0:  # slots without predictions count as below the threshold
                st.above = 0
                if st.open:
                    st.below += gap
            hit = score >= rule.threshold
            if not st.open:
                if not hit:
                    st.above = 0
                    continue
                if st.above == 0:
                    st.run_start_ms, st.run_peak = start_ms, 0.0
                st.above += 1
                if score > st.run_peak:
                    st.run_peak, st.run_peak_ms, st.run_label = score, start_ms, label
                st.last_above_end_ms = end_ms
                if st.above >= rule.open_after and start_ms >= st.cooldown_until_ms:
                    st.open, st.below = True, 0
                    st.start_ms, st.peak, st.peak_ms, st.label = (
                        st.run_start_ms,
                        st.run_peak,
                        st.run_peak_ms,
                        st.run_label,
                    )
                    st.emitted_peak = st.peak
                    events.append(self._event("open", rule, st, slot, score))
                continue
            if hit:
                st.below = 0
                st.last_above_end_ms = end_ms
                if score > st.peak:
                    st.peak, st.peak_ms, st.label = score, start_ms, label
                if rule.update_delta and st.peak - st.emitted_peak >= rule.update_delta:
                    st.emitted_peak = st.peak
                    events.append(self._event("update", rule, st, slot, score))
                continue
            st.below += 1
            lasted_ms = end_ms - st.start_ms
            if st.below >= rule.close_after and lasted_ms >= rule.min_duration_seconds * 1000:
                events.append(self._close(rule, st, slot, score))
        return events
