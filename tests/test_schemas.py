"""Message models: the committed JSON Schema, the wire encoding, and every rejection reason."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import BaseModel, Field, ValidationError

from schemas import (
    REASONS,
    ControlMessage,
    DeadLetter,
    Frame,
    MessageError,
    Prediction,
    StreamMessage,
    TopLabel,
    field_sizes,
)
from schemas.generate import MODELS, SCHEMA_DIR, check, render, write
from schemas.wire import int_pattern
from tests.contract import wire, wire_errors

ROOT = Path(__file__).resolve().parents[1]

PREDICTION = Prediction(
    camera="lobby-1",
    slot=8_979_193_905,
    start_ms=1_795_838_781_000,
    end_ms=1_795_838_781_200,
    window_start_ms=1_795_838_776_200,
    frames=25,
    repeated=True,
    capture_ms=1_795_838_780_990,
    model="a0-stream",
    worker="w-1",
    top=[TopLabel(label="jumping jacks", score=0.875), TopLabel(label="dancing", score=0.0625)],
)
SAMPLES: list[StreamMessage] = [
    Frame(
        camera="cam.1:a_b-c",
        seq=7,
        capture_ms=1_795_838_781_000,
        encoding="jpeg",
        width=172,
        height=172,
        data=b"\xff\xd8\x00\x01binary\xff",
    ),
    Frame(camera="c", seq=0, encoding="rgb24", width=2, height=1, data=bytes(range(6))),
    Frame(camera="c", seq=0, encoding="png", data=b"\x89PNG"),
    PREDICTION,
    PREDICTION.model_copy(update={"repeated": False}),
    ControlMessage(action="subscribe", camera="lobby-1", fps=2.5, top_k=3),
    ControlMessage(action="unsubscribe", camera="lobby-1"),
    DeadLetter(
        stream="frames:{lobby-1}",
        entry_id="1795838781000-0",
        camera="",
        reason="undecodable",
        detail="bad JPEG: über",
        worker="w-1",
        at_ms=1_795_838_781_001,
        fields={"data": 12000, "seq": 2},
    ),
]


def _wire(message: StreamMessage) -> dict[bytes | str, bytes | str]:
    """to_fields, checked to hold only text and bytes: redis-py would format numbers its own way."""
    fields = message.to_fields()
    out = {k: v for k, v in fields.items() if isinstance(v, (str, bytes))}
    assert out == fields
    return out  # type: ignore[return-value]


def test_committed_schemas_match_the_models() -> None:
    assert check() == [], "run `python -m schemas.generate` and commit the result"
    proc = subprocess.run(
        [sys.executable, "-m", "schemas.generate", "--check"], cwd=ROOT, capture_output=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    committed = [*SCHEMA_DIR.glob("*.schema.json"), *SCHEMA_DIR.glob("wire/*.schema.json")]
    assert sorted(p.relative_to(SCHEMA_DIR).as_posix() for p in committed) == sorted(render())


def test_check_fails_when_a_model_changes(tmp_path: Path) -> None:
    write(tmp_path)
    assert check(tmp_path) == []

    class ChangedFrame(Frame):
        """One camera image."""

        exposure_us: int | None = Field(default=None, ge=0, description="A new field.")

    assert check(tmp_path, {**MODELS, "frame": ChangedFrame}) == [
        "frame.schema.json: differs from the model",
        "wire/frame.schema.json: differs from the model",
    ]
    (tmp_path / "prediction.schema.json").write_text("{}\n")
    (tmp_path / "old.schema.json").write_text("{}\n")
    (tmp_path / "wire" / "old.schema.json").write_text("{}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "schemas.generate", "--check", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "prediction.schema.json: differs" in proc.stderr and "old.schema.json: no model" in proc.stderr
    assert "wire/old.schema.json: no model" in proc.stderr
    assert "frame.schema.json" not in proc.stderr


def test_decoded_schema_describes_the_message() -> None:
    schema = json.loads((SCHEMA_DIR / "prediction.schema.json").read_text())
    assert schema["required"][0] == "v" and schema["additionalProperties"] is False
    assert schema["properties"]["top"]["items"] == {"$ref": "#/$defs/TopLabel"}  # decoded: an array
    assert "temporal" in schema["required"]  # the worker always writes it
    frame = json.loads((SCHEMA_DIR / "frame.schema.json").read_text())
    assert frame["properties"]["capture_ms"] == {
        "description": Frame.model_fields["capture_ms"].description,
        "maximum": 2**63 - 1,
        "minimum": 0,
        "type": "integer",
    }  # optional means absent: no null, no default
    assert "capture_ms" not in frame["required"] and "entry ID" in frame["description"]
    for name in MODELS:
        schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
        assert schema["description"], name
        assert all(p.get("description") for p in schema["properties"].values()), name


def test_wire_schema_describes_the_entry_as_stored() -> None:
    for name, model in MODELS.items():
        if not issubclass(model, StreamMessage):
            continue
        schema = wire(name)
        assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
        assert schema["additionalProperties"] is False and schema["required"][0] == "v"
        assert all(p["type"] == "string" and p["description"] for p in schema["properties"].values()), name
    prediction = wire("prediction")["properties"]
    assert prediction["v"]["const"] == "1" and prediction["repeated"]["enum"] == ["0", "1"]
    assert prediction["top"]["contentMediaType"] == "application/json"
    assert prediction["top"]["contentSchema"]["items"] == {"$ref": "#/definitions/TopLabel"}
    assert wire("frame")["properties"]["data"]["contentEncoding"] == "binary"
    assert wire("control_message")["properties"]["rules"]["contentSchema"]["items"] == {
        "$ref": "#/definitions/AlertRule"
    }


@pytest.mark.parametrize(("lo", "hi"), [(0, 9), (1, 600), (1, 8192), (0, 1000), (7, 7), (37, 12_345)])
def test_int_pattern_matches_exactly_the_range(lo: int, hi: int) -> None:
    pattern = re.compile(int_pattern(lo, hi))
    assert [n for n in range(2 * hi + 20) if pattern.match(str(n))] == list(range(lo, hi + 1))
    assert not any(pattern.match(t) for t in (f"0{lo}", f"+{lo}", f"-{lo}", f" {lo}", f"{lo}.0", ""))


def test_int64_pattern_bounds() -> None:
    pattern = re.compile(int_pattern(0, 2**63 - 1))
    rng = random.Random(5)
    edges = [2**63 - 1, 2**63, 2**63 - 2, 10**18, 10**19, 2**64 - 1]
    for n in [*edges, *(rng.randrange(2**64) for _ in range(20_000))]:
        assert bool(pattern.match(str(n))) == (n < 2**63), n


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_samples_are_valid_against_the_committed_schemas(message: StreamMessage) -> None:
    import jsonschema

    name = next(n for n, m in MODELS.items() if m is type(message))
    decoded = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    document = json.loads(message.model_dump_json(exclude_none=True))  # what `tail --json` prints
    jsonschema.validate(document, decoded)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**document, "surprise": 1}, decoded)
    assert wire_errors(wire(name), _wire(message)) == []
    assert wire_errors(wire(name), {**_wire(message), "surprise": "1"}) != []


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_redis(message: StreamMessage, r: tuple[redis.Redis, str]) -> None:
    client, prefix = r
    fields = _wire(message)
    assert type(message).from_fields(fields) == message  # str keys, as built
    client.xadd(f"{prefix}:stream", fields)
    [(_, stored)] = client.xrange(f"{prefix}:stream")
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in stored.items())
    assert type(message).from_fields(stored) == message
    name = next(n for n, m in MODELS.items() if m is type(message))
    assert wire_errors(wire(name), stored) == []  # XRANGE's reply, validated as it is


def test_wire_encoding() -> None:
    fields = PREDICTION.to_fields()
    assert fields["v"] == "1" and fields["repeated"] == "1" and fields["slot"] == "8979193905"
    assert fields["top"] == '[{"label":"jumping jacks","score":0.875},{"label":"dancing","score":0.0625}]'
    assert PREDICTION.model_copy(update={"repeated": False}).to_fields()["repeated"] == "0"
    assert ControlMessage(action="subscribe", camera="c", fps=5).to_fields() == {
        "v": "1",
        "camera": "c",
        "action": "subscribe",
        "fps": "5.0",
    }
    assert "capture_ms" not in SAMPLES[1].to_fields()  # optional fields are absent, not empty
    assert DeadLetter.from_fields(_wire(SAMPLES[-1])).fields == {"data": 12000, "seq": 2}
    assert field_sizes({b"data": b"\x00" * 5000, "camera": "caf\u00e9"}) == {"data": 5000, "camera": 5}
    long = DeadLetter.model_validate({**SAMPLES[-1].model_dump(), "detail": "x" * 10_000})
    assert len(long.detail) == 4096


def _frame_fields(**changes: bytes | str | None) -> dict[bytes | str, bytes | str]:
    fields: dict[bytes | str, bytes | str] = {
        b"v": b"1",
        b"camera": b"cam1",
        b"seq": b"3",
        b"encoding": b"jpeg",
        b"data": b"\xff\xd8",
    }
    for name, value in changes.items():
        if value is None:
            del fields[name.encode()]
        else:
            fields[name.encode()] = value
    return fields


PRED = PREDICTION.to_fields()


@pytest.mark.parametrize(
    ("model", "fields", "reason"),
    [
        (Frame, _frame_fields(seq=None), "missing_field"),
        (Frame, _frame_fields(data=None), "missing_field"),
        (Frame, _frame_fields(encoding="rgb24", width="2"), "missing_field"),  # rgb24 needs height too
        (Frame, _frame_fields(seq="abc"), "bad_type"),
        (Frame, _frame_fields(seq="-1"), "bad_type"),
        (Frame, _frame_fields(width="-3"), "bad_type"),
        (Frame, _frame_fields(height="8193"), "bad_type"),
        (Frame, _frame_fields(capture_ms="1.5"), "bad_type"),
        (Frame, _frame_fields(camera="cam{1}"), "bad_type"),
        (Frame, _frame_fields(camera=b"\xff\xfe"), "bad_type"),
        (Frame, _frame_fields(encoding="gif"), "bad_encoding"),
        (Frame, _frame_fields(encoding="JPEG"), "bad_encoding"),
        (Frame, _frame_fields(v="2"), "bad_version"),
        (Frame, _frame_fields(v="one"), "bad_version"),
        (Frame, _frame_fields(v=None), "missing_field"),
        (Frame, _frame_fields(source="lobby"), "unknown_field"),
        (Prediction, {**PRED, "top": "not json"}, "bad_type"),
        (Prediction, {**PRED, "top": '[{"label":"a","score":0.1},{"label":"b","score":0.2}]'}, "bad_type"),
        (Prediction, {**PRED, "top": '[{"label":"a","score":1.5}]'}, "bad_type"),
        (Prediction, {**PRED, "top": "[]"}, "bad_type"),
        (Prediction, {**PRED, "repeated": "yes"}, "bad_type"),
        (Prediction, {**PRED, "end_ms": PRED["start_ms"]}, "bad_type"),
        (Prediction, {**PRED, "frames": "0"}, "bad_type"),
        (Prediction, {k: v for k, v in PRED.items() if k != "worker"}, "missing_field"),
        (ControlMessage, {"v": "1", "action": "subscribe", "camera": "c", "fps": "100"}, "bad_type"),
        (ControlMessage, {"v": "1", "action": "subscribe", "camera": "c", "top_k": "0"}, "bad_type"),
        (ControlMessage, {"v": "1", "action": "pause", "camera": "c"}, "bad_type"),
        (ControlMessage, {"v": "1", "action": "subscribe"}, "missing_field"),
        (ControlMessage, {"v": "2", "action": "subscribe", "camera": "c"}, "bad_version"),
        (DeadLetter, {**SAMPLES[-1].to_fields(), "entry_id": "12"}, "bad_type"),
        (DeadLetter, {**SAMPLES[-1].to_fields(), "fields": '{"data": -1}'}, "bad_type"),
    ],
)
def test_rejections_carry_a_reason(model: type[StreamMessage], fields: Any, reason: str) -> None:
    with pytest.raises(MessageError) as info:
        model.from_fields(fields)
    assert info.value.reason == reason, info.value.detail
    assert reason in REASONS and info.value.detail
    assert not isinstance(info.value, ValidationError)
    # The wire schema refuses the same entry, except for rules across values that no schema states.
    name = next(n for n, m in MODELS.items() if m is model)
    semantic = info.value.detail.startswith(("entry: Value error, need window", "entry: Value error, top"))
    assert (wire_errors(wire(name), fields) == []) == semantic, info.value.detail


def test_error_detail_names_the_field_and_value() -> None:
    with pytest.raises(MessageError) as info:
        Frame.from_fields(_frame_fields(seq="abc"))
    assert info.value.detail.startswith("seq: ") and "'abc'" in info.value.detail
    assert str(info.value).startswith("bad_type: seq")


def test_models_are_strict_in_python_too() -> None:
    with pytest.raises(ValidationError):
        Frame(camera="c", seq=0, encoding="jpeg", data=b"x", colour="red")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        TopLabel(label="", score=0.5)
    assert all(issubclass(m, BaseModel) for m in MODELS.values())
