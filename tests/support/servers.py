"""Private Redis servers: one redis-server, or a three-node Redis Cluster, on loopback."""

from __future__ import annotations

import contextlib
import random
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

from tests.support.base import (
    LOOPBACK,
    _binary,
    _ping,
    _port_free,
    _stop_process,
    _tail,
    _text,
    wait_for,
)
from worker.testing import free_port


class RedisServer:
    """A private `redis-server` on a free loopback port, nothing kept on disk; stopped on exit."""

    def __init__(self, *extra_args: str, start_timeout: float = 10.0) -> None:
        self.extra_args = extra_args
        self.start_timeout = start_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._clients: list[redis.Redis] = []

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> RedisServer:
        binary = _binary("redis-server")
        for _ in range(3):  # a free port can be taken between finding it and binding it
            self._dir = tempfile.TemporaryDirectory(prefix="redis-test-")
            self.port = free_port()
            args = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
            args += ["--dir", self._dir.name, "--logfile", str(Path(self._dir.name) / "redis.log")]
            self._proc = subprocess.Popen([*args, *self.extra_args], stdout=subprocess.DEVNULL)
            deadline = time.monotonic() + self.start_timeout
            while self._proc.poll() is None and time.monotonic() < deadline:
                if _ping(LOOPBACK, self.port):
                    return self
                time.sleep(0.05)
            self.stop()
        raise RuntimeError("redis-server did not start on a free loopback port")

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client closed when the server stops."""
        options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5, **kwargs}
        client = redis.Redis(host=LOOPBACK, port=self.port, **options)
        self._clients.append(client)
        return client

    def cut_connections(self) -> int:
        """`CLIENT KILL TYPE normal` from a separate admin client: every other connection is cut."""
        admin = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5)
        try:
            return int(admin.client_kill_filter(_type="normal", skipme=True))
        finally:
            admin.close()

    def log_tail(self, lines: int = 30) -> str:
        return _tail(Path(self._dir.name) / "redis.log", lines) if self._dir else ""

    def stop(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        _stop_process(self._proc)
        self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        if port not in taken and port + 10000 not in taken and _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster3:
    """Three `redis-server --cluster-enabled yes` masters on loopback, no replicas; stopped on exit."""

    def __init__(self, start_timeout: float = 30.0, node_timeout_ms: int = 5000) -> None:
        self.start_timeout = start_timeout
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._dirs: list[tempfile.TemporaryDirectory[str]] = []
        self._clients: list[RedisCluster] = []

    @property
    def url(self) -> str:
        """Any node: a cluster client discovers the others."""
        return f"redis://{LOOPBACK}:{self.ports[0]}/0"

    @property
    def urls(self) -> list[str]:
        return [f"redis://{LOOPBACK}:{p}/0" for p in self.ports]

    def start(self) -> RedisCluster3:
        binary = _binary("redis-server")
        deadline = time.monotonic() + self.start_timeout
        try:
            for _ in range(3):
                port = _free_cluster_port(set(self.ports))
                folder = tempfile.TemporaryDirectory(prefix="redis-cluster-")
                self._dirs.append(folder)
                args = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
                args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
                args += ["--cluster-node-timeout", str(self.node_timeout_ms), "--dir", folder.name]
                args += ["--logfile", str(Path(folder.name) / "redis.log")]
                self._procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
                self.ports.append(port)
            for port, proc in zip(self.ports, self._procs, strict=True):
                while not _ping(LOOPBACK, port):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"cluster node on port {port} did not start:\n{self.log_tail()}")
                    time.sleep(0.05)
            nodes = [f"{LOOPBACK}:{p}" for p in self.ports]
            create = [_binary("redis-cli"), "--cluster", "create", *nodes]
            create += ["--cluster-replicas", "0", "--cluster-yes"]
            made = subprocess.run(
                create,
                check=False,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
            )
            if made.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{made.stdout}\n{made.stderr}")
            wait_for(self.healthy, max(1.0, deadline - time.monotonic()), "cluster_state:ok on every node")
        except BaseException:
            self.stop()
            raise
        return self

    def info(self, port: int) -> dict[str, str]:
        """`CLUSTER INFO` of one node as a dict."""
        client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=2)
        try:
            raw = client.execute_command("CLUSTER INFO")
        finally:
            client.close()
        if isinstance(raw, dict):  # redis-py parses it
            return {_text(k): _text(v) if isinstance(v, bytes) else str(v) for k, v in raw.items()}
        return dict(line.split(":", 1) for line in _text(raw).split() if ":" in line)

    def healthy(self) -> bool:
        try:
            infos = [self.info(port) for port in self.ports]
        except redis.RedisError:
            return False
        return all(
            i.get("cluster_state") == "ok"
            and i.get("cluster_slots_ok") == "16384"
            and i.get("cluster_known_nodes") == str(len(self.ports))
            for i in infos
        )

    def client(self, **kwargs: Any) -> RedisCluster:
        """A `redis.cluster.RedisCluster` client, closed when the cluster stops."""
        options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5, **kwargs}
        client = RedisCluster(host=LOOPBACK, port=self.ports[0], **options)
        self._clients.append(client)
        return client

    def keyslot(self, key: str) -> int:
        client = redis.Redis(host=LOOPBACK, port=self.ports[0], socket_timeout=2)
        try:
            return int(client.execute_command("CLUSTER KEYSLOT", key))
        finally:
            client.close()

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(
            f"-- node {port}:\n{_tail(Path(d.name) / 'redis.log', lines)}"
            for port, d in zip(self.ports, self._dirs, strict=False)
        )

    def stop(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        for proc in self._procs:
            _stop_process(proc)
        self._procs.clear()
        for folder in self._dirs:
            folder.cleanup()
        self._dirs.clear()

    def __enter__(self) -> RedisCluster3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
