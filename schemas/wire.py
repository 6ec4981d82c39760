"""The wire schema of a stream entry: what XRANGE returns, a map of field name to string.

It is derived from the same pydantic model as the decoded schema, by the rules `to_fields` encodes
with, so the two cannot disagree: integers become patterns of canonical decimal text bounded like
the model's field, booleans '0'/'1', enums and the version their strings, JSON fields (and numbers,
whose decimal text is JSON) a string whose parsed content has a schema of its own (`contentSchema`,
which a client applies after JSON.parse; validators treat that keyword as an annotation), binary
fields a string of one character per byte.
Draft-07, the dialect every validator and the AsyncAPI parser know.
"""

from __future__ import annotations

from typing import Any, Final

from schemas.messages import MAX_INT, StreamMessage

DRAFT_07: Final = "http://json-schema.org/draft-07/schema#"
WIRE_NOTE: Final = (
    "A Redis stream entry exactly as stored: XRANGE returns a map of field name to string, which "
    "this schema validates directly. Every value is UTF-8 text except fields with contentEncoding "
    "'binary' (raw bytes; read them as one character per byte, e.g. Node's Buffer.toString('latin1')). "
    "Integers are canonical decimal text (no sign, no leading zero) and may reach 2^63-1: parse them "
    "as BigInt (or keep the text) where numbers are doubles. Booleans are '0' or '1'. A field with "
    "contentMediaType application/json is compact JSON text (numbers too: '5.0', '1e-05'): parse it "
    "and validate the result against its contentSchema, whose definitions are this document's. An "
    "optional field is absent, never empty or null."
)
NUMBER_PATTERN: Final = r"^(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?$"


def int_pattern(lo: int, hi: int) -> str:
    """A regular expression matching exactly the canonical decimal texts of lo..hi (0 <= lo <= hi)."""
    if not 0 <= lo <= hi:
        raise ValueError(f"need 0 <= lo <= hi, got {lo}, {hi}")
    parts: list[str] = []
    if lo == 0:
        parts.append("0")
        lo = 1
    full: list[int] = []  # lengths whose every number is in range: `[1-9][0-9]{m,n}` for a run
    for digits in range(len(str(lo)), len(str(hi)) + 1):
        a, b = max(lo, 10 ** (digits - 1)), min(hi, 10**digits - 1)
        if a == 10 ** (digits - 1) and b == 10**digits - 1:
            full.append(digits - 1)
        elif a <= b:
            parts += _same_length(str(a), str(b))
    if full:
        first, last = full[0], full[-1]
        rest = "" if last == 0 else f"[0-9]{{{last}}}" if first == last else f"[0-9]{{{first},{last}}}"
        parts.insert(1 if parts[:1] == ["0"] else 0, "[1-9]" + rest)
    return "^(?:" + "|".join(parts) + ")$"


def _digit_class(a: str, b: str) -> str:
    return a if a == b else f"[{a}-{b}]"


def _any_digits(n: int) -> str:
    return "" if n == 0 else "[0-9]" if n == 1 else f"[0-9]{{{n}}}"


def _same_length(a: str, b: str) -> list[str]:
    """Alternatives matching a..b, two digit strings of one length (leading zeros are literal)."""
    n = len(a)
    if a == b:
        return [a]
    if a[0] == b[0]:
        return [a[0] + p for p in _same_length(a[1:], b[1:])]
    low_full, high_full = a[1:] == "0" * (n - 1), b[1:] == "9" * (n - 1)
    parts = [] if low_full else _same_length(a, a[0] + "9" * (n - 1))
    first, last = int(a[0]) + (0 if low_full else 1), int(b[0]) - (0 if high_full else 1)
    if first <= last:
        parts.append(_digit_class(str(first), str(last)) + _any_digits(n - 1))
    return parts + ([] if high_full else _same_length(b[0] + "0" * (n - 1), b))


def wire_property(name: str, prop: dict[str, Any], model: type[StreamMessage]) -> dict[str, Any]:
    """One field of the entry as stored, from its decoded schema and the model's wire rules."""
    kind, rest = prop.get("type"), {k: v for k, v in prop.items() if k != "description"}
    rule: dict[str, Any]
    if name in model.JSON_FIELDS:
        rule = {"contentMediaType": "application/json", "contentSchema": rest}
    elif name in model.BYTES_FIELDS:
        rule = {"contentEncoding": "binary", "minLength": prop.get("minLength", 0)}
    elif "const" in prop:
        rule = {"const": str(prop["const"])}
    elif "enum" in prop:
        rule = {"enum": [str(v) for v in prop["enum"]]}
    elif kind == "integer":
        if prop.get("minimum", 0) < 0 or "exclusiveMinimum" in prop or "exclusiveMaximum" in prop:
            raise ValueError(f"{model.__name__}.{name}: only inclusive non-negative integer bounds")
        rule = {"pattern": int_pattern(prop.get("minimum", 0), prop.get("maximum", MAX_INT))}
    elif kind == "number":
        if prop.get("minimum", prop.get("exclusiveMinimum", -1)) < 0:
            raise ValueError(f"{model.__name__}.{name}: the number pattern has no sign")
        # A decimal number is JSON text too: its bounds are checked as a JSON field's are.
        rule = {"pattern": NUMBER_PATTERN, "contentMediaType": "application/json", "contentSchema": rest}
    elif kind == "boolean":
        rule = {"enum": ["0", "1"]}
    elif kind == "string":
        rule = rest
    else:
        raise ValueError(f"{model.__name__}.{name}: no wire rule for {prop}")
    return {"description": prop.get("description", ""), "type": "string", **rule}


def wire_schema(model: type[StreamMessage], decoded: dict[str, Any]) -> dict[str, Any]:
    """The entry's wire schema from its decoded schema (generated with refs to #/definitions)."""
    properties = {name: wire_property(name, prop, model) for name, prop in decoded["properties"].items()}
    schema: dict[str, Any] = {
        "$schema": DRAFT_07,
        "title": decoded["title"],
        "description": decoded["description"],
        "$comment": WIRE_NOTE,
        "type": "object",
        "properties": properties,
        "required": decoded["required"],
        "additionalProperties": False,
    }
    if "allOf" in decoded:  # conditions on enum fields, whose values are the same strings on the wire
        schema["allOf"] = decoded["allOf"]
    if "$defs" in decoded:
        schema["definitions"] = decoded["$defs"]
    return schema
