"""Message formats of the worker's Redis streams: pydantic models and their committed JSON Schema."""

from schemas.messages import (
    CAMERA_ID_PATTERN,
    REASONS,
    SCHEMA_VERSION,
    ControlMessage,
    DeadLetter,
    Frame,
    MessageError,
    Prediction,
    StreamMessage,
    TopLabel,
    field_sizes,
)

__all__ = [
    "CAMERA_ID_PATTERN",
    "REASONS",
    "SCHEMA_VERSION",
    "ControlMessage",
    "DeadLetter",
    "Frame",
    "MessageError",
    "Prediction",
    "StreamMessage",
    "TopLabel",
    "field_sizes",
]
