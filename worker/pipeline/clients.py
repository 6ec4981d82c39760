"""Redis clients as the worker makes them: every one with a socket timeout, keep-alive and retries."""

from __future__ import annotations

from typing import Any

from worker.config import Settings


def client_options(settings: Settings, asyncio: bool = False) -> dict[str, Any]:
    """What every client gets: a call that hangs longer than `redis_timeout_seconds` fails (and is
    retried by the caller) instead of hanging the task; dead TCP peers are noticed by keep-alive.
    `asyncio`: for a redis.asyncio client, which wants its own Retry (it warns about the other)."""
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    timeout = settings.redis_timeout_seconds
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, 5.0),
        "retry": (AsyncRetry if asyncio else Retry)(ExponentialBackoff(cap=2.0), 2),
    }
    if not (settings.redis_url or "").startswith("unix"):
        options["socket_keepalive"] = True
    return options


def connect(settings: Settings) -> Any:
    """An asyncio client: a Redis Cluster client when --redis-cluster, else a plain one."""
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster

    url = settings.redis_url or ""
    options = client_options(settings, asyncio=True)
    if settings.redis_cluster:
        return RedisCluster.from_url(url, **options)
    return aioredis.from_url(url, health_check_interval=10, **options)


def connect_sync(settings: Settings) -> Any:
    """A blocking client for threads (the lease keeper): same options as `connect`."""
    import redis
    from redis.cluster import RedisCluster

    url = settings.redis_url or ""
    options = client_options(settings)
    if settings.redis_cluster:
        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, health_check_interval=10, **options)


def tool_client(url: str, timeout: float = 10.0) -> Any:
    """A blocking client for the command-line tools: a Redis that does not answer fails the command
    within `timeout` seconds (with a message, see `cli.main`) instead of hanging it."""
    import redis

    keepalive = {} if url.startswith("unix") else {"socket_keepalive": True}
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=min(timeout, 5.0), **keepalive
    )
