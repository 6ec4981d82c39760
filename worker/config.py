"""The worker's configuration: strict, env-first, every field also a CLI flag.

Each field is an environment variable (`MOVINET_<FIELD>`, plus `REDIS_URL`) and a flag
(`--field-name`); flags win over the environment, which wins over the defaults here. A bad value
exits with a message naming the field.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.rules import AlertRule
from worker import keys
from worker.constants import DEFAULT_TOP_K, TF_BATCH_SIZES
from worker.keys import as_written, to_format

ENV_PREFIX = "MOVINET_"
# Key templates: written `frames:{<camera>}` (or in str.format spelling), kept in str.format spelling.
TEMPLATE_FIELDS = (
    "frames_key",
    "predictions_key",
    "owner_key",
    "alert_state_key",
    "alerts_key",
    "checkpoint_key",
    "evidence_key",
)
S = TypeVar("S", bound=BaseSettings)


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
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=600, description="labels per published prediction")
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
    max_png_pixels: int = Field(
        2_073_600,
        ge=1,
        description="PNG frames with more pixels are dead-lettered (PNG decodes ~20x slower than JPEG: a "
        "4096x4096 16-bit PNG takes half a second; default 1920x1080)",
    )
    decode_threads: int = Field(1, ge=1, le=64, description="threads decoding frames off the event loop")
    decode_budget_ms: float = Field(
        100.0,
        gt=0,
        le=60_000,
        description="decode time one camera may take per read; the rest of its entries wait for the next "
        "read, so one camera of heavy frames cannot starve the others",
    )
    clock_ahead_seconds: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="entries whose ID time is this far ahead of the wall clock are dead-lettered "
        "(clock_ahead) and the camera reported",
    )
    capture_skew_seconds: float = Field(
        3600.0,
        gt=0,
        le=10 * 86_400,
        description="frames whose capture_ms is this far from their entry ID time are dead-lettered "
        "(bad_capture_time)",
    )
    read_count: int = Field(64, ge=1, le=10_000, description="entries read per camera per Redis call")
    block_ms: int = Field(100, ge=1, le=60_000, description="longest wait for new frames per read")
    batch_sizes: list[int] = Field(
        list(TF_BATCH_SIZES),
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
        60.0,
        ge=0,
        description="frames older than this behind a camera's committed position, or behind its stream's "
        "newest frame, are trimmed (0: never); keep it above window + max_gap_slots slots, which a "
        "takeover replays, and above max_lag_seconds",
    )
    alert_rules: list[AlertRule] = Field(
        [],
        description="default alert rules (JSON list; per-camera rules on the control stream replace them), "
        'e.g. [{"name": "exercise", "group": "exercise", "threshold": 0.6}]',
    )
    alerts_maxlen: int = Field(100_000, ge=1, description="approximate length of the alerts stream")
    alerts_key: str = Field(
        keys.ALERTS_STREAM, description="alert events stream (with --redis-cluster it must contain {camera})"
    )
    alert_state_key: str = Field(
        to_format(keys.ALERT_STATE_KEY), description="per-camera alert state key template"
    )
    checkpoint_key: str = Field(
        to_format(keys.CHECKPOINT_KEY), description="per-camera model state checkpoint key template"
    )
    evidence: bool = Field(
        True,
        description="keep each alert's evidence (its frames as received and its predictions) in Redis, "
        "for `movinet-worker explain ALERT_ID`",
    )
    evidence_key: str = Field(
        to_format(keys.EVIDENCE_KEY),
        description="per-camera evidence key template: an index of the camera's alerts; each alert's "
        "evidence is <key>:<rule>:<start_ms> (a hash) with its :frames and :predictions streams",
    )
    evidence_seconds: float = Field(
        86_400.0, gt=0, le=365 * 86_400, description="evidence is kept this long after an alert's last slot"
    )
    evidence_max_alert_seconds: float = Field(
        120.0,
        gt=0,
        le=86_400,
        description="an alert's evidence covers at most this long from the start of the window that "
        "opened it; later frames are not kept",
    )
    evidence_max_alert_bytes: int = Field(
        64_000_000, ge=1000, description="bytes of evidence kept per alert, at most (frames and predictions)"
    )
    evidence_max_camera_bytes: int = Field(
        256_000_000,
        ge=1000,
        description="bytes of evidence kept per camera, at most: the oldest closed alerts' evidence is "
        "deleted to make room, and an open alert's stops growing when that is not enough",
    )
    checkpoint_every_slots: int | None = Field(
        None,
        ge=0,
        le=1_000_000,
        description="slots between periodic checkpoints of a camera's model state, which make a crash "
        "takeover exact in ema mode and shorten its replay; keep it under input_retention_seconds "
        "(default: ema_replay_slots in ema mode, 0 = only on a hand-over in windows mode, where the "
        "replay is exact without; costs in the README's failover section)",
    )
    frames_key: str = Field(to_format(keys.FRAMES_KEY), description="input stream key template")
    predictions_key: str = Field(to_format(keys.PREDICTIONS_KEY), description="output stream key template")
    control_stream: str = Field(
        keys.CONTROL_STREAM, description="control stream: subscribe / unsubscribe cameras"
    )
    deadletter_stream: str = Field(
        keys.DEADLETTER_STREAM, description="stream of rejected entries with reasons"
    )
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
    owner_key: str = Field(to_format(keys.OWNER_KEY), description="camera lease key template")
    workers_key: str = Field("workers", description="sorted set of live workers (score: heartbeat expiry)")
    capacity_key: str = Field(
        "workers:capacity", description="hash of live workers' capacities (cameras each takes)"
    )
    max_cameras: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="the most cameras this worker takes (default: as many as its measured load allows)",
    )
    memory_limit_mb: float | None = Field(
        None,
        ge=64,
        le=1_048_576,
        description="the memory this worker may use, in MiB (default: its cgroup's limit, as Kubernetes "
        "sets it, else none); it takes no more cameras than 75 percent of it holds",
    )
    target_load: float = Field(
        0.85,
        gt=0.1,
        le=1.0,
        description="busy fraction of the model (or decode) thread, or 1 / the share of its cameras' time "
        "it keeps up with when under 90 percent, above which the worker sheds cameras; "
        "under 70 percent of it, it takes more; 1.0: never shed (a fixed fleet, or a replay of a backlog)",
    )
    latency_budget_ms: float | None = Field(
        None,
        ge=0,
        le=60_000,
        description="batching: a round waits for more cameras' slots while every slot it holds can still be "
        "published within this many ms of its capture, planning on three quarters of it (a bigger batch "
        "costs less per camera-frame); a slot that would miss it is never held (default: one slot, "
        "1000/fps; 0: step whatever is ready)",
    )
    readahead_frames: int = Field(
        1024,
        ge=16,
        le=1_000_000,
        description="decoded frames queued across all cameras, at most (each ~89 kB at 172x172): "
        "bounds memory",
    )
    max_lag_seconds: float = Field(
        20.0,
        gt=1,
        le=86_400,
        description="a camera further than this behind its stream's newest frame skips ahead to recent "
        "frames (counted; its windows restart as after a long gap) rather than serve an ever older backlog",
    )
    grace_seconds: float = Field(
        20.0, gt=0, le=3600, description="on SIGTERM: finish the slot, publish and ack within this time"
    )
    redis_timeout_seconds: float = Field(
        10.0,
        gt=0.5,
        le=600,
        description="socket timeout of every Redis call (connect, read, write); a call that hangs "
        "longer fails and is retried",
    )
    task_restarts: int = Field(
        5,
        ge=0,
        le=1000,
        description="a task that fails unexpectedly is restarted; this many failures within "
        "task_restart_window_seconds exit the process (non-zero) so that it is restarted whole",
    )
    task_restart_window_seconds: float = Field(
        300.0, gt=0, le=86_400, description="window over which task restarts are counted"
    )
    stall_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="an event loop stalled this long stops renewing its leases (other workers take its "
        "cameras) and reports not ready",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @field_validator(*TEMPLATE_FIELDS, mode="before")
    @classmethod
    def _as_format(cls, value: Any) -> Any:
        return to_format(value) if isinstance(value, str) else value

    @field_validator(
        "frames_key", "predictions_key", "owner_key", "alert_state_key", "checkpoint_key", "evidence_key"
    )
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

    def checkpoint(self, camera: str) -> str:
        return self.checkpoint_key.format(camera=camera)

    def evidence_index(self, camera: str) -> str:
        return self.evidence_key.format(camera=camera)

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
        if data.get("redis_url"):
            data["redis_url"] = redact_url(data["redis_url"])
        return data


def redact_url(url: str | None) -> str:
    """`url` with its password (and any `password=` query value) replaced by ***: safe to print or log."""
    if not url:
        return ""
    text = re.sub(r"(?i)(password=)[^&#]*", r"\1***", url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
        authority = f"{user}:***@{host}" if user else f"***@{host}"
    return f"{scheme}://{authority}{slash}{tail}"


KEY_FIELDS = (
    "capacity_key",
    "frames_key",
    "predictions_key",
    "control_stream",
    "deadletter_stream",
    "owner_key",
    "workers_key",
    "alerts_key",
    "alert_state_key",
    "checkpoint_key",
    "evidence_key",
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


def add_settings_arguments(
    parser: argparse.ArgumentParser, settings_class: type[BaseSettings] = Settings
) -> None:
    """One flag per field; the default is None so that only flags actually given override. The help
    shows the field's default and, for a fixed set of values, the choices."""
    group = parser.add_argument_group("settings (flag, or environment variable)")
    for name, field in settings_class.model_fields.items():
        flag = "--" + name.replace("_", "-")
        shown = _shown_default(field.default)
        said = f" (default: {shown})" if shown is not None else ""
        help_text = f"{field.description}{said} [env: {env_name(name)}]".replace("%", "%%")
        if field.annotation is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        group.add_argument(
            flag, default=None, help=help_text, choices=choices, metavar=None if choices else name.upper()
        )


def _shown_default(default: Any) -> str | None:
    """A field's default as a user writes it, or None when there is nothing worth saying."""
    if default is None or default is PydanticUndefined or default == []:
        return None
    if isinstance(default, list):
        return ",".join(str(v) for v in default)
    if isinstance(default, str):
        return as_written(default) if "{camera}" in default else (default or None)
    return str(default)


def _json_values(settings_class: type[BaseSettings], given: dict[str, Any]) -> dict[str, Any]:
    """Flags for list or object fields written as JSON (as the environment takes them), parsed."""
    out = dict(given)
    for name, value in given.items():
        field = settings_class.model_fields.get(name)
        if field is None or not isinstance(value, str) or get_origin(field.annotation) not in (list, dict):
            continue
        if value.lstrip().startswith(("[", "{")):
            try:
                out[name] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise SystemExit(
                    f"invalid configuration: {name} (--{name.replace('_', '-')} / {env_name(name)}): "
                    f"not valid JSON ({exc}); quote it for the shell, e.g. --{name.replace('_', '-')} '[...]'"
                ) from None
    return out


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings from env, then flags; raises SystemExit naming each bad field."""
    return load_settings(Settings, args, **overrides)


def load_settings(settings_class: type[S], args: argparse.Namespace, **overrides: Any) -> S:
    """Any settings class from env, then its flags (`add_settings_arguments`); SystemExit when bad."""
    fields = settings_class.model_fields
    given = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    given.update({k: v for k, v in overrides.items() if v is not None})
    given = _json_values(settings_class, given)
    try:
        return settings_class(**given)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            name = field.split(".")[0]
            source = f"--{name.replace('_', '-')} / {env_name(name)}" if name in fields else field
            lines.append(f"  {field} ({source}): {err['msg']}")
        raise SystemExit("invalid configuration:\n" + "\n".join(lines)) from None
