"""Action alert events: intervals raised by the rules of `schemas.rules`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from typing_extensions import Self

from schemas.messages import MAX_INT, CameraId, Millis, Name, StreamMessage
from schemas.rules import RULE_NAME_PATTERN


class Alert(StreamMessage):
    """An alert event on the stream `alerts`: `open` when an activity starts, `update` when its peak
    grows, `close` when it ends. One alert per activity: a camera and rule never overlap."""

    SCHEMA_RULES = (
        {
            "if": {"properties": {"event": {"const": "close"}}, "required": ["event"]},
            "then": {"required": ["end_ms"]},
            "else": {"not": {"required": ["end_ms"]}},
        },
    )

    event: Literal["open", "update", "close"] = Field(description="What happened to the alert.")
    alert_id: Name = Field(description="`<camera>:<rule>:<start_ms>`: the same for all events of one alert.")
    camera: CameraId = Field(description="Camera ID.")
    rule: str = Field(pattern=RULE_NAME_PATTERN, description="Name of the rule that raised it.")
    label: Name = Field(description="The watched label with the highest score at the peak.")
    start_ms: Millis = Field(description="Start of the first slot of the run that opened the alert.")
    end_ms: Millis | None = Field(
        default=None, description="close only: end of the last slot at or above the threshold."
    )
    slot: int = Field(ge=0, le=MAX_INT, description="The slot that caused this event.")
    score: float = Field(ge=0, le=1, description="The rule's score at that slot.")
    peak_score: float = Field(ge=0, le=1, description="Highest score since the alert opened.")
    peak_ms: Millis = Field(description="Start of the slot with the peak score.")
    worker: Name = Field(description="ID of the worker that emitted the event.")
    evidence: Name | None = Field(
        default=None,
        description="Redis key of the alert's evidence (a hash; its frames as received in `<key>:frames`, "
        "its predictions in `<key>:predictions`), kept for a while after the alert's last slot; "
        "`movinet-worker explain <alert_id>` replays the model on it. Absent when none is kept.",
    )

    @model_validator(mode="after")
    def _close_has_end(self) -> Self:
        if (self.event == "close") != (self.end_ms is not None):
            raise ValueError("end_ms is set on close events, and only on them")
        return self
