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
- **Capacity**: each worker also publishes how many cameras it can serve (configured, or measured
  from its own load, see `worker.pipeline.capacity`) in a hash beside the registry. No worker is given more
  than that: cameras over the fair share go to workers with room, and cameras nobody has room for
  stay unowned (a metric, for the autoscaler) until a worker has room.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from worker.config import Settings
from worker.pipeline.supervisor import script

# The holder key outlives its lease by this factor, so that the next owner can tell a takeover from a
# hand-over, and then expires: churn leaves no key behind.
HOLDER_LEASES = 10
# KEYS: owner, holder. ARGV: lease value, lease ms, holder ms.
RENEW = script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
""")
# KEYS: owner, holder. ARGV: lease value, holder ms.
RELEASE = script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], '', 'PX', ARGV[2])
  return redis.call('DEL', KEYS[1])
end
return 0
""")
# Publish a camera's predictions and alert events and commit its read position, only while holding its
# lease. KEYS: owner, predictions, frames, alert state, alerts, checkpoint, evidence index. ARGV: token,
# group, maxlen, commit id ('' for none), input trim MINID ('' for none), alert state ('' to keep),
# alerts maxlen, n, then n times (id, field count, fields...), then m, then m times (field count,
# fields...), then the model state checkpoint ('' for none) and its ms to live (see
# `worker.pipeline.checkpoint`), then the evidence section (below). Returns -1 when fenced, else one 1/0 per
# prediction (0: the slot's ID was taken, i.e. published before), then the camera's evidence bytes
# and the evidence entries a cap left out.
PUBLISH = script("""
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
if ARGV[i] ~= '' then redis.call('SET', KEYS[6], ARGV[i], 'PX', ARGV[i + 1]) end
if ARGV[6] ~= '' then redis.call('SET', KEYS[4], ARGV[6]) end
if ARGV[4] ~= '' then
  redis.call('XGROUP', 'SETID', KEYS[3], ARGV[2], ARGV[4])
end
i = i + 2
-- Evidence of the camera's open alerts (see `worker.pipeline.evidence`): copied from the input and
-- output streams before the input is trimmed. ARGV: ms to keep, bytes per alert, bytes per camera,
-- q, then q times
-- (key, from ms ('' to continue only), to ms, until ms, closing '1'/'0', info JSON, latest event JSON).
local keep_ms, max_alert, max_camera = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
local q = tonumber(ARGV[i + 3])
i = i + 4
local total, dropped = 0, 0
if q > 0 then
  local index = redis.pcall('HGETALL', KEYS[7])
  if index.err then index = {} end  -- a key of another type there: no evidence, the publish goes on
  for j = 1, #index, 2 do
    if redis.call('EXISTS', index[j]) == 1 then total = total + (tonumber(index[j + 1]) or 0)
    else redis.call('HDEL', KEYS[7], index[j]) end
  end
end
local function evict(current, need)
  -- The oldest closed alerts' evidence goes first, until `need` more bytes fit under the camera's cap.
  local index = redis.pcall('HGETALL', KEYS[7])
  if index.err then index = {} end
  local old = {}
  for j = 1, #index, 2 do
    if index[j] ~= current and redis.pcall('HGET', index[j], 'closed') == '1' then
      local at = tonumber(string.match(index[j], ':(%d+)$') or 0)
      old[#old + 1] = {index[j], tonumber(index[j + 1]) or 0, at}
    end
  end
  table.sort(old, function(a, b) return a[3] < b[3] end)
  for _, o in ipairs(old) do
    if total + need <= max_camera then break end
    redis.call('DEL', o[1], o[1] .. ':frames', o[1] .. ':predictions')
    redis.call('HDEL', KEYS[7], o[1])
    total = total - o[2]
  end
  return total + need <= max_camera
end
for e = 1, q do
  local key = ARGV[i]
  local meta = redis.pcall('HMGET', key, 'bytes', 'from_ms', 'until_ms', 'capped')
  local index_ok = redis.call('TYPE', KEYS[7]).ok
  if meta.err or (index_ok ~= 'hash' and index_ok ~= 'none') then
    meta = {false}  -- keys of another type in the way: this alert keeps no evidence
  elseif not meta[1] and ARGV[i + 1] ~= '' then
    redis.call('HSET', key, 'info', ARGV[i + 5], 'from_ms', ARGV[i + 1], 'until_ms', ARGV[i + 3],
      'bytes', 0, 'frames', 0, 'predictions', 0, 'capped', '', 'closed', '0')
    meta = {'0', ARGV[i + 1], ARGV[i + 3], ''}
  end
  if meta[1] then
    local bytes, capped = tonumber(meta[1]), meta[4]
    local stop = math.min(tonumber(ARGV[i + 2]), tonumber(meta[3]))
    for _, part in ipairs({{KEYS[3], 'frames'}, {KEYS[2], 'predictions'}}) do
      local last = redis.call('HGET', key, part[2] .. '_last')
      local lo = last and ('(' .. last) or meta[2]
      if capped == '' and stop > tonumber(meta[2]) then
        local entries = redis.call('XRANGE', part[1], lo, string.format('%.0f', stop - 1))
        local added = 0
        for k, entry in ipairs(entries) do
          local size = #entry[1]
          for f = 1, #entry[2] do size = size + #entry[2][f] end
          if bytes + size > max_alert then capped = 'alert'
          elseif total + size > max_camera and not evict(key, size) then capped = 'camera' end
          if capped ~= '' then
            dropped = dropped + #entries - k + 1
            break
          end
          local args = {'XADD', key .. ':' .. part[2], entry[1]}
          for f = 1, #entry[2] do args[#args + 1] = entry[2][f] end
          local ok = redis.pcall(unpack(args))
          if not (type(ok) == 'table' and ok.err) then
            bytes, total, added = bytes + size, total + size, added + 1
          end
          last = entry[1]
        end
        if last then redis.call('HSET', key, part[2] .. '_last', last) end
        redis.call('HINCRBY', key, part[2], added)
      end
    end
    if capped == '' and tonumber(ARGV[i + 2]) > tonumber(meta[3]) then capped = 'duration' end
    redis.call('HSET', key, 'bytes', bytes, 'capped', capped)
    if ARGV[i + 6] ~= '' then redis.call('HSET', key, 'event', ARGV[i + 6]) end
    if ARGV[i + 4] == '1' then redis.call('HSET', key, 'closed', '1') end
    redis.call('HSET', KEYS[7], key, bytes)
    for _, k in ipairs({key, key .. ':frames', key .. ':predictions', KEYS[7]}) do
      redis.call('PEXPIRE', k, keep_ms)
    end
  end
  i = i + 7
end
results[#results + 1] = total
results[#results + 1] = dropped
if ARGV[5] ~= '' then
  redis.call('XTRIM', KEYS[3], 'MINID', '~', ARGV[5])
end
return results
""")


def rendezvous_score(worker: str, camera: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{worker}\x00{camera}".encode(), digest_size=8).digest(), "big")


def assign(
    cameras: Sequence[str], workers: Sequence[str], capacity: Mapping[str, int | None] | None = None
) -> dict[str, str]:
    """Bounded-load rendezvous hashing: the same answer on every worker for the same inputs.

    `capacity`: the most cameras each worker takes (None or absent: no limit). Cameras no worker
    has room for are left out of the answer."""
    if not workers:
        return {}
    fair = math.ceil(len(cameras) / len(workers))
    limit = {w: (capacity or {}).get(w) for w in workers}
    load = dict.fromkeys(workers, 0)
    out: dict[str, str] = {}
    spill = []
    for camera in sorted(cameras):
        ranked = sorted(workers, key=lambda w: (rendezvous_score(w, camera), w), reverse=True)
        owner = next((w for w in ranked if load[w] < min(fair, _room(limit[w]))), None)
        if owner is None:
            spill.append((camera, ranked))
            continue
        load[owner] += 1
        out[camera] = owner
    for camera, ranked in spill:  # over the fair share, to whoever still has room
        owner = next((w for w in ranked if load[w] < _room(limit[w])), None)
        if owner is not None:
            load[owner] += 1
            out[camera] = owner
    return out


def _room(limit: int | None) -> float:
    return math.inf if limit is None else limit


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit() and len(text) < 10


class Ownership:
    """The leases this worker holds. Taken and released on the event loop; renewed by the lease keeper's
    thread (`worker.pipeline.leases`), hence the lock around `held`."""

    def __init__(self, redis: Any, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.me = settings.worker_id
        self.lease_ms = int(settings.lease_seconds * 1000)
        self.holder_ms = self.lease_ms * HOLDER_LEASES
        self.held: dict[str, str] = {}  # camera -> lease value; change it only under `lock`
        self.lock = threading.Lock()
        self.live: list[str] = [self.me]  # live workers, as the last heartbeat saw them
        self.capacity: int | None = None  # the most cameras this worker takes (None: no limit)
        self.capacities: dict[str, int | None] = {}  # every live worker's, as the last heartbeat saw them

    def token(self, camera: str) -> str | None:
        with self.lock:
            return self.held.get(camera)

    def holding(self) -> list[str]:
        with self.lock:
            return list(self.held)

    def forget(self, camera: str) -> bool:
        """Drop a lease found lost; False if it was not held (already dropped)."""
        with self.lock:
            return self.held.pop(camera, None) is not None

    def heartbeat_sync(self, client: Any) -> list[str]:
        """Renew this worker's registration; returns the live workers (this one included)."""
        now = int(time.time() * 1000)
        key = self.settings.workers_key
        client.zadd(key, {self.me: now + self.lease_ms})
        client.zremrangebyscore(key, "-inf", now)
        live = sorted(
            w.decode() if isinstance(w, bytes) else w for w in client.zrangebyscore(key, now, "+inf")
        )
        self.live = live if self.me in live else sorted({*live, self.me})
        # Capacities: -1 is "no limit". Fields of workers gone from the registry are removed.
        room = self.settings.capacity_key
        client.hset(room, self.me, -1 if self.capacity is None else self.capacity)
        stored = {_text(k): _text(v) for k, v in client.hgetall(room).items()}
        gone = [w for w in stored if w not in self.live]
        if gone:
            client.hdel(room, *gone)
        self.capacities = {
            w: (None if int(v) < 0 else int(v)) for w, v in stored.items() if w in self.live and _is_int(v)
        }
        self.capacities[self.me] = self.capacity
        return self.live

    async def live_now(self) -> list[str]:
        """The live workers as the registry says now (the keeper's view can be a heartbeat old)."""
        now = int(time.time() * 1000)
        found = await self.redis.zrangebyscore(self.settings.workers_key, now, "+inf")
        live = sorted({*(_text(w) for w in found), self.me})
        self.live = live
        return live

    async def deregister(self) -> None:
        await self.redis.zrem(self.settings.workers_key, self.me)
        await self.redis.hdel(self.settings.capacity_key, self.me)

    def _holder(self, camera: str) -> str:
        """Who last took the camera, '' once released: tells a takeover from a handover."""
        return self.settings.owner(camera) + ":holder"

    async def acquire(self, camera: str) -> tuple[bool, str]:
        """Take the lease if free; also returns the previous holder if it never released it."""
        value = f"{self.me}:{secrets.token_hex(8)}"
        if not await self.redis.set(self.settings.owner(camera), value, nx=True, px=self.lease_ms):
            return False, ""
        with self.lock:
            self.held[camera] = value
        previous = await self.redis.set(self._holder(camera), self.me, px=self.holder_ms, get=True)
        text = previous.decode() if isinstance(previous, bytes) else (previous or "")
        return True, "" if text == self.me else text

    def renew_sync(self, client: Any) -> list[str]:
        """Extend every held lease (from the keeper's thread); returns the cameras whose lease was lost."""
        with self.lock:
            held = list(self.held.items())
        lost = []
        for camera, value in held:
            # EVAL, not EVALSHA: no NOSCRIPT round trips after a restart or failover of a shard.
            owner = self.settings.owner(camera)
            ok = client.eval(RENEW, 2, owner, self._holder(camera), value, self.lease_ms, self.holder_ms)
            if not ok:
                with self.lock:
                    if self.held.get(camera) == value:
                        del self.held[camera]
                        lost.append(camera)
        return lost

    async def release(self, camera: str) -> None:
        with self.lock:
            value = self.held.pop(camera, None)
        if value is not None:
            await self.redis.eval(
                RELEASE, 2, self.settings.owner(camera), self._holder(camera), value, self.holder_ms
            )
