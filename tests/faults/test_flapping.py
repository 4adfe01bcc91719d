"""A flapping upstream under concurrent load: cooldowns engage and release, no request is lost, and every
request is logged exactly once."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import metric
from tests.faults.conftest import AUTH, HI, unique
from tests.faults.fault_upstream import fail, ok


async def burst(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(body: dict) -> httpx.Response:
            async with gate:
                return await client.post(f"{url}/api/chat/completions", json=body, headers=AUTH)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_flapping_upstream_under_load(start_fault_gateway, fault):
    flap, good = unique("flap"), unique("good")
    # flaps in runs of four: four 503s, four successes, ... (a success resets the failure count, so strict
    # alternation would never cool it)
    fault.default(flap, lambda n: fail(503, "flap") if n // 4 % 2 == 0 else ok(flap, "flap-ok"))
    fault.default(good, lambda n: ok(good, "steady"))
    gw = start_fault_gateway(cooldowns={"failures": 2, "window": 60, "duration": 1,
                                        "statuses": [500, 502, 503, 504]})
    replies: list[httpx.Response] = []
    waves = 0
    # waves of concurrent requests, each after the last cooldown released, until fault-a has both cooled and
    # served (bounded)
    while waves < 6 and not (replies and metric(gw.url, "llmrelay_cooldowns_entered_total", provider="fault-a")
                             and any(r.headers["x-llmrelay-provider"] == "fault-a" for r in replies)):
        deadline = time.monotonic() + 5
        while metric(gw.url, "llmrelay_deployment_cooling", provider="fault-a") and time.monotonic() < deadline:
            time.sleep(0.05)
        bodies = [{"model": f"fault-a/{flap}", "messages": HI, "fallback_models": [f"fault-b/{good}"],
                   "retries": 0, "customer_identifier": f"flap-{waves}-{i}"} for i in range(16)]
        replies += asyncio.run(burst(gw.url, bodies, concurrency=8))
        waves += 1
    n = len(replies)
    assert [r.status_code for r in replies] == [200] * n  # nothing lost: a failure fell back to fault-b
    served = {r.headers["x-llmrelay-provider"] for r in replies}
    assert served == {"fault-a", "fault-b"}
    assert metric(gw.url, "llmrelay_cooldowns_entered_total", provider="fault-a") >= 1
    # while fault-a cooled, requests went straight to fault-b: fewer tries of fault-a than requests
    assert fault.count(flap) < n
    ids = [r.headers["x-respan-log-id"] for r in replies]
    assert len(set(ids)) == n
    rows = gw.records(count=n, timeout=10)
    assert sorted(r["unique_id"] for r in rows) == sorted(ids)  # each request logged exactly once
    by_id = {r["unique_id"]: r for r in rows}
    for reply in replies:
        record = by_id[reply.headers["x-respan-log-id"]]
        assert record["status_code"] == 200 and record["provider_id"] == reply.headers["x-llmrelay-provider"]
        if record["attempts"]:
            assert [a["status"] for a in record["attempts"]] == [503, 200]
    assert metric(gw.url, "llmrelay_requests_total", status="200") == n

    # the cooldown ends (1 s) and fault-a is back in rotation
    deadline = time.monotonic() + 5
    while metric(gw.url, "llmrelay_deployment_cooling", provider="fault-a") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(gw.url, "llmrelay_deployment_cooling", provider="fault-a") == 0
    fault.default(flap, lambda n: ok(flap, "flap-ok"))
    tries = fault.count(flap)
    response = httpx.post(f"{gw.url}/api/chat/completions", headers=AUTH, timeout=30,
                          json={"model": f"fault-a/{flap}", "messages": HI, "fallback_models": [f"fault-b/{good}"]})
    assert response.status_code == 200 and response.headers["x-llmrelay-provider"] == "fault-a"
    assert fault.count(flap) == tries + 1
