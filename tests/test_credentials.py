"""The `credentials` stage (spec 3.2): credential_override > customer_credentials (three shapes) >
a load-balance entry's credentials > customer_api_keys > the configured provider deployments.

Unit tests call the stage directly on a real ModelTable; end-to-end tests run `llmrelay serve`
in front of the mock provider, which records which `Authorization: Bearer` key arrived.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import orjson
import pytest
from openai import OpenAI

from plugins.credentials import CredentialsStage, create_stage
from proxy.call import Call, Reply, Target
from proxy.catalog import load_catalog
from proxy.errors import NotFound, ValidationFailed
from proxy.keys import hash_key
from proxy.metrics import Metrics
from proxy.model_table import ModelTable
from proxy.params import EMPTY, ParamsError, to_params
from proxy.pipeline import StageContext
from proxy.settings import Cooldowns as CooldownPolicy
from proxy.settings import parse_settings
from proxy.state.cooldowns import Cooldowns
from tests.conftest import KEY, UPSTREAM_KEY, GatewayProcess, base_config, module_gateway
from tests.mock_upstream import MockUpstream

# chi-square critical values at p = 0.001, by degrees of freedom
CHI2_001 = {1: 10.828, 2: 13.816, 3: 16.266}


def chi_square(counts: dict[str, int], weights: dict[str, float]) -> float:
    total = sum(counts.values())
    weight_sum = sum(weights.values())
    assert set(counts) <= set(weights), counts
    return sum((counts.get(k, 0) - total * w / weight_sum) ** 2 / (total * w / weight_sum) for k, w in weights.items())


# -- unit: the stage on a real ModelTable ----------------------------------------------------

UNIT_PROVIDERS: list[dict[str, Any]] = [
    {"id": "mock", "protocol": "openai", "base_url": "https://mock.example/v1", "api_key": "sk-mock"},
    {"id": "openai", "base_url": "https://openai.example/v1", "deployments": [
        {"name": "d1", "api_key": "sk-d1", "weight": 1},
        {"name": "d2", "api_key": "sk-d2", "weight": 2},
        {"name": "d3", "api_key": "sk-d3", "weight": 3},
    ]},
    {"id": "pool", "protocol": "openai", "base_url": "https://pool.example/v1", "api_key": "sk-pool-default",
     "deployments": [
         {"name": "only-a", "api_key": "sk-a", "models": ["m-a"]},
         {"name": "not-b", "base_url": "https://not-b.example/v1", "exclude_models": ["m-b"]},  # inherits the key
         {"name": "all", "api_key": "sk-all"},
     ]},
    {"id": "single", "protocol": "openai", "base_url": "https://single.example/v1",
     "deployments": [{"name": "lonely", "api_key": "sk-lonely"}]},
    {"id": "together_ai", "base_url": "https://together.example/v1", "api_key": "sk-together"},
    {"id": "demo", "protocol": "demo"},
]
UNIT_MODELS: list[dict[str, Any]] = [
    {"name": "gpt-test", "provider": "mock", "model": "mock-ok", "aliases": ["gpt-test-alias"]},
    {"name": "gpt-3.5-turbo", "provider": "openai", "model": "gpt-3.5-turbo"},
    {"name": "gpt-4", "provider": "openai", "model": "gpt-4"},
    {"name": "demo", "provider": "demo", "model": "llmrelay-demo-1"},
]


def make_stage(cooldowns: Cooldowns | None = None, options: dict[str, Any] | None = None) -> CredentialsStage:
    settings = parse_settings({"providers": UNIT_PROVIDERS, "models": UNIT_MODELS, "auto_providers": False}, "test")
    table = ModelTable(settings, load_catalog())
    services: dict[str, Any] = {"metrics": Metrics()}
    if cooldowns is not None:
        services["cooldowns"] = cooldowns
    return create_stage(StageContext("credentials", options or {}, settings, table, services))


def make_call(model: str, **params: Any) -> Call:
    return Call(endpoint="chat", path="/api/chat/completions", body={"model": model, "messages": []},
                params=to_params(dict(params)) if params else EMPTY, headers={})


def planned(stage: CredentialsStage, model: str, **params: Any) -> list[Target]:
    call = make_call(model, **params)
    stage.plan(call)
    assert call.target is call.plan[0]
    return call.plan


def one(stage: CredentialsStage, model: str, **params: Any) -> Target:
    plan = planned(stage, model, **params)
    return plan[0]


@pytest.fixture
def stage() -> CredentialsStage:
    return make_stage()


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError, match="no options"):
        make_stage(options={"weights": 1})


def test_single_deployment_passes_the_model_table_target_through(stage):
    call = make_call("gpt-test")
    stage.plan(call)
    assert call.plan == [stage.models.resolve("gpt-test")]
    assert call.target is stage.models.resolve("gpt-test")  # no copy on the common path
    assert (call.target.api_key, call.target.deployment, call.target.custom_credential) == ("sk-mock", "mock", False)


def test_provider_without_credentials_passes_through(stage):
    target = one(stage, "demo")
    assert target is stage.models.resolve("demo")
    assert target.api_key is None and not target.custom_credential


def test_starts_from_call_target_or_resolves_the_model(stage):
    call = make_call("gpt-test")
    call.target = stage.models.resolve("gpt-3.5-turbo")  # routing left a target but no plan
    stage.plan(call)
    assert {t.deployment for t in call.plan} == {"d1", "d2", "d3"}
    call = make_call("no-such-model")
    with pytest.raises(NotFound):
        stage.plan(call)


def test_every_plan_entry_gets_its_credential_and_deployments_expand(stage):
    call = make_call("gpt-3.5-turbo", customer_credentials={"mock": {"api_key": "sk-cust-mock"}})
    call.plan = [stage.models.resolve("gpt-3.5-turbo"), stage.models.resolve("gpt-test")]
    call.target = call.plan[0]
    stage.plan(call)
    assert [t.provider for t in call.plan] == ["openai", "openai", "openai", "mock"]
    assert sorted(t.deployment for t in call.plan[:3]) == ["d1", "d2", "d3"]
    assert sorted(t.api_key for t in call.plan[:3]) == ["sk-d1", "sk-d2", "sk-d3"]
    assert (call.plan[3].api_key, call.plan[3].deployment, call.plan[3].custom_credential) == (
        "sk-cust-mock", "customer_credentials", True)
    assert call.target is call.plan[0]


# precedence, one level at a time


def test_precedence_each_level_wins_over_the_next(stage):
    lb = msgspec.structs.replace(stage.models.resolve("gpt-test"), credentials={"api_key": "sk-lb"})
    override = {"gpt-test": {"api_key": "sk-override"}}
    customer = {"mock": {"api_key": "sk-customer"}}
    legacy = {"gpt-test": "sk-legacy"}
    cases: list[tuple[dict[str, Any], Target | None, str, str]] = [
        ({"credential_override": override, "customer_credentials": customer, "customer_api_keys": legacy}, lb,
         "sk-override", "credential_override"),
        ({"customer_credentials": customer, "customer_api_keys": legacy}, lb, "sk-customer", "customer_credentials"),
        ({"customer_api_keys": legacy}, lb, "sk-lb", "load_balance"),
        ({"customer_api_keys": legacy}, None, "sk-legacy", "customer_api_keys"),
        ({}, None, "sk-mock", "mock"),
    ]
    for params, routed, key, deployment in cases:
        call = make_call("gpt-test", **params)
        if routed is not None:
            call.plan = [routed]
            call.target = routed
        stage.plan(call)
        target = call.target
        assert (target.api_key, target.deployment, target.custom_credential) == (key, deployment, deployment != "mock")


def test_load_balance_credentials_on_the_target_with_a_fake_next(stage):
    seen: list[Call] = []

    async def fake_next(call: Call) -> Reply:
        seen.append(call)
        return Reply(200, body=b"{}")

    routed = msgspec.structs.replace(stage.models.resolve("gpt-3.5-turbo"), group_id="grp",
                                     credentials={"api_key": "sk-lb-entry", "api_base": "https://azure.example/v1",
                                                  "api_version": "2024-06-01"})
    call = make_call("gpt-3.5-turbo")
    call.plan = [routed]
    call.target = routed
    reply = asyncio.run(stage(call, fake_next))
    assert reply.status == 200 and seen == [call]
    target = call.target
    assert call.plan == [target]
    assert (target.api_key, target.base_url, target.deployment, target.custom_credential) == (
        "sk-lb-entry", "https://azure.example/v1", "load_balance", True)
    assert target.credentials["api_version"] == "2024-06-01"  # kept for providers that need it
    assert target.group_id == "grp"
    assert routed.api_key == "sk-d1" and routed.deployment == "d1"  # the shared target is untouched


def test_load_balance_credentials_may_be_keyed_by_provider(stage):
    routed = msgspec.structs.replace(stage.models.resolve("gpt-test"), credentials={"mock": {"api_key": "sk-nested"}})
    call = make_call("gpt-test")
    call.plan = [routed]
    stage.plan(call)
    assert call.target.api_key == "sk-nested"
    assert call.target.base_url == "https://mock.example/v1"


# credential_override


@pytest.mark.parametrize("slug", ["gpt-test-alias", "mock/mock-ok", "mock-ok"])
def test_override_matches_requested_name_then_provider_slug_then_model(stage, slug):
    target = one(stage, "gpt-test-alias", credential_override={slug: {"api_key": "sk-o"}})
    assert (target.api_key, target.deployment, target.custom_credential) == ("sk-o", "credential_override", True)


def test_override_prefers_the_requested_slug(stage):
    target = one(stage, "gpt-test-alias", credential_override={
        "mock-ok": {"api_key": "sk-model"}, "mock/mock-ok": {"api_key": "sk-slug"},
        "gpt-test-alias": {"api_key": "sk-requested"}})
    assert target.api_key == "sk-requested"
    target = one(stage, "gpt-test-alias", credential_override={
        "mock-ok": {"api_key": "sk-model"}, "mock/mock-ok": {"api_key": "sk-slug"}})
    assert target.api_key == "sk-slug"


def test_override_for_another_model_does_not_apply(stage):
    target = one(stage, "gpt-test", credential_override={"gpt-4": {"api_key": "sk-o"}})
    assert (target.api_key, target.custom_credential) == ("sk-mock", False)


def test_override_slug_with_a_provider_alias(stage):
    target = one(stage, "together_ai/some-model", credential_override={"together/some-model": {"api_key": "sk-t"}})
    assert target.api_key == "sk-t"


def test_override_base_url_and_its_aliases(stage):
    for field in ("api_base", "base_url", "endpoint"):
        target = one(stage, "gpt-test", credential_override={"gpt-test": {"api_key": "sk-o", field: "https://o.example/v1"}})
        assert target.base_url == "https://o.example/v1"


def test_custom_base_url_never_receives_the_configured_key(stage):
    target = one(stage, "gpt-test", credential_override={"gpt-test": {"api_base": "https://elsewhere.example/v1"}})
    assert target.base_url == "https://elsewhere.example/v1"
    assert target.api_key is None


def test_custom_key_without_base_url_goes_to_the_providers_base_url(stage):
    # pool's model-table target carries its first deployment; a customer key goes to the provider's own URL
    target = one(stage, "pool/m-c", customer_credentials={"pool": {"api_key": "sk-c"}})
    assert target.base_url == "https://pool.example/v1"


# customer_credentials


def test_shape_a_provider_dict(stage):
    target = one(stage, "gpt-3.5-turbo", customer_credentials={"openai": {"api_key": "sk-a"}, "mock": {"api_key": "x"}})
    assert (target.api_key, target.deployment, target.custom_credential) == ("sk-a", "customer_credentials", True)
    assert len(planned(stage, "gpt-3.5-turbo", customer_credentials={"openai": {"api_key": "sk-a"}})) == 1


def test_shape_a_for_another_provider_leaves_the_configured_deployments(stage):
    plan = planned(stage, "gpt-3.5-turbo", customer_credentials={"anthropic": {"api_key": "sk-x"}, "mock": {"api_key": "y"}})
    assert sorted(t.deployment for t in plan) == ["d1", "d2", "d3"]


def test_provider_ids_match_through_catalog_aliases(stage):
    target = one(stage, "together_ai/some-model", customer_credentials={"together": {"api_key": "sk-tg"}})
    assert target.api_key == "sk-tg"
    # the exact id wins over an alias, whatever the order
    for creds in ({"together": {"api_key": "sk-alias"}, "together_ai": {"api_key": "sk-id"}},
                  {"together_ai": {"api_key": "sk-id"}, "together": {"api_key": "sk-alias"}}):
        assert one(stage, "together_ai/x", customer_credentials=creds).api_key == "sk-id"


SHAPE_B = [
    {"credentials": {"openai": {"api_key": "k1"}}, "weight": 1.0,
     "available_models": ["gpt-3.5-turbo"], "exclude_models": ["gpt-4"]},
    {"credentials": {"openai": {"api_key": "k2"}}, "weight": 1.0},
]


def test_shape_b_available_and_excluded_models(stage):
    stage.random = iter([0.1, 0.9] * 50).__next__
    keys = collections.Counter(one(stage, "gpt-3.5-turbo", customer_credentials=SHAPE_B).api_key for _ in range(100))
    assert keys == {"k1": 50, "k2": 50}
    stage.random = lambda: 0.0
    assert {one(stage, "gpt-4", customer_credentials=SHAPE_B).api_key for _ in range(20)} == {"k2"}
    target = one(stage, "gpt-4", customer_credentials=SHAPE_B)
    assert (target.deployment, target.custom_credential) == ("customer_credentials[1]", True)


def test_shape_b_without_an_entry_for_the_model_falls_through(stage):
    creds = [{"credentials": {"openai": {"api_key": "k1"}}, "available_models": ["gpt-3.5-turbo"]}]
    plan = planned(stage, "gpt-4", customer_credentials=creds)
    assert sorted(t.deployment for t in plan) == ["d1", "d2", "d3"]


def test_shape_b_weights_are_proportional(stage):
    stage.random = random.Random(1).random
    creds = [{"credentials": {"openai": {"api_key": "k1"}}, "weight": 1},
             {"credentials": {"openai": {"api_key": "k2"}}, "weight": 3},
             {"credentials": {"mock": {"api_key": "k3"}}, "weight": 100}]  # other provider: not a candidate
    counts = collections.Counter(one(stage, "gpt-4", customer_credentials=creds).api_key for _ in range(4000))
    assert chi_square(counts, {"k1": 1, "k2": 3}) < CHI2_001[1]


def test_shape_c_weighted_list_per_provider(stage):
    stage.random = random.Random(2).random
    creds = {"openai": [{"weight": 1.0, "credentials": {"api_key": "k1"}}, {"weight": 2.0, "credentials": {"api_key": "k2"}}]}
    counts = collections.Counter(one(stage, "gpt-4", customer_credentials=creds).api_key for _ in range(3000))
    assert chi_square(counts, {"k1": 1, "k2": 2}) < CHI2_001[1]
    names = {one(stage, "gpt-4", customer_credentials=creds).deployment for _ in range(50)}
    assert names == {"customer_credentials.openai[0]", "customer_credentials.openai[1]"}


def test_shape_c_names_the_configured_provider_id(stage):
    target = one(stage, "together_ai/x", customer_credentials={"together": [{"credentials": {"api_key": "k"}}]})
    assert target.deployment == "customer_credentials.together_ai[0]"


def test_customer_api_keys_match_requested_name_or_model(stage):
    assert one(stage, "gpt-test-alias", customer_api_keys={"gpt-test-alias": "sk-l"}).api_key == "sk-l"
    assert one(stage, "gpt-test-alias", customer_api_keys={"mock-ok": "sk-m"}).api_key == "sk-m"
    assert one(stage, "gpt-test", customer_api_keys={"gpt-4": "sk-x"}).api_key == "sk-mock"


# invalid shapes: 422 naming the field, never the secret

SECRET = "sk-customer-secret-0123456789"

INVALID: list[tuple[dict[str, Any], str]] = [
    ({"customer_credentials": [{"credentials": {"openai": {"api_key": SECRET}}, "weight": 1},
                               {"credentials": {"openai": {"api_key": SECRET}}, "weight": 0}]},
     "customer_credentials[1].weight"),
    ({"customer_credentials": [{"credentials": {"openai": {"api_key": SECRET}}, "weight": -2}]},
     "customer_credentials[0].weight"),
    ({"customer_credentials": [{"credentials": {"openai": {"api_key": SECRET}}, "weight": True}]},
     "customer_credentials[0].weight"),
    ({"customer_credentials": [{"credentials": {"openai": {"api_key": SECRET}}, "weight": "1"}]},
     "customer_credentials[0].weight"),
    ({"customer_credentials": [SECRET]}, "customer_credentials[0]"),
    ({"customer_credentials": [{"weight": 1}]}, "customer_credentials[0].credentials"),
    ({"customer_credentials": [{"credentials": {}}]}, "customer_credentials[0].credentials"),
    ({"customer_credentials": [{"credentials": {"openai": SECRET}}]}, "customer_credentials[0].credentials.openai"),
    ({"customer_credentials": [{"credentials": {"openai": {"api_key": 42}}}]},
     "customer_credentials[0].credentials.openai.api_key"),
    ({"customer_credentials": [{"credentials": {"openai": {"api_key": SECRET}}, "available_models": "gpt-4"}]},
     "customer_credentials[0].available_models"),
    ({"customer_credentials": [{"credentials": {"openai": {"api_key": SECRET}}, "exclude_models": [1]}]},
     "customer_credentials[0].exclude_models"),
    ({"customer_credentials": {"openai": SECRET}}, "customer_credentials.openai"),
    ({"customer_credentials": {"openai": {}}}, "customer_credentials.openai"),
    ({"customer_credentials": {"openai": {"api_key": SECRET + "\nX-Injected: 1"}}}, "customer_credentials.openai.api_key"),
    ({"customer_credentials": {"openai": {"api_key": "  "}}}, "customer_credentials.openai.api_key"),
    ({"customer_credentials": {"openai": {"api_key": SECRET, "api_base": "ftp://x.example"}}},
     "customer_credentials.openai.api_base"),
    ({"customer_credentials": {"openai": {"api_key": SECRET, "base_url": f"https://{SECRET}@x.example/v1"}}},
     "customer_credentials.openai.base_url"),
    ({"customer_credentials": {"openai": [{"weight": 0, "credentials": {"api_key": SECRET}}]}},
     "customer_credentials.openai[0].weight"),
    ({"customer_credentials": {"openai": [{"weight": 1}]}}, "customer_credentials.openai[0].credentials"),
    ({"customer_credentials": {"openai": [SECRET]}}, "customer_credentials.openai[0]"),
    ({"customer_credentials": {"unknown-provider": {"api_key": 5}}}, "customer_credentials.unknown-provider.api_key"),
    ({"credential_override": {"gpt-test": {"api_key": SECRET, "api_base": "not a url"}}},
     "credential_override.gpt-test.api_base"),
    ({"credential_override": {"gpt-test": {"api_key": ["x"]}}}, "credential_override.gpt-test.api_key"),
    ({"customer_api_keys": {"gpt-test": ""}}, "customer_api_keys.gpt-test"),
]


@pytest.mark.parametrize(("params", "field"), INVALID, ids=[f for _, f in INVALID])
def test_invalid_shapes_are_422_naming_the_field(stage, params, field):
    try:
        call = make_call("gpt-test", **params)
    except ParamsError as exc:  # the core's typed params already refuse it (also a 422 naming the field)
        assert exc.field == field and SECRET not in str(exc)
        return
    with pytest.raises(ValidationFailed) as info:
        stage.plan(call)
    assert info.value.status == 422
    assert info.value.field == field
    body = orjson.loads(info.value.body())
    assert body["detail"] == "Validation error" and list(body["errors"]) == [field]
    assert SECRET not in info.value.body().decode()
    assert call.plan == [] and call.target is None  # nothing half-applied


def test_invalid_load_balance_credentials_are_422(stage):
    routed = msgspec.structs.replace(stage.models.resolve("gpt-test"), credentials={"api_key": 7})
    call = make_call("gpt-test")
    call.plan = [routed]
    with pytest.raises(ValidationFailed) as info:
        stage.plan(call)
    assert info.value.field == "load_balance.credentials.api_key"


# configured deployments


def test_deployment_weights_order_the_plan(stage):
    stage.random = random.Random(3).random
    firsts = collections.Counter(planned(stage, "gpt-3.5-turbo")[0].deployment for _ in range(6000))
    assert chi_square(firsts, {"d1": 1, "d2": 2, "d3": 3}) < CHI2_001[2]
    plan = planned(stage, "gpt-3.5-turbo")
    assert all(not t.custom_credential and t.base_url == "https://openai.example/v1" for t in plan)
    assert {t.deployment_key for t in plan} == {"openai/d1", "openai/d2", "openai/d3"}


def test_deployment_models_and_exclude_models(stage):
    def deployments(model: str) -> set[str]:
        return {t.deployment for t in planned(stage, model)}

    assert deployments("pool/m-a") == {"only-a", "not-b", "all"}
    assert deployments("pool/m-b") == {"all"}
    assert deployments("pool/m-c") == {"not-b", "all"}
    by_name = {t.deployment: t for t in planned(stage, "pool/m-c")}
    # a deployment inherits the provider's key and base_url where it has none
    assert (by_name["not-b"].api_key, by_name["not-b"].base_url) == ("sk-pool-default", "https://not-b.example/v1")
    assert (by_name["all"].api_key, by_name["all"].base_url) == ("sk-all", "https://pool.example/v1")


def test_no_deployment_serving_the_model_is_404():
    settings = parse_settings({"providers": [{"id": "p", "protocol": "openai", "base_url": "https://p.example",
                                              "deployments": [{"name": "a", "api_key": "sk-a", "models": ["m"]}]}],
                               "auto_providers": False}, "test")
    table = ModelTable(settings, load_catalog())
    narrow = create_stage(StageContext("credentials", {}, settings, table, {}))
    call = make_call("p/other")
    with pytest.raises(NotFound) as info:
        narrow.plan(call)
    assert "sk-a" not in info.value.detail and "'p'" in info.value.detail
    call = make_call("p/m")
    narrow.plan(call)
    assert (call.target.deployment, call.target.api_key) == ("a", "sk-a")


def cooldowns() -> Cooldowns:
    return Cooldowns(CooldownPolicy(), Metrics())


def test_cooling_deployment_moves_last():
    cool = cooldowns()
    stage = make_stage(cool)
    cool.enter("openai/d3", time.time() + 60)  # the heaviest one
    seen_first = set()
    for _ in range(300):
        plan = planned(stage, "gpt-3.5-turbo")
        assert [t.deployment for t in plan][-1] == "d3"
        assert len(plan) == 3  # cooled, not dropped
        seen_first.add(plan[0].deployment)
    assert seen_first == {"d1", "d2"}
    cool.enter("openai/d1", time.time() + 30)  # back sooner than d3: tried before it
    for _ in range(50):
        assert [t.deployment for t in planned(stage, "gpt-3.5-turbo")] == ["d2", "d1", "d3"]


def test_the_only_deployment_is_still_used_when_cooling():
    cool = cooldowns()
    stage = make_stage(cool)
    cool.enter("single/lonely", time.time() + 60)
    cool.enter("mock/mock", time.time() + 60)
    assert [(t.deployment, t.api_key) for t in planned(stage, "single/m")] == [("lonely", "sk-lonely")]
    assert planned(stage, "gpt-test") == [stage.models.resolve("gpt-test")]


def test_expired_cooldown_is_back_in_rotation():
    cool = cooldowns()
    stage = make_stage(cool)
    cool.enter("openai/d3", time.time() - 1)
    stage.random = random.Random(4).random
    firsts = collections.Counter(planned(stage, "gpt-3.5-turbo")[0].deployment for _ in range(600))
    assert firsts["d3"] > 150


def test_deployment_names_never_hold_a_secret(stage):
    for params in ({"credential_override": {"gpt-4": {"api_key": SECRET}}},
                   {"customer_credentials": {"openai": {"api_key": SECRET}}},
                   {"customer_credentials": [{"credentials": {"openai": {"api_key": SECRET}}}]},
                   {"customer_credentials": {"openai": [{"credentials": {"api_key": SECRET}}]}},
                   {"customer_api_keys": {"gpt-4": SECRET}}):
        target = one(stage, "gpt-4", **params)
        assert target.api_key == SECRET
        assert SECRET not in (target.deployment or "") and SECRET not in target.deployment_key


# -- end to end: real gateway processes -------------------------------------------------------

DEPLOYMENT_KEYS = {"sk-dep-1": 1, "sk-dep-2": 2, "sk-dep-3": 3}


def e2e_config(mock: MockUpstream, workdir: Any) -> dict[str, Any]:
    return base_config(
        mock, workdir,
        providers=[
            {"id": "mock", "protocol": "openai", "base_url": mock.base_url, "api_key": UPSTREAM_KEY},
            {"id": "openai", "base_url": mock.base_url, "deployments": [
                {"name": f"d{i}", "api_key": key, "weight": weight}
                for i, (key, weight) in enumerate(DEPLOYMENT_KEYS.items(), 1)]},
            {"id": "pool", "protocol": "openai", "base_url": mock.base_url, "api_key": "sk-pool-default",
             "deployments": [
                 {"name": "only-a", "api_key": "sk-a", "models": ["m-a"]},
                 {"name": "not-b", "exclude_models": ["m-b"]},
                 {"name": "all", "api_key": "sk-all"},
             ]},
            {"id": "demo", "protocol": "demo"},
        ],
        models=[
            {"name": "gpt-test", "provider": "mock", "model": "mock-ok", "aliases": ["gpt-test-alias"]},
            {"name": "gpt-3.5-turbo", "provider": "openai", "model": "gpt-3.5-turbo"},
            {"name": "gpt-4", "provider": "openai", "model": "gpt-4"},
        ],
        keys=[{"name": "tests", "key_hash": hash_key(KEY)}],
        pipeline=["auth", "credentials"],
    )


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    yield from module_gateway(tmp_path_factory, "credentials", config=lambda workdir: e2e_config(mock_upstream, workdir))


@pytest.fixture(scope="module")
def client(gw: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as c:
        yield c


def chat(client: httpx.Client, model: str, headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **params}
    return client.post("/api/chat/completions", content=orjson.dumps(body),
                       headers={"Content-Type": "application/json", **(headers or {})})


def sent_key(mock: MockUpstream) -> str:
    authorization = mock.last()["headers"]["Authorization"]
    assert authorization.startswith("Bearer ")
    return authorization.removeprefix("Bearer ")


def key_for(client: httpx.Client, mock: MockUpstream, model: str, **params: Any) -> str:
    response = chat(client, model, **params)
    assert response.status_code == 200, response.text
    return sent_key(mock)


def test_e2e_default_deployment_and_its_log(gw, client, mock):
    response = chat(client, "gpt-test")
    assert response.status_code == 200
    assert sent_key(mock) == UPSTREAM_KEY
    assert response.headers["x-llmrelay-deployment"] == "mock"
    record = gw.record(response.headers["x-respan-log-id"])
    assert (record["deployment_name"], record["used_custom_credential"]) == ("mock", False)


def test_e2e_each_level_wins_over_the_next(gw, client, mock):
    levels: list[tuple[str, Any, str, str]] = [
        ("credential_override", {"gpt-test": {"api_key": "sk-o"}}, "sk-o", "credential_override"),
        ("customer_credentials", {"mock": {"api_key": "sk-c"}}, "sk-c", "customer_credentials"),
        ("customer_api_keys", {"gpt-test": "sk-l"}, "sk-l", "customer_api_keys"),
    ]
    for i, (_, _, key, deployment) in enumerate(levels):
        params = {name: value for name, value, _, _ in levels[i:]}
        response = chat(client, "gpt-test", **params)
        assert response.status_code == 200, response.text
        assert sent_key(mock) == key
        assert response.headers["x-llmrelay-deployment"] == deployment
        record = gw.record(response.headers["x-respan-log-id"])
        assert (record["deployment_name"], record["used_custom_credential"]) == (deployment, True)
    assert key_for(client, mock, "gpt-test") == UPSTREAM_KEY


def test_e2e_override_by_requested_slug(client, mock):
    assert key_for(client, mock, "gpt-test-alias", credential_override={"gpt-test-alias": {"api_key": "sk-alias"}}) == "sk-alias"
    assert key_for(client, mock, "gpt-test-alias", credential_override={"mock/mock-ok": {"api_key": "sk-slug"}}) == "sk-slug"
    assert key_for(client, mock, "gpt-test", credential_override={"gpt-4": {"api_key": "sk-other"}}) == UPSTREAM_KEY


def test_e2e_override_api_base_sends_to_that_endpoint(client, mock):
    other = MockUpstream().start()
    try:
        response = chat(client, "gpt-test", credential_override={"gpt-test": {"api_key": "sk-own", "api_base": other.base_url}})
        assert response.status_code == 200, response.text
        assert mock.requests == []
        assert other.last()["headers"]["Authorization"] == "Bearer sk-own"
        # a base URL without a key: no key is sent, never the gateway's own
        response = chat(client, "gpt-test", credential_override={"gpt-test": {"base_url": other.base_url}})
        assert response.status_code == 200, response.text
        assert "Authorization" not in other.last()["headers"]
        assert mock.requests == []
    finally:
        other.stop()


def test_e2e_params_from_respan_params_and_header(client, mock):
    creds = {"customer_credentials": {"mock": {"api_key": "sk-nested"}}}
    assert key_for(client, mock, "gpt-test", respan_params=creds) == "sk-nested"
    header = base64.b64encode(orjson.dumps({"customer_credentials": {"mock": {"api_key": "sk-header"}}})).decode()
    response = chat(client, "gpt-test", headers={"X-Data-Respan-Params": header})
    assert response.status_code == 200 and sent_key(mock) == "sk-header"


def test_e2e_shape_a_with_the_openai_sdk_streaming(gw, mock):
    sdk = OpenAI(api_key=KEY, base_url=f"{gw.url}/api")
    stream = sdk.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], stream=True,
                                         extra_body={"customer_credentials": {"openai": {"api_key": "sk-sdk"}}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    assert sent_key(mock) == "sk-sdk"
    completion = sdk.chat.completions.with_raw_response.create(
        model="gpt-4", messages=[{"role": "user", "content": "hi"}],
        extra_body={"customer_credentials": {"openai": {"api_key": "sk-sdk-2"}}})
    assert sent_key(mock) == "sk-sdk-2"
    record = gw.record(completion.headers["x-respan-log-id"])
    assert (record["deployment_name"], record["used_custom_credential"]) == ("customer_credentials", True)


def test_e2e_shape_b_splits_by_available_and_excluded_models(gw, client, mock):
    counts = collections.Counter(key_for(client, mock, "gpt-3.5-turbo", customer_credentials=SHAPE_B) for _ in range(200))
    assert set(counts) == {"k1", "k2"}
    assert chi_square(counts, {"k1": 1, "k2": 1}) < CHI2_001[1]
    assert {key_for(client, mock, "gpt-4", customer_credentials=SHAPE_B) for _ in range(40)} == {"k2"}
    response = chat(client, "gpt-4", customer_credentials=SHAPE_B)
    record = gw.record(response.headers["x-respan-log-id"])
    assert (record["deployment_name"], record["used_custom_credential"]) == ("customer_credentials[1]", True)


def test_e2e_shape_c_weighted(gw, client, mock):
    creds = {"openai": [{"weight": 1.0, "credentials": {"api_key": "k1"}}, {"weight": 2.0, "credentials": {"api_key": "k2"}}]}
    counts = collections.Counter(key_for(client, mock, "gpt-4", customer_credentials=creds) for _ in range(300))
    assert chi_square(counts, {"k1": 1, "k2": 2}) < CHI2_001[1]
    response = chat(client, "gpt-4", customer_credentials=creds)
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["deployment_name"] in ("customer_credentials.openai[0]", "customer_credentials.openai[1]")
    assert record["used_custom_credential"] is True


def test_e2e_configured_deployment_weights(gw, client, mock):
    counts = collections.Counter(key_for(client, mock, "gpt-3.5-turbo") for _ in range(300))
    assert chi_square(counts, DEPLOYMENT_KEYS) < CHI2_001[2]
    response = chat(client, "gpt-3.5-turbo")
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["deployment_name"] in ("d1", "d2", "d3") and record["used_custom_credential"] is False
    assert response.headers["x-llmrelay-deployment"] == record["deployment_name"]


def test_e2e_deployment_models_and_exclude_models(client, mock):
    assert {key_for(client, mock, "pool/m-b") for _ in range(20)} == {"sk-all"}
    keys_c = {key_for(client, mock, "pool/m-c") for _ in range(40)}
    assert keys_c == {"sk-pool-default", "sk-all"}  # not-b inherits the provider's key; only-a serves m-a only
    keys_a = {key_for(client, mock, "pool/m-a") for _ in range(60)}
    assert keys_a == {"sk-a", "sk-pool-default", "sk-all"}


@pytest.mark.parametrize(("params", "field"), [INVALID[i] for i in (0, 4, 11, 13, 17, 21)],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_e2e_invalid_shapes_are_422(gw, client, mock, params, field):
    response = chat(client, "gpt-test", **params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == "Validation error"
    assert list(response.json()["errors"]) == [field]
    assert SECRET not in response.text
    assert mock.requests == []
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 422
    assert SECRET not in orjson.dumps(record).decode()


def test_e2e_customer_keys_never_leak(gw, client, mock):
    secret = f"sk-leak-check-{uuid.uuid4().hex}"
    requests: list[dict[str, Any]] = [
        {"credential_override": {"gpt-test": {"api_key": secret}}},
        {"customer_credentials": {"mock": {"api_key": secret}}},
        {"customer_credentials": [{"credentials": {"mock": {"api_key": secret}}, "weight": 2}]},
        {"customer_credentials": {"mock": [{"weight": 1, "credentials": {"api_key": secret}}]}},
        {"customer_api_keys": {"gpt-test": secret}},
        {"customer_credentials": {"mock": {"api_key": secret}}, "stream": True},
        {"customer_credentials": {"mock": {"api_key": secret}}, "metadata": {"note": "leak check"}},
    ]
    log_ids = []
    for params in requests:
        response = chat(client, "gpt-test", **params)
        assert response.status_code == 200, response.text
        assert sent_key(mock) == secret  # it did reach the provider...
        assert secret not in str(response.headers)  # ...and nothing else
        assert secret not in response.text
        log_ids.append(response.headers["x-respan-log-id"])
    for log_id in log_ids:
        record = gw.record(log_id)
        assert record["used_custom_credential"] is True
        assert secret not in orjson.dumps(record).decode()
    jsonl = gw.workdir / "logs.jsonl"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (jsonl.exists() and log_ids[-1] in jsonl.read_text()):
        time.sleep(0.05)
    assert log_ids[-1] in jsonl.read_text()
    metrics = client.get("/metrics").text
    assert "llmrelay_requests" in metrics
    assert secret not in metrics
    stored = [p for p in gw.workdir.rglob("*") if p.is_file()]
    assert any(p.name.startswith("logs.db") for p in stored)
    for path in stored:  # the SQLite files (WAL included), the JSONL, the spool, the process output
        assert secret.encode() not in path.read_bytes(), path
