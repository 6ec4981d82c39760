"""Redis key templates as people write them: `frames:{<camera>}` is the key of every camera.

`<camera>` stands for the camera ID and every other character is literal, braces included (the
defaults put the camera in a Redis Cluster hash tag). Internally a template is a `str.format`
string, `frames:{{{camera}}}`; that older spelling is still accepted, and `config` prints the
written one.
"""

from __future__ import annotations

import string

PLACEHOLDER = "<camera>"

# The default keys, as written; the worker's settings (worker/config.py) and every command's options
# take them from here. Per-camera keys put the camera in a hash tag: one Redis Cluster slot each.
FRAMES_KEY = "frames:{<camera>}"
PREDICTIONS_KEY = "predictions:{<camera>}"
ALERT_STATE_KEY = "alertstate:{<camera>}"
CHECKPOINT_KEY = "checkpoint:{<camera>}"
EVIDENCE_KEY = "evidence:{<camera>}"
OWNER_KEY = "owner:{<camera>}"
ALERTS_STREAM = "alerts"
CONTROL_STREAM = "cameras"
DEADLETTER_STREAM = "deadletter"


def to_format(text: str) -> str:
    """A template as written -> its `str.format` string; one without `<camera>` is taken as one already."""
    if PLACEHOLDER not in text:
        return text
    return text.replace("{", "{{").replace("}", "}}").replace(PLACEHOLDER, "{camera}")


def as_written(template: str) -> str:
    """A `str.format` template -> as a user writes it; text that is not a valid template is kept."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        return template
    if any(field not in (None, "camera") or spec or conv for _, field, spec, conv in parts):
        return template
    return "".join(literal + (PLACEHOLDER if field else "") for literal, field, _, _ in parts)
