"""`movinet-worker bench --sizing BENCH.json`: workers and Redis Cluster shards for many cameras,
on paper, from the per-camera costs one bench run measured (docs/capacity.md explains the model).

What the bench JSON must contain (a `bench --json-out` file of this version has all of it), per
backend and temporal mode, in its `live` rows (the trial at the most cameras held, `at_max`):

- `max_cameras`, `fps`, `latency_budget_ms`: cameras one worker machine held within the budget;
- `at_max.cpu_cores.worker`, `at_max.seconds`, `at_max.predictions_published`: worker CPU per
  camera-frame;
- `at_max.redis`: `cpu_ms_per_camera_frame`, `net_in_bytes_per_camera_frame`,
  `net_out_bytes_per_camera_frame`, `frame_entry_bytes`, `prediction_entry_bytes`,
  `checkpoint_bytes` (None when no checkpoint was written during the trial);

and `memory[].state_bytes` (one model state: the checkpoint size when none was measured).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.bench.report import _table
from worker.config import Settings

# What one Redis Cluster shard (a primary; its replica mirrors it) is planned to carry at most:
# its one main thread under 60% busy (room for replication, rebalancing, a slow command), memory
# under an 8 GB maxmemory, and half of a 10 Gbit/s interface.
SHARD_CPU_CORES = 0.6
SHARD_MEMORY_BYTES = 8e9
SHARD_NET_BYTES_PER_SECOND = 0.5 * 10e9 / 8
DEFAULTS = Settings.model_fields


def per_camera(doc: dict[str, Any], budget_ms: float | None = None) -> list[dict[str, Any]]:
    """Each backend and mode's measured costs per camera-frame and per camera, at `budget_ms` (default:
    the largest budget measured)."""
    budgets = sorted({live["latency_budget_ms"] for live in doc.get("live", [])})
    if not budgets:
        raise ValueError("the bench JSON has no live rows (run the bench with live trials)")
    budget = budgets[-1] if budget_ms is None else budget_ms
    states = {(m["backend"], m["temporal"]): m["state_bytes"] for m in doc.get("memory", [])}
    rows = []
    for live in doc["live"]:
        at = live.get("at_max")
        if live["latency_budget_ms"] != budget or not at:
            continue
        if "redis" not in at:
            raise ValueError("the bench JSON's live rows have no Redis costs: rerun the bench (this version)")
        frames = max(at["predictions_published"], 1)
        redis = at["redis"]
        checkpoint = redis.get("checkpoint_bytes")
        if live["temporal"] == "ema" and not checkpoint:
            checkpoint = states.get((live["backend"], live["temporal"]))  # uncompressed: an upper bound
        rows.append(
            {
                "backend": live["backend"],
                "temporal": live["temporal"],
                "latency_budget_ms": budget,
                "fps": live["fps"],
                "cameras_per_worker": live["max_cameras"],
                "worker_cpu_ms_per_camera_frame": 1e3 * at["cpu_cores"]["worker"] * at["seconds"] / frames,
                "redis_cpu_ms_per_camera_frame": redis["cpu_ms_per_camera_frame"],
                "wire_bytes_per_camera_frame": redis["net_in_bytes_per_camera_frame"]
                + redis["net_out_bytes_per_camera_frame"],
                "frame_entry_bytes": redis.get("frame_entry_bytes") or 0.0,
                "prediction_entry_bytes": redis.get("prediction_entry_bytes") or 0.0,
                "checkpoint_bytes": (checkpoint or 0.0) if live["temporal"] == "ema" else 0.0,
            }
        )
    return rows


def redis_memory_per_camera(
    costs: dict[str, Any],
    fps: float,
    retention_seconds: float = DEFAULTS["input_retention_seconds"].default,
    predictions_maxlen: int = DEFAULTS["predictions_maxlen"].default,
) -> float:
    """Bytes one camera keeps in Redis: its retained frames, its predictions stream at its cap, and
    in ema mode its checkpoint."""
    frames = costs["frame_entry_bytes"] * fps * retention_seconds
    return float(frames + costs["prediction_entry_bytes"] * predictions_maxlen + costs["checkpoint_bytes"])


def size(costs: dict[str, Any], cameras: int, fps: float) -> dict[str, Any]:
    """Workers and shards for `cameras` at `fps`, and which limit sets the shard count first."""
    rate = cameras * fps  # camera-frames/s
    per_worker = costs["cameras_per_worker"] * costs["fps"] / fps  # the same camera-frames/s
    memory = cameras * redis_memory_per_camera(costs, fps)
    redis_cores = rate * costs["redis_cpu_ms_per_camera_frame"] / 1e3
    wire = rate * costs["wire_bytes_per_camera_frame"]
    need = {  # shards each limit alone asks for, unrounded
        "Redis CPU": redis_cores / SHARD_CPU_CORES,
        "Redis memory": memory / SHARD_MEMORY_BYTES,
        "network": wire / SHARD_NET_BYTES_PER_SECOND,
    }
    shards = {k: math.ceil(v) for k, v in need.items()}
    first = max(need, key=lambda k: need[k])
    return {
        "cameras": cameras,
        "fps": fps,
        "workers": math.ceil(cameras / per_worker) if per_worker >= 1 else None,
        "worker_cores": rate * costs["worker_cpu_ms_per_camera_frame"] / 1e3,
        "redis_cores": redis_cores,
        "redis_memory_bytes": memory,
        "wire_bytes_per_second": wire,
        "shards_by": shards,
        "shards": max(1, *shards.values()),
        "first_bottleneck": first,
    }


def sizing_table(doc: dict[str, Any], cameras: Sequence[int] = (1000, 10_000), fps: float = 5.0) -> str:
    m = doc.get("machine", {})
    rows = []
    for costs in per_camera(doc):
        for n in cameras:
            s = size(costs, n, fps)
            by = s["shards_by"]
            rows.append(
                (
                    f"{costs['backend']}/{costs['temporal']}",
                    str(n),
                    str(s["workers"] if s["workers"] is not None else "-"),
                    f"{s['worker_cores']:.0f}",
                    f"{s['redis_cores']:.1f}",
                    f"{s['redis_memory_bytes'] / 1e9:.1f}",
                    f"{8 * s['wire_bytes_per_second'] / 1e9:.2f}",
                    f"{by['Redis CPU']}/{by['Redis memory']}/{by['network']}",
                    str(s["shards"]),
                    s["first_bottleneck"],
                )
            )
    head = (
        "backend/mode",
        "cameras",
        "workers",
        "worker cores",
        "Redis cores",
        "Redis GB",
        "wire Gbit/s",
        "shards cpu/mem/net",
        "shards",
        "first bound",
    )
    costs_lines = [
        f"  {c['backend']}/{c['temporal']}: {c['cameras_per_worker']} cameras per worker machine at "
        f"{c['fps']:g} fps within {c['latency_budget_ms']:.0f} ms; worker "
        f"{c['worker_cpu_ms_per_camera_frame']:.2f} ms CPU, Redis "
        f"{c['redis_cpu_ms_per_camera_frame']:.3f} ms CPU and "
        f"{c['wire_bytes_per_camera_frame'] / 1e3:.1f} kB on the wire per camera-frame; Redis "
        f"{redis_memory_per_camera(c, fps) / 1e6:.1f} MB per camera"
        for c in per_camera(doc)
    ]
    return "\n".join(
        [
            f"sizing at {fps:g} fps from a bench on {m.get('cpu', '?')}, {m.get('cores', '?')} cores",
            "per camera (measured at the most live cameras held):",
            *costs_lines,
            _table(head, rows),
            f"(a shard: its main thread <= {SHARD_CPU_CORES:.0%} busy, <= {SHARD_MEMORY_BYTES / 1e9:.0f} GB, "
            f"<= {8 * SHARD_NET_BYTES_PER_SECOND / 1e9:.0f} Gbit/s; one replica each doubles the nodes, not "
            "the shards; workers as the bench's machine, whose cores Redis and the publishers shared)",
        ]
    )


def print_sizing(path: str, cameras: Sequence[int], fps: float) -> int:
    try:
        doc = json.loads(Path(path).read_text())
        print(sizing_table(doc, cameras, fps))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"bench --sizing {path}: {type(exc).__name__}: {exc}") from None
    return 0
