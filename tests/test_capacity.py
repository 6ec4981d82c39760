"""The capacity estimate: shed after two windows over the target, grow back while cameras wait,
never shed at a target of 1.0 (a replay of a backlog is busy all the time by construction); the
memory limit (setting or cgroup) caps it whatever the load allows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas import Frame
from tests.harness import Harness
from worker.pipeline.capacity import WINDOW_SECONDS, Capacity
from worker.pipeline.codec import encode_jpeg
from worker.pipeline.memory import camera_cap, cgroup_limit_bytes, limit_bytes


def window(
    c: Capacity, start: float, busy: float, slots: int, *, owned: int, waiting: int = 0, grew: float = 0
) -> float:
    """One window of wall time with `busy` seconds of model time and `slots` camera-slots stepped, in
    which each of the `owned` cameras' backlog grew by `grew` seconds; returns its end."""
    c._window_start = start  # a fixed clock: windows end exactly where the test says
    c.busy("model", busy)
    c.done(slots)
    c.behind(grew * owned * 1000, owned * WINDOW_SECONDS * 1000)
    end = start + WINDOW_SECONDS
    c.update(owned, waiting, now=end)
    return end


def test_two_windows_over_the_target_shed_to_what_the_cost_allows() -> None:
    c = Capacity(None, 0.85, fps=5)
    # 10 cameras, 5 fps, 10 s: 500 camera-slots in 10 s of busy time: 0.1 s of busy time per
    # second of one camera, so 8 cameras at 0.85.
    t = window(c, 0.0, 10.0, 500, owned=10)
    assert c.limit is None  # one window passes (a burst)
    t = window(c, t, 10.0, 500, owned=10)
    assert c.limit == 8 and c.estimate == 8 and c.load == 1.0


def test_a_burst_of_one_window_does_not_shed() -> None:
    c = Capacity(None, 0.85, fps=5)
    t = window(c, 0.0, 10.0, 500, owned=10)
    t = window(c, t, 4.0, 500, owned=10)
    t = window(c, t, 10.0, 500, owned=10)
    assert c.limit is None


def test_falling_behind_with_idle_threads_sheds_what_it_cannot_step() -> None:
    # 36 cameras at 5 fps, 1,368 camera-slots of 1,800 stepped in 10 s (76%): each camera's backlog
    # grows 2.4 s. The model is busy 7.8 s of 10 (under the target): the bottleneck is elsewhere
    # (the event loop, cores shared with Redis and the publishers).
    c = Capacity(None, 0.85, fps=5)
    t = window(c, 0.0, 7.8, 1368, owned=36, grew=2.4)
    assert c.limit is None and c.load == pytest.approx(1 / 0.76)
    window(c, t, 7.8, 1368, owned=36, grew=2.4)
    assert c.limit == 23  # floor(36 x 0.85 x 0.76): what it steps, with the target's headroom


def test_keeping_up_or_catching_up_is_not_falling_behind() -> None:
    c = Capacity(None, 0.85, fps=5)
    t = window(c, 0.0, 5.0, 1750, owned=36, grew=0.5)  # 95% kept up: within KEEP_UP
    t = window(c, t, 5.0, 1750, owned=36, grew=0.5)
    assert c.limit is None and c.load == 0.5
    # A stall of one window, then the backlog worked off: never two windows behind in a row.
    t = window(c, t, 0.0, 0, owned=36, grew=10.0)
    assert c.load == 2.0  # MAX_BEHIND_LOAD
    t = window(c, t, 6.0, 3600, owned=36, grew=-10.0)
    window(c, t, 0.0, 0, owned=36, grew=10.0)
    assert c.limit is None


def test_light_load_grows_back_only_while_cameras_wait() -> None:
    c = Capacity(None, 0.85, fps=5)
    t = window(c, 0.0, 10.0, 500, owned=10)
    t = window(c, t, 10.0, 500, owned=10)
    assert c.limit == 8
    t = window(c, t, 2.0, 400, owned=8, waiting=0)
    assert c.limit == 8
    t = window(c, t, 2.0, 400, owned=8, waiting=3)
    assert c.limit == 9


def test_a_configured_maximum_caps_the_measure() -> None:
    c = Capacity(4, 0.85, fps=5)
    assert c.limit == 4
    t = window(c, 0.0, 10.0, 200, owned=4)
    window(c, t, 10.0, 200, owned=4)
    assert c.limit == 3  # measured under the maximum: shed one more


def test_a_target_of_one_never_sheds() -> None:
    c = Capacity(None, 1.0, fps=5)
    t = 0.0
    for _ in range(5):
        # a step that began in the previous window counts here too: load a little over 1.0
        t = window(c, t, 10.5, 100, owned=4)
    assert c.load > 1.0 and c.limit is None


def test_the_memory_cap_bounds_the_capacity_whatever_the_load_allows() -> None:
    c = Capacity(None, 0.85, fps=5, memory_cap=7)
    assert c.limit == 7
    t = window(c, 0.0, 1.0, 500, owned=7, waiting=5)  # light load: grows the measure, not the cap
    window(c, t, 1.0, 500, owned=7, waiting=5)
    assert c.limit == 7


def test_the_cgroup_limit_is_read_and_no_limit_is_none(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("1073741824\n")
    assert cgroup_limit_bytes((v2, v1)) == 1 << 30
    v2.write_text("max\n")
    v1.write_text("1073741824\n")
    assert cgroup_limit_bytes((v2, v1)) is None  # v2 is there and says no limit
    v2.unlink()
    assert cgroup_limit_bytes((v2, v1)) == 1 << 30
    v1.write_text(str(2**63 - 4096))  # cgroup v1's "unlimited"
    assert cgroup_limit_bytes((v2, v1)) is None
    assert cgroup_limit_bytes((tmp_path / "none",)) is None
    assert limit_bytes(512) == (512 << 20, "setting")


def test_cameras_that_fit_in_three_quarters_of_the_limit() -> None:
    mb = 1 << 20
    # 1 GiB: 768 MB budget, 120 MB process, 90 MB read-ahead: 558 MB for 2 states x 3 x 2.5 MB
    assert camera_cap(1024 * mb, 120 * mb, int(2.5 * mb), 2, 90 * mb) == 37
    assert camera_cap(1024 * mb, 120 * mb, int(2.5 * mb), 1, 90 * mb) == 74
    assert camera_cap(256 * mb, 180 * mb, int(2.5 * mb), 2, 90 * mb) == 1  # never none


# ---- a worker in-process, real Redis ---------------------------------------------------------------


def test_sparse_cameras_and_a_recorded_burst_are_not_load(
    harnesses: list[Harness], redis_url: str, lite_backend: Any, labels600: list[str]
) -> None:
    """Three cameras sending a frame every 2 s (each frame restarts them: the gap is over
    max_gap_slots, so one slot is stepped per 10 s of stream time) and one whose last minute of
    recording arrives at once: the worker keeps up with all of them and sheds nothing."""
    h = Harness(redis_url, lite_backend, labels600, target_load=0.85, heartbeat_seconds=1.0)
    harnesses.append(h)
    h.start()
    jpeg = encode_jpeg(np.full((172, 172, 3), 90, np.uint8))

    def fields(camera: str, seq: int, ms: int) -> dict[str, Any]:
        return Frame(camera=camera, seq=seq, capture_ms=ms, encoding="jpeg", data=jpeg).to_fields()

    now = int(time.time() * 1000)
    recorded = [(f"{now - 60_000 + 200 * i}-0", now - 60_000 + 200 * i) for i in range(300)]
    for seq, (entry_id, ms) in enumerate(recorded):
        h.client.xadd(h.frames_key("recorded"), fields("recorded", seq, ms), id=entry_id)
    sparse = ["sparse-a", "sparse-b", "sparse-c"]
    end = time.monotonic() + 2.5 * WINDOW_SECONDS
    seq = 0
    while time.monotonic() < end:
        for name in sparse:
            h.client.xadd(h.frames_key(name), fields(name, seq, int(time.time() * 1000)))
        seq += 1
        time.sleep(2.0)
    assert h.worker is not None
    capacity = h.worker.capacity
    assert capacity.measured is None and capacity.load < 0.85, (capacity.measured, capacity.load)
    assert all(h.worker.cameras[n].owned for n in [*sparse, "recorded"])
    assert all(h.client.xlen(h.settings.predictions_stream(n)) >= seq - 2 for n in sparse)
    assert h.client.xlen(h.settings.predictions_stream("recorded")) >= 290
