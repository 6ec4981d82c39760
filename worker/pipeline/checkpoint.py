"""Checkpoints of a camera's model state: what makes a hand-over exact in `ema` mode too.

A checkpoint holds a camera's window states after slot S (the backend's own arrays), their start
slots and frame counts, the image slot S was stepped with (a short gap after S repeats it), and the
identity of the model and of the temporal settings the states belong to. It is written under the
camera's hash tag only while the writer holds the camera's lease: periodically by the publish script
together with slot S's prediction (`ownership.PUBLISH`), and on a deliberate release (rebalance,
unsubscribe, drain) by `SAVE` once slot S is published. So a checkpoint never runs ahead of the
predictions, and a worker that lost the lease cannot write one.

A new owner restores the checkpoint and replays only the frames after S; a checkpoint it cannot
use (none or expired, another model or settings, corrupt, its frames trimmed, older than the
replay) leaves it to the full replay of `camera.py`, counted and logged.

Layout: MAGIC, a 4-byte header length, a JSON header, the arrays' raw bytes in header order, and a
BLAKE2b digest of all before it; or ZMAGIC and that, deflated. Compression pays for some models and
not others (measured, README failover section: an int8 model's dequantized states deflate to 30% at
~70 ms; a float model's to 95% at ~250 ms), so each worker tries it on its first checkpoint and
keeps it only if it saves at least a fifth.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from worker.config import Settings
from worker.model.backends import Backend
from worker.pipeline.cameras import Camera, id_key, log, text_of
from worker.pipeline.metrics import CheckpointMetrics
from worker.pipeline.supervisor import script
from worker.pipeline.timeline import CameraTimeline, Clock

MAGIC = b"MOVINET-CHECKPOINT-1\n"
ZMAGIC = b"MOVINET-CHECKPOINT-1Z\n"
# Compression is kept when it leaves at most this much of a checkpoint.
COMPRESS_RATIO = 0.8
# The decision is made on 16 pieces of 64 kB spread over the first checkpoint (deflating all of A0's
# 5.5 MB of float state to learn that it does not pay takes ~0.5 s; its arrays differ, so one piece
# of the middle can mislead).
SAMPLE_PIECES, SAMPLE_PIECE = 16, 1 << 16
# A drain stops checkpointing when less than this much of the grace period is left: releasing the
# leases and leaving the registry come first (the next owners replay instead).
DRAIN_MARGIN_SECONDS = 2.0
# A deflated checkpoint may inflate to no more than this (A0 windows: 5.5 MB; A5 is ~10x A0).
MAX_INFLATED = 256 << 20
DIGEST_BYTES = 16
# Without input retention, a checkpoint expires after this long (a day): a camera picked up later
# replays as if it had none.
DEFAULT_TTL_MS = 86_400_000
# Encoding a checkpoint: ~1 ms for the test models, ~10 ms for A0's 2.7 MB of state.
# Write a camera's checkpoint only while holding its lease. KEYS: owner, checkpoint.
# ARGV: lease value, checkpoint, ms to live. Returns 0 when fenced.
SAVE = script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
""")


class Refused(Exception):
    """A checkpoint that cannot be used; `reason` is the metric's label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A camera's stepped state after `slot`: what a checkpoint holds."""

    slot: int
    windows: tuple[tuple[Any, int, int], ...]  # (backend state, start slot, frames) per window
    image: np.ndarray  # uint8, the image slot `slot` was stepped with
    capture_ms: int


def model_identity(backend: Backend) -> str:
    """A digest of the model's files (or its handle) and its state layout: checkpoints of another
    model, even one of the same architecture, are refused."""
    h = hashlib.blake2b(digest_size=16)
    h.update(backend.name.encode())
    for name, (dtype, shape) in sorted(state_layout(backend).items()):
        h.update(f"{name}:{dtype}:{shape};".encode())
    source = Path(backend.info.source)
    if source.is_file():
        files = [(source, "")]
    elif source.is_dir():
        files = [(p, str(p.relative_to(source))) for p in sorted(source.rglob("*")) if p.is_file()]
    else:
        files = []
        h.update(backend.info.source.encode())
    for path, name in files:
        h.update(name.encode() + b"\x00")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def state_layout(backend: Backend) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {n: (a.dtype.str, tuple(a.shape)) for n, a in backend.export_state(backend.init_state()).items()}


def encode(snapshot: Snapshot, backend: Backend, model: str, setup: str, written_ms: int) -> bytes:
    body: list[bytes] = []
    windows = []
    for state, start, frames in snapshot.windows:
        named = backend.export_state(state)
        entries = []
        for name in sorted(named):
            array = np.ascontiguousarray(named[name])
            entries.append([name, array.dtype.str, list(array.shape)])
            body.append(array.tobytes())
        windows.append({"start_slot": start, "frames": frames, "count": state.frames, "arrays": entries})
    image = np.ascontiguousarray(snapshot.image, np.uint8)
    body.append(image.tobytes())
    header = {
        "model": model,
        "setup": setup,
        "slot": snapshot.slot,
        "capture_ms": snapshot.capture_ms,
        "written_ms": written_ms,
        "windows": windows,
        "image": list(image.shape),
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    blob = b"".join([MAGIC, len(head).to_bytes(4, "big"), head, *body])
    return blob + hashlib.blake2b(blob, digest_size=DIGEST_BYTES).digest()


def decode(
    blob: bytes, backend: Backend, model: str, setup: str, layout: dict[str, tuple[str, tuple[int, ...]]]
) -> Snapshot:
    """The snapshot in `blob`; raises `Refused` unless it is intact and of this model and setup."""
    if blob.startswith(ZMAGIC):
        inflate = zlib.decompressobj()
        try:
            blob = inflate.decompress(blob[len(ZMAGIC) :], MAX_INFLATED)
        except zlib.error as exc:
            raise Refused("corrupt", f"deflate: {exc}") from None
        if inflate.unconsumed_tail:
            raise Refused("corrupt", "inflates past the size limit")
    if len(blob) < len(MAGIC) + 4 + DIGEST_BYTES or not blob.startswith(MAGIC):
        raise Refused("corrupt", "not a checkpoint")
    content, digest = blob[:-DIGEST_BYTES], blob[-DIGEST_BYTES:]
    if hashlib.blake2b(content, digest_size=DIGEST_BYTES).digest() != digest:
        raise Refused("corrupt", "digest mismatch")
    start = len(MAGIC) + 4
    size = int.from_bytes(content[len(MAGIC) : start], "big")
    try:
        header = json.loads(content[start : start + size])
        if header["model"] != model:
            raise Refused("model", f"written by model {str(header['model'])[:40]}, this is {model}")
        if header["setup"] != setup:
            raise Refused("settings", f"written for {str(header['setup'])[:80]}, this is {setup}")
        offset = start + size
        windows = []
        for w in header["windows"]:
            arrays = {}
            for name, dtype, shape in w["arrays"]:
                if layout.get(name) != (dtype, tuple(shape)):
                    raise Refused("corrupt", f"state array {str(name)[:60]} is not this model's")
                count = int(np.prod(shape, dtype=np.int64))
                arrays[name] = np.frombuffer(content, np.dtype(dtype), count, offset).reshape(shape)
                offset += arrays[name].nbytes
            if set(arrays) != set(layout):
                raise Refused("corrupt", "state arrays missing")
            state = backend.import_state(arrays, int(w["count"]))
            windows.append((state, int(w["start_slot"]), int(w["frames"])))
        shape = tuple(int(n) for n in header["image"])
        image = np.frombuffer(content, np.uint8, int(np.prod(shape)), offset).reshape(shape)
        if offset + image.nbytes != len(content):
            raise Refused("corrupt", "trailing bytes")
        return Snapshot(int(header["slot"]), tuple(windows), image, int(header["capture_ms"]))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise Refused("corrupt", f"{type(exc).__name__}: {exc}") from None


class Checkpoints:
    """When to checkpoint a camera, writing on release, and restoring on pick-up."""

    def __init__(self, settings: Settings, backend: Backend, window: int, registry: Any) -> None:
        self.settings = settings
        self.backend = backend
        ema_frames, ema_replay = settings.ema_plan(window)
        # By default, ema mode checkpoints as often as its replay is long (a crash takeover then
        # replays no more than before, exactly); windows mode, exact without, only on a release.
        every = settings.checkpoint_every_slots
        self.every = (ema_replay or 0) if every is None else every
        retention = settings.input_retention_seconds
        # A checkpoint outlives the frames after it by little: the next owner must replay those.
        self.ttl_ms = int(retention * 1000) if retention else DEFAULT_TTL_MS
        temporal = f"ema/{ema_frames}" if ema_frames else "windows"
        self.setup_base = f"{temporal} window={window} max_gap={settings.max_gap_slots}"
        try:
            self.layout = state_layout(backend)
        except NotImplementedError:  # a backend without state export (test fakes): no checkpoints
            self.layout = {}
        self.enabled = bool(self.layout)
        self.compress: bool | None = None  # decided on the first checkpoint
        self.model = model_identity(backend) if self.enabled else ""
        m = CheckpointMetrics(registry)
        self.written, self.bytes, self.seconds, self.resumes = m.written, m.bytes, m.seconds, m.resumes

    def setup(self, clock: Clock) -> str:
        return f"{self.setup_base} fps={clock.fps}"

    def stepped(self, cam: Camera, timeline: CameraTimeline, image: np.ndarray, capture_ms: int) -> Any:
        """Remember the camera's state after its newest stepped slot; returns it when a periodic
        checkpoint is due (else None)."""
        slot = timeline.stepped_slot
        if not self.enabled or slot is None:
            return None
        windows = tuple((w.state, w.start_slot, w.frames) for w in timeline.windows)
        cam.snapshot = Snapshot(slot, windows, image, capture_ms)
        if not self.every or (cam.checkpoint_slot is not None and slot - cam.checkpoint_slot < self.every):
            return None
        cam.checkpoint_slot = slot
        return cam.snapshot

    def encode(self, cam: Camera, snapshot: Snapshot) -> bytes:
        """Serialize (call it off the event loop: ~10 ms for A0)."""
        started = time.perf_counter()
        blob = encode(snapshot, self.backend, self.model, self.setup(cam.clock), int(time.time() * 1000))
        if self.compress is None:
            step = len(blob) // SAMPLE_PIECES
            sample = b"".join(blob[i * step : i * step + SAMPLE_PIECE] for i in range(SAMPLE_PIECES))
            ratio = len(zlib.compress(sample, 1)) / max(1, len(sample))
            self.compress = ratio <= COMPRESS_RATIO
            log.info(
                "checkpoints deflate to ~%.0f%% of %d bytes: %s",
                100 * ratio,
                len(blob),
                "compressed" if self.compress else "stored as they are",
            )
        if self.compress:
            blob = ZMAGIC + zlib.compress(blob, 1)
        self.seconds.observe(time.perf_counter() - started)
        return blob

    async def encode_rows(self, rows: list[tuple[Camera, Any]]) -> None:
        """Serialize the snapshots due in a round's rows, in a thread."""
        due = [(cam, row) for cam, row in rows if row.snapshot is not None]
        if due:
            blobs = await asyncio.to_thread(lambda: [self.encode(c, r.snapshot) for c, r in due])
            for (_, row), blob in zip(due, blobs, strict=True):
                row.checkpoint, row.snapshot = blob, None

    def count(self, reason: str, blob: bytes) -> None:
        self.written.labels(reason).inc()
        self.bytes.inc(len(blob))

    async def save(self, redis: Any, cam: Camera, token: str | None) -> bool:
        """On a deliberate release: checkpoint the camera's newest stepped and published slot."""
        snapshot = cam.snapshot
        if token is None or snapshot is None:
            return False
        if cam.published_slot is None or snapshot.slot > cam.published_slot:
            return False  # its prediction is not out: the next owner must step that slot itself
        blob = await asyncio.to_thread(self.encode, cam, snapshot)
        owner, key = self.settings.owner(cam.name), self.settings.checkpoint(cam.name)
        if not await redis.eval(SAVE, 2, owner, key, token, blob, self.ttl_ms):
            return False
        self.count("release", blob)
        log.info("camera %s: checkpoint of slot %d written (%d bytes)", cam.name, snapshot.slot, len(blob))
        return True

    async def save_all(self, redis: Any, cameras: dict[str, Camera], ownership: Any, deadline: float) -> None:
        """On a drain: checkpoint every camera still held, while the grace period (`deadline`,
        monotonic) leaves room for the releases."""
        names = [n for n in ownership.holding() if n in cameras]
        for i, name in enumerate(names):
            if time.monotonic() > deadline - DRAIN_MARGIN_SECONDS:
                log.warning(
                    "grace period nearly over: %d cameras released without a checkpoint (replayed)",
                    len(names) - i,
                )
                return
            await self.save(redis, cameras[name], ownership.token(name))

    async def restore(self, redis: Any, cam: Camera, timeline: CameraTimeline, published: int) -> int | None:
        """Load the camera's checkpoint into `timeline`; returns its slot, or None (full replay)."""
        fallback = timeline.replay_start_slot(published + 1)
        why = "ema state rebuilt approximately" if timeline.ema_replay is not None else "exact"
        try:
            blob = await redis.get(self.settings.checkpoint(cam.name)) if self.enabled else None
            if not self.enabled:
                raise Refused("unsupported", "this backend cannot export its states")
            if blob is None:
                raise Refused("none", "no checkpoint (never written, or expired)")
            snap = await asyncio.to_thread(
                decode, blob, self.backend, self.model, self.setup(cam.clock), self.layout
            )
            if snap.slot > published:
                raise Refused("ahead", f"slot {snap.slot} is after the last published {published}")
            if timeline.ema_replay is None and snap.slot + 1 < fallback:
                raise Refused("older", f"slot {snap.slot} is before the windows' replay start {fallback}")
            if len(snap.windows) != len(timeline.windows):
                raise Refused("settings", "another number of windows")
            oldest = await redis.xrange(cam.stream, count=1)
            if oldest and id_key(text_of(oldest[0][0]))[0] >= cam.clock.end_ms(snap.slot):
                raise Refused("trimmed", f"frames after slot {snap.slot} are trimmed from the stream")
        except Refused as exc:
            self.resumes.labels(exc.reason).inc()
            log.log(
                20 if exc.reason in ("none", "older") else 30,
                "camera %s: no usable checkpoint (%s): replaying from slot %d (%s)",
                cam.name,
                exc,
                fallback,
                why,
            )
            return None
        for w, (state, start, frames) in zip(timeline.windows, snap.windows, strict=True):
            w.state, w.start_slot, w.frames = state, start, frames
        timeline.last_slot = timeline.stepped_slot = snap.slot
        timeline.last_image, timeline.last_capture_ms = snap.image, snap.capture_ms
        cam.snapshot, cam.checkpoint_slot = snap, snap.slot
        self.resumes.labels("restored").inc()
        log.info(
            "camera %s: restored from the checkpoint of slot %d: replaying %d slots instead of %d",
            cam.name,
            snap.slot,
            published - snap.slot,
            published + 1 - fallback,
        )
        return snap.slot
