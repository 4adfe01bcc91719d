"""/api/providers/ and /api/models/: custom providers and models (and aliases) created through the
admin API on running gateways, and routable at once through the router (spec 2.5)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import (
    ADMIN_KEYS,
    KEY,
    REDIS_URL,
    GatewayProcess,
    base_config,
    module_gateway,
    openai_client,
    wait_until,
)
from tests.conftest import admin_request as admin
from tests.mock_upstream import MockUpstream

CUSTOM_KEY = "sk-custom-provider-secret-0987654321"
HI = [{"role": "user", "content": "hi"}]


PIPELINE = ["auth", "routing", "credentials", "fallback"]


def config(mock: MockUpstream, workdir: Path) -> dict[str, Any]:
    return base_config(mock, workdir, admin_keys=ADMIN_KEYS, pipeline=PIPELINE)




def expected_cost(record: dict[str, Any], input_cost: float, output_cost: float, cached_cost: float) -> float:
    cached = record["prompt_cache_hit_tokens"] or 0
    return ((record["prompt_tokens"] - cached) * input_cost + cached * cached_cost
            + record["completion_tokens"] * output_cost) / 1e6


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def provider_body(mock: MockUpstream, provider_id: str, **kwargs: Any) -> dict[str, Any]:
    return {"provider_id": provider_id, "provider_name": "Our vLLM", "api_key": CUSTOM_KEY,
            "extra_kwargs": {"base_url": mock.base_url, **kwargs}}


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    yield from module_gateway(tmp_path_factory, "models", config=lambda workdir: config(mock_upstream, workdir))


@pytest.fixture
def client(gw: GatewayProcess) -> OpenAI:
    return openai_client(gw)


# -- routable at once ---------------------------------------------------------------------------


def test_a_provider_and_model_made_over_the_api_answer_at_once(gw: GatewayProcess, client: OpenAI,
                                                               mock_upstream: MockUpstream) -> None:
    provider, model = unique("vllm"), unique("my-llama")
    r = admin(gw, "POST", "/api/providers/", provider_body(mock_upstream, provider))
    assert r.status_code == 201, r.text
    r = admin(gw, "POST", "/api/models/", {"model_name": model, "custom_provider_id": provider,
                                           "input_cost": 3.0, "output_cost": 6.0, "max_context_window": 32000})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["source"] == "db" and created["affiliation_category"] == "custom" and created["routable"]
    assert created["provider"]["provider_id"] == provider and created["upstream_model_name"] == model

    raw = client.chat.completions.with_raw_response.create(model=model, messages=HI)  # no wait, no reload
    assert raw.parse().choices[0].message.content
    sent = mock_upstream.last()
    assert sent["body"]["model"] == model and sent["headers"]["Authorization"] == f"Bearer {CUSTOM_KEY}"
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["provider_id"] == provider and record["model_requested"] == model
    assert record["cost"] == pytest.approx(expected_cost(record, 3.0, 6.0, 3.0))

    # the provider's own slug, and the route-provider header, reach it too
    client.chat.completions.create(model=f"{provider}/mock-ok", messages=HI)
    assert mock_upstream.last()["headers"]["Authorization"] == f"Bearer {CUSTOM_KEY}"
    client.chat.completions.create(model="gpt-test", messages=HI, extra_headers={"X-Respan-Route-Provider": provider})
    assert mock_upstream.last()["headers"]["Authorization"] == f"Bearer {CUSTOM_KEY}"

    public = httpx.get(f"{gw.url}/api/models/public").json()["models"]
    assert any(m["model_name"] == model and m["input_cost"] == 3.0 for m in public)
    ids = [m.id for m in client.models.list()]
    assert model in ids

    # deleted: gone at once, with the documented 404
    assert admin(gw, "DELETE", f"/api/models/{model}/").status_code == 204
    with pytest.raises(openai.NotFoundError) as gone:
        client.chat.completions.create(model=model, messages=HI)
    assert gone.value.response.json()["detail"] == f"Requested model {model} is not available in the model list"
    assert admin(gw, "DELETE", f"/api/providers/{provider}/").status_code == 204
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=f"{provider}/mock-ok", messages=HI)


def test_an_alias_inherits_from_its_base_and_bills_under_its_own_name(gw: GatewayProcess, client: OpenAI,
                                                                        mock_upstream: MockUpstream) -> None:
    alias = unique("fast")
    r = admin(gw, "POST", "/api/models/", {"model_name": alias, "base_model_name": "gpt-test", "input_cost": 10.0,
                                           "display_name": "Fast"})
    assert r.status_code == 201, r.text
    shown = admin(gw, "GET", f"/api/models/{alias}/").json()
    assert shown["base_model_name"] == "gpt-test" and shown["upstream_model_name"] == "mock-ok"
    assert shown["input_cost"] == 10.0 and shown["output_cost"] == 2.0  # output inherited from gpt-test
    assert shown["cache_hit_input_cost"] == 0.5 and shown["display_name"] == "Fast"
    assert shown["is_called_by_custom_name"] is False

    raw = client.chat.completions.with_raw_response.create(model=alias, messages=HI)
    assert mock_upstream.last()["body"]["model"] == "mock-ok"
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["model_requested"] == alias and record["prompt_tokens"] > 0
    assert record["cost"] == pytest.approx(expected_cost(record, 10.0, 2.0, 0.5))

    # an alias of an alias, called upstream by its own name, and a fallback target
    second = unique("fast2")
    assert admin(gw, "POST", "/api/models/", {"model_name": second, "base_model_name": alias,
                                              "is_called_by_custom_name": True}).status_code == 201
    client.chat.completions.create(model="down-model", messages=HI, extra_body={"fallback_models": [second]})
    assert mock_upstream.last()["body"]["model"] == second

    # POST again upserts (200); PATCH merges
    r = admin(gw, "POST", "/api/models/", {"model_name": alias, "base_model_name": "gpt-test", "output_cost": 4.0})
    assert r.status_code == 200 and r.json()["output_cost"] == 4.0
    r = admin(gw, "PATCH", f"/api/models/{alias}/", {"input_cost": 1.5})
    assert r.status_code == 200 and r.json()["input_cost"] == 1.5 and r.json()["output_cost"] == 4.0
    assert admin(gw, "DELETE", f"/api/models/{alias}/").status_code == 409  # the base of `second`
    assert admin(gw, "DELETE", f"/api/models/{second}/").status_code == 204
    assert admin(gw, "DELETE", f"/api/models/{alias}/").status_code == 204


def test_a_custom_model_can_re_price_a_catalog_model(gw: GatewayProcess, client: OpenAI) -> None:
    name = "gpt-4o-mini"  # a catalog model, served by the config's `openai` provider (the mock)
    before = admin(gw, "GET", f"/api/models/{name}/").json()
    assert before["source"] == "hardcoded"
    assert admin(gw, "PATCH", f"/api/models/{name}/", {"input_cost": 1}).status_code == 403
    r = admin(gw, "POST", "/api/models/", {"model_name": name, "base_model_name": name, "input_cost": 99.0})
    assert r.status_code == 201, r.text
    raw = client.chat.completions.with_raw_response.create(model=name, messages=HI)
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["cost"] == pytest.approx(expected_cost(record, 99.0, before["output_cost"],
                                                         before["cache_hit_input_cost"] or 99.0))
    assert admin(gw, "DELETE", f"/api/models/{name}/").status_code == 204
    assert admin(gw, "GET", f"/api/models/{name}/").json()["input_cost"] == before["input_cost"]


def test_provider_defaults_fill_what_the_request_leaves_out(gw: GatewayProcess, client: OpenAI,
                                                           mock_upstream: MockUpstream) -> None:
    provider = unique("tuned")
    body = provider_body(mock_upstream, provider, temperature=0.3, max_tokens=77, headers={"X-Team": "search"})
    assert admin(gw, "POST", "/api/providers/", body).status_code == 201
    client.chat.completions.create(model=f"{provider}/mock-ok", messages=HI)
    sent = mock_upstream.last()
    assert sent["body"]["temperature"] == 0.3 and sent["body"]["max_tokens"] == 77
    assert sent["headers"]["X-Team"] == "search"
    client.chat.completions.create(model=f"{provider}/mock-ok", messages=HI, temperature=0.9)
    assert mock_upstream.last()["body"]["temperature"] == 0.9


# -- the providers API --------------------------------------------------------------------------


def test_provider_crud_never_shows_the_key(gw: GatewayProcess, mock_upstream: MockUpstream) -> None:
    provider = unique("crud")
    created = admin(gw, "POST", "/api/providers/", provider_body(mock_upstream, provider, headers={"X-Secret": "hdr-value-1"}))
    assert created.status_code == 201
    shown = admin(gw, "GET", f"/api/providers/{provider}/").json()
    listed = admin(gw, "GET", "/api/providers/").json()["results"]
    for view in (created.json(), shown, *listed):
        assert CUSTOM_KEY not in str(view) and "hdr-value-1" not in str(view) and "api_key" not in view
    assert shown["has_api_key"] is True and shown["extra_kwargs"]["headers"] == {"X-Secret": "<hidden>"}
    assert shown["id"] == provider and shown["is_managed"] is False and shown["extra_kwargs"]["protocol"] == "openai"
    managed = {v["provider_id"]: v for v in listed if v["is_managed"]}
    assert set(managed) >= {"mock", "openai", "demo"} and managed["mock"]["has_api_key"] is True

    # POST on an existing id updates it (200); PATCH merges extra_kwargs; null api_key removes it
    again = admin(gw, "POST", "/api/providers/", {**provider_body(mock_upstream, provider), "provider_name": "Renamed"})
    assert again.status_code == 200 and again.json()["provider_name"] == "Renamed"
    patched = admin(gw, "PATCH", f"/api/providers/{provider}/", {"extra_kwargs": {"timeout": 5}, "api_key": None})
    assert patched.status_code == 200, patched.text
    assert patched.json()["extra_kwargs"]["timeout"] == 5 and patched.json()["extra_kwargs"]["base_url"] == mock_upstream.base_url
    assert patched.json()["has_api_key"] is False
    # PUT replaces the provider, keeping a key it does not mention
    admin(gw, "PATCH", f"/api/providers/{provider}/", {"api_key": "sk-another-key"})
    put = admin(gw, "PUT", f"/api/providers/{provider}/", {"provider_name": "Put", "extra_kwargs": {"base_url": mock_upstream.base_url}})
    assert put.status_code == 200 and put.json()["has_api_key"] is True and "timeout" not in put.json()["extra_kwargs"]
    assert admin(gw, "DELETE", f"/api/providers/{provider}/").status_code == 204
    assert admin(gw, "GET", f"/api/providers/{provider}/").status_code == 404
    assert admin(gw, "DELETE", f"/api/providers/{provider}/").status_code == 404
    assert admin(gw, "PATCH", f"/api/providers/{provider}/", {"provider_name": "x"}).status_code == 404

    conn = sqlite3.connect(gw.workdir / "llmrelay-data" / "admin.db")
    try:
        stored = " ".join(row[0] for row in conn.execute("SELECT data FROM admin_objects WHERE kind = 'provider'"))
    finally:
        conn.close()
    assert provider not in stored  # deleted for real
    assert CUSTOM_KEY not in gw.output.read_text()


@pytest.mark.parametrize(("body", "field"), [
    ({"provider_name": "x", "extra_kwargs": {"base_url": "http://h/v1"}}, "provider_id"),
    ({"provider_id": "bad id!", "provider_name": "x", "extra_kwargs": {"base_url": "http://h/v1"}}, "provider_id"),
    ({"provider_id": "p", "extra_kwargs": {"base_url": "http://h/v1"}}, "provider_name"),
    ({"provider_id": "p", "provider_name": "x"}, "extra_kwargs"),
    ({"provider_id": "p", "provider_name": "x", "extra_kwargs": {"base_url": "ftp://h"}}, "extra_kwargs.base_url"),
    ({"provider_id": "p", "provider_name": "x", "extra_kwargs": {"base_url": "http://u:pw@h/v1"}},
     "extra_kwargs.base_url"),
    ({"provider_id": "p", "provider_name": "x", "extra_kwargs": {"base_url": "http://h", "colour": 1}},
     "extra_kwargs.colour"),
    ({"provider_id": "p", "provider_name": "x", "extra_kwargs": {"base_url": "http://h", "timeout": -1}},
     "extra_kwargs.timeout"),
    ({"provider_id": "p", "provider_name": "x", "extra_kwargs": {"base_url": "http://h", "protocol": "bedrock"}},
     "extra_kwargs.protocol"),
    ({"provider_id": "p", "provider_name": "x", "extra_kwargs": {"base_url": "http://h",
                                                                 "headers": {"X-A": "v\r\nInjected: 1"}}},
     "extra_kwargs.headers.X-A"),
    ({"provider_id": "p", "provider_name": "x", "api_key": "k\nx", "extra_kwargs": {"base_url": "http://h"}}, "api_key"),
    ({"provider_id": "p", "provider_name": "x", "extra_kwargs": {"base_url": "http://h"}, "colour": 1}, "colour"),
])
def test_bad_provider_bodies_are_400s_naming_the_field(gw: GatewayProcess, body: dict[str, Any], field: str) -> None:
    r = admin(gw, "POST", "/api/providers/", body)
    assert r.status_code == 400 and r.json()["detail"].startswith(f"{field}:"), r.text
    assert admin(gw, "GET", "/api/providers/p/").status_code == 404  # nothing half-made


def test_config_providers_are_read_only(gw: GatewayProcess, mock_upstream: MockUpstream) -> None:
    assert admin(gw, "GET", "/api/providers/mock/").json()["is_managed"] is True
    for method in ("PATCH", "PUT", "DELETE"):
        r = admin(gw, method, "/api/providers/mock/", {"provider_name": "x"})
        assert r.status_code == 403 and "managed provider" in r.json()["error"]
    r = admin(gw, "POST", "/api/providers/", provider_body(mock_upstream, "mock"))
    assert r.status_code == 403


def test_a_provider_in_use_cannot_be_deleted(gw: GatewayProcess, mock_upstream: MockUpstream) -> None:
    provider, model = unique("busy"), unique("busy-model")
    admin(gw, "POST", "/api/providers/", provider_body(mock_upstream, provider))
    admin(gw, "POST", "/api/models/", {"model_name": model, "provider_id": provider})
    r = admin(gw, "DELETE", f"/api/providers/{provider}/")
    assert r.status_code == 409 and r.json()["models"] == [model]
    assert admin(gw, "DELETE", f"/api/models/{model}/").status_code == 204
    assert admin(gw, "DELETE", f"/api/providers/{provider}/").status_code == 204


# -- the models API -----------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "field"), [
    ({"provider_id": "mock"}, "model_name"),
    ({"model_name": "x"}, "provider_id"),
    ({"model_name": "x", "provider_id": "nowhere"}, "provider_id"),
    ({"model_name": "x", "provider_id": "mock", "input_cost": -1}, "input_cost"),
    ({"model_name": "x", "provider_id": "mock", "input_cost": "cheap"}, "input_cost"),
    ({"model_name": "x", "provider_id": "mock", "max_context_window": 0}, "max_context_window"),
    ({"model_name": "x", "provider_id": "mock", "streaming_support": 2}, "streaming_support"),
    ({"model_name": "x", "provider_id": "mock", "supported_params_override": []}, "supported_params_override"),
    ({"model_name": "x", "provider_id": "mock", "colour": 1}, "colour"),
])
def test_bad_model_bodies_are_400s_naming_the_field(gw: GatewayProcess, body: dict[str, Any], field: str) -> None:
    r = admin(gw, "POST", "/api/models/", body)
    assert r.status_code == 400 and r.json()["detail"].startswith(f"{field}:"), r.text
    assert admin(gw, "GET", "/api/models/x/").status_code == 404


def test_a_missing_base_and_a_cycle_are_refused(gw: GatewayProcess) -> None:
    r = admin(gw, "POST", "/api/models/", {"model_name": "orphan", "base_model_name": "no-such-model"})
    assert r.status_code == 400 and r.json()["error"] == "Base model not found"
    assert "no-such-model" in r.json()["detail"]
    a, b = unique("cyc-a"), unique("cyc-b")
    assert admin(gw, "POST", "/api/models/", {"model_name": a, "base_model_name": "gpt-test"}).status_code == 201
    assert admin(gw, "POST", "/api/models/", {"model_name": b, "base_model_name": a}).status_code == 201
    r = admin(gw, "PATCH", f"/api/models/{a}/", {"base_model_name": b})
    assert r.status_code == 400 and "cycle" in r.json()["detail"]
    assert admin(gw, "GET", f"/api/models/{a}/").json()["base_model_name"] == "gpt-test"  # unchanged
    for name in (b, a):
        assert admin(gw, "DELETE", f"/api/models/{name}/").status_code == 204


def test_config_models_are_read_only_and_names_may_hold_slashes(gw: GatewayProcess, client: OpenAI) -> None:
    for method in ("PATCH", "DELETE"):
        r = admin(gw, method, "/api/models/gpt-test/", {"input_cost": 1})
        assert r.status_code == 403 and r.json()["detail"].startswith("Cannot modify hardcoded models")
    assert admin(gw, "POST", "/api/models/", {"model_name": "gpt-test-alias", "provider_id": "mock"}).status_code == 403
    assert admin(gw, "GET", "/api/models/gpt-test/").json()["source"] == "config"
    assert admin(gw, "GET", "/api/models/nothing-here/").status_code == 404
    assert admin(gw, "PATCH", "/api/models/nothing-here/", {"input_cost": 1}).status_code == 404

    slashed = f"team/{unique('m')}"
    r = admin(gw, "POST", "/api/models/", {"model_name": slashed, "base_model_name": "gpt-test"})
    assert r.status_code == 201, r.text
    assert admin(gw, "GET", f"/api/models/{slashed}/").json()["model_name"] == slashed
    assert client.chat.completions.create(model=slashed, messages=HI).choices[0].message.content
    assert admin(gw, "DELETE", f"/api/models/{slashed}/").status_code == 204


def test_model_lists_and_summary(gw: GatewayProcess) -> None:
    names = [unique("listed") for _ in range(3)]
    for name in names:
        admin(gw, "POST", "/api/models/", {"model_name": name, "base_model_name": "gpt-test"})
    custom = admin(gw, "GET", "/api/models/").json()
    assert set(names) <= {m["model_name"] for m in custom["results"]}
    assert all(m["source"] == "db" for m in custom["results"])
    everything = admin(gw, "GET", "/api/models/?all=true&page_size=100").json()
    sources = {m["source"] for m in everything["results"]}
    assert {"db", "config", "hardcoded"} <= sources and everything["count"] > custom["count"]
    found = admin(gw, "POST", "/api/models/list/", {"model_name": names[1], "page_size": 10}).json()
    assert [m["model_name"] for m in found["results"]] == [names[1]]
    paged = admin(gw, "POST", "/api/models/list/", {"model_name": "listed", "page_size": 2, "page": 2}).json()
    assert paged["count"] >= 3 and len(paged["results"]) >= 1
    assert admin(gw, "POST", "/api/models/list/", {"page_size": 500}).status_code == 400
    assert admin(gw, "POST", "/api/models/list/", {"colour": "red"}).status_code == 400
    summary = admin(gw, "POST", "/api/models/summary/").json()
    assert summary["custom"] >= 3 and summary["by_source"]["config"] >= 2
    for name in names:
        admin(gw, "DELETE", f"/api/models/{name}/")


def test_gateway_keys_get_403_and_no_key_401(gw: GatewayProcess) -> None:
    for path in ("/api/providers/", "/api/models/", "/api/models/gpt-test/"):
        assert admin(gw, "GET", path, key=KEY).status_code == 403
        assert httpx.get(f"{gw.url}{path}").status_code == 401


# -- across processes -----------------------------------------------------------------------------


def test_a_model_made_through_one_replica_is_served_by_another(start_gateway: Any, mock_upstream: MockUpstream,
                                                               pg_store: str) -> None:
    """Two gateway processes (two workers each) share a PostgreSQL store and Redis notices (the poll is
    an hour apart, so only a notice can carry the change): a provider and model made through one are
    served by every worker of the other within a second."""
    store = {"backend": "postgres", "dsn": pg_store, "poll_interval": 3600, "notify_url": REDIS_URL}
    a, b = (start_gateway(workers=2, admin_keys=ADMIN_KEYS, pipeline=PIPELINE, store=store) for _ in range(2))
    provider, model = unique("shared"), unique("shared-model")
    assert admin(a, "POST", "/api/providers/", provider_body(mock_upstream, provider)).status_code == 201
    assert admin(a, "POST", "/api/models/", {"model_name": model, "provider_id": provider}).status_code == 201

    def served_everywhere() -> bool:
        for _ in range(6):  # fresh connections: both workers answer some
            r = httpx.post(f"{b.url}/api/chat/completions", json={"model": model, "messages": HI},
                           headers={"authorization": f"Bearer {KEY}", "connection": "close"}, timeout=10)
            if r.status_code != 200:
                return False
        return True

    assert wait_until(served_everywhere, timeout=1.0)
    assert admin(b, "DELETE", f"/api/models/{model}/").status_code == 204
    assert wait_until(lambda: httpx.post(f"{a.url}/api/chat/completions", json={"model": model, "messages": HI},
                                         headers={"authorization": f"Bearer {KEY}"}).status_code == 404, timeout=1.0)
