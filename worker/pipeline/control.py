"""Control: subscriptions, unsubscriptions and announcements from the control stream.

`Control.read_once` is one turn of the control task: it reads the control stream (XREAD, no
group: every worker sees every entry), checks each entry and applies it to the camera table
(a subscription's top-k, fps and alert rules; a camera to release; a camera announced, which wakes
the owner). A rejected entry is dead-lettered like a bad frame.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from schemas.messages import ControlMessage, DeadLetter, MessageError
from worker.config import Settings
from worker.pipeline.alerting import AlertTracker
from worker.pipeline.cameras import Camera, Cameras, id_key, log, text_of
from worker.pipeline.health import Health
from worker.pipeline.metrics import Metrics
from worker.pipeline.publishing import dead_letter

# Names remembered (unsubscribed cameras, bad stream keys): bounded, whatever arrives.
MAX_REMEMBERED = 100_000
# A control entry is a few hundred bytes; rules for 100 labels a few kB.
MAX_CONTROL_BYTES = 256_000


class Control:
    """The control stream applied to the camera table: `read_once` (the control task's turn). It
    sets `work` when the stepper has something to do (a release, a letter) and `announce` when a
    new camera should be taken now."""

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        cameras: Cameras,
        labels: list[str],
        *,
        metrics: Metrics,
        health: Health,
        tracker: Callable[[Camera], AlertTracker | None],
        dead_letters: list[DeadLetter],
        work: asyncio.Event,
        announce: asyncio.Event,
        beat: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings, self.redis, self.cameras, self.labels = settings, redis, cameras, labels
        self.metrics, self.health, self.tracker = metrics, health, tracker
        self.dead_letters, self.work, self.announce, self.beat = dead_letters, work, announce, beat
        self.last_id = "0-0"  # the control stream is read from its start: subscriptions persist

    async def read_once(self) -> None:
        """One turn of the control task: the control entries written since the last one, applied."""
        response = await self.redis.xread({self.settings.control_stream: self.last_id}, count=500, block=1000)
        self.health.redis_answered()  # at least once a second: the block above
        self.beat()
        for _, entries in response or []:
            for entry_id, fields in entries:
                self.last_id = text_of(entry_id)
                try:
                    self._apply_control(self._control_message(fields))
                except MessageError as exc:
                    self._reject_control(fields, exc)
                except Exception as exc:  # a message nobody foresaw must not stop the others
                    log.error("control entry %s could not be applied", self.last_id, exc_info=exc)
                    self._reject_control(
                        fields, MessageError("unprocessable", f"{type(exc).__name__}: {exc}")
                    )

    def _control_message(self, fields: dict[Any, Any]) -> ControlMessage:
        size = sum(len(k) + len(v) for k, v in fields.items())
        if size > MAX_CONTROL_BYTES:
            raise MessageError("too_large", f"control entry is {size} bytes, limit {MAX_CONTROL_BYTES}")
        msg = ControlMessage.from_fields(fields)
        if msg.rules:
            try:  # the rules must name labels of this model
                AlertTracker(msg.camera, msg.rules, self.labels, self.settings.worker_id)
            except ValueError as exc:
                raise MessageError("unknown_label", str(exc)) from None
        return msg

    def _reject_control(self, fields: dict[Any, Any], exc: MessageError) -> None:
        log.warning("control entry %s rejected: %s", self.last_id, exc)
        self.metrics.frames_deadlettered.labels(exc.reason).inc()
        stream = self.settings.control_stream
        self.dead_letters.append(
            dead_letter(stream, "", self.last_id, fields, exc, worker=self.settings.worker_id)
        )
        self.work.set()

    def _apply_control(self, msg: ControlMessage) -> None:
        if msg.action == "announce":
            self._announced(msg.camera, self.last_id)
            return
        if msg.rules:
            self.metrics.know_rules(rule.name for rule in msg.rules)
        if msg.action == "subscribe":
            self.cameras.subscribed[msg.camera] = msg
            self.cameras.unsubscribed.pop(msg.camera, None)
            cam = self.cameras.camera(msg.camera)
            if msg.top_k:
                cam.top_k = msg.top_k
            if msg.rules is not None and cam.resumed:  # new rules from the next slot on, state kept
                old = cam.alerts
                cam.alerts = self.tracker(cam)
                if cam.alerts is not None and old is not None:
                    cam.alerts.load(old.dump())
                self.metrics.keep_open_alerts(cam.name, cam.alerts.active if cam.alerts else ())
            log.info("camera %s subscribed", msg.camera)
        else:
            self.cameras.subscribed.pop(msg.camera, None)
            self.cameras.unsubscribed[msg.camera] = None
            if len(self.cameras.unsubscribed) > MAX_REMEMBERED:
                del self.cameras.unsubscribed[next(iter(self.cameras.unsubscribed))]
            known = self.cameras.get(msg.camera)
            if known is not None:
                known.release = True  # the stepper drops it between two rounds
                self.work.set()
                log.info("camera %s unsubscribed", msg.camera)

    def _announced(self, name: str, entry_id: str) -> None:
        """A publisher announced a new camera: serve it now rather than at the next discovery SCAN.

        Announcements older than idle_timeout_seconds (the control stream's history, replayed at
        start-up) are ignored: a camera still sending is found by discovery, a retired one stays gone.
        """
        age = time.time() - id_key(entry_id)[0] / 1000
        known = name in self.cameras or name in self.cameras.unsubscribed
        if known or age > self.settings.idle_timeout_seconds:
            return
        self.cameras.camera(name)
        self.announce.set()
        log.info("camera %s announced", name)
