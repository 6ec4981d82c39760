"""How many cameras this worker takes: a configured maximum, and what its own load allows.

Load is the busy fraction of the model thread or the decode thread (whichever is higher) over a
window of wall time. Busy time over the camera-slots done in the window is the cost of one camera
at the worker's frame rate; `target_load` over that cost is how many cameras it can serve in real
time. The busy times miss a bottleneck elsewhere (the event loop, cores shared with Redis or other
processes), so the worker also watches its cameras' backlog (stream head minus published slot):
if it grows by more than `1 - KEEP_UP` of real time, the worker keeps up with a share `kept` of
its cameras' time and its load is 1 / kept (at most `MAX_BEHIND_LOAD`), the share it would need to
serve them all. Growth counts at most real time per camera (a recorded file published at once is a
backlog, not load), and a camera sending few frames has no backlog: neither looks like load.

Over `target_load` for two windows in a row, the worker lowers its capacity to that figure (at
least one camera fewer): it sheds cameras, which the balancer hands to workers with room or leaves
unowned, counted for the autoscaler. Under 70% of the target it raises its capacity again, a step
per window, while cameras wait unowned. One window is not enough to shed: a burst (a takeover's
replay, a new TF batch size compiling) passes. A target of 1.0 never sheds: a worker catching up a
backlog is busy all the time by construction, and a step that spans two windows can count a little
over 1.0 in the second.
"""

from __future__ import annotations

import math
import time

WINDOW_SECONDS = 10.0
MIN_SLOTS = 20  # fewer camera-slots in a window say too little about the cost of one
GROW_BELOW = 0.7  # of the target
KEEP_UP = 0.9  # keeping up with less than this share of its cameras' time is falling behind
MAX_BEHIND_LOAD = 2.0  # a stall counts as this much load: one decision sheds at most about half


class Capacity:
    def __init__(
        self, max_cameras: int | None, target_load: float, fps: float, memory_cap: int | None = None
    ) -> None:
        self.max_cameras = max_cameras
        self.memory_cap = memory_cap  # cameras the memory limit holds (worker/pipeline/memory.py)
        self.target = target_load
        self.fps = fps
        self.estimate: int | None = None  # cameras the last window's costs allow at the target load
        self._slots = 0
        self._grew = self._served = 0.0  # ms of unpublished backlog grown, ms of camera time watched
        self.measured: int | None = None  # None until the load first asks for a limit
        self.load = 0.0  # of the last full window
        self._busy = {"model": 0.0, "decode": 0.0}
        self._window_start = time.monotonic()
        self._over = 0

    @property
    def limit(self) -> int | None:
        caps = [c for c in (self.max_cameras, self.memory_cap, self.measured) if c is not None]
        return min(caps) if caps else None

    def busy(self, part: str, seconds: float) -> None:
        self._busy[part] = self._busy.get(part, 0.0) + seconds

    def done(self, slots: int) -> None:
        """Camera-slots stepped (each one camera's frame of one slot)."""
        self._slots += slots

    def behind(self, grew_ms: float, served_ms: float) -> None:
        """The served cameras' unpublished backlog grew by `grew_ms` (negative: shrank) over `served_ms` of
        their time (wall time summed over the cameras watched)."""
        self._grew += grew_ms
        self._served += served_ms

    def update(self, owned: int, waiting: int, now: float | None = None) -> bool:
        """At the end of each window: adjust to the load; `waiting`: cameras nobody owns. True if
        the limit changed."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._window_start
        if elapsed < WINDOW_SECONDS:
            return False
        busiest = max(self._busy.values())
        self.load = busiest / elapsed
        if self._served >= WINDOW_SECONDS * 1000:  # at least one camera's window
            kept = 1 - self._grew / self._served
            if kept < KEEP_UP:
                self.load = max(self.load, 1 / max(kept, 1 / MAX_BEHIND_LOAD))
        if self._slots >= MIN_SLOTS:
            per_camera = busiest / self._slots * self.fps  # busy seconds per second of one camera
            self.estimate = max(1, math.floor(self.target / per_camera))
        self._busy = dict.fromkeys(self._busy, 0.0)
        self._slots = 0
        self._grew = self._served = 0.0
        self._window_start = now
        before = self.limit
        if self.load > self.target and owned > 1 and self.target < 1.0:
            self._over += 1
            if self._over >= 2:
                fair = math.floor(owned * self.target / self.load)
                self.measured = max(1, min(owned - 1, self.estimate or fair, fair))
                self._over = 0
        else:
            self._over = 0
            if self.measured is not None and self.load < GROW_BELOW * self.target and waiting:
                self.measured = max(self.measured, owned) + max(1, owned // 10)
        return self.limit != before
