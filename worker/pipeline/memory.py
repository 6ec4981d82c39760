"""The worker's memory: what it may use, and how many cameras that holds.

- `limit_bytes`: the configured limit (`memory_limit_mb`), else the cgroup's (a Kubernetes memory
  limit: cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`), else none.
- `camera_cap`: how many cameras fit in a share of that limit, from the model's state size: a camera
  holds `per_slot` states (two windows, or one EMA state); a round holds the old and the new states
  of its cameras at once, checkpoints copy them, and the heap keeps what was freed. Measured peak
  resident memory of a LiteRT worker at 20-120 cameras (A0 int8, 2.6 MB a state, full read-ahead):
  2.4 (windows) to 2.6 (EMA) times the held states, up to 3.3 for a few EMA cameras; hence 3.
  The cap joins the load-based capacity (worker/pipeline/capacity.py): a fast CPU that could
  step more cameras than the memory holds takes no more than the memory holds.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

BUDGET_SHARE = 0.75  # of the limit: the rest is headroom for bursts (a takeover's replay, a TF retrace)
STATE_COPIES = 3.0  # resident bytes per byte of held state (measured 2.4-3.3, see above)
CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
NO_LIMIT = 1 << 60  # cgroup v1 says "no limit" with a huge number


def cgroup_limit_bytes(files: tuple[Path, ...] = CGROUP_FILES) -> int | None:
    for path in files:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < NO_LIMIT:
            return int(text)
        return None  # "max": this cgroup has no limit
    return None


def limit_bytes(configured_mb: float | None) -> tuple[int | None, str]:
    """The limit and where it comes from ("setting", "cgroup" or "none")."""
    if configured_mb is not None:
        return int(configured_mb * 2**20), "setting"
    found = cgroup_limit_bytes()
    return (found, "cgroup") if found is not None else (None, "none")


def rss_bytes() -> int:
    try:
        found = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return 0
    return int(found.group(1)) * 1024 if found else 0


def camera_cap(limit: int, base: int, state_bytes: int, per_slot: int, readahead_bytes: int) -> int:
    """Cameras that fit in `BUDGET_SHARE` of `limit`, after `base` (the process with its model
    loaded) and the read-ahead; at least one."""
    per_camera = state_bytes * per_slot * STATE_COPIES
    room = limit * BUDGET_SHARE - base - readahead_bytes
    return max(1, math.floor(room / per_camera))
