"""Alert rules: which labels to watch and how a run of scores becomes one alert.

A rule watches one score per slot (the highest probability among its labels) and opens an alert
after `open_after` consecutive slots at or above its threshold, keeps it open at least
`min_duration_seconds`, closes it after `close_after` consecutive slots below, and opens no new one
for `cooldown_seconds` after a close: one alert per activity, no flapping.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Self

RULE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"

# Named groups of Kinetics-600 labels, for rules that care about a kind of activity.
LABEL_GROUPS: dict[str, tuple[str, ...]] = {
    "exercise": (
        "jumping jacks",
        "push up",
        "squat",
        "lunge",
        "situp",
        "exercising with an exercise ball",
        "doing aerobics",
        "mountain climber (exercise)",
    ),
    "fighting": (
        "punching person (boxing)",
        "wrestling",
        "slapping",
        "headbutting",
        "sword fighting",
        "capoeira",
        "drop kicking",
        "arm wrestling",
    ),
    "falling": ("falling off bike", "falling off chair", "faceplanting"),
    "smoking": ("smoking", "smoking hookah", "smoking pipe"),
}


class AlertRule(BaseModel):
    """When to raise an action alert. Set per camera (control stream) or as the worker's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=RULE_NAME_PATTERN, description="Rule name; a metric label, so keep the set small."
    )
    labels: tuple[str, ...] = Field(
        default=(), max_length=600, description="Kinetics labels the rule watches (and/or `group`)."
    )
    group: str | None = Field(
        default=None, description="A named group of labels: " + ", ".join(sorted(LABEL_GROUPS)) + "."
    )
    threshold: float = Field(
        default=0.6, gt=0, le=1, description="Score (probability) at or above which a slot counts."
    )
    open_after: int = Field(
        default=3,
        ge=1,
        le=10_000,
        description="Consecutive slots at or above the threshold that open an alert.",
    )
    close_after: int = Field(
        default=5, ge=1, le=10_000, description="Consecutive slots below the threshold that close it."
    )
    min_duration_seconds: float = Field(
        default=2.0, ge=0, le=86_400, description="An open alert stays open at least this long."
    )
    cooldown_seconds: float = Field(
        default=10.0, ge=0, le=86_400, description="After a close, no new alert for this rule for this long."
    )
    update_delta: float = Field(
        default=0.05, ge=0, le=1, description="Emit an `update` when the peak grows by this much (0: never)."
    )

    @model_validator(mode="after")
    def _watches_something(self) -> Self:
        if not self.labels and not self.group:
            raise ValueError("a rule needs `labels` or `group`")
        if self.group is not None and self.group not in LABEL_GROUPS:
            raise ValueError(f"unknown group {self.group!r}; known: {', '.join(sorted(LABEL_GROUPS))}")
        return self

    def watched(self) -> tuple[str, ...]:
        return self.labels + (LABEL_GROUPS[self.group] if self.group else ())
