"""Write the committed JSON Schemas of every message, or check that they still match the models.

Two views of each message, both from its pydantic model: `schemas/<name>.schema.json`, the decoded
message (draft 2020-12; what `tail --json` prints), and, for every stream entry,
`schemas/wire/<name>.schema.json`, the entry exactly as stored in Redis (`schemas.wire`). Clients in
other languages read the JSON files, not the Python, so a model change that is not regenerated would
silently break them: `--check` (run in CI and by the tests) exits 1 on any drift.

    python -m schemas.generate            # rewrite schemas/*.schema.json and schemas/wire/
    python -m schemas.generate --check    # exit 1, listing the files that differ
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from schemas.alerts import Alert
from schemas.messages import ControlMessage, DeadLetter, Frame, Prediction, StreamMessage, TopLabel
from schemas.rules import AlertRule
from schemas.wire import wire_schema

SCHEMA_DIR = Path(__file__).resolve().parent
SUFFIX = ".schema.json"
WIRE = "wire"
DECODED_NOTE = (
    "The decoded message, as a reader gets it from the entry's fields and `movinet-worker tail --json` "
    "or `alerts --json` prints it; the entry as stored in Redis is wire/<name>.schema.json. An optional "
    "field is absent, never null. Integers may reach 2^63-1: parse them as BigInt where numbers are doubles."
)
MODELS: dict[str, type[BaseModel]] = {
    "frame": Frame,
    "prediction": Prediction,
    "top_label": TopLabel,
    "control_message": ControlMessage,
    "dead_letter": DeadLetter,
    "alert": Alert,
    "alert_rule": AlertRule,
}


class AbsentNotNull(GenerateJsonSchema):
    """An optional field is absent, never null: in Redis, in `to_fields` and in `--json` output."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        if schema.get("default", ...) is None:
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def decoded_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The committed JSON Schema of a decoded message: draft 2020-12."""
    schema = model.model_json_schema(schema_generator=AbsentNotNull)
    if issubclass(model, StreamMessage):
        schema["$comment"] = DECODED_NOTE
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def entry_schema(model: type[StreamMessage]) -> dict[str, Any]:
    """The committed wire schema of a stream entry: draft-07, refs to #/definitions."""
    decoded = model.model_json_schema(ref_template="#/definitions/{model}", schema_generator=AbsentNotNull)
    return wire_schema(model, decoded)


def _text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def render(models: Mapping[str, type[BaseModel]] = MODELS) -> dict[str, str]:
    """Relative file name -> text; fixed formatting so that the committed files diff cleanly.

    Every stream entry (a `StreamMessage`) also gets its wire schema."""
    files = {f"{name}{SUFFIX}": _text(decoded_schema(model)) for name, model in models.items()}
    for name, model in models.items():
        if issubclass(model, StreamMessage):
            files[f"{WIRE}/{name}{SUFFIX}"] = _text(entry_schema(model))
    return files


def write(directory: Path = SCHEMA_DIR, models: Mapping[str, type[BaseModel]] = MODELS) -> list[Path]:
    """Rewrite every schema file; returns the ones whose content changed."""
    changed = []
    (directory / WIRE).mkdir(exist_ok=True)
    for name, text in render(models).items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    return changed


def check(directory: Path = SCHEMA_DIR, models: Mapping[str, type[BaseModel]] = MODELS) -> list[str]:
    """Problems as 'file: why'; a schema file that no model writes any more is one too."""
    wanted = render(models)
    problems = []
    for name, text in wanted.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{name}: differs from the model")
    present = [*directory.glob(f"*{SUFFIX}"), *directory.glob(f"{WIRE}/*{SUFFIX}")]
    problems += [
        f"{name}: no model writes it"
        for name in sorted(p.relative_to(directory).as_posix() for p in present)
        if name not in wanted
    ]
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m schemas.generate", description="Write or check the JSON Schema of every message."
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file differs")
    parser.add_argument(
        "--dir", type=Path, default=SCHEMA_DIR, help=f"where the files are (default {SCHEMA_DIR})"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.dir)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `python -m schemas.generate` and commit the result", file=sys.stderr)
        return 1 if problems else 0
    for path in write(args.dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
