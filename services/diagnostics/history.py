"""Per-run history of computed batches, kept in Redis.

Invariants:
- one record per (run, step); recording the same step again replaces it (a learner that
  retries after a restart does not duplicate history);
- a run keeps at most `limit` records: recording and trimming the oldest happen in one
  server-side script, and every trimmed record is counted (`trimmed`), never dropped silently;
- the EMA state of a step is read from the record of the closest earlier step, so a retried
  step smooths against the same predecessor.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

_RECORD_AND_TRIM = """
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if excess > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, excess - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, excess - 1)
  redis.call('HDEL', KEYS[3], unpack(old))
  redis.call('INCRBY', KEYS[4], excess)
  return excess
end
return 0
"""


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    n_batches: int
    first_step: int | None
    latest_step: int | None
    updated_unix: float
    trimmed: int


class History:
    """Redis-backed store of batch records (JSON dicts with at least `step` and `alpha_ema`)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "aisrl", limit: int = 10_000) -> None:
        self.client = client
        self.prefix = prefix
        self.limit = limit
        self._script = client.register_script(_RECORD_AND_TRIM)

    def _keys(self, run_id: str) -> tuple[str, str, str, str]:
        base = f"{self.prefix}:diag:run:{run_id}"
        return f"{self.prefix}:diag:runs", f"{base}:steps", f"{base}:records", f"{base}:trimmed"

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def record(self, run_id: str, record: dict[str, Any]) -> int:
        """Stores a record under its step; returns how many old records were trimmed."""
        keys = self._keys(run_id)
        step = int(record["step"])
        trimmed = await self._script(keys=list(keys), args=[run_id, step, json.dumps(record), time.time(), self.limit])
        return int(trimmed)

    async def prev_ema(self, run_id: str, step: int) -> float | None:
        """alpha_ema of the latest record with a step below `step` (None: no earlier record)."""
        _, steps, records, _ = self._keys(run_id)
        found = await self.client.zrevrangebyscore(steps, f"({step}", "-inf", start=0, num=1)
        if not found:
            return None
        raw = await self.client.hget(records, found[0])
        return None if raw is None else float(json.loads(raw)["alpha_ema"])

    async def exists(self, run_id: str) -> bool:
        return await self.client.zscore(self._keys(run_id)[0], run_id) is not None

    async def latest(self, run_id: str) -> dict[str, Any] | None:
        _, steps, records, _ = self._keys(run_id)
        found = await self.client.zrevrange(steps, 0, 0)
        if not found:
            return None
        raw = await self.client.hget(records, found[0])
        return None if raw is None else json.loads(raw)

    async def get(self, run_id: str, step: int) -> dict[str, Any] | None:
        raw = await self.client.hget(self._keys(run_id)[2], str(step))
        return None if raw is None else json.loads(raw)

    async def page(self, run_id: str, since_step: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Records with step >= since_step, oldest first, at most `limit`."""
        _, steps, records, _ = self._keys(run_id)
        found = await self.client.zrangebyscore(steps, since_step, "+inf", start=0, num=limit)
        if not found:
            return []
        raws = await self.client.hmget(records, found)
        return [json.loads(r) for r in raws if r is not None]

    async def tail(self, run_id: str, count: int) -> list[dict[str, Any]]:
        """The last `count` records of a run, oldest first."""
        _, steps, records, _ = self._keys(run_id)
        found = await self.client.zrevrange(steps, 0, count - 1)
        if not found:
            return []
        raws = await self.client.hmget(records, list(reversed(found)))
        return [json.loads(r) for r in raws if r is not None]

    async def summary(self, run_id: str) -> RunSummary | None:
        """One run's summary; None for an unknown run."""
        runs_key, steps, _, trimmed_key = self._keys(run_id)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zscore(runs_key, run_id)
            pipe.zcard(steps)
            pipe.zrange(steps, 0, 0)
            pipe.zrevrange(steps, 0, 0)
            pipe.get(trimmed_key)
            updated, count, first, last, trimmed = await pipe.execute()
        if updated is None:
            return None
        return RunSummary(
            run_id=run_id,
            n_batches=int(count),
            first_step=int(first[0]) if first else None,
            latest_step=int(last[0]) if last else None,
            updated_unix=float(updated),
            trimmed=int(trimmed or 0),
        )

    async def runs(self) -> list[RunSummary]:
        """Every run, most recently updated first."""
        entries = await self.client.zrevrange(self._keys("")[0], 0, -1)
        names = [raw.decode() if isinstance(raw, bytes) else raw for raw in entries]
        summaries = [await self.summary(name) for name in names]
        return [s for s in summaries if s is not None]
