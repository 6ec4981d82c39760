"""The messages on the worker's Redis streams, as versioned pydantic models.

A stream entry is a flat map of field name -> bytes, so each model describes one entry's field map.
`to_fields` and `from_fields` are the only way in and out of Redis, so every producer and consumer
agrees on one wire encoding, and `from_fields` turns anything malformed into a `MessageError` whose
`reason` can label a metric and a dead letter. Two JSON Schemas of each are generated from these models
and committed (`python -m schemas.generate`): `schemas/wire/` the entry as stored in Redis (what a client
in another language validates an XRANGE reply with, and what `schemas/asyncapi.yaml` refers to), and
`schemas/*.schema.json` the decoded message (what `tail --json` prints).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import Self

from schemas.rules import AlertRule

SCHEMA_VERSION: Final = 1
# No braces: keys carry the camera in a Redis Cluster hash tag, `frames:{<camera>}`.
CAMERA_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
# Redis entry IDs are two unsigned 64-bit numbers; int64 is what every client language can hold.
MAX_INT = 2**63 - 1
MAX_DETAIL_CHARS = 4096
# Every `MessageError.reason`: the first five from `from_fields`, then `worker.pipeline.codec`'s, then
# the worker's checks of entry IDs, times and control messages (`worker.pipeline.reading`,
# `worker.pipeline.worker`).
REASONS = (
    "missing_field",
    "unknown_field",
    "bad_type",
    "bad_encoding",
    "bad_version",
    "undecodable",
    "wrong_size",
    "too_large",
    "wrong_camera",
    "bad_entry_id",
    "clock_ahead",
    "bad_capture_time",
    "unknown_label",
    "unprocessable",
)


class MessageError(ValueError):
    """A stream entry or image the worker cannot use; `reason` is one of `REASONS`, `detail` is for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _wire_bool(value: Any) -> Any:
    """Booleans are '0'/'1' on the wire; pydantic's lax 'yes'/'off'/'t' would hide a client's bug."""
    if isinstance(value, bool):
        return value
    if value in ("0", "1", 0, 1):
        return value in ("1", 1)
    raise PydanticCustomError("bool_parsing", "must be '0' or '1'")


def _clip(value: Any) -> Any:
    """A dead letter must not itself be refused because the error it reports was long."""
    return value[:MAX_DETAIL_CHARS] if isinstance(value, str) else value


def _message_schema_extra(schema: dict[str, Any], model: type[BaseModel]) -> None:
    schema["properties"]["v"].pop("default", None)  # required on the wire, default only in Python
    written: frozenset[str] = getattr(model, "ALWAYS_WRITTEN", frozenset())
    required = [r for r in schema.get("required", []) if r != "v"]
    schema["required"] = ["v", *required, *sorted(written - set(required))]
    rules = getattr(model, "SCHEMA_RULES", ())
    if rules:
        schema["allOf"] = list(rules)


def _base64_in_json(schema: dict[str, Any]) -> None:
    """Decoded JSON has no bytes: Frame dumps them as base64 (`ser_json_bytes`)."""
    schema.pop("format", None)
    schema["contentEncoding"] = "base64"


WireBool = Annotated[bool, BeforeValidator(_wire_bool)]
CameraId = Annotated[str, Field(pattern=CAMERA_ID_PATTERN)]
Millis = Annotated[int, Field(ge=0, le=MAX_INT)]
Name = Annotated[str, Field(min_length=1, max_length=256)]


class StreamMessage(BaseModel):
    """Base of every stream entry: the version check and the wire encoding live here, once."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_message_schema_extra)
    # Fields sent as raw bytes (never decoded as text) and fields sent as JSON text.
    BYTES_FIELDS: ClassVar[frozenset[str]] = frozenset()
    JSON_FIELDS: ClassVar[frozenset[str]] = frozenset()
    # Fields with a Python default that the worker nevertheless always writes: required in the schemas.
    ALWAYS_WRITTEN: ClassVar[frozenset[str]] = frozenset()
    # Cross-field rules of the model validators, as JSON Schema conditions on string fields.
    SCHEMA_RULES: ClassVar[tuple[dict[str, Any], ...]] = ()

    v: Literal[1] = Field(
        default=SCHEMA_VERSION,
        description="Message format version, 1. A reader rejects a version it does not know.",
    )

    def to_fields(self) -> dict[str, bytes | str | int | float]:
        """The entry's field map for redis-py's XADD; numbers are formatted here, not by the client."""
        out: dict[str, bytes | str | int | float] = {}
        for name, value in self:
            if value is None:
                continue
            if name in self.JSON_FIELDS:
                plain = self.model_dump(mode="json", include={name})[name]
                out[name] = json.dumps(plain, separators=(",", ":"), ensure_ascii=False)
            elif isinstance(value, bool):
                out[name] = "1" if value else "0"
            elif isinstance(value, bytes):
                out[name] = value
            else:
                out[name] = str(value)
        return out

    @classmethod
    def from_fields(cls, fields: Mapping[bytes | str, bytes | str]) -> Self:
        """Parse an entry as read by XREAD/XRANGE; any problem is a `MessageError`, never a pydantic one."""
        data: dict[str, Any] = {}
        for key, value in fields.items():
            data[key.decode("utf-8", "replace") if isinstance(key, bytes) else key] = value
        # The version first: a newer message may have fields this reader would call unknown.
        if "v" not in data:
            raise MessageError("missing_field", "v: field required")
        version = _text("v", data["v"]).strip()
        if version != str(SCHEMA_VERSION):
            raise MessageError(
                "bad_version",
                f"version {version[:20]!r} is not supported (this reader knows {SCHEMA_VERSION})",
            )
        for name, value in data.items():
            if name in cls.BYTES_FIELDS:
                continue
            data[name] = _text(name, value)
            if name in cls.JSON_FIELDS:
                try:
                    data[name] = json.loads(data[name])
                except (ValueError, RecursionError) as exc:  # RecursionError: '[' nested 100,000 deep
                    raise MessageError("bad_type", f"{name}: not JSON text ({exc})") from None
        data["v"] = SCHEMA_VERSION
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _message_error(exc) from None


def _text(name: str, value: bytes | str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError("bad_type", f"{name}: not UTF-8 text") from None


def _message_error(exc: ValidationError) -> MessageError:
    """The first error names the reason; the detail lists them all, with short inputs only."""
    reasons, parts = [], []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "entry"
        kind = err["type"]
        if kind == "missing":
            reasons.append("missing_field")
        elif kind == "extra_forbidden":
            reasons.append("unknown_field")
        elif kind in REASONS:
            reasons.append(kind)
        elif err["loc"][:1] == ("encoding",):
            reasons.append("bad_encoding")
        else:
            reasons.append("bad_type")
        shown = err.get("input")
        got = f" (got {shown!r:.60})" if isinstance(shown, (str, int, float)) and kind != "missing" else ""
        parts.append(f"{loc}: {err['msg']}{got}")
    return MessageError(reasons[0], "; ".join(parts))


class Frame(StreamMessage):
    """One camera image: an entry of the stream `frames:{<camera>}`.

    The worker places a frame on the camera's model clock by the millisecond part of its Redis entry
    ID, not by `capture_ms`: a publisher that wants frames on the slots of their capture time sets
    explicit entry IDs from it.
    """

    model_config = ConfigDict(ser_json_bytes="base64")
    BYTES_FIELDS = frozenset({"data"})
    SCHEMA_RULES = (
        {
            "if": {"properties": {"encoding": {"const": "rgb24"}}, "required": ["encoding"]},
            "then": {"required": ["width", "height"]},
        },
    )

    camera: CameraId = Field(description="Camera ID; must match the camera in the stream key.")
    seq: int = Field(ge=0, le=MAX_INT, description="The publisher's frame counter, for gaps and logs.")
    capture_ms: Millis | None = Field(
        default=None,
        description="Capture time in ms since the Unix epoch; when absent, the entry ID's millisecond "
        "part is the capture time. Reported back in predictions; the model clock uses the entry ID.",
    )
    encoding: Literal["jpeg", "png", "rgb24"] = Field(
        description="Image format of `data`: a JPEG or PNG file, or raw RGB pixels, row-major, 8 bits "
        "per channel."
    )
    width: int | None = Field(
        default=None, ge=1, le=8192, description="Image width in pixels; required for rgb24."
    )
    height: int | None = Field(
        default=None, ge=1, le=8192, description="Image height in pixels; required for rgb24."
    )
    data: bytes = Field(
        min_length=1,
        repr=False,
        json_schema_extra=_base64_in_json,
        description="The image bytes: raw in Redis, base64 in JSON.",
    )

    @model_validator(mode="after")
    def _raw_needs_size(self) -> Self:
        if self.encoding == "rgb24" and (self.width is None or self.height is None):
            raise PydanticCustomError("missing_field", "width and height are required for rgb24")
        return self


class TopLabel(BaseModel):
    """One label of a prediction and its probability."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: Name = Field(description="Class name, as in the model's label file.")
    score: float = Field(
        ge=0.0, le=1.0, allow_inf_nan=False, description="Probability (softmax over all classes)."
    )


class Prediction(StreamMessage):
    """The model's output for one slot of a camera: an entry of `predictions:{<camera>}`.

    Its entry ID is `<start_ms>-0`, derived from the slot, so a replayed slot cannot be published twice.
    """

    JSON_FIELDS = frozenset({"top"})
    ALWAYS_WRITTEN = frozenset({"temporal"})  # its default reads entries from before it existed

    camera: CameraId = Field(description="Camera ID.")
    slot: int = Field(
        ge=0,
        le=MAX_INT,
        description="Slot index on the camera's model clock: slot k covers [k/fps, (k+1)/fps) seconds "
        "since the Unix epoch.",
    )
    start_ms: Millis = Field(description="Start of the slot, ms since the Unix epoch.")
    end_ms: Millis = Field(description="End of the slot (exclusive), ms since the Unix epoch.")
    window_start_ms: Millis = Field(
        description="Start of the first slot of the window whose model state made this prediction."
    )
    frames: int = Field(
        ge=1,
        le=MAX_INT,
        description="Frames the state has stepped since window_start_ms, this slot's included.",
    )
    temporal: Literal["windows", "ema"] = Field(
        "windows",
        description="How the state bounds its context. windows: every frame since window_start_ms "
        "weighs the same, so the prediction is the base model's on exactly those frames. ema: the "
        "pooled features are a moving average, the newest frame weighing 1/(ema_frames+1).",
    )
    ema_frames: int | None = Field(
        None, ge=1, le=MAX_INT, description="ema: the frame count the state is held at; absent otherwise."
    )
    repeated: WireBool = Field(
        description="'1' when this slot had no frame and the camera's previous frame was repeated."
    )
    capture_ms: Millis = Field(description="Capture time of the frame stepped, ms since the Unix epoch.")
    model: Name = Field(description="The model that made the prediction (handle, path or name).")
    worker: Name = Field(description="ID of the worker that made the prediction.")
    top: list[TopLabel] = Field(
        min_length=1,
        max_length=600,
        description="The top labels, highest score first (compact JSON text in Redis).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.end_ms <= self.start_ms or self.window_start_ms > self.start_ms:
            raise ValueError("need window_start_ms <= start_ms < end_ms")
        scores = [t.score for t in self.top]
        if scores != sorted(scores, reverse=True):
            raise ValueError("top must be sorted by score, highest first")
        return self


class ControlMessage(StreamMessage):
    """A request to a worker pool, on the stream `cameras`: start or stop serving a camera."""

    JSON_FIELDS = frozenset({"rules"})

    camera: CameraId = Field(description="Camera ID.")
    action: Literal["subscribe", "unsubscribe", "announce"] = Field(
        description="subscribe: start (or reconfigure) predictions for the camera; unsubscribe: stop; "
        "announce: a publisher started sending frames for a new camera, serve it now (as discovery "
        "would, later) unless it was unsubscribed; fps, top_k and rules are ignored."
    )
    fps: float | None = Field(
        default=None,
        ge=0.5,
        le=60.0,
        allow_inf_nan=False,
        description="Model-clock frames per second for this camera; default: the model's training rate.",
    )
    top_k: int | None = Field(
        default=None, ge=1, le=600, description="Labels per prediction; default: the worker's setting."
    )
    rules: list[AlertRule] | None = Field(
        default=None,
        max_length=100,
        description="Alert rules for this camera, replacing the worker's defaults (JSON text in Redis).",
    )


class DeadLetter(StreamMessage):
    """An input entry the worker could not use, on the stream `deadletter`, with why.

    The original entry's values are not copied (an image can be megabytes): only their sizes are.
    """

    JSON_FIELDS = frozenset({"fields"})

    stream: str = Field(min_length=1, max_length=512, description="Key of the stream the entry came from.")
    entry_id: str = Field(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$", description="The entry's ID in that stream.")
    camera: str = Field(
        pattern=r"^(?:" + CAMERA_ID_PATTERN[1:-1] + r")?$",
        description="Camera ID, or empty when it is not known.",
    )
    reason: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,63}$", description="Machine-readable reason, e.g. bad_type, undecodable."
    )
    detail: Annotated[str, BeforeValidator(_clip)] = Field(
        max_length=MAX_DETAIL_CHARS, description="What was wrong, for people; clipped, never refused."
    )
    worker: Name = Field(description="ID of the worker that rejected the entry.")
    at_ms: Millis = Field(description="When it was rejected, ms since the Unix epoch.")
    fields: dict[str, Annotated[int, Field(ge=0, le=MAX_INT)]] = Field(
        max_length=1000,
        description="The original entry's field names, each with its value's size in bytes "
        "(JSON text in Redis).",
    )


def field_sizes(fields: Mapping[bytes | str, bytes | str]) -> dict[str, int]:
    """What a dead letter keeps of an entry: names and sizes, so a bad image is not copied around."""
    return {
        (k.decode("utf-8", "replace") if isinstance(k, bytes) else k): len(
            v if isinstance(v, bytes) else v.encode()
        )
        for k, v in list(fields.items())[:1000]
    }
