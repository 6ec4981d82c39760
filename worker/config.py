"""The worker's configuration: strict, env-first, every field also a CLI flag.

Each field is an environment variable (`MOVINET_<FIELD>`, plus `REDIS_URL`) and a flag
(`--field-name`); flags win over the environment, which wins over the defaults here. A bad value
exits with a message naming the field.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.rules import AlertRule

ENV_PREFIX = "MOVINET_"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, populate_by_name=True
    )

    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "MOVINET_REDIS_URL"),
        description="Redis to read frames from and publish to (redis://, rediss://, unix://). "
        "`demo` starts a local one when unset",
    )
    model: str | None = Field(
        None, description="MoViNet stream model: TF Hub handle, SavedModel folder or .tflite file"
    )
    backend: Literal["auto", "tfhub", "litert"] = Field(
        "auto", description="model backend; auto picks litert for .tflite files"
    )
    labels: str | None = Field(
        None, description="label file, one per line; default: the tutorial's list, fetched once and cached"
    )
    worker_id: str = Field(
        default_factory=default_worker_id,
        min_length=1,
        max_length=200,
        description="this worker's name in Redis (default: host-pid)",
    )
    metrics_port: int = Field(9108, ge=0, le=65535, description="Prometheus /metrics port (0: none)")
    metrics_host: str = Field("0.0.0.0", description="address the metrics server binds")
    top_k: int = Field(5, ge=1, le=600, description="labels per published prediction")
    fps: float | None = Field(
        None, gt=0.1, le=60, description="model clock, frames per second (default: the model's training rate)"
    )
    window: int | None = Field(
        None,
        ge=2,
        le=1000,
        description="slots per window before a state is reset (default: the model's training clip, "
        "50 for A0-A2); two windows staggered by half give every prediction window/2..window frames",
    )
    temporal: Literal["windows", "ema"] = Field(
        "windows",
        description="how a camera's context is bounded: 'windows' keeps two staggered states reset every "
        "window slots (each prediction exactly the base model's on its window's frames; two model steps "
        "per slot); 'ema' keeps one state whose pooled features are an exponential moving average "
        "(one model step per slot, half the compute and memory; a takeover rebuilds it approximately)",
    )
    ema_frames: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="ema mode: the frame count c each state is held at, i.e. weight 1/(c+1) on the "
        "newest frame (default: window/2, the mean age of a window's frames)",
    )
    ema_replay_slots: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="ema mode: slots a worker replays to rebuild a camera it picks up; older frames "
        "weigh (c/(c+1))^slots in the uninterrupted state (default: 4 * ema_frames, which leaves them "
        "under 2 percent)",
    )
    max_gap_slots: int = Field(
        5,
        ge=0,
        le=1000,
        description="missing slots filled by repeating a camera's last frame; a longer gap resets its state",
    )
    idle_timeout_seconds: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="a camera with no frame for this long is dropped and its state freed",
    )
    max_frame_bytes: int = Field(
        8_000_000, ge=1024, le=256_000_000, description="larger frame entries are dead-lettered"
    )
    max_frame_pixels: int = Field(
        16_777_216, ge=1, description="decoded images with more pixels are dead-lettered"
    )
    read_count: int = Field(64, ge=1, le=10_000, description="entries read per camera per Redis call")
    block_ms: int = Field(100, ge=1, le=60_000, description="longest wait for new frames per read")
    batch_sizes: list[int] = Field(
        [1, 2, 4, 8, 16, 32, 64],
        description="TF backend: padded batch sizes (each costs ~3 s of set-up on first use)",
    )
    interpreters: int | None = Field(
        None, ge=1, le=64, description="LiteRT backend: interpreters run in parallel (default: one per core)"
    )
    threads: int = Field(1, ge=1, le=64, description="LiteRT backend: threads per interpreter")
    predictions_maxlen: int = Field(
        10_000, ge=1, description="approximate length output streams are trimmed to"
    )
    deadletter_maxlen: int = Field(10_000, ge=1, description="approximate length of the dead-letter stream")
    input_retention_seconds: float = Field(
        300.0,
        ge=0,
        description="frames older than this behind a camera's committed position are trimmed (0: never); "
        "keep it above window + max_gap_slots slots, which a takeover replays",
    )
    alert_rules: list[AlertRule] = Field(
        [],
        description="default alert rules (JSON list; per-camera rules on the control stream replace them), "
        'e.g. [{"name": "exercise", "group": "exercise", "threshold": 0.6}]',
    )
    alerts_maxlen: int = Field(100_000, ge=1, description="approximate length of the alerts stream")
    alerts_key: str = Field(
        "alerts", description="alert events stream (with --redis-cluster it must contain {camera})"
    )
    alert_state_key: str = Field("alertstate:{{{camera}}}", description="per-camera alert state key template")
    frames_key: str = Field("frames:{{{camera}}}", description="input stream key template")
    predictions_key: str = Field("predictions:{{{camera}}}", description="output stream key template")
    control_stream: str = Field("cameras", description="control stream: subscribe / unsubscribe cameras")
    deadletter_stream: str = Field("deadletter", description="stream of rejected entries with reasons")
    group: str = Field("movinet", min_length=1, description="consumer group on every frames stream")
    discover: bool = Field(True, description="also serve cameras whose frame streams exist (SCAN)")
    discover_interval_seconds: float = Field(
        5.0, gt=0, le=3600, description="how often frame streams are looked for"
    )
    start_from: Literal["new", "all"] = Field(
        "all",
        description="where a camera seen for the first time starts: its retained history, or new frames",
    )
    redis_cluster: bool = Field(False, description="REDIS_URL names a node of a Redis Cluster")
    lease_seconds: float = Field(
        8.0,
        gt=0.5,
        le=600,
        description="camera lease: a dead worker's cameras are taken over this long after its last renewal",
    )
    heartbeat_seconds: float = Field(
        2.0, gt=0.05, le=60, description="how often leases and the worker registry are renewed and rebalanced"
    )
    owner_key: str = Field("owner:{{{camera}}}", description="camera lease key template")
    workers_key: str = Field("workers", description="sorted set of live workers (score: heartbeat expiry)")
    grace_seconds: float = Field(
        20.0, gt=0, le=3600, description="on SIGTERM: finish the slot, publish and ack within this time"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @field_validator("frames_key", "predictions_key", "owner_key", "alert_state_key")
    @classmethod
    def _has_camera(cls, value: str) -> str:
        try:
            uses_camera = value.format(camera="a") != value.format(camera="b")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"not a valid template ({exc}); write literal braces as {{{{ }}}}") from exc
        if not uses_camera:
            raise ValueError("must contain {camera}")
        return value

    @model_validator(mode="after")
    def _cluster_keys(self) -> Settings:
        if self.redis_cluster and "{camera}" not in self.alerts_key:
            raise ValueError("alerts_key must contain {camera} with redis_cluster (one shard per camera)")
        return self

    @field_validator("batch_sizes", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [int(v) for v in value.split(",") if v.strip()]
        return value

    @field_validator("batch_sizes")
    @classmethod
    def _positive_sizes(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 1:
            raise ValueError("must be one or more sizes >= 1")
        return sorted(set(value))

    def frames_stream(self, camera: str) -> str:
        return self.frames_key.format(camera=camera)

    def predictions_stream(self, camera: str) -> str:
        return self.predictions_key.format(camera=camera)

    def owner(self, camera: str) -> str:
        return self.owner_key.format(camera=camera)

    def alert_state(self, camera: str) -> str:
        return self.alert_state_key.format(camera=camera)

    def alerts_stream(self, camera: str) -> str:
        return self.alerts_key.format(camera=camera) if "{camera}" in self.alerts_key else self.alerts_key

    def camera_from_frames_key(self, key: str) -> str | None:
        prefix, _, suffix = self.frames_key.partition("{camera}")
        prefix, suffix = prefix.format(), suffix.format()
        if key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix) + len(suffix):
            return key[len(prefix) : len(key) - len(suffix)]
        return None

    def ema_plan(self, window: int) -> tuple[int | None, int | None]:
        """EMA mode for a model window of `window` slots: (frame count held, slots a pick-up replays);
        (None, None) in windows mode."""
        if self.temporal != "ema":
            return None, None
        held = self.ema_frames or max(1, window // 2)
        return held, self.ema_replay_slots or 4 * held

    def redacted(self) -> dict[str, Any]:
        data = self.model_dump()
        url = data.get("redis_url")
        if url and "@" in url:
            scheme, _, rest = url.partition("://")
            data["redis_url"] = f"{scheme}://***@{rest.split('@', 1)[1]}"
        return data


KEY_FIELDS = (
    "frames_key",
    "predictions_key",
    "control_stream",
    "deadletter_stream",
    "owner_key",
    "workers_key",
    "alerts_key",
    "alert_state_key",
)


def prefixed_keys(prefix: str) -> dict[str, Any]:
    """Every Redis key setting under `prefix`, so that several deployments (or tests) share one Redis."""
    defaults = Settings.model_fields
    return {name: f"{prefix}:{defaults[name].default}" for name in KEY_FIELDS}


def key_env(prefix: str) -> dict[str, str]:
    """`prefixed_keys` as the environment variables a worker process reads them from."""
    return {env_name(name): value for name, value in prefixed_keys(prefix).items()}


def env_name(field: str) -> str:
    return "REDIS_URL" if field == "redis_url" else f"{ENV_PREFIX}{field.upper()}"


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; the default is None so that only flags actually given override."""
    group = parser.add_argument_group("worker settings (flag, or environment variable)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env: {env_name(name)}]"
        if field.annotation is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, default=None, help=help_text, metavar=name.upper())


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings from env, then flags; raises SystemExit naming each bad field."""
    given = {
        name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None
    }
    given.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            name = field.split(".")[0]
            source = (
                f"--{name.replace('_', '-')} / {env_name(name)}" if name in Settings.model_fields else field
            )
            lines.append(f"  {field} ({source}): {err['msg']}")
        raise SystemExit("invalid configuration:\n" + "\n".join(lines)) from None
