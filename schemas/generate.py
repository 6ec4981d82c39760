"""Write the committed JSON Schema of every message, or check that it still matches the models.

Clients in other languages read the JSON files, not the Python, so a model change that is not
regenerated would silently break them: `--check` (run in CI and by the tests) exits 1 on any drift.

    python -m schemas.generate            # rewrite schemas/*.schema.json
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
from schemas.messages import ControlMessage, DeadLetter, Frame, Prediction, TopLabel
from schemas.rules import AlertRule

SCHEMA_DIR = Path(__file__).resolve().parent
SUFFIX = ".schema.json"
MODELS: dict[str, type[BaseModel]] = {
    "frame": Frame,
    "prediction": Prediction,
    "top_label": TopLabel,
    "control_message": ControlMessage,
    "dead_letter": DeadLetter,
    "alert": Alert,
    "alert_rule": AlertRule,
}


class WireJsonSchema(GenerateJsonSchema):
    """JSON Schema of the field map: an optional field is absent on the wire, never null."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        if schema.get("default", ...) is None:
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def wire_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The committed JSON Schema of a message: draft 2020-12, describing the entry's field map."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **model.model_json_schema(schema_generator=WireJsonSchema),
    }


def render(models: Mapping[str, type[BaseModel]] = MODELS) -> dict[str, str]:
    """File name -> text; fixed formatting so that the committed files diff cleanly."""
    return {
        f"{name}{SUFFIX}": json.dumps(wire_schema(model), indent=2, ensure_ascii=False) + "\n"
        for name, model in models.items()
    }


def write(directory: Path = SCHEMA_DIR, models: Mapping[str, type[BaseModel]] = MODELS) -> list[Path]:
    """Rewrite every schema file; returns the ones whose content changed."""
    changed = []
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
    problems += [
        f"{p.name}: no model writes it" for p in sorted(directory.glob(f"*{SUFFIX}")) if p.name not in wanted
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
