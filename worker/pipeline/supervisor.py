"""Every long-running task of the worker runs here: restarted when it fails, watched for progress.

A task is a coroutine function run in a loop (`once`), or a long coroutine that calls `beat` as it
goes. What happens on an exception:

- a Redis outage (connection, timeout) is waited out with capped backoff; it is not a failure of
  the task, but the task makes no progress meanwhile, so the worker is not ready;
- a Redis permission denial (ACL `NOPERM`) is logged with the command Redis named, and the worker is
  not ready until the same call succeeds;
- anything else is a bug or an input nobody foresaw: logged with its traceback, counted in
  `movinet_task_restarts_total{task}`, and the task restarted after a backoff. More than
  `task_restarts` failures within `task_restart_window_seconds` end the process with a non-zero
  exit, so that Kubernetes restarts it whole rather than leave it half alive.

Readiness is false while any task is dead, has not made progress within its interval, or is
denied by Redis: a worker that stopped serving never reports that it serves.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.pipeline.metrics import Metrics

log = logging.getLogger("movinet.worker")

# Connection-level failures: Redis is away or slow, the task itself is fine.
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
)
# After a failed call: wait this long, doubling up to the cap, then try again.
BACKOFF_START_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0
# A denial is forgotten this long after it was last seen (the ACL may have been fixed).
DENIAL_MEMORY_SECONDS = 30.0
# Exit status of a worker whose tasks kept failing (distinct from a bad configuration's 2).
EXIT_TASKS_FAILED = 3


# The worker's Lua scripts by SHA1: a denial inside a script names only the script and a line.
SCRIPTS: dict[str, str] = {}


def script(text: str) -> str:
    """Register a Lua script (so that an ACL denial inside it can name its command); returns it."""
    SCRIPTS[hashlib.sha1(text.encode()).hexdigest()] = text
    return text


def denied_command(exc: BaseException) -> str | None:
    """What an ACL denial names (`the 'xtrim' command`, or a key), or None if not a denial."""
    text = str(exc)
    in_script = re.search(
        r"can't run this command or subcommand script: ([0-9a-f]{40}), on @user_script:(\d+)", text
    )
    if in_script:
        lines = SCRIPTS.get(in_script.group(1), "").splitlines()
        at = int(in_script.group(2)) - 1
        for line in reversed(lines[max(0, at - 6) : at + 1]):  # the call, or the args built above it
            name = re.search(r"'([A-Z]+)'", line)
            if name:
                return name.group(1).lower()
        return "a command in a script"
    if not (isinstance(exc, NoPermissionError) or (isinstance(exc, ResponseError) and "NOPERM" in text)):
        return None
    found = re.search(r"'([^']+)' command", text)
    return found.group(1) if found else text.removeprefix("NOPERM ")[:200]


async def retrying(call: Callable[[], Awaitable[None]], metrics: Metrics, what: str) -> None:
    """Run `call` until it succeeds through Redis outages (capped exponential backoff)."""
    delay = BACKOFF_START_SECONDS
    while True:
        try:
            await call()
            return
        except REDIS_ERRORS as exc:
            metrics.redis_errors.inc()
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_SECONDS)


@dataclasses.dataclass
class Task:
    name: str
    interval: float  # progress is expected at least this often
    beat_at: float = dataclasses.field(default_factory=time.monotonic)
    failures: collections.deque[float] = dataclasses.field(default_factory=collections.deque)
    running: bool = False
    error: str = ""


class Supervisor:
    def __init__(
        self,
        metrics: Metrics,
        stopping: asyncio.Event,
        *,
        restarts: int,
        window_seconds: float,
    ) -> None:
        self.metrics = metrics
        self.stopping = stopping
        self.restarts = restarts
        self.window_seconds = window_seconds
        self.tasks: dict[str, Task] = {}
        self.handles: list[asyncio.Task[None]] = []
        self.denials: dict[str, float] = {}  # denied command -> when last seen
        self.failed = False  # too many restarts: the process must exit non-zero
        self.stalled = ""  # set by the lease keeper when the event loop stops making progress

    # ---- progress ----------------------------------------------------------------------------

    def beat(self, name: str) -> None:
        task = self.tasks.get(name)
        if task is not None:
            task.beat_at = time.monotonic()
            task.error = ""

    def denied(self, command: str) -> None:
        if command not in self.denials:
            log.error(
                "Redis denies the %r command to this worker's user: not ready until it is allowed "
                "(the ACL needed is in deploy/README.md)",
                command,
            )
        self.denials[command] = time.monotonic()

    def health(self) -> tuple[bool, str]:
        """(ready, why not): every task running and recent, no denial, no stall."""
        now = time.monotonic()
        for command, at in list(self.denials.items()):
            if now - at > DENIAL_MEMORY_SECONDS:
                self.denials.pop(command, None)
        if self.failed:
            return False, "tasks failed too often; exiting"
        if self.stalled:
            return False, self.stalled
        if self.denials:
            return False, "Redis denies " + ", ".join(sorted(self.denials))
        for task in self.tasks.values():
            if not task.running:
                return False, f"task {task.name} is not running ({task.error or 'not started'})"
            late = now - task.beat_at
            if late > task.interval:
                why = f": {task.error}" if task.error else ""
                return False, f"task {task.name} made no progress for {late:.1f}s{why}"
        return True, "serving"

    # ---- running -----------------------------------------------------------------------------

    def start(
        self,
        name: str,
        body: Callable[[], Awaitable[None]],
        interval: float,
        *,
        loop: bool,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        """Run `body` under supervision: forever in a loop (`loop=True`) or until it returns once;
        `on_failure` resets what a failed run may have left half done, before the restart."""
        task = self.tasks[name] = Task(name, interval)
        self.handles.append(asyncio.create_task(self._run(task, body, loop, on_failure), name=name))

    async def _run(
        self,
        task: Task,
        body: Callable[[], Awaitable[None]],
        loop: bool,
        on_failure: Callable[[], None] | None,
    ) -> None:
        delay = BACKOFF_START_SECONDS
        task.running = True
        try:
            while not self.stopping.is_set():
                try:
                    await body()
                    self.beat(task.name)
                    delay = BACKOFF_START_SECONDS
                    if not loop:
                        return
                    continue
                except asyncio.CancelledError:
                    raise
                except REDIS_ERRORS as exc:
                    self.metrics.redis_errors.inc()
                    task.error = f"Redis: {exc}"
                    log.warning("%s: redis call failed (%s); retrying in %.1fs", task.name, exc, delay)
                except ResponseError as exc:
                    command = denied_command(exc)
                    if command is None:
                        self._failure(task, exc)
                    else:
                        self.denied(command)
                        task.error = f"denied {command}"
                except Exception as exc:
                    self._failure(task, exc)
                    if on_failure is not None:
                        on_failure()
                if self.failed:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)
        finally:
            task.running = False

    def _failure(self, task: Task, exc: BaseException) -> None:
        now = time.monotonic()
        task.error = f"{type(exc).__name__}: {exc}"[:300]
        task.failures.append(now)
        while task.failures and now - task.failures[0] > self.window_seconds:
            task.failures.popleft()
        self.metrics.task_restarts.labels(task.name).inc()
        log.error("task %s failed; restarting it", task.name, exc_info=exc)
        if len(task.failures) > self.restarts:
            log.critical(
                "task %s failed %d times in %.0fs: stopping the worker so that it is restarted whole",
                task.name,
                len(task.failures),
                self.window_seconds,
            )
            self.failed = True
            self.stopping.set()

    async def cancel(self, names: list[str] | None = None) -> None:
        """Cancel the named tasks (default: all) and wait for them to end."""
        chosen = [h for h in self.handles if names is None or h.get_name() in names]
        for handle in chosen:
            handle.cancel()
        await asyncio.gather(*chosen, return_exceptions=True)
