"""`movinet-worker publish`: a video file or camera URL into a frame stream, as a camera would.

The worker puts a frame on the model clock by its entry ID's time, so the ID is what matters. A
recorded file is stamped with its media time from a start just after both now and the stream's last
ID: it can be published much faster than real time and still land on the same model slots as if it
were live (with `fps`, each frame exactly at the start of its slot). A live source is stamped on
arrival (ID `*`), as a real camera's publisher would.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
from fractions import Fraction
from typing import Any

import numpy as np
from redis import Redis
from redis.exceptions import RedisError, ResponseError
from tqdm import tqdm

from schemas.messages import CAMERA_ID_PATTERN, ControlMessage, Frame
from worker import keys
from worker.config import Settings
from worker.keys import to_format
from worker.options import alias, env_option, non_negative_float, redis_url_option
from worker.pipeline.clients import tool_client
from worker.pipeline.codec import encode_jpeg
from worker.tools.video import VideoError, expected_frames, open_source, read_frames

LIVE_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "srt://")
# XADDs per pipelined round trip when publishing fast: a 172x172 JPEG is ~10 kB, so a batch is
# ~160 kB, enough to hide the round trip without holding many frames back.
BATCH = 16
DEFAULT_SIZE = (172, 172)  # MoViNet A0/A1's input; the worker resizes to its model's size anyway
DEFAULT_KEY_TEMPLATE = keys.FRAMES_KEY
DEFAULT_CONTROL_STREAM = keys.CONTROL_STREAM
DESCRIPTION = (
    "Read SOURCE with PyAV, optionally resample it to --fps by timestamps and resize it, and add each "
    "frame as a JPEG Frame entry to the camera's frame stream. Files are stamped with their media time "
    "(explicit entry IDs from now on, so they can be published faster than real time and still land on "
    "the right model slots); URLs are stamped on arrival, like a live camera."
)


@dataclasses.dataclass
class PublishStats:
    frames: int = 0
    bytes: int = 0  # JPEG bytes published
    first_id: str | None = None
    last_id: str | None = None
    seconds: float = 0.0
    interrupted: bool = False  # stopped by Ctrl-C; everything counted was published


def is_live(source: str) -> bool:
    return source.lower().startswith(LIVE_PREFIXES)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def last_id_ms(redis: Redis, key: str) -> int | None:
    """The stream's last generated ID's time: XADD refuses anything not above it, deleted entries too."""
    try:
        info = redis.xinfo_stream(key)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    return int(_text(info["last-generated-id"]).split("-")[0])


class _Timeline:
    """Where each frame sits from the start of publishing, continuing across loop passes.

    Positions are whole slots when resampling (exact: floats at epoch-ms scale cannot tell a 333.333 ms
    period from 333.3334), else milliseconds of media time.
    """

    def __init__(self, fps: float | None, frame_ms: float) -> None:
        self.period = Fraction(1000) / Fraction(fps).limit_denominator(1_000_000) if fps else None
        self.frame_ms = frame_ms  # the source's frame duration: the gap between one pass and the next
        self.offset = 0  # position where this pass starts
        self.end = 0  # position just after this pass's last frame

    def place(self, slot: int | None, seconds: float) -> int:
        if self.period is not None and slot is not None:
            position = self.offset + slot
            self.end = position + 1
        else:
            position = self.offset + round(seconds * 1000)
            self.end = position + max(1, round(self.frame_ms))
        return position

    def ms(self, position: int) -> Fraction:
        """Milliseconds from the start to a position (a slot's start when resampling)."""
        return position * self.period if self.period is not None else Fraction(position)

    def next_pass(self) -> None:
        self.offset = self.end


class _MediaIds:
    """Explicit entry IDs from a start time, strictly increasing even when media times repeat."""

    def __init__(self, start_ms: int, timeline: _Timeline) -> None:
        # Resampled frames sit on the absolute model clock, each at the start of its slot.
        self.origin = math.ceil(start_ms / timeline.period) * timeline.period if timeline.period else start_ms
        self.timeline = timeline
        self.last = (-1, -1)

    def entry_id(self, position: int) -> tuple[str, int]:
        ms = math.ceil(self.origin + self.timeline.ms(position))
        seq = self.last[1] + 1 if ms <= self.last[0] else 0
        self.last = (max(ms, self.last[0]), seq)
        return f"{self.last[0]}-{seq}", self.last[0]


def jpeg_frame(camera: str, seq: int, capture_ms: int, image: np.ndarray, quality: int = 90) -> Frame:
    """A decoded (already resized) image as the Frame entry a camera publishes."""
    return Frame(
        camera=camera,
        seq=seq,
        capture_ms=capture_ms,
        encoding="jpeg",
        width=image.shape[1],
        height=image.shape[0],
        data=encode_jpeg(image, quality),
    )


RETENTION_DEFAULT = Settings.model_fields["input_retention_seconds"].default


def _frame_ms(container: Any) -> float:
    rate = container.streams.video[0].average_rate
    return 1000 / float(rate) if rate else 40.0  # 25 fps when the container does not say


def publish(
    redis: Redis,
    source: str,
    camera: str,
    *,
    key: str,
    fps: float | None = None,
    size: tuple[int, int] | None = DEFAULT_SIZE,
    loop: bool = False,
    realtime: bool | None = None,
    quality: int = 90,
    maxlen: int | None = None,
    retention_seconds: float | None = None,
    limit: int | None = None,
    progress: bool | None = None,
    announce: str | None = None,
) -> PublishStats:
    """Publish SOURCE's frames to `key`; stops at the end (or `limit`), or on Ctrl-C with what was sent.

    `realtime` None means: on arrival for URLs, by media time for files. Realtime publishing of a file
    sleeps to the media pace; a live source sets its own pace.

    `announce` names the workers' control stream: a camera whose frames stream does not exist yet is
    announced there first, so a worker serves it from its first frame instead of finding it at its
    next discovery SCAN (up to discover_interval_seconds later).

    Trimming: `maxlen` keeps about that many entries; otherwise `retention_seconds` (None or 0: never)
    drops entries more than that older than each new one (XADD MINID ~), as the worker trims its input.
    """
    if not re.fullmatch(CAMERA_ID_PATTERN, camera):
        raise ValueError(f"camera ID {camera!r} does not match {CAMERA_ID_PATTERN}")
    live = is_live(source)
    realtime = live if realtime is None else realtime
    stats = PublishStats()
    started = time.monotonic()
    last_ms = last_id_ms(redis, key)
    start_ms = max(_now_ms(), (last_ms or -1) + 1)
    if announce and last_ms is None:
        redis.xadd(announce, ControlMessage(camera=camera, action="announce").to_fields())
    container = open_source(source)
    timeline = _Timeline(fps, _frame_ms(container))
    ids = _MediaIds(start_ms, timeline)
    known = expected_frames(container, fps)
    total = limit if loop else (min(known, limit or known) if known else None)
    bar = tqdm(
        total=total,
        disable=True if total is None else (None if progress is None else not progress),
        unit="frame",
        desc=key,
        leave=False,
    )
    pipe = redis.pipeline(transaction=False)
    pending: list[int] = []  # JPEG sizes of the XADDs queued in `pipe`

    def flush() -> None:
        added = [_text(i) for i in pipe.execute()]
        stats.frames += len(added)
        stats.bytes += sum(pending)
        stats.first_id = stats.first_id or added[0]
        stats.last_id = added[-1]
        bar.update(len(added))
        pending.clear()

    try:
        while container is not None:
            for frame in read_frames(source, size, fps, container=container):
                if limit is not None and stats.frames + len(pending) >= limit:
                    break
                position = timeline.place(frame.slot, frame.time)
                if not realtime:
                    entry_id, capture_ms = ids.entry_id(position)
                else:
                    if not live:
                        time.sleep(max(0.0, started + float(timeline.ms(position)) / 1000 - time.monotonic()))
                    entry_id, capture_ms = "*", _now_ms()
                message = jpeg_frame(camera, stats.frames + len(pending), capture_ms, frame.image, quality)
                minid = None
                if maxlen is None and retention_seconds:
                    minid = max(0, capture_ms - int(retention_seconds * 1000))
                pipe.xadd(key, message.to_fields(), id=entry_id, maxlen=maxlen, minid=minid, approximate=True)
                pending.append(len(message.data))
                if realtime or len(pending) >= BATCH:
                    flush()
            published = stats.frames + len(pending)
            container.close()
            container = None
            if loop and timeline.end > timeline.offset and (limit is None or published < limit):
                timeline.next_pass()
                container = open_source(source)
        if pending:
            flush()
    except KeyboardInterrupt:
        pipe.reset()  # up to BATCH queued frames are dropped; every frame counted was published
        stats.interrupted = True
    finally:
        bar.close()
        if container is not None:
            container.close()
    stats.seconds = time.monotonic() - started
    return stats


def _camera(text: str) -> str:
    if not re.fullmatch(CAMERA_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits and _ . : - only, up to 128, no braces")
    return text


def _size(text: str) -> tuple[int, int] | None:
    if text.lower() in ("full", "0", "none"):
        return None
    height, sep, width = text.lower().partition("x")
    if not (sep and height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise argparse.ArgumentTypeError(f"expected HxW such as 172x172, or 'full', got {text!r}")
    return int(height), int(width)


def _key_template(text: str) -> str:
    text = to_format(text)
    try:
        ok = "{camera}" in text and text.format(camera="x") != text
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"{text!r} needs <camera> (e.g. 'frames:{{<camera>}}'), or {{camera}} with other braces doubled"
        )
    return text


def _bounded_int(low: int, high: int | None = None) -> Any:
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be in {low}..{high or 'inf'}, got {text}")
        return value

    return parse


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="video file, GIF, or rtsp:// / http(s):// URL")
    parser.add_argument("--camera", required=True, type=_camera, help="camera ID, e.g. lobby-1")
    parser.add_argument(
        "--fps",
        type=float,
        default=None,
        help="resample to this many frames per second by timestamps, one frame per slot of the model "
        "clock (e.g. 5, the rate of A0-A2); default: every decoded frame",
    )
    parser.add_argument(
        "--size",
        type=_size,
        default=DEFAULT_SIZE,
        metavar="HxW",
        help="resize to height x width before JPEG encoding, or 'full' to keep the source's size "
        "(default 172x172, the A0 input; the worker resizes to its own model's size anyway)",
    )
    parser.add_argument(
        "--loop",
        action="store_true",
        help="start again at the end, each pass timed after the previous one (stop with Ctrl-C or --limit)",
    )
    parser.add_argument(
        "--realtime",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stamp frames on arrival (entry ID '*', capture_ms now) and publish a file at its media "
        "pace; --no-realtime stamps each frame with its media time after a start of now (explicit "
        "IDs) and publishes as fast as Redis takes it. Default: realtime for URLs, not for files",
    )
    parser.add_argument(
        "--quality", type=_bounded_int(1, 100), default=90, help="JPEG quality 1-100 (default 90)"
    )
    parser.add_argument(
        "--maxlen",
        type=_bounded_int(1),
        default=None,
        help="trim the stream to about this many entries (approximate MAXLEN) instead of by age",
    )
    env_option(
        parser,
        "--retention-seconds",
        env="MOVINET_INPUT_RETENTION_SECONDS",
        default=str(RETENTION_DEFAULT),
        type=non_negative_float,
        metavar="SECONDS",
        help="trim frames more than this older than the newest (approximate MINID, as the worker trims "
        "its input; 0: never). Default %(default)s, the worker's input_retention_seconds",
    )
    parser.add_argument("--limit", type=_bounded_int(1), default=None, help="stop after N frames")
    redis_url_option(parser, "Redis to publish to")
    env_option(
        parser,
        "--frames-key",
        env="MOVINET_FRAMES_KEY",
        default=DEFAULT_KEY_TEMPLATE,
        type=_key_template,
        metavar="TEMPLATE",
        help="stream key of the camera, <camera> standing for its ID (the default puts the ID in a "
        "Redis Cluster hash tag)",
    )
    alias(parser, "frames_key", "--key-template", type=_key_template)
    parser.add_argument(
        "--control-stream",
        default=os.environ.get("MOVINET_CONTROL_STREAM", DEFAULT_CONTROL_STREAM),
        help="the workers' control stream: a new camera is announced there so it is served from its "
        "first frame (default %(default)s) [env: MOVINET_CONTROL_STREAM]",
    )
    parser.add_argument(
        "--announce",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="announce a camera whose frames stream is new on the control stream (default: yes)",
    )
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def cmd_publish(args: argparse.Namespace) -> int:
    key = args.frames_key.format(camera=args.camera)
    client: Redis = tool_client(args.redis_url)
    try:
        stats = publish(
            client,
            args.source,
            args.camera,
            key=key,
            fps=args.fps,
            size=args.size,
            loop=args.loop,
            realtime=args.realtime,
            quality=args.quality,
            maxlen=args.maxlen,
            retention_seconds=args.retention_seconds,
            limit=args.limit,
            progress=False if args.no_progress else None,
            announce=args.control_stream if args.announce else None,
        )
    except (VideoError, RedisError) as exc:
        print(f"movinet-worker publish: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    rate = stats.frames / stats.seconds if stats.seconds else 0.0
    print(
        f"published {stats.frames} frames ({stats.bytes / 1e6:.1f} MB) to {key} in {stats.seconds:.1f} s "
        f"({rate:.0f} frames/s); IDs {stats.first_id} .. {stats.last_id}"
        + ("; stopped by Ctrl-C" if stats.interrupted else "")
    )
    return 130 if stats.interrupted else 0
