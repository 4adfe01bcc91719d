"""Limit counters: check and reserve in one atomic step, then adjust.

`reserve` looks at every counter a request touches and either adds to all of them or to none:
a counter with a block limit refuses when it is already at its limit or the amount would take
it past. In memory that is atomic because nothing awaits between the check and the add (one
event loop, no lock needed); on Redis it is one Lua script, so N workers and N replicas share
counters exactly. `add` applies the difference between what was reserved and what was used.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol

from proxy.state.redis import Arg, RedisClient, Script

KEY_PREFIX = "llmrelay:limit:"


class Charge(NamedTuple):
    key: str  # counter key (policy, scope value, window start)
    amount: float
    limit: float | None  # the block threshold; None: counted, never refused
    ttl: int  # seconds from now until the counter may be dropped (its window's end, plus a margin); 0: never


class Decision(NamedTuple):
    admitted: bool
    values: list[float]  # admitted: each counter after the add; refused: each counter as it was
    refused_by: int = -1  # the index of the charge that refused


class Counters(Protocol):
    def submit_reserve(self, charges: list[Charge]) -> asyncio.Future[Any]:
        """Check and reserve (see the module's docstring), sent at once: other commands of this loop
        turn share its write. `decision` reads the future's answer."""
        ...

    def decision(self, answer: Any) -> Decision: ...

    def add(self, charges: list[Charge]) -> Awaitable[None]:
        """Add each amount to its counter, without a check (a reconciliation). The write starts
        at once (on Redis: with the next command someone awaits, or within a few milliseconds);
        awaiting the result says whether it landed."""
        ...

    async def value(self, key: str) -> float: ...

    async def close(self) -> None: ...


async def reserve(counters: Counters, charges: list[Charge]) -> Decision:
    """Check and reserve, and wait for the decision."""
    return counters.decision(await counters.submit_reserve(charges))


def refuses(current: float, amount: float, limit: float | None) -> bool:
    return limit is not None and (current >= limit or current + amount > limit)


class MemoryCounters:
    """One process's counters. Expired counters are swept as new ones are made."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._values: dict[str, list[float]] = {}  # key -> [value, expires at (inf: never)]
        self._next_sweep = 0.0

    def submit_reserve(self, charges: list[Charge]) -> asyncio.Future[Any]:
        """Decided at once: the future is already done."""
        answer = asyncio.get_running_loop().create_future()
        answer.set_result(self.reserve_now(charges))
        return answer

    def decision(self, answer: Any) -> Decision:
        return answer

    def reserve_now(self, charges: list[Charge]) -> Decision:
        now = self.clock()
        current = [self._current(c.key, now) for c in charges]
        for i, (charge, value) in enumerate(zip(charges, current, strict=True)):
            if refuses(value, charge.amount, charge.limit):
                return Decision(False, current, i)
        return Decision(True, [self._add(c, now) for c in charges])

    async def add(self, charges: list[Charge]) -> None:
        self.add_now(charges)

    def add_now(self, charges: list[Charge]) -> None:
        now = self.clock()
        for charge in charges:
            self._add(charge, now)

    async def value(self, key: str) -> float:
        return self._current(key, self.clock())

    async def close(self) -> None:
        pass

    def _current(self, key: str, now: float) -> float:
        entry = self._values.get(key)
        if entry is None or entry[1] <= now:
            return 0.0
        return entry[0]

    def _add(self, charge: Charge, now: float) -> float:
        entry = self._values.get(charge.key)
        expires = now + charge.ttl if charge.ttl else float("inf")
        if entry is None or entry[1] <= now:
            if now >= self._next_sweep:
                self._sweep(now)
            entry = self._values[charge.key] = [0.0, expires]
        entry[0] += charge.amount
        entry[1] = max(entry[1], expires)
        return entry[0]

    def _sweep(self, now: float) -> None:
        for key in [k for k, (_, expires) in self._values.items() if expires <= now]:
            del self._values[key]
        self._next_sweep = now + 60.0

    def __len__(self) -> int:
        return len(self._values)


# KEYS: counter keys. ARGV: per key, (amount, limit or "", ttl seconds or 0). Returns
# {1, value...} when every counter took its amount, {0, index, value...} when one refused.
RESERVE_SCRIPT = """
local values = {}
for i = 1, #KEYS do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  local amount = tonumber(ARGV[i * 3 - 2])
  local limit = tonumber(ARGV[i * 3 - 1])
  if limit and (current >= limit or current + amount > limit) then
    local out = {0, i}
    for j = 1, #KEYS do out[#out + 1] = tostring(tonumber(redis.call('GET', KEYS[j]) or '0')) end
    return out
  end
  values[i] = current
end
local out = {1}
for i = 1, #KEYS do
  out[#out + 1] = redis.call('INCRBYFLOAT', KEYS[i], ARGV[i * 3 - 2])
  local ttl = tonumber(ARGV[i * 3])
  if ttl > 0 and redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ttl) end
end
return out
"""

ADD_SCRIPT = """
for i = 1, #KEYS do
  redis.call('INCRBYFLOAT', KEYS[i], ARGV[i * 2 - 1])
  local ttl = tonumber(ARGV[i * 2])
  if ttl > 0 and redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ttl) end
end
return 1
"""
RESERVE = Script(RESERVE_SCRIPT)
ADD = Script(ADD_SCRIPT)


class RedisCounters:
    """Counters shared by every worker and replica that points at the same Redis."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis

    def submit_reserve(self, charges: list[Charge]) -> asyncio.Future[Any]:
        args: list[Arg] = []
        for c in charges:
            args += (repr(c.amount), "" if c.limit is None else repr(c.limit), c.ttl)
        return self._redis.submit_script(RESERVE, [KEY_PREFIX + c.key for c in charges], args)

    def decision(self, answer: Any) -> Decision:
        if int(answer[0]) == 1:
            return Decision(True, [float(v) for v in answer[1:]])
        return Decision(False, [float(v) for v in answer[2:]], int(answer[1]) - 1)

    def add(self, charges: list[Charge]) -> asyncio.Future[None]:
        args: list[Arg] = []
        for c in charges:
            args += (repr(c.amount), c.ttl)
        return self._redis.submit_script(ADD, [KEY_PREFIX + c.key for c in charges], args, later=True)

    async def value(self, key: str) -> float:
        return float(await self._redis.execute("GET", KEY_PREFIX + key) or 0)

    async def claim(self, key: str, ttl: int) -> bool:
        """True for the first process to claim `key` (an alert's dedupe key) until it expires."""
        expiry: tuple[Arg, ...] = ("EX", ttl) if ttl else ()
        return await self._redis.execute("SET", KEY_PREFIX + "alerted:" + key, b"1", "NX", *expiry) is not None

    async def close(self) -> None:
        return None  # the connection belongs to the gateway's RedisClients
