"""Cooldowns: proxy/state/cooldowns.py on its own (memory and real Redis), then through gateways:
a deployment past the failure threshold is skipped while a healthy candidate serves, is tried
again after the cooldown, the only deployment of a model is still tried, and two gateway
processes share the state through the Redis on 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from proxy.metrics import Metrics
from proxy.settings import Cooldowns as Policy
from proxy.state.cooldowns import KEY_PREFIX, Cooldowns
from tests.conftest import KEY, REDIS_URL, base_config
from tests.mock_upstream import MockUpstream

HI = [{"role": "user", "content": "hi"}]


def cooldowns(**policy: Any) -> tuple[Cooldowns, Metrics]:
    metrics = Metrics()
    return Cooldowns(Policy(**policy), metrics), metrics


def entered(metrics: Metrics, provider: str, deployment: str) -> float:
    value = metrics.registry.get_sample_value(
        "llmrelay_cooldowns_entered_total", {"provider": provider, "deployment": deployment})
    return value or 0.0


def gauge(metrics: Metrics, provider: str, deployment: str) -> float | None:
    return metrics.registry.get_sample_value("llmrelay_deployment_cooling", {"provider": provider, "deployment": deployment})


# -- unit: proxy/state/cooldowns.py ------------------------------------------------------------


def test_threshold_within_window_enters_cooldown():
    c, metrics = cooldowns(failures=3, window=60, duration=30)
    assert c.failure("p/d", 503) is False
    assert c.failure("p/d", 500) is False
    assert not c.cooling("p/d")
    before = time.time()
    assert c.failure("p/d", 502) is True  # the third within the window
    assert c.cooling("p/d")
    assert before + 29 < c.until("p/d") <= time.time() + 30
    assert entered(metrics, "p", "d") == 1
    assert gauge(metrics, "p", "d") == 1
    assert c.failure("p/d", 503) is False  # already cooling: not entered twice
    assert entered(metrics, "p", "d") == 1
    assert not c.cooling("p/other")


def test_failures_outside_the_window_do_not_count():
    c, _ = cooldowns(failures=2, window=0.2, duration=30)
    assert c.failure("p/d", 500) is False
    time.sleep(0.3)
    assert c.failure("p/d", 500) is False  # the first one fell out of the window
    assert not c.cooling("p/d")
    assert c.failure("p/d", 500) is True


def test_statuses_outside_the_policy_are_ignored():
    c, _ = cooldowns(failures=1, statuses=[500])
    assert c.failure("p/d", 400) is False
    assert c.failure("p/d", 503) is False
    assert not c.cooling("p/d")
    assert c.failure("p/d", 500) is True


def test_429_with_retry_after_enters_at_once_for_that_long():
    c, metrics = cooldowns(failures=5, duration=30)
    assert c.failure("p/d", 429, 2.0) is True
    assert 1.5 < c.until("p/d") - time.time() <= 2.0
    assert entered(metrics, "p", "d") == 1
    c2, _ = cooldowns(failures=5)
    assert c2.failure("p/d", 429) is False  # without Retry-After it is an ordinary failure
    assert c2.failure("p/d", 429, None) is False


def test_retry_after_cooldown_is_capped():
    c, _ = cooldowns(max_duration=5)
    assert c.failure("p/d", 429, 3600) is True
    assert c.until("p/d") - time.time() <= 5


def test_cooldown_expires_and_the_gauge_drops():
    c, metrics = cooldowns(failures=1, duration=0.2)
    assert c.failure("p/d", 500) is True
    assert c.cooling("p/d")
    time.sleep(0.3)
    assert not c.cooling("p/d")
    assert c.until("p/d") == 0.0
    assert gauge(metrics, "p", "d") == 0
    # and it can enter again, counted again
    assert c.failure("p/d", 500) is True
    assert entered(metrics, "p", "d") == 2


def test_gauge_drops_at_expiry_without_any_request():
    async def main() -> None:
        c, metrics = cooldowns(failures=1, duration=0.2)
        assert c.failure("p/d", 503) is True
        assert gauge(metrics, "p", "d") == 1
        await asyncio.sleep(0.35)  # nobody asks about p/d: the timer set on entry resets the gauge
        assert gauge(metrics, "p", "d") == 0

    asyncio.run(main())


def test_success_resets_the_failure_count():
    c, _ = cooldowns(failures=3)
    c.failure("p/d", 500)
    c.failure("p/d", 500)
    c.success("p/d")
    assert c.failure("p/d", 500) is False  # counting starts again
    assert c.failure("p/d", 500) is False
    assert c.failure("p/d", 500) is True


def test_longer_cooldown_wins():
    c, _ = cooldowns()
    now = time.time()
    c.enter("p/d", now + 10)
    c.enter("p/d", now + 5)  # e.g. a shorter one heard from another replica
    assert c.until("p/d") == now + 10




def _delete_keys(suffix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{KEY_PREFIX}*{suffix}*"):
        client.delete(key)
    client.close()


def test_redis_shares_a_cooldown_between_instances():
    suffix = uuid.uuid4().hex[:10]
    key = f"prov-{suffix}/dep-{suffix}"

    async def main() -> None:
        a, _ = Cooldowns(Policy(failures=1, duration=30), Metrics(), REDIS_URL), None
        b = Cooldowns(Policy(failures=1, duration=30), Metrics(), REDIS_URL)
        await a.start()
        await b.start()
        try:
            await asyncio.sleep(0.2)  # both subscribed
            assert a.failure(key, 503) is True
            deadline = time.monotonic() + 1.0
            while not b.cooling(key) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert b.cooling(key), "the other instance did not hear of the cooldown within 1 s"
            assert abs(b.until(key) - a.until(key)) < 0.01
            # a process that starts later loads the stored cooldown
            c = Cooldowns(Policy(), Metrics(), REDIS_URL)
            await c.start()
            try:
                deadline = time.monotonic() + 1.0
                while not c.cooling(key) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert c.cooling(key)
            finally:
                await c.stop()
        finally:
            await a.stop()
            await b.stop()

    try:
        asyncio.run(main())
    finally:
        _delete_keys(suffix)


def test_a_shorter_cooldown_never_cuts_a_stored_longer_one():
    suffix = uuid.uuid4().hex[:10]
    key = f"prov-{suffix}/dep-{suffix}"

    async def main() -> tuple[float, float]:
        long = Cooldowns(Policy(failures=1, duration=120), Metrics(), REDIS_URL)
        short = Cooldowns(Policy(failures=1, duration=5), Metrics(), REDIS_URL)
        await long.start()
        await short.start()
        try:
            long.failure(key, 503)
            await asyncio.sleep(0.3)
            short._until.pop(key, None)  # as if `short` had not heard yet: it publishes its own
            short.failure(key, 503)
            await asyncio.sleep(0.3)
            import redis

            stored = float(redis.Redis.from_url(REDIS_URL).get(KEY_PREFIX + key))
            return stored, long.until(key)
        finally:
            await long.stop()
            await short.stop()

    try:
        stored, long_until = asyncio.run(main())
        assert stored == long_until and stored > time.time() + 100
    finally:
        _delete_keys(suffix)


# -- through gateways --------------------------------------------------------------------------

PLAN_STAGE = '''
def create_stage(context):
    plans = context.options.get("plans", {})

    async def stage(call, next):
        names = plans.get(call.model)
        if names:
            call.plan = [context.models.resolve(name) for name in names]
            call.target = call.plan[0]
        return await next(call)

    return stage
'''


def plan_stage_env(folder: Path) -> dict[str, str]:
    """A test-only stage `testplan` (options: plans: {model: [candidate names]}) that sets call.plan
    the way routing does, installed as a bare dist-info folder on PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "llmrelay_testplan.py").write_text(PLAN_STAGE)
    info = folder / "llmrelay_testplan-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llmrelay-testplan\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[llmrelay.stages]\ntestplan = llmrelay_testplan:create_stage\n")
    existing = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{folder}{os.pathsep}{existing}" if existing else str(folder)}


def chat(gateway: Any, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "messages": HI, **extra}, timeout=20)


def two_provider_config(mock: MockUpstream, workdir: Path, suffix: str, *, failing_model: str = "mock-status-503",
                        cooldown: dict[str, Any] | None = None, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Providers `bad-<suffix>` (answers `failing_model`) and `good-<suffix>`, each with its own key,
    so the mock's request log tells which one was called."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = base_config(mock, workdir)
    config["providers"] += [
        {"id": f"bad-{suffix}", "base_url": mock.base_url, "api_key": f"key-bad-{suffix}"},
        {"id": f"good-{suffix}", "base_url": mock.base_url, "api_key": f"key-good-{suffix}"},
    ]
    config["models"] += [
        {"name": "bad", "provider": f"bad-{suffix}", "model": failing_model},
        {"name": "good", "provider": f"good-{suffix}", "model": "mock-ok"},
    ]
    config["pipeline"] = ["auth", {"name": "testplan", "options": {"plans": {
        "pair": ["bad", "good"], "alone": ["bad"]}}}, "fallback"]
    config["cooldowns"] = {"failures": 2, "window": 60, "duration": 30, **(cooldown or {})}
    if state:
        config["state"] = state
    return config


def test_failing_deployment_is_skipped_then_tried_again(start_gateway, mock, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    config = two_provider_config(mock, tmp_path, suffix, cooldown={"duration": 1.5})
    gateway = start_gateway(config=config, env=plan_stage_env(tmp_path / "site"))
    bad, good = f"key-bad-{suffix}", f"key-good-{suffix}"
    no_retries = {"retry_params": {"retry_enabled": False}}

    for _ in range(2):  # two failures: the threshold
        response = chat(gateway, "pair", **no_retries)
        assert response.status_code == 200
        assert response.headers["x-llmrelay-provider"] == f"good-{suffix}"
        assert response.headers["x-llmrelay-attempts"] == "2"
    assert len(mock.sent_with_key(bad)) == 2

    for _ in range(5):  # in cooldown: not called at all, the healthy candidate serves at once
        response = chat(gateway, "pair", **no_retries)
        assert response.status_code == 200
        assert response.headers["x-llmrelay-attempts"] == "1"
        assert response.headers["x-llmrelay-provider"] == f"good-{suffix}"
    assert len(mock.sent_with_key(bad)) == 2
    assert len(mock.sent_with_key(good)) == 7

    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert f'llmrelay_cooldowns_entered_total{{deployment="bad-{suffix}",provider="bad-{suffix}"}} 1.0' in metrics
    assert f'llmrelay_deployment_cooling{{deployment="bad-{suffix}",provider="bad-{suffix}"}} 1.0' in metrics

    time.sleep(1.7)  # the cooldown is over: back in rotation
    response = chat(gateway, "pair", **no_retries)
    assert response.status_code == 200
    assert response.headers["x-llmrelay-attempts"] == "2"
    assert len(mock.sent_with_key(bad)) == 3
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert f'llmrelay_deployment_cooling{{deployment="bad-{suffix}",provider="bad-{suffix}"}} 0.0' in metrics


def test_the_only_deployment_is_tried_while_cooling(start_gateway, mock, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    config = two_provider_config(mock, tmp_path, suffix)
    gateway = start_gateway(config=config, env=plan_stage_env(tmp_path / "site"))
    bad = f"key-bad-{suffix}"
    for _ in range(2):
        chat(gateway, "pair", retry_params={"retry_enabled": False})
    assert len(mock.sent_with_key(bad)) == 2  # now cooling
    assert chat(gateway, "pair", retry_params={"retry_enabled": False}).status_code == 200
    assert len(mock.sent_with_key(bad)) == 2  # skipped while another candidate is healthy

    response = chat(gateway, "alone", retry_params={"retry_enabled": False})
    assert response.status_code == 503  # tried all the same: its own answer, not "no deployments"
    assert response.json()["error"]["code"] == "mock_503"
    assert len(mock.sent_with_key(bad)) == 3


def test_cooldown_is_shared_between_two_gateways_through_redis(start_gateway, mock, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    state = {"cooldowns": {"backend": "redis", "url": REDIS_URL}}
    env = plan_stage_env(tmp_path / "site")
    bad = f"key-bad-{suffix}"
    try:
        a = start_gateway(config=two_provider_config(mock, tmp_path / "a", suffix, cooldown={"failures": 3},
                                                     state=state), env=env)
        b = start_gateway(config=two_provider_config(mock, tmp_path / "b", suffix, cooldown={"failures": 3},
                                                     state=state), env=env)
        no_retries = {"retry_params": {"retry_enabled": False}}
        assert chat(b, "pair", **no_retries).headers["x-llmrelay-attempts"] == "2"  # B does call it (1 failure)
        assert len(mock.sent_with_key(bad)) == 1
        for _ in range(3):  # A: three failures, the threshold; A puts it in cooldown and shares that
            assert chat(a, "pair", **no_retries).status_code == 200
        assert len(mock.sent_with_key(bad)) == 4
        time.sleep(1.0)  # "within a second"
        for _ in range(3):
            response = chat(b, "pair", **no_retries)
            assert response.status_code == 200
            assert response.headers["x-llmrelay-attempts"] == "1"
        assert len(mock.sent_with_key(bad)) == 4  # B no longer sends to it
        metrics = httpx.get(f"{b.url}/metrics").text
        # B heard of it: cooling there too, though B did not enter it itself
        assert f'llmrelay_deployment_cooling{{deployment="bad-{suffix}",provider="bad-{suffix}"}} 1.0' in metrics
        assert f'llmrelay_cooldowns_entered_total{{deployment="bad-{suffix}",provider="bad-{suffix}"}}' not in metrics
    finally:
        _delete_keys(suffix)
