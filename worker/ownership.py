"""Which worker serves which camera: leases, a registry of live workers, and the balancing rule.

- **Registry**: a sorted set of worker IDs scored by heartbeat expiry; a worker that stops renewing
  drops out after one lease.
- **Leases**: `owner:{camera}` holds `<worker>:<token>` with a TTL (SET NX PX). The token is new for
  every acquisition, and every publish runs in a Lua script that first checks the key still holds it
  (fencing): a worker that lost a lease, even one paused for a minute, can no longer publish or move
  the camera's committed position. The camera's keys share a Redis Cluster hash tag, so the script
  runs on one shard.
- **Balance**: every worker computes the same assignment from the same inputs: cameras in name order,
  each to the live worker with the highest rendezvous score that still has room under
  `ceil(cameras / workers)`. Few cameras move when a worker joins or leaves, and none owns more than
  one above the fair share.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Sequence
from typing import Any

from worker.config import Settings

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], '')
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# Publish a camera's predictions and alert events and commit its read position, only while holding its
# lease. KEYS: owner, predictions, frames, alert state, alerts. ARGV: token, group, maxlen, commit id
# ('' for none), input trim MINID ('' for none), alert state ('' to keep), alerts maxlen, n, then n
# times (id, field count, fields...), then m, then m times (field count, fields...). Returns -1 when
# fenced, else one 1/0 per prediction (0: the slot's ID was taken, i.e. published before).
PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local n = tonumber(ARGV[8])
local i = 9
local results = {}
for p = 1, n do
  local id = ARGV[i]
  local nf = tonumber(ARGV[i + 1])
  local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], id}
  for j = 1, nf * 2 do args[#args + 1] = ARGV[i + 1 + j] end
  local ok = redis.pcall(unpack(args))
  if type(ok) == 'table' and ok.err then results[p] = 0 else results[p] = 1 end
  i = i + 2 + nf * 2
end
local m = tonumber(ARGV[i])
i = i + 1
for e = 1, m do
  local nf = tonumber(ARGV[i])
  local args = {'XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*'}
  for j = 1, nf * 2 do args[#args + 1] = ARGV[i + j] end
  redis.call(unpack(args))
  i = i + 1 + nf * 2
end
if ARGV[6] ~= '' then redis.call('SET', KEYS[4], ARGV[6]) end
if ARGV[4] ~= '' then
  redis.call('XGROUP', 'SETID', KEYS[3], ARGV[2], ARGV[4])
end
if ARGV[5] ~= '' then
  redis.call('XTRIM', KEYS[3], 'MINID', '~', ARGV[5])
end
return results
"""


def rendezvous_score(worker: str, camera: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{worker}\x00{camera}".encode(), digest_size=8).digest(), "big")


def assign(cameras: Sequence[str], workers: Sequence[str]) -> dict[str, str]:
    """Bounded-load rendezvous hashing: the same answer on every worker for the same inputs."""
    if not workers:
        return {}
    capacity = math.ceil(len(cameras) / len(workers))
    load = dict.fromkeys(workers, 0)
    out: dict[str, str] = {}
    for camera in sorted(cameras):
        ranked = sorted(workers, key=lambda w: (rendezvous_score(w, camera), w), reverse=True)
        owner = next(w for w in ranked if load[w] < capacity)
        load[owner] += 1
        out[camera] = owner
    return out


class Ownership:
    def __init__(self, redis: Any, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.me = settings.worker_id
        self.lease_ms = int(settings.lease_seconds * 1000)
        self.held: dict[str, str] = {}  # camera -> lease value

    async def heartbeat(self) -> list[str]:
        """Renew this worker's registration; returns the live workers (this one included)."""
        now = int(time.time() * 1000)
        key = self.settings.workers_key
        await self.redis.zadd(key, {self.me: now + self.lease_ms})
        await self.redis.zremrangebyscore(key, "-inf", now)
        live = await self.redis.zrangebyscore(key, now, "+inf")
        return sorted(w.decode() if isinstance(w, bytes) else w for w in live)

    async def deregister(self) -> None:
        await self.redis.zrem(self.settings.workers_key, self.me)

    def _holder(self, camera: str) -> str:
        """Who last took the camera, '' once released: tells a takeover from a handover."""
        return self.settings.owner(camera) + ":holder"

    async def acquire(self, camera: str) -> tuple[bool, str]:
        """Take the lease if free; also returns the previous holder if it never released it."""
        value = f"{self.me}:{secrets.token_hex(8)}"
        if not await self.redis.set(self.settings.owner(camera), value, nx=True, px=self.lease_ms):
            return False, ""
        self.held[camera] = value
        previous = await self.redis.getset(self._holder(camera), self.me)
        text = previous.decode() if isinstance(previous, bytes) else (previous or "")
        return True, "" if text == self.me else text

    async def renew(self) -> list[str]:
        """Extend every held lease; returns the cameras whose lease was lost."""
        lost = []
        for camera, value in list(self.held.items()):
            # EVAL, not EVALSHA: no NOSCRIPT round trips after a restart or failover of a shard.
            ok = await self.redis.eval(RENEW, 1, self.settings.owner(camera), value, self.lease_ms)
            if not ok:
                lost.append(camera)
                del self.held[camera]
        return lost

    async def release(self, camera: str) -> None:
        value = self.held.pop(camera, None)
        if value is not None:
            await self.redis.eval(RELEASE, 2, self.settings.owner(camera), self._holder(camera), value)
