"""The wire contract applied from Python the way the Node client applies it: XRANGE's field map of
strings against `schemas/wire/*.schema.json`, each JSON field parsed and checked by its contentSchema."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft7Validator

from schemas.generate import SCHEMA_DIR, WIRE


def wire(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / WIRE / f"{name}.schema.json").read_text())
    return schema


def as_text(schema: Mapping[str, Any], fields: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """Entry as stored -> field map of strings: UTF-8, binary fields one character per byte."""
    out = {}
    for key, value in fields.items():
        name = key.decode() if isinstance(key, bytes) else key
        binary = schema["properties"].get(name, {}).get("contentEncoding") == "binary"
        if isinstance(value, bytes):
            out[name] = value.decode("latin-1" if binary else "utf-8")
        else:
            out[name] = value
    return out


def wire_errors(schema: Mapping[str, Any], fields: Mapping[bytes | str, bytes | str]) -> list[str]:
    """Why an entry breaks its wire schema; [] when it is valid."""
    try:
        text = as_text(schema, fields)
    except UnicodeDecodeError as exc:
        return [f"not UTF-8: {exc}"]
    errors = [f"/{'/'.join(map(str, e.path))} {e.message}" for e in Draft7Validator(schema).iter_errors(text)]
    for name, prop in schema["properties"].items():
        if prop.get("contentMediaType") != "application/json" or name not in text:
            continue
        try:
            value = json.loads(text[name])
        except ValueError as exc:
            errors.append(f"/{name} is not JSON: {exc}")
            continue
        content = Draft7Validator({**prop["contentSchema"], "definitions": schema.get("definitions", {})})
        errors += [f"/{name}/{'/'.join(map(str, e.path))} {e.message}" for e in content.iter_errors(value)]
    return errors
