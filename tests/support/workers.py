"""Real worker processes (`movinet-worker run`) and a fleet of them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.base import LOOPBACK, ROOT, KeySpace, _stop_process, _tail
from worker.testing import free_port


def write_labels(path: Path, labels: Sequence[str] | None = None) -> Path:
    """A label file: the given names, or 600 placeholders (the test models have random weights)."""
    names = list(labels) if labels is not None else [f"class {i}" for i in range(600)]
    path.write_text("\n".join(names) + "\n")
    return path


class WorkerProcess:
    """`python -m worker run` as a subprocess with its own metrics port; its log goes to a file."""

    def __init__(
        self,
        worker_id: str,
        redis_url: str,
        keys: KeySpace,
        *,
        model: Path | str,
        labels: Path,
        log_dir: Path,
        window: int | None = 10,
        lease_seconds: float | None = 3.0,
        heartbeat_seconds: float | None = 0.5,
        grace_seconds: float | None = None,
        cluster: bool = False,
        interpreters: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.keys = keys
        self.metrics_port = free_port()
        self.log_path = log_dir / f"worker-{worker_id}.log"
        settings = {
            "REDIS_URL": redis_url,
            "MOVINET_MODEL": str(model),
            "MOVINET_LABELS": str(labels),
            "MOVINET_WORKER_ID": worker_id,
            "MOVINET_METRICS_PORT": str(self.metrics_port),
            "MOVINET_METRICS_HOST": LOOPBACK,
            "MOVINET_BLOCK_MS": "20",
            "MOVINET_DISCOVER_INTERVAL_SECONDS": "0.2",
            # These runs are about exactness through failures, not overload: a loaded test machine must
            # not make a worker shed cameras (target load 1.0 never sheds), skip ahead or trim a backlog
            # that the reference run reads afterwards (tests/test_overload.py covers those).
            "MOVINET_TARGET_LOAD": "1.0",
            "MOVINET_MAX_LAG_SECONDS": "86400",
            "MOVINET_INPUT_RETENTION_SECONDS": "0",
            **keys.env(cluster),
        }
        optional = {
            "MOVINET_WINDOW": window,
            "MOVINET_LEASE_SECONDS": lease_seconds,
            "MOVINET_HEARTBEAT_SECONDS": heartbeat_seconds,
            "MOVINET_GRACE_SECONDS": grace_seconds,
            "MOVINET_INTERPRETERS": interpreters,
        }
        settings.update({k: str(v) for k, v in optional.items() if v is not None})
        if cluster:
            settings["MOVINET_REDIS_CLUSTER"] = "1"
        settings.update(env or {})
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def environment(self) -> dict[str, str]:
        """The parent's environment minus any worker settings of its own, plus this worker's."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("MOVINET_") and k != "REDIS_URL"}
        return {**base, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **self.settings}

    def start(self) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=self.environment(),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def sigkill(self) -> None:
        self._signal(signal.SIGKILL)

    def sigterm(self) -> None:
        self._signal(signal.SIGTERM)

    def sigstop(self) -> None:
        self._signal(signal.SIGSTOP)

    def sigcont(self) -> None:
        self._signal(signal.SIGCONT)

    def wait(self, timeout: float) -> int:
        """The exit code; an AssertionError (with the log's tail) if still running after `timeout`."""
        assert self.proc is not None, "not started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.worker_id} still running after {timeout:.1f}s:\n{self.log_tail()}"
            ) from None

    def scrape(self, timeout: float = 2.0) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as response:
            text: str = response.read().decode()
            return text

    def metrics(self, timeout: float = 2.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample: (name, sorted labels) -> value."""
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(self.scrape(timeout)):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(
        self, name: str, labels: Mapping[str, str] | None = None, timeout: float = 2.0
    ) -> float | None:
        """A sample's value: the sum over the samples named `name` whose labels include `labels`
        (so a labelled metric without `labels` gives its total); None when there is no such sample."""
        wanted = set((labels or {}).items())
        values = [v for (n, ls), v in self.metrics(timeout).items() if n == name and wanted <= set(ls)]
        return sum(values) if values else None

    def ready(self, timeout: float = 60.0) -> WorkerProcess:
        """Wait until `/metrics` says `movinet_worker_ready 1`; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise AssertionError(
                    f"worker {self.worker_id} exited ({self.returncode}) before it was ready:\n"
                    f"{self.log_tail()}"
                )
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                if self.metric("movinet_worker_ready", timeout=1.0) == 1.0:
                    return self
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"worker {self.worker_id} not ready after {timeout:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def close(self) -> None:
        _stop_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> WorkerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Fleet:
    """The worker processes of one test, started alike; all stopped on exit, their logs' tails
    printed when the block fails (pytest shows them with the failure)."""

    def __init__(
        self, redis_url: str, keys: KeySpace, model: Path | str, labels: Path, log_dir: Path, **common: Any
    ) -> None:
        self.redis_url, self.keys, self.model, self.labels = redis_url, keys, model, labels
        self.log_dir = log_dir
        self.common = common
        self.workers: dict[str, WorkerProcess] = {}

    def start(
        self, worker_id: str, ready: bool = True, timeout: float = 60.0, **overrides: Any
    ) -> WorkerProcess:
        options = {**self.common, **overrides}
        worker = WorkerProcess(
            worker_id,
            self.redis_url,
            self.keys,
            model=self.model,
            labels=self.labels,
            log_dir=self.log_dir,
            **options,
        )
        self.workers[worker_id] = worker.start()
        return worker.ready(timeout) if ready else worker

    def start_all(self, worker_ids: Iterable[str], timeout: float = 60.0) -> list[WorkerProcess]:
        """Start together, then wait for each to be ready (the model loads in parallel)."""
        started = [self.start(w, ready=False) for w in worker_ids]
        return [w.ready(timeout) for w in started]

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if w.alive]

    def stop_all(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every live worker (resumed first if stopped) and wait; returns the exit codes."""
        for worker in self.alive():
            worker.sigcont()
            worker.sigterm()
        deadline = time.monotonic() + timeout
        for worker in self.workers.values():
            if worker.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.proc.wait(max(0.1, deadline - time.monotonic()))
        codes = {w.worker_id: w.returncode for w in self.workers.values()}
        self.close()
        return codes

    def tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"---- {w.worker_id} ({w.log_path}):\n{w.log_tail(lines)}" for w in self.workers.values()
        )

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            print(f"\nworker logs (test failed: {exc_type.__name__}):\n{self.tails()}")
        self.close()
