"""/api/users/: customers' settings (budgets, rate limit, markup, name, email) set through the admin
API, shown beside their spend, and enforced by the limits stage on running gateways (spec 2.7)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import ADMIN_KEYS, KEY, GatewayProcess, module_gateway, openai_client
from tests.conftest import admin_request as admin
from tests.mock_upstream import MockUpstream

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    yield from module_gateway(tmp_path_factory, "customers", mock_upstream, admin_keys=ADMIN_KEYS,
                              pipeline=["auth", "limits"])


@pytest.fixture
def client(gw: GatewayProcess) -> OpenAI:
    return openai_client(gw)




def customer() -> str:
    return f"cust-{uuid.uuid4().hex[:8]}"


def ask(client: OpenAI, who: str, **params: Any) -> Any:
    return client.chat.completions.with_raw_response.create(model="gpt-test", messages=HI,
                                                           extra_body={"customer_identifier": who, **params})


def test_patch_creates_settings_shown_beside_the_spend(gw: GatewayProcess, client: OpenAI) -> None:
    who = customer()
    assert admin(gw, "GET", f"/api/users/{who}/").status_code == 404  # never seen, nothing set
    r = admin(gw, "PATCH", f"/api/users/{who}/", {"name": "Acme", "email": "ops@acme.test", "period_budget": 50,
                                                  "budget_duration": "weekly", "markup_percentage": 20,
                                                  "metadata": {"tier": "gold"}, "period_start": "2026-11-01"})
    assert r.status_code == 200, r.text
    assert r.json()["customer_identifier"] == who and r.json()["period_start"] == "2026-11-01"
    detail = admin(gw, "GET", f"/api/users/{who}/").json()  # no request yet: settings, zero spend
    assert detail["name"] == "Acme" and detail["period_budget"] == 50 and detail["number_of_requests"] == 0
    ask(client, who)
    assert gw.records(where="customer_identifier = ?", args=(who,))
    detail = admin(gw, "GET", f"/api/users/{who}/").json()
    assert detail["number_of_requests"] == 1 and detail["email"] == "ops@acme.test" and detail["total_cost"] > 0
    listed = admin(gw, "GET", "/api/users/").json()["results"]
    mine = next(u for u in listed if u["customer_identifier"] == who)
    assert mine["budget_duration"] == "weekly" and mine["markup_percentage"] == 20 and mine["number_of_requests"] == 1

    r = admin(gw, "PATCH", f"/api/users/{who}/", {"metadata": {"region": "eu"}, "name": None})
    assert r.json()["metadata"] == {"tier": "gold", "region": "eu"} and "name" not in r.json()
    assert admin(gw, "DELETE", f"/api/users/{who}/").status_code == 204
    assert admin(gw, "DELETE", f"/api/users/{who}/").status_code == 404
    detail = admin(gw, "GET", f"/api/users/{who}/").json()  # the logs stay
    assert detail["number_of_requests"] == 1 and "period_budget" not in detail


def test_a_stored_budget_and_rate_limit_are_enforced_at_once(gw: GatewayProcess, client: OpenAI) -> None:
    broke, busy = customer(), customer()
    assert admin(gw, "PATCH", f"/api/users/{broke}/", {"total_budget": 0}).status_code == 200
    with pytest.raises(openai.RateLimitError) as blocked:
        ask(client, broke)
    assert f"customer '{broke}'" in blocked.value.response.json()["detail"]
    admin(gw, "PATCH", f"/api/users/{broke}/", {"total_budget": None})
    assert ask(client, broke).status_code == 200  # lifted at once

    # what an admin set wins over the request's own customer_params
    admin(gw, "PATCH", f"/api/users/{busy}/", {"rate_limit": 2})
    generous = {"customer_params": {"customer_identifier": busy, "rate_limit": 100}}
    for _ in range(2):
        ask(client, busy, **generous)
    with pytest.raises(openai.RateLimitError):
        ask(client, busy, **generous)
    with pytest.raises(openai.RateLimitError):
        ask(client, busy)


def test_a_period_budget_counts_the_markup(gw: GatewayProcess, client: OpenAI) -> None:
    """A gpt-test answer costs $0.000024; with a 100% markup it counts $0.000048 against a $0.00006
    daily budget, so the second request passes the budget and the third is refused."""
    who = customer()
    admin(gw, "PATCH", f"/api/users/{who}/", {"period_budget": 0.00006, "budget_duration": "daily",
                                              "markup_percentage": 100})
    for _ in range(2):
        ask(client, who)
        time.sleep(0.1)  # the reconciliation with the real cost lands in the background
    with pytest.raises(openai.RateLimitError):
        ask(client, who)


@pytest.mark.parametrize(("body", "field"), [
    ({"budget_duration": "hourly"}, "budget_duration"),
    ({"period_budget": -1}, "period_budget"),
    ({"total_budget": "lots"}, "total_budget"),
    ({"markup_percentage": True}, "markup_percentage"),
    ({"rate_limit": 0}, "rate_limit"),
    ({"environment": "staging"}, "environment"),
    ({"metadata": [1]}, "metadata"),
    ({"period_start": "yesterday"}, "period_start"),
    ({"period_start": "2026-11-02", "period_end": "2026-11-01"}, "period_end"),
    ({"colour": "red"}, "colour"),
])
def test_bad_settings_are_400s_naming_the_field(gw: GatewayProcess, body: dict[str, Any], field: str) -> None:
    who = customer()
    r = admin(gw, "PATCH", f"/api/users/{who}/", body)
    assert r.status_code == 400 and r.json()["detail"].startswith(f"{field}:"), r.text
    assert admin(gw, "GET", f"/api/users/{who}/").status_code == 404  # nothing stored


def test_gateway_keys_get_403(gw: GatewayProcess) -> None:
    who = customer()
    assert admin(gw, "PATCH", f"/api/users/{who}/", {"name": "x"}, key=KEY).status_code == 403
    assert httpx.patch(f"{gw.url}/api/users/{who}/", json={"name": "x"}).status_code == 401
    assert admin(gw, "GET", f"/api/users/{who}/").status_code == 404
