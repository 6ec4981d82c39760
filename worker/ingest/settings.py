"""The ingest service's settings (env-first, a flag each, as the worker's) and its camera list (YAML).

The camera list is a file so that it can be a Kubernetes ConfigMap and be re-read on SIGHUP:

    cameras:
      - id: lobby-1
        url: rtsp://10.0.0.5:554/stream1
      - id: dock
        url: http://cam-dock.local/video.ts
        fps: 2
        size: 224x224
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.messages import CAMERA_ID_PATTERN
from worker.config import ENV_PREFIX, Settings, add_settings_arguments
from worker.tools.publish import DEFAULT_SIZE, _size

# The worker's own defaults for the keys both sides must agree on, and for how long frames are kept.
_WORKER = Settings.model_fields
DEFAULT_FPS = 5.0  # the training rate of MoViNet A0-A2: frames above it are dropped by the worker anyway


def _parse_size(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return _size(value)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
    return value


class CameraSpec(BaseModel):
    """One camera of the list; unset fields take the service's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=CAMERA_ID_PATTERN, description="camera ID: its frame stream is frames:{id}")
    url: str = Field(min_length=1, description="rtsp://, http(s)://, udp://, srt:// URL, or a file (looped)")
    fps: float | None = Field(None, gt=0.1, le=60, description="frames per second published")
    size: tuple[int, int] | None = Field(
        None, description="HxW the frames are resized to before JPEG encoding, or 'full'"
    )
    quality: int | None = Field(None, ge=1, le=100, description="JPEG quality")
    options: dict[str, str] = Field(
        {}, description="FFmpeg options for opening the URL, e.g. {rtsp_transport: udp}"
    )

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return _parse_size(value)


class CameraList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cameras: list[CameraSpec] = Field(default_factory=list, max_length=10_000)

    @field_validator("cameras")
    @classmethod
    def _unique(cls, cameras: list[CameraSpec]) -> list[CameraSpec]:
        ids = [c.id for c in cameras]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"camera IDs listed more than once: {', '.join(twice)}")
        return cameras


class ConfigError(ValueError):
    """A camera list that cannot be read or is invalid; the message names the file and field."""


def load_cameras(path: str | Path) -> list[CameraSpec]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        return CameraList.model_validate(data).cameras
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{path}: invalid camera list:\n" + "\n".join(lines)) from None


class IngestSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, populate_by_name=True
    )

    config: str | None = Field(None, description="the camera list (YAML; re-read on SIGHUP)")
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "MOVINET_REDIS_URL"),
        description="Redis to publish frames to",
    )
    fps: float = Field(
        DEFAULT_FPS, gt=0.1, le=60, description="frames per second published per camera (default 5)"
    )
    size: tuple[int, int] | None = Field(
        DEFAULT_SIZE, description="HxW frames are resized to before encoding, or 'full' (default 172x172)"
    )
    quality: int = Field(90, ge=1, le=100, description="JPEG quality")
    retention_seconds: float = Field(
        _WORKER["input_retention_seconds"].default,
        ge=0,
        description="frames older than this are trimmed as new ones are added (XADD MINID ~; 0: never); "
        "keep it at the worker's input_retention_seconds",
    )
    maxlen: int | None = Field(
        None, ge=1, description="trim each frame stream to about this many entries instead (MAXLEN ~)"
    )
    frames_key: str = Field(_WORKER["frames_key"].default, description="frame stream key template")
    control_stream: str = Field(_WORKER["control_stream"].default, description="control stream")
    announce: bool = Field(True, description="subscribe each camera on the control stream when it starts")
    reconnect_min_seconds: float = Field(
        0.5, gt=0, le=60, description="first wait before reconnecting; doubles per failure (jittered)"
    )
    reconnect_max_seconds: float = Field(
        2.0,
        gt=0,
        le=600,
        description="longest wait between reconnects: a restored camera is back within about this long "
        "(an attempt on a dead camera costs one TCP handshake)",
    )
    stall_seconds: float = Field(
        10.0, gt=0.1, le=600, description="no frame (or no data) for this long: reconnect"
    )
    open_timeout_seconds: float = Field(10.0, gt=0.1, le=600, description="longest wait to open a URL")
    metrics_port: int = Field(9110, ge=0, le=65535, description="/metrics, /healthz, /readyz port (0: none)")
    metrics_host: str = Field("0.0.0.0", description="address the metrics server binds")
    grace_seconds: float = Field(5.0, gt=0, le=600, description="on SIGTERM: wait this long for the feeds")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$", description="log level")

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return _parse_size(value)

    @field_validator("frames_key")
    @classmethod
    def _has_camera(cls, value: str) -> str:
        return Settings._has_camera(value)  # the worker's own check: both accept the same templates

    def frames_stream(self, camera: str) -> str:
        return self.frames_key.format(camera=camera)


def add_ingest_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, IngestSettings)
