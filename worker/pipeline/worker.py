"""The worker: frames in from Redis Streams, one batched model step per round, predictions out.

`Worker` composes parts sharing one camera table (`cameras.Cameras`): the `Reader` (reading.py),
the `Stepper` (stepping.py), the `Publisher` (publishing.py) and the `Control` reader (control.py).
Four asyncio tasks share one event loop: the owner (here: heartbeat, leases, balance, discovery),
the reader (XREAD from each owned camera's position, decode, place frames on slots), the stepper
(one slot per camera per round, all cameras in one backend call run in a thread, so reading and
decoding go on while the model computes; each round's rows go to the publisher) and the control
reader (subscriptions).

Exactly once: a prediction's entry ID is derived from its slot, so Redis refuses a second one; it is
published by a script that checks the camera's lease (fencing) and moves the camera's committed
position (its consumer group's last-delivered ID) in the same step. A camera picked up (start,
restart, takeover) replays its frames from the start of its current windows: the stream is the log,
and the windows are a pure function of it (see `timeline.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

from redis.exceptions import ResponseError

from schemas.messages import DeadLetter
from worker.config import Settings
from worker.model.backends import Backend
from worker.pipeline.cameras import Cameras, ModelPlan, id_key, log, text_of, valid_camera
from worker.pipeline.capacity import Capacity
from worker.pipeline.checkpoint import Checkpoints
from worker.pipeline.clients import connect_sync
from worker.pipeline.control import MAX_REMEMBERED, Control
from worker.pipeline.health import Health
from worker.pipeline.leases import LeaseKeeper
from worker.pipeline.memory import camera_cap, limit_bytes, rss_bytes
from worker.pipeline.metrics import Metrics
from worker.pipeline.ownership import Ownership, assign
from worker.pipeline.publishing import Publisher
from worker.pipeline.reading import Reader
from worker.pipeline.stepping import Stepper
from worker.pipeline.supervisor import EXIT_TASKS_FAILED, REDIS_ERRORS, Supervisor, script

# A camera that skips ahead resumes this far behind its newest frame (a few slots to start from).
SKIP_KEEP_MS = 1000
# Per-camera lag and last-input gauges are refreshed this often (and /healthz's loop beat).
WATCH_SECONDS = 1.0
# A stream's newest entry ID, without its data; the input older than ARGV[1] ms behind it is trimmed.
HEAD = script("""
local e = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if not e[1] then return false end
local id = e[1][1]
local keep = tonumber(ARGV[1])
if keep > 0 then
  local ms = tonumber(string.match(id, '^(%d+)'))
  redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%.0f', math.max(0, ms - keep)))
end
return id
""")


class Worker:
    """A reader, a stepper, a publisher and a control reader sharing one camera table.

    `Worker` makes the parts and wires them (the dead-letter list, the `work`, `space` and
    `announce` events); it is the owner itself (leases, balance, discovery, skipping ahead, idle
    cameras) and runs every task under its `Supervisor`."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        labels: list[str],
        redis: Any,
        metrics: Metrics | None = None,
        *,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.labels = labels
        self.redis = redis
        self.metrics = metrics or Metrics()
        self.metrics.know_rules(rule.name for rule in settings.alert_rules)
        # /readyz, movinet_worker_ready and `check` read `health`; it asks `ready` below once serving.
        self.health = health or Health(settings.lease_seconds)
        self.health.model_loaded = True  # the backend is loaded
        self.health.check = self.ready
        self.ownership = Ownership(redis, settings)
        self.plan = plan = ModelPlan.of(settings, backend)
        self.checkpoints = Checkpoints(settings, backend, plan.window, self.metrics.registry)
        self.cameras = Cameras(settings, backend, plan, self.metrics)
        self.stopping = asyncio.Event()
        self.supervisor = Supervisor(
            self.metrics,
            self.stopping,
            restarts=settings.task_restarts,
            window_seconds=settings.task_restart_window_seconds,
        )
        self.keeper: LeaseKeeper | None = None
        self.capacity = Capacity(
            settings.max_cameras, settings.target_load, float(plan.fps), self._memory_cap(backend.info)
        )
        self.ownership.capacity = self.capacity.limit
        self._work = asyncio.Event()  # set by the reader and the owner: slot work or a release to do
        self._space = asyncio.Event()  # set by the stepper: queues have room to read into
        self._dead_letters: list[DeadLetter] = []  # from the reader and the control reader, to Redis
        self.publisher = Publisher(
            settings,
            redis,
            self.cameras,
            labels,
            metrics=self.metrics,
            ownership=self.ownership,
            checkpoints=self.checkpoints,
            dead_letters=self._dead_letters,
            denied=self.supervisor.denied,
        )
        self.reader = Reader(
            settings,
            redis,
            self.cameras,
            labels,
            metrics=self.metrics,
            checkpoints=self.checkpoints,
            capacity=self.capacity,
            dead_letters=self._dead_letters,
            work=self._work,
            space=self._space,
            beat=lambda: self.supervisor.beat("reader"),
        )
        self.stepper = Stepper(
            settings,
            redis,
            self.cameras,
            backend,
            self.publisher,
            metrics=self.metrics,
            checkpoints=self.checkpoints,
            capacity=self.capacity,
            ownership=self.ownership,
            stopping=self.stopping,
            work=self._work,
            space=self._space,
            beat=lambda: self.supervisor.beat("stepper"),
        )
        self._heads_seen: dict[str, tuple[int, float]] = {}  # served camera -> (backlog ms, monotonic ms)
        self._announce = asyncio.Event()  # a camera was announced: the owner acts now, not at its next beat
        self.control = Control(
            settings,
            redis,
            self.cameras,
            labels,
            metrics=self.metrics,
            health=self.health,
            tracker=self.reader.tracker,
            dead_letters=self._dead_letters,
            work=self._work,
            announce=self._announce,
            beat=lambda: self.supervisor.beat("control"),
        )
        self._last_discovery = 0.0
        self._invalid_keys: set[bytes | str] = set()
        self._tick = time.monotonic()  # the event loop's heartbeat, read by the lease keeper's thread

    def _memory_cap(self, info: Any) -> int | None:
        """Cameras the memory limit holds (None without a limit), logged with where the limit comes from."""
        limit, source = limit_bytes(self.settings.memory_limit_mb)
        if limit is None:
            return None
        state = sum(a.nbytes for a in self.backend.export_state(self.backend.init_state()).values())
        readahead = self.settings.readahead_frames * int(info.height) * int(info.width) * 3
        cap = camera_cap(limit, rss_bytes(), state, self.plan.per_slot, readahead)
        log.info("memory limit %d MiB (%s): at most %d cameras", limit >> 20, source, cap)
        return cap

    # ---- lifecycle -------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stop requested: finishing the slot in flight")
            self.stopping.set()
            self._work.set()

    def ready(self) -> tuple[bool, str]:
        """(ready, why not): serving, every task running and recent, leases renewed, Redis answering.

        Safe to call from any thread (the metrics server calls it at each scrape)."""
        if self.stopping.is_set():
            return False, "stopping"
        if self.keeper is None or not self.keeper.alive():
            return False, "lease keeper not running"
        renewal = time.monotonic() - self.keeper.renewed_at
        if renewal > self.settings.lease_seconds:
            return False, f"leases not renewed for {renewal:.1f}s (Redis unreachable?)"
        return self.supervisor.health()

    @property
    def exit_code(self) -> int:
        return EXIT_TASKS_FAILED if self.supervisor.failed else 0

    async def run(self) -> None:
        """Serve until `request_stop`; then drain within the grace period, hand over and return."""
        loop = asyncio.get_running_loop()
        self.keeper = LeaseKeeper(
            self.settings,
            self.ownership,
            connect_sync(self.settings),
            self.metrics,
            loop_tick=lambda: self._tick,
            on_lost=lambda names: self._call_soon(loop, self._leases_lost, names),
            on_stall=self._stall,
            on_denied=self.supervisor.denied,
        )
        with contextlib.suppress(*REDIS_ERRORS):  # else the keeper's first round registers us
            await asyncio.to_thread(self.ownership.heartbeat_sync, self.keeper.client)
        self.keeper.start()
        self.metrics.watch_readiness(lambda: self.health.ready()[0])
        self.health.start_serving()
        settings, sup = self.settings, self.supervisor
        ticker = asyncio.create_task(self._ticker(), name="ticker")
        watch = asyncio.create_task(self._watch(), name="watch")
        sup.start(
            "owner",
            self._own_once,
            3 * settings.heartbeat_seconds + settings.redis_timeout_seconds,
            loop=True,
        )
        sup.start("reader", self.reader.read_once, settings.stall_seconds, loop=True)
        sup.start("control", self.control.read_once, 2 + settings.redis_timeout_seconds, loop=True)
        sup.start(
            "stepper", self.stepper.run, settings.stall_seconds, loop=True, on_failure=self.stepper.reset
        )
        try:
            await self.stopping.wait()
            self.health.stop_serving()
            deadline = time.monotonic() + self.settings.grace_seconds
            await sup.cancel(["owner", "reader", "control"])
            self._work.set()
            stepper = [h for h in sup.handles if h.get_name() == "stepper"]
            try:  # the lease keeper goes on renewing: the drain may outlast a lease
                await asyncio.wait_for(asyncio.gather(*stepper), timeout=self.settings.grace_seconds)
            except asyncio.TimeoutError:
                log.warning("grace period over with work pending; the next owner replays it")
            await sup.cancel()
            with contextlib.suppress(*REDIS_ERRORS, ResponseError):  # each next owner resumes exactly
                await self.checkpoints.save_all(self.redis, self.cameras, self.ownership, deadline)
            self.keeper.stop()
            with contextlib.suppress(*REDIS_ERRORS, ResponseError):
                for name in self.ownership.holding():
                    self.metrics.forget_camera(name)  # its series go before its lease: never on two workers
                    await self.ownership.release(name)
                await self.ownership.deregister()
        finally:
            ticker.cancel()
            watch.cancel()
            self.keeper.stop()
            self.stepper.close()
            self.reader.close()

    @staticmethod
    def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nothing left to tell
            loop.call_soon_threadsafe(fn, *args)

    async def _ticker(self) -> None:
        while True:
            self._tick = time.monotonic()
            await asyncio.sleep(0.25)

    def _stall(self, why: str) -> None:
        if why and not self.supervisor.stalled:
            log.error("%s", why)
        self.supervisor.stalled = why

    # ---- cameras and ownership -------------------------------------------------------------

    def _camera_of_key(self, key: bytes | str) -> str | None:
        """The camera a frames stream key names, or None (logged once) if it breaks the camera-ID rule."""
        try:
            text = key.decode() if isinstance(key, bytes) else key
        except UnicodeDecodeError:
            text = ""
        name = self.settings.camera_from_frames_key(text) if text else None
        if name is not None and valid_camera(name):
            return name
        if key not in self._invalid_keys and len(self._invalid_keys) < MAX_REMEMBERED:
            self._invalid_keys.add(key)
            self.metrics.invalid_streams.inc()
            log.warning(
                "stream %r ignored: a camera ID is 1-128 of A-Z a-z 0-9 _ . : - "
                "starting with a letter or digit",
                key[:200],
            )
        return None

    async def _discover(self) -> None:
        now = time.monotonic()
        if not self.settings.discover or now - self._last_discovery < self.settings.discover_interval_seconds:
            return
        self._last_discovery = now
        pattern = self.settings.frames_key.format(camera="*")
        async for key in self.redis.scan_iter(match=pattern, count=1000, _type="stream"):
            name = self._camera_of_key(key)
            if name and name not in self.cameras and name not in self.cameras.unsubscribed:
                self.cameras.camera(name)

    def _leases_lost(self, names: list[str]) -> None:
        """From the lease keeper: these leases expired or were taken; their state is dropped."""
        for name in names:
            cam = self.cameras.get(name)
            log.warning("camera %s: lease lost; state dropped", name)
            self.metrics.leases_lost.inc()
            if cam is not None and cam.owned:
                cam.owned = False
                self.cameras.drop_state(cam)
        self.cameras.count_owned()

    async def _own_once(self) -> None:
        """Take or hand over cameras to match the shared assignment (leases are renewed by the keeper)."""
        await self._discover()
        live = await self.ownership.live_now()  # fresh: a dead worker's cameras move one beat sooner
        wanted = assign(list(self.cameras), live, self.ownership.capacities)
        fresh_ms = (time.time() - self.settings.idle_timeout_seconds) * 1000
        waiting = sum(1 for n, c in self.cameras.items() if n not in wanted and c.head_ms > fresh_ms)
        self.metrics.cameras_unassigned.set(waiting)
        owned = sum(1 for c in self.cameras.values() if c.owned)
        if self.capacity.update(owned, waiting):
            self.ownership.capacity = self.capacity.limit
            log.warning("capacity now %s cameras (load %.2f)", self.capacity.limit, self.capacity.load)
        self.metrics.capacity.set(-1 if self.capacity.limit is None else self.capacity.limit)
        self.metrics.load.set(self.capacity.load)
        for name in list(self.cameras):  # a copy: the table changes while we await
            cam = self.cameras.get(name)
            if cam is None:
                continue
            mine = wanted.get(name) == self.settings.worker_id
            if mine and not cam.owned and not self.stopping.is_set():
                taken, unreleased = await self.ownership.acquire(name)
                if not taken:
                    continue
                if self.cameras.get(name) is not cam:  # unsubscribed while we took it
                    await self.ownership.release(name)
                    continue
                cam.owned, cam.resumed, cam.release = True, False, False
                cam.acquired_at = time.monotonic()
                self.metrics.leases_acquired.inc()
                if unreleased:  # its holder died or stalled instead of handing it over
                    self.metrics.leases_taken_over.inc()
                log.info("camera %s: lease acquired%s", name, f" from {unreleased}" if unreleased else "")
            elif cam.owned and not mine:
                cam.release = True  # the stepper hands it over between two rounds
                self._work.set()
        await self._heads(wanted)
        self._evict_idle()
        self.cameras.count_owned()
        self.supervisor.beat("owner")
        await self._owner_rest()

    async def _owner_rest(self) -> None:
        """Wait one heartbeat, or less: until a stop, or a camera announced (served within a slot)."""
        waits = [asyncio.create_task(self.stopping.wait()), asyncio.create_task(self._announce.wait())]
        beat = self.settings.heartbeat_seconds
        try:
            await asyncio.wait(waits, timeout=beat, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the owner task is cancelled: no waiter left pending
            for task in waits:
                task.cancel()
        self._announce.clear()  # the next _own_once sees every camera announced up to now

    async def _watch(self) -> None:
        """Every second, whether or not anything is published: per-camera lag and input gauges from
        the cameras' state (a silent camera's lag grows), and a beat for /healthz."""
        while not self.stopping.is_set():
            self.metrics.observe_cameras(self.cameras.values())
            self.health.beat()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), WATCH_SECONDS)

    async def _heads(self, wanted: dict[str, str]) -> None:
        """Each stream's newest entry, for the cameras this worker owns and the ones nobody owns: input
        older than the retention behind it is trimmed (an unowned camera's by the first live worker),
        and an owned camera too far behind it skips ahead. How the served cameras' backlog (stream
        head minus published slot) grows is the capacity's keep-up check."""
        first = self.ownership.live[0] == self.settings.worker_id
        names = [n for n, c in self.cameras.items() if c.owned or n not in wanted]
        if not names:
            self._heads_seen = {}
            return
        keep = int(self.settings.input_retention_seconds * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            trims = self.cameras[name].owned or first  # an unowned camera's input: trimmed by one worker
            pipe.eval(HEAD, 1, self.settings.frames_stream(name), keep if trims else 0)
        replies = await pipe.execute(raise_on_error=False)
        mono_ms = time.monotonic() * 1000
        grew = served = 0.0
        seen: dict[str, tuple[int, float]] = {}
        for name, reply in zip(names, replies, strict=True):
            cam = self.cameras.get(name)
            if isinstance(reply, Exception):
                if isinstance(reply, REDIS_ERRORS):
                    raise reply
                continue  # a key of another type: the reader quarantines it
            if cam is None or not reply:
                continue
            head_ms = cam.head_ms = id_key(text_of(reply))[0]
            behind = head_ms - id_key(cam.cursor)[0]
            # A cursor of 0-0 has read nothing yet (a new group): its lag is not known until it has.
            started = cam.cursor != "0-0"
            if cam.owned and cam.resumed and started and cam.published_slot is not None:
                # Not yet published: read or not (the read-ahead holds seconds of frames per camera).
                backlog = max(0, head_ms - cam.clock.start_ms(cam.published_slot + 1))
                was = self._heads_seen.get(name)
                if was is not None:  # at most real time: a burst of recorded frames is a backlog, not load
                    grew += min(backlog - was[0], mono_ms - was[1])
                    served += mono_ms - was[1]
                seen[name] = (backlog, mono_ms)
            if cam.owned and cam.resumed and started and behind > self.settings.max_lag_seconds * 1000:
                to_ms = head_ms - SKIP_KEEP_MS
                skipped = int((to_ms - id_key(cam.cursor)[0]) * cam.clock.fps / 1000)
                log.warning(
                    "camera %s: %.0fs behind its stream: skipping ~%d slots ahead",
                    name,
                    behind / 1000,
                    skipped,
                )
                self.metrics.slots_skipped.inc(max(0, skipped))
                cam.skipped += max(0, skipped)
                self.cameras.drop_state(cam)
                cam.skip_to_ms = to_ms
                seen[name] = (max(0, head_ms - to_ms), mono_ms)  # skipped: not stepped, yet not behind
        self._heads_seen = seen
        self.capacity.behind(grew, served)

    def _evict_idle(self) -> None:
        now = time.monotonic()
        for cam in self.cameras.values():
            idle = now - cam.seen_at > self.settings.idle_timeout_seconds
            if cam.timeline is not None and not cam.pending and idle:
                log.info("camera %s idle for %.0fs: state freed", cam.name, now - cam.seen_at)
                if cam.alerts is not None and cam.owned:
                    cam.pending_alerts.extend(cam.alerts.close_all(cam.timeline.stepped_slot or 0))
                    self._work.set()
                cam.timeline = cam.snapshot = None
                self.metrics.forget_camera(cam.name)
        self.cameras.count_active()
