"""`publish` against a real Redis: entry IDs on the media timeline, loops, restarts, the CLI."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import av
import numpy as np
import pytest
import redis

from schemas import Frame
from schemas.messages import ControlMessage
from worker.pipeline.codec import decode_image
from worker.tools.publish import add_publish_arguments, cmd_publish, publish


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 frames at 25 fps (0.36 s), 64x48, each frame a different grey so order is visible."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            image = np.full((48, 64, 3), 20 * i + 20, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def _entries(client: redis.Redis, key: str) -> list[tuple[int, int, Frame]]:
    out = []
    for entry_id, fields in client.xrange(key):
        ms, seq = entry_id.decode().split("-")
        out.append((int(ms), int(seq), Frame.from_fields(fields)))
    return out


def test_gif_at_5_fps_lands_on_consecutive_slots(r: tuple[redis.Redis, str], assets: Path) -> None:
    client, prefix = r
    key = f"{prefix}:frames:{{cam1}}"
    before = time.time_ns() // 1_000_000
    stats = publish(
        client, str(assets / "videos" / "jumpingjack.gif"), "cam1", key=key, fps=5, progress=False
    )
    entries = _entries(client, key)
    assert stats.frames == len(entries) == 8
    start = entries[0][0]
    assert [ms - start for ms, _, _ in entries] == [0, 200, 400, 600, 800, 1000, 1200, 1400]
    assert start % 200 == 0 and before <= start < before + 200  # the first slot starting after now
    assert [seq for _, seq, _ in entries] == [0] * 8
    for i, (ms, _, frame) in enumerate(entries):
        assert (frame.camera, frame.seq, frame.capture_ms, frame.encoding) == ("cam1", i, ms, "jpeg")
        assert (frame.width, frame.height) == (172, 172)
        assert decode_image(frame, (172, 172)).shape == (172, 172, 3)
    assert stats.first_id == f"{start}-0" and stats.last_id == f"{start + 1400}-0"
    assert stats.bytes == sum(len(f.data) for _, _, f in entries)


def test_every_frame_at_its_media_time(r: tuple[redis.Redis, str], clip: Path) -> None:
    client, prefix = r
    key = f"{prefix}:frames"
    publish(client, str(clip), "c", key=key, size=None, progress=False)
    entries = _entries(client, key)
    start = entries[0][0]
    assert [ms - start for ms, _, _ in entries] == [40 * i for i in range(10)]
    grey = [int(decode_image(f, (48, 64)).mean()) for _, _, f in entries]
    assert grey == sorted(grey) and grey[-1] - grey[0] > 150  # in order, full size (48x64)
    assert (entries[0][2].width, entries[0][2].height) == (64, 48)


def test_loop_continues_the_timeline(r: tuple[redis.Redis, str], clip: Path) -> None:
    client, prefix = r
    # 5 fps: the 0.36 s clip fills slots 0 and 1, so each pass continues two slots on.
    stats = publish(client, str(clip), "c", key=f"{prefix}:a", fps=5, loop=True, limit=7, progress=False)
    entries = _entries(client, f"{prefix}:a")
    assert stats.frames == len(entries) == 7
    assert [ms - entries[0][0] for ms, _, _ in entries] == [200 * i for i in range(7)]
    assert [f.seq for _, _, f in entries] == list(range(7))
    # Every frame: a pass is 10 frames of 40 ms, so the next pass starts 400 ms after the last one did.
    publish(client, str(clip), "c", key=f"{prefix}:b", loop=True, limit=25, progress=False)
    times = [ms for ms, _, _ in _entries(client, f"{prefix}:b")]
    assert [ms - times[0] for ms in times] == [40 * i for i in range(25)]


def test_a_second_publish_never_goes_backwards(r: tuple[redis.Redis, str], clip: Path) -> None:
    client, prefix = r
    key = f"{prefix}:frames"
    first = publish(client, str(clip), "c", key=key, fps=5, progress=False)
    second = publish(client, str(clip), "c", key=key, fps=5, progress=False)
    assert first.last_id and second.first_id
    assert int(second.first_id.split("-")[0]) > int(first.last_id.split("-")[0])
    # A stream whose last ID is an hour ahead (a clock, or a long file published fast): start after it.
    ahead = time.time_ns() // 1_000_000 + 3_600_000
    client.xadd(key, {"x": "1"}, id=f"{ahead}-5")
    client.xdel(key, f"{ahead}-5")  # deleted, but XADD still refuses IDs below it
    third = publish(client, str(clip), "c", key=key, fps=5, progress=False)
    assert third.first_id is not None
    third_ms = int(third.first_id.split("-")[0])
    assert ahead < third_ms <= ahead + 200 and third_ms % 200 == 0
    ids = [(ms, seq) for ms, seq, _ in _entries(client, key)]
    assert ids == sorted(ids) and len(ids) == 6


def test_realtime_is_stamped_on_arrival_at_the_media_pace(r: tuple[redis.Redis, str], clip: Path) -> None:
    client, prefix = r
    key = f"{prefix}:frames"
    before = time.time_ns() // 1_000_000
    stats = publish(client, str(clip), "c", key=key, realtime=True, progress=False)
    after = time.time_ns() // 1_000_000
    entries = _entries(client, key)
    assert stats.frames == 10 and stats.seconds >= 0.35  # 9 gaps of 40 ms
    for ms, _, frame in entries:
        assert frame.capture_ms is not None and before <= frame.capture_ms <= ms <= after
    gaps = np.diff([ms for ms, _, _ in entries])
    assert gaps.min() >= 20 and gaps.sum() >= 340


def test_maxlen_trims(r: tuple[redis.Redis, str], clip: Path) -> None:
    client, prefix = r
    key = f"{prefix}:frames"
    publish(client, str(clip), "c", key=key, size=(8, 8), loop=True, limit=300, maxlen=10, progress=False)
    assert 10 <= client.xlen(key) < 300  # approximate: whole nodes of entries are dropped


def test_retention_trims_by_age_as_the_worker_does(r: tuple[redis.Redis, str], clip: Path) -> None:
    client, prefix = r
    kept, untrimmed = f"{prefix}:frames:kept", f"{prefix}:frames:all"
    # 600 frames at 25 fps (24 s of media time, explicit IDs): a 2 s retention keeps about the last 2 s.
    for key, retention in ((kept, 2.0), (untrimmed, 0.0)):
        publish(
            client, str(clip), "c", key=key, size=(8, 8), loop=True, limit=600, retention_seconds=retention
        )
    assert client.xlen(untrimmed) == 600
    oldest = int(client.xrange(kept, count=1)[0][0].split(b"-")[0])
    newest = int(client.xrevrange(kept, count=1)[0][0].split(b"-")[0])
    assert newest - oldest >= 2000 - 40  # never more than asked: every entry within 2 s of the newest stays
    assert 50 <= client.xlen(kept) < 300  # approximate: whole nodes (100 entries) go at once


def test_cli(r: tuple[redis.Redis, str], clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    client, prefix = r
    parser = argparse.ArgumentParser()
    add_publish_arguments(parser)
    template = f"{prefix}:frames:{{{{{{camera}}}}}}"
    control = f"{prefix}:cameras"
    argv = [str(clip), "--camera", "cam-7", "--fps", "10", "--key-template", template, "--no-progress"]
    args = parser.parse_args([*argv, "--control-stream", control])
    assert args.size == (172, 172) and args.realtime is None and not args.loop and args.announce
    assert cmd_publish(args) == 0
    key = f"{prefix}:frames:{{cam-7}}"
    assert client.xlen(key) == 4  # 0.36 s at 10 fps
    # A new camera is announced once; a camera whose stream exists is not.
    ((_, fields),) = client.xrange(control)
    assert ControlMessage.from_fields(fields) == ControlMessage(camera="cam-7", action="announce")
    capsys.readouterr()
    assert cmd_publish(parser.parse_args([*argv, "--control-stream", control])) == 0
    assert client.xlen(control) == 1 and client.xlen(key) == 8
    out = capsys.readouterr().out
    assert out.startswith("published 4 frames") and f"to {key} " in out
    missing = parser.parse_args([str(clip) + ".nope", "--camera", "c", "--key-template", template])
    assert cmd_publish(missing) == 1
    assert "cannot open" in capsys.readouterr().err
    for bad in (
        ["--camera", "a{b}"],
        ["--camera", "c", "--size", "172"],
        ["--camera", "c", "--quality", "0"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args([str(clip), *bad])
    with pytest.raises(SystemExit):
        parser.parse_args([str(clip), "--camera", "c", "--key-template", "frames:{cam}"])
    assert parser.parse_args([str(clip), "--camera", "c", "--size", "full"]).size is None


def test_redis_url_default_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, r: tuple[redis.Redis, str]
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:1/2")
    parser = argparse.ArgumentParser()
    add_publish_arguments(parser)
    assert parser.parse_args(["x", "--camera", "c"]).redis_url == "redis://example:1/2"
    assert "[env: REDIS_URL]" in parser.format_help()
    with pytest.raises(ValueError, match="camera ID"):
        publish(r[0], "x", "bad camera", key=f"{r[1]}:k")
