"""The fault-test helpers themselves (tests/cluster.py): they must be right before they judge a worker."""

from __future__ import annotations

import copy
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from schemas.messages import Frame, Prediction, TopLabel
from tests.cluster import (
    Fleet,
    KeySpace,
    LivePublisher,
    PredictionWatcher,
    RedisCluster3,
    RedisServer,
    check_run,
    frame_image,
    owned_by,
    reference_predictions,
    same_top,
    slot_of,
    wait_drained,
    write_labels,
)

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis-server / redis-cli not installed",
)
T0 = 1_700_000_000_000  # on a slot boundary


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_redis_server_starts_serves_and_stops() -> None:
    with RedisServer() as server:
        client = server.client()
        assert client.ping()
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert redis.Redis.from_url(server.url).config_get("appendonly") == {"appendonly": "no"}
        port, folder = server.port, Path(server._dir.name)  # type: ignore[union-attr]
        assert folder.is_dir()
    assert refused(port)
    assert not folder.exists()


def test_cut_connections_drops_every_client_which_then_reconnects() -> None:
    with RedisServer() as server:
        a, b = server.client(), server.client()
        assert a.ping() and b.ping()
        first = a.client_id()
        assert server.cut_connections() >= 2
        assert a.ping()  # redis-py reconnects on the next call
        assert a.client_id() != first
        assert b.get("nothing") is None


def test_cluster_reaches_ok_and_a_cameras_keys_share_a_slot() -> None:
    keys = KeySpace.new()
    started = time.monotonic()
    with RedisCluster3() as cluster:
        took = time.monotonic() - started
        assert len(set(cluster.ports)) == 3
        for port in cluster.ports:
            info = cluster.info(port)
            assert info["cluster_state"] == "ok" and info["cluster_known_nodes"] == "3", info
        cameras = [f"cam{i}" for i in range(8)]
        for camera in cameras:
            slots = {
                cluster.keyslot(k)
                for k in (keys.frames(camera), keys.predictions(camera), keys.owner(camera))
            }
            assert len(slots) == 1, (camera, slots)
        client = cluster.client()
        # A script over one camera's keys runs (same slot), as the worker's fenced publish does.
        script = (
            "if redis.call('GET', KEYS[1]) == ARGV[1] then "
            "return redis.call('XADD', KEYS[2], '1-0', 'a', 'b') end"
        )
        client.set(keys.owner("cam1"), "w1:tok")
        assert client.eval(script, 2, keys.owner("cam1"), keys.predictions("cam1"), "w1:tok") == b"1-0"
        nodes = {client.get_node_from_key(keys.frames(c)).port for c in cameras}
        assert len(nodes) >= 2  # eight cameras spread over the masters
        with LivePublisher(client, keys, cameras[:4]) as publisher:
            publisher.run_until(1.3)
        assert all(len(v) >= 5 for v in publisher.published.values())
        assert client.xlen(keys.frames("cam0")) == len(publisher.published["cam0"])
        assert keys.cleanup(client) >= 5
        assert list(client.scan_iter(match=f"{keys.prefix}:*")) == []
        ports = list(cluster.ports)
    print(f"cluster up in {took:.1f}s")
    assert all(refused(p) for p in ports)


def test_publisher_runs_in_real_time_at_5_fps_with_increasing_ids() -> None:
    cameras = ["a", "b", "c"]
    keys = KeySpace.new()
    with RedisServer() as server:
        client = server.client()
        publisher = LivePublisher(client, keys, cameras).start()
        publisher.run_until(3.0)
        publisher.stop()
        for camera in cameras:
            entries = client.xrange(keys.frames(camera))
            ids = [tuple(int(x) for x in e.decode().split("-")) for e, _ in entries]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            assert 13 <= len(entries) <= 16, len(entries)
            ms = [i[0] for i in ids]
            gaps = np.diff(ms)
            assert abs(float(np.median(gaps)) - 200) <= 20, gaps
            slots = [slot_of(m) for m in ms]
            assert len(set(slots)) == len(slots)  # one frame per slot, at the slot's middle
            assert all(60 <= m % 200 <= 140 for m in ms), [m % 200 for m in ms]
            record = publisher.published[camera]
            assert [p.entry_id for p in record] == [e.decode() for e, _ in entries]
            assert all(abs(p.wall * 1000 - p.ms) < 100 for p in record)  # published when captured
            for entry_id, fields in entries:
                frame = Frame.from_fields(fields)
                assert frame.capture_ms == int(entry_id.decode().split("-")[0])
                image = np.frombuffer(frame.data, np.uint8).reshape(172, 172, 3)
                np.testing.assert_array_equal(image, frame_image(camera, frame.seq))
        assert publisher.errors == publisher.skipped == 0
        assert not np.array_equal(frame_image("a", 0), frame_image("a", 1))
        assert not np.array_equal(frame_image("a", 0), frame_image("b", 0))


def fake_prediction(client: redis.Redis, keys: KeySpace, camera: str, slot: int, worker: str) -> None:
    start = slot * 200
    prediction = Prediction(
        camera=camera,
        slot=slot,
        start_ms=start,
        end_ms=start + 200,
        window_start_ms=start,
        frames=1,
        repeated=False,
        capture_ms=start,
        model="m",
        worker=worker,
        top=[TopLabel(label="x", score=0.5)],
    )
    client.xadd(keys.predictions(camera), prediction.to_fields(), id=f"{start}-0")


def test_watcher_records_first_seen_times_workers_gaps_and_fencing() -> None:
    keys = KeySpace.new()
    base = T0 // 200
    with RedisServer() as server:
        client = server.client()
        watcher = PredictionWatcher(client, keys, ["a", "b"])
        client.set(keys.owner("a"), "w1:tok1")
        client.set(keys.owner("b"), "w-2:x:tok2")  # the token follows the last colon
        assert owned_by(client, keys, ["a", "b"]) == {"w1": ["a"], "w-2:x": ["b"]}
        fake_prediction(client, keys, "a", base, "w1")
        fake_prediction(client, keys, "b", base, "w-2:x")
        assert watcher.poll_once() == 2
        fake_prediction(client, keys, "a", base + 1, "w1")
        client.set(keys.owner("a"), "w2:tok3")  # lost right after publishing: not a violation
        assert watcher.poll_once() == 1
        time.sleep(0.5)
        fake_prediction(client, keys, "a", base + 2, "w1")  # the lease is w2's: a violation
        assert watcher.poll_once() == 1
        fake_prediction(client, keys, "a", base + 3, "w2")
        assert watcher.poll_once() == 1
        assert watcher.poll_once() == 0
        assert watcher.count() == 5
        assert watcher.workers_seen() == {"w1": 3, "w-2:x": 1, "w2": 1}
        gap = watcher.max_gap()
        assert gap is not None and (gap.camera, gap.before, gap.after) == ("a", base + 1, base + 2)
        assert 0.45 < gap.seconds < 1.0
        assert [(s.camera, s.slot, s.worker) for s in watcher.fencing_violations()] == [("a", base + 2, "w1")]
        delay, worst = watcher.max_delay()
        assert worst is not None and delay > 1e6  # slots in 2023: long ago
        assert watcher.max_delay({"a": base + 10, "b": base + 10}) == (0.0, None)
        # The thread: new entries show up within a few polls.
        with watcher:
            fake_prediction(client, keys, "b", base + 1, "w-2:x")
            deadline = time.monotonic() + 5
            while watcher.count() < 6 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert watcher.count() == 6 and watcher.errors == 0


def test_same_top_allows_only_near_ties_to_swap() -> None:
    ref = [("a", 0.5), ("b", 0.3), ("c", 0.1)]
    assert same_top(ref, ref) is None
    assert same_top([("a", 0.50005), ("b", 0.3), ("c", 0.1)], ref) is None
    assert same_top([("a", 0.5002), ("b", 0.3), ("c", 0.1)], ref) is not None
    assert same_top([("b", 0.5), ("a", 0.3), ("c", 0.1)], ref) is not None
    close = [("a", 0.5), ("b", 0.3003), ("c", 0.3)]
    assert same_top([("a", 0.5), ("c", 0.3003), ("b", 0.3)], close) is not None  # not a tie: swapped
    assert same_top([("a", 0.5), ("c", 0.3), ("b", 0.3)], [("a", 0.5), ("b", 0.3), ("c", 0.3)]) is None
    assert same_top([("a", 0.5), ("b", 0.3), ("d", 0.1)], ref) is None  # a tie at the cut-off
    assert same_top([("a", 0.5), ("b", 0.3)], ref) is not None


def test_worker_process_reference_run_and_check_run(models, labels600, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One worker process serves a live publisher; the reference run over a copy of its frames
    agrees with it exactly, and `check_run` notices a lost, a duplicated and a changed slot."""
    cameras = ["a", "b"]
    keys = KeySpace.new()
    labels = write_labels(tmp_path / "labels.txt", labels600)
    with RedisServer() as server:
        client = server.client()
        with Fleet(server.url, keys, models.tflite, labels, tmp_path, window=10) as fleet:
            started = time.monotonic()
            worker = fleet.start("solo")
            ready_after = time.monotonic() - started
            assert worker.metric("movinet_worker_ready") == 1
            assert worker.metric("no_such_metric") is None
            with PredictionWatcher(client, keys, cameras, track_owners=False) as watcher:
                publisher = LivePublisher(client, keys, cameras).start()
                publisher.run_until(4.0)
                publisher.stop()
                wait_drained(client, keys, publisher.last_slots(), timeout=30)
                time.sleep(0.2)
            assert watcher.workers_seen() == {"solo": watcher.count()}
            published = worker.metric("movinet_predictions_published_total")
            assert published is not None and published >= 36
            assert worker.metric("movinet_frames_received_total") == publisher.count()
            worker.sigstop()
            with pytest.raises(OSError):
                worker.scrape(timeout=0.5)  # stopped: no answer
            worker.sigcont()
            assert worker.metric("movinet_worker_ready") == 1
            worker.sigterm()
            assert worker.wait(20) == 0
        ref = reference_predictions(
            client, keys, cameras, redis_url=server.url, model=models.tflite, labels=labels, log_dir=tmp_path
        )
        assert {c: len(v) for c, v in ref.items()} == {
            c: publisher.last_slots()[c] - publisher.first_slots()[c] + 1 for c in cameras
        }
        result = check_run(client, keys, ref, window=10)
        print(f"worker ready in {ready_after:.1f}s; {result}")
        assert result.ok and result.checked == sum(len(v) for v in ref.values()), str(result)

        tampered = copy.deepcopy(ref)
        slot = sorted(tampered["a"])[-3]
        label, score = tampered["a"][slot][0]
        tampered["a"][slot][0] = (label, score + 2e-4)
        tampered["b"][max(tampered["b"]) + 1] = tampered["b"][max(tampered["b"])]
        _, fields = client.xrevrange(keys.predictions("a"), count=1)[0]
        last = Prediction.from_fields(fields)
        client.xadd(keys.predictions("a"), fields, id=f"{last.start_ms}-1")
        bad = check_run(client, keys, tampered, window=10)
        assert (bad.lost, bad.duplicated, bad.mismatched) == (1, 1, 1), str(bad)
        assert not bad.ok


def test_keyspace_env_gives_the_worker_the_same_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.config import Settings

    keys = KeySpace.new()
    for cluster in (False, True):
        for name, value in keys.env(cluster).items():
            monkeypatch.setenv(name, value)
        settings = Settings.model_validate({"redis_cluster": cluster})
        assert settings.frames_stream("cam-1") == keys.frames("cam-1") == f"{keys.prefix}:frames:{{cam-1}}"
        assert settings.predictions_stream("cam-1") == keys.predictions("cam-1")
        assert settings.owner("cam-1") == keys.owner("cam-1")
        assert (settings.workers_key, settings.control_stream, settings.deadletter_stream) == (
            keys.workers,
            keys.control,
            keys.deadletter,
        )
        assert settings.camera_from_frames_key(keys.frames("cam-1")) == "cam-1"
