"""Issue 4, scale-out: worker processes share cameras through leases, and faults change nothing.

Each test runs real `movinet-worker run` processes (the exported float TFLite model, windows of
W=10 slots, short leases) against a private Redis, with cameras publishing at 5 fps in real time.
After each fault, every camera's prediction stream must have no duplicate slot, no missing slot
after its first full window, and predictions equal to one uninterrupted worker's over the same
frames (scores within 1e-4). Every wait is bounded; the run's numbers are printed (`-s`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.cluster import (
    Fleet,
    KeySpace,
    LivePublisher,
    PredictionWatcher,
    RedisClient,
    RedisCluster3,
    RedisServer,
    RunCheck,
    WorkerProcess,
    check_run,
    owned_by,
    owners,
    reference_predictions,
    registered_workers,
    wait_balanced,
    wait_drained,
    wait_for,
    write_labels,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
        reason="redis-server / redis-cli not installed",
    ),
]

WINDOW = 10
LEASE = 3.0
HEARTBEAT = 0.5
# A dead worker's cameras: its lease lapses within LEASE of the kill, a survivor notices within a
# heartbeat or two and replays at most W slots; the rest is slack for a busy, shared 2-core machine
# (measured here: 3.6-5.8 s).
TAKEOVER_BOUND = LEASE + 4 * HEARTBEAT + 2.0


def cameras(n: int) -> list[str]:
    return [f"cam{i:02d}" for i in range(n)]


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory: pytest.TempPathFactory, labels600: list[str]) -> Path:
    return write_labels(tmp_path_factory.mktemp("labels") / "labels.txt", labels600)


class Scenario:
    """One run: worker processes, a live publisher and a prediction watcher on a private key space.

    On exit everything is stopped and the keys deleted; when the block failed, the workers' log
    tails are printed.
    """

    def __init__(
        self,
        client: RedisClient,
        redis_url: str,
        cams: list[str],
        *,
        models: Any,
        labels: Path,
        log_dir: Path,
        **worker_options: Any,
    ) -> None:
        self.client, self.cameras = client, cams
        self.models, self.labels, self.log_dir = models, labels, log_dir
        self.keys = KeySpace.new()
        options = {"window": WINDOW, "lease_seconds": LEASE, "heartbeat_seconds": HEARTBEAT, **worker_options}
        self.fleet = Fleet(redis_url, self.keys, models.tflite, labels, log_dir, **options)
        self.publisher = LivePublisher(client, self.keys, cams)
        self.watcher = PredictionWatcher(client, self.keys, cams)

    def __enter__(self) -> Scenario:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.publisher.__exit__()
        self.watcher.__exit__()
        self.fleet.__exit__(exc_type, exc, tb)
        self.keys.cleanup(self.client)

    def worker(self, worker_id: str) -> WorkerProcess:
        return self.fleet.workers[worker_id]

    def feed(self) -> None:
        self.watcher.start()
        self.publisher.start()

    def start(self, workers: list[str], *, run_for: float = 0.0, timeout: float = 20.0) -> None:
        """Start the workers, the publisher and the watcher; wait for a balanced split, then `run_for` s."""
        self.fleet.start_all(workers)
        self.feed()
        self.balanced(workers, timeout)
        if run_for:
            self.publisher.run_until(run_for)

    def balanced(self, workers: list[str], timeout: float = 20.0) -> dict[str, list[str]]:
        return wait_balanced(self.client, self.keys, self.cameras, workers, timeout)

    def owned(self) -> dict[str, list[str]]:
        return owned_by(self.client, self.keys, self.cameras)

    def finish(self, timeout: float = 30.0) -> None:
        """Stop publishing, wait until every camera's last frame is predicted, stop watching."""
        self.publisher.stop()
        wait_drained(self.client, self.keys, self.publisher.last_slots(), timeout)
        time.sleep(0.2)
        self.watcher.stop()

    def first_full_windows(self) -> dict[str, int]:
        return {c: s + WINDOW for c, s in self.publisher.first_slots().items()}

    def metric_sum(self, name: str, workers: list[str]) -> float:
        return sum(self.worker(w).metric(name) or 0.0 for w in workers)

    def verify(self, reference_url: str) -> RunCheck:
        """Stop the workers; compare every prediction with one uninterrupted worker's."""
        self.fleet.stop_all()
        started = time.monotonic()
        reference = reference_predictions(
            self.client,
            self.keys,
            self.cameras,
            redis_url=reference_url,
            model=self.models.tflite,
            labels=self.labels,
            log_dir=self.log_dir,
            window=WINDOW,
        )
        result = check_run(self.client, self.keys, reference, WINDOW)
        print(
            f"\n{result}\n  published {self.publisher.count()} frames ({self.publisher.errors} errors "
            f"retried, {self.publisher.skipped} skipped); {self.watcher.count()} predictions seen by "
            f"{dict(self.watcher.workers_seen())}; reference run {time.monotonic() - started:.1f}s"
        )
        return result


def test_sigkill_one_of_three_workers_loses_duplicates_and_changes_nothing(
    models: Any, labels_file: Path, tmp_path: Path
) -> None:
    cams = cameras(12)
    ids = ["w1", "w2", "w3"]
    with (
        RedisServer() as server,
        Scenario(
            server.client(), server.url, cams, models=models, labels=labels_file, log_dir=tmp_path
        ) as run,
    ):
        run.start(ids, run_for=8)
        held = run.owned()
        victim = max(ids, key=lambda w: len(held.get(w, [])))
        lost_cameras = held[victim]
        killed_at = time.time()
        run.worker(victim).sigkill()
        run.worker(victim).wait(5)
        survivors = [w for w in ids if w != victim]
        run.balanced(survivors, timeout=LEASE + 12)
        settled_after = time.time() - killed_at
        run.publisher.run_until(run.publisher.elapsed() + 8)
        run.finish()
        gap = run.watcher.max_gap(since=killed_at)
        taken = run.metric_sum("movinet_leases_taken_over_total", survivors)
        replayed = run.metric_sum("movinet_takeover_replay_frames_total", survivors)
        replays = run.metric_sum("movinet_takeover_replay_seconds_count", survivors)
        owned = run.metric_sum("movinet_cameras_owned", survivors)
        violations = run.watcher.fencing_violations()
        caught_up = run.watcher.caught_up(lost_cameras, since=killed_at)
        result = run.verify(server.url)
        assert gap is not None
        print(
            f"killed {victim} holding {len(lost_cameras)} cameras; takeover {gap} from "
            f"{gap.start - killed_at:+.2f}s after the kill (bound {TAKEOVER_BOUND:.1f}s), balanced again "
            f"after {settled_after:.1f}s; taken over {taken:.0f}, replayed {replayed:.0f} frames in "
            f"{replays:.0f} replays; its cameras live again (delay < 1s) after {caught_up}s"
        )
        assert result.ok, str(result)
        assert not violations, violations[:5]
        assert gap.seconds < TAKEOVER_BOUND
        assert taken >= len(lost_cameras)
        assert replayed > 0 and replays >= 1
        assert owned == len(cams)


def test_sigterm_one_worker_and_start_another_within_the_grace_period(
    models: Any, labels_file: Path, tmp_path: Path
) -> None:
    # The default grace is 20 s. Measured here: delays of 1.6-3.3 s on a quiet machine, up to 9.5 s
    # with 12 cameras while other test suites ran (w4 then took 4.5 s to load its model).
    grace = 10.0
    cams = cameras(8)
    with (
        RedisServer() as server,
        Scenario(
            server.client(),
            server.url,
            cams,
            models=models,
            labels=labels_file,
            log_dir=tmp_path,
            grace_seconds=grace,
        ) as run,
    ):
        run.start(["w1", "w2", "w3"], run_for=8)
        leaving = run.worker("w1")
        termed_at = time.monotonic()
        leaving.sigterm()
        joining = run.fleet.start("w4", ready=False)  # a rolling update: w4 comes up while w1 drains
        code = leaving.wait(grace + 5)
        exited_after = time.monotonic() - termed_at
        assert code == 0, leaving.log_tail()
        assert exited_after < grace
        # It released its leases and left the registry on the way out.
        assert "w1" not in owners(run.client, run.keys, cams).values()
        assert not [m for m in registered_workers(run.client, run.keys) if m.split(":")[0] == "w1"]
        joining.ready(60)
        run.balanced(["w2", "w3", "w4"], timeout=15)
        run.publisher.run_until(run.publisher.elapsed() + 8)
        run.finish()
        delay, worst = run.watcher.max_delay(run.first_full_windows())
        violations = run.watcher.fencing_violations()
        by_new = run.watcher.workers_seen().get("w4", 0)
        result = run.verify(server.url)
        print(
            f"w1 exited {code} {exited_after:.1f}s after SIGTERM; longest delay after a slot's end "
            f"{delay:.2f}s ({worst}); grace {grace:.0f}s; w4 published {by_new}"
        )
        assert result.ok, str(result)
        assert not violations, violations[:5]
        assert delay < grace
        assert by_new > 0


def test_paused_worker_publishes_nothing_for_the_cameras_it_lost(
    models: Any, labels_file: Path, tmp_path: Path
) -> None:
    cams = cameras(8)
    with (
        RedisServer() as server,
        Scenario(
            server.client(), server.url, cams, models=models, labels=labels_file, log_dir=tmp_path
        ) as run,
    ):
        run.start(["w1", "w2"], run_for=6)
        held = run.owned()
        paused_id = max(held, key=lambda w: len(held[w]))
        other = "w2" if paused_id == "w1" else "w1"
        lost_cameras = held[paused_id]
        paused = run.worker(paused_id)
        stopped_at = time.time()
        paused.sigstop()

        def taken_over() -> bool:
            now = owners(run.client, run.keys, lost_cameras)
            return all(w == other for w in now.values())

        wait_for(taken_over, LEASE + 12, f"{other} to take over {lost_cameras}", interval=0.1)
        taken_after = time.time() - stopped_at
        time.sleep(max(0.0, stopped_at + LEASE + 1.0 - time.time()))  # paused well past its lease
        paused.sigcont()
        resumed_at = time.time()
        run.balanced(["w1", "w2"], timeout=15)  # it rejoins and gets its share back
        run.publisher.run_until(run.publisher.elapsed() + 6)
        run.finish()
        leases_lost = paused.metric("movinet_leases_lost_total")
        violations = run.watcher.fencing_violations()
        after = run.watcher.workers_seen(since=stopped_at + LEASE)
        result = run.verify(server.url)
        print(
            f"paused {paused_id} ({len(lost_cameras)} cameras) for {resumed_at - stopped_at:.1f}s; "
            f"{other} held them {taken_after:.1f}s after the pause; leases lost {leases_lost}; "
            f"published after its lease lapsed: {dict(after)}; fencing violations {len(violations)}"
        )
        assert not violations, [(s.camera, s.slot, s.worker) for s in violations[:10]]
        assert leases_lost is not None and leases_lost >= len(lost_cameras)
        assert result.ok, str(result)


def test_redis_connections_cut_workers_reconnect_and_nothing_is_lost(
    models: Any, labels_file: Path, tmp_path: Path
) -> None:
    cams = cameras(8)
    with (
        RedisServer() as server,
        Scenario(
            server.client(), server.url, cams, models=models, labels=labels_file, log_dir=tmp_path
        ) as run,
    ):
        run.start(["w1", "w2"], run_for=6)
        cuts = [server.cut_connections()]
        run.publisher.run_until(10)
        cuts.append(server.cut_connections())
        run.publisher.run_until(13)
        storm_end = time.monotonic() + 1.0  # connections cut again and again for a second
        storm = 0
        while time.monotonic() < storm_end:
            storm += server.cut_connections()
            time.sleep(0.1)
        calm_at = time.time()
        run.publisher.run_until(20)
        assert all(w.alive for w in run.fleet.workers.values())
        run.balanced(["w1", "w2"], timeout=15)
        run.finish()
        since_calm = run.watcher.workers_seen(since=calm_at + 2)
        errors = run.metric_sum("movinet_redis_errors_total", ["w1", "w2"])
        gap = run.watcher.max_gap(since=calm_at - 8)
        violations = run.watcher.fencing_violations()
        result = run.verify(server.url)
        print(
            f"cut {cuts} connections, then {storm} in a 1s storm; worker redis errors {errors:.0f}; "
            f"longest gap {gap}; published after the storm: {dict(since_calm)}"
        )
        assert result.ok, str(result)
        assert not violations, violations[:5]
        assert since_calm.get("w1", 0) > 0 and since_calm.get("w2", 0) > 0


def test_redis_cluster_two_workers_eight_cameras(models: Any, labels_file: Path, tmp_path: Path) -> None:
    cams = cameras(8)
    with RedisCluster3() as cluster, RedisServer() as reference:
        client = cluster.client()
        with Scenario(
            client, cluster.url, cams, models=models, labels=labels_file, log_dir=tmp_path, cluster=True
        ) as run:
            nodes = {client.get_node_from_key(run.keys.frames(c)).port for c in cams}
            assert len(nodes) >= 2  # the cameras' keys really are spread over the masters
            run.start(["w1", "w2"], run_for=20, timeout=20)
            run.finish()
            seen = run.watcher.workers_seen()
            violations = run.watcher.fencing_violations()
            result = run.verify(reference.url)
            print(f"cluster nodes holding cameras: {sorted(nodes)}; published by {dict(seen)}")
            assert result.ok, str(result)
            assert not violations, violations[:5]
            assert seen.get("w1", 0) > 0 and seen.get("w2", 0) > 0


def test_takeover_with_the_default_lease_is_under_15_seconds(
    models: Any, labels_file: Path, tmp_path: Path
) -> None:
    cams = cameras(4)
    with (
        RedisServer() as server,
        Scenario(
            server.client(),
            server.url,
            cams,
            models=models,
            labels=labels_file,
            log_dir=tmp_path,
            lease_seconds=None,  # the defaults: 8 s leases, 2 s heartbeats
            heartbeat_seconds=None,
        ) as run,
    ):
        run.start(["w1", "w2"], run_for=6, timeout=30)
        held = run.owned()
        victim = max(held, key=lambda w: len(held[w]))
        survivor = "w2" if victim == "w1" else "w1"
        killed_at = time.time()
        run.worker(victim).sigkill()
        run.balanced([survivor], timeout=25)
        run.publisher.run_until(run.publisher.elapsed() + 3)
        run.finish()
        gap = run.watcher.max_gap(since=killed_at)
        result = run.verify(server.url)
        assert gap is not None
        print(f"default lease: takeover of {held[victim]} took {gap.seconds:.2f}s")
        assert result.ok, str(result)
        assert gap.seconds < 15
