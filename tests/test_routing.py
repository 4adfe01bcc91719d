"""The `routing` stage: model resolution, X-Respan-Route-Provider, load balancing, the router list,
and the plan of candidates (spec 3.1 and section 4 step 7).

Unit tests call the stage directly with a fake `next`; end-to-end tests run real gateway processes
in front of the mock provider and check what the mock received, the response headers and the log.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from plugins.routing import NO_MODEL, RoutingStage, create_stage
from proxy.call import Call, Reply
from proxy.catalog import load_catalog
from proxy.errors import BadRequest, ModelNotFound
from proxy.model_table import ModelTable
from proxy.params import ParamsError, split_params, to_params
from proxy.pipeline import StageContext, load_stages
from proxy.settings import ConfigError, parse_settings
from tests.conftest import KEY, UPSTREAM_KEY, GatewayProcess, base_config
from tests.mock_upstream import MockUpstream

HI = [{"role": "user", "content": "hi"}]
MOCKB_KEY = "sk-upstream-mockb-0987654321"
CHI2_CRITICAL_2DOF_P001 = 13.82

GROUPS = {
    "g1": [
        {"model": "mock/mock-a", "weight": 1},
        {"model": "mock/mock-b", "weight": 2, "credentials": {"api_key": "sk-lb-entry"}},
    ],
    "weighted": [
        {"model": "mock/mock-a", "weight": 1},
        {"model": "mock/mock-b", "weight": 2},
        {"model": "mock/mock-c", "weight": 3},
    ],
    "solo": [{"model": "gpt-test", "weight": 5, "credentials": {"api_key": "sk-solo"}}],
}
OPTIONS = {"load_balance_groups": GROUPS, "route_provider_aliases": {"backup": "mockb", "Second": "MOCKB"}}


def providers(base_url: str) -> list[dict[str, Any]]:
    return [
        {"id": "mock", "protocol": "openai", "base_url": base_url, "api_key": UPSTREAM_KEY},
        {"id": "mockb", "protocol": "openai", "base_url": base_url, "api_key": MOCKB_KEY},
        {"id": "openai", "base_url": base_url, "api_key": UPSTREAM_KEY},  # a catalog id, pointed at the mock
        {"id": "demo", "protocol": "demo"},
    ]


MODELS = [
    {"name": "gpt-test", "provider": "mock", "model": "mock-ok", "aliases": ["gpt-test-alias"]},
    {"name": "b-model", "provider": "mockb", "model": "mock-bee"},
]
ALIASES = {"fast": "gpt-test", "fast2": "fast", "slugged": "mockb/mock-c", "bee": "b-model"}


def routing_config(mock: MockUpstream, workdir: Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    return base_config(
        mock, workdir,
        providers=providers(mock.base_url),
        models=MODELS,
        aliases=ALIASES,
        pipeline=["auth", {"name": "routing", "options": OPTIONS if options is None else options}],
    )


# ======================================================================================
# Unit tests: the stage called directly
# ======================================================================================


def make_stage(options: dict[str, Any] | None = None) -> RoutingStage:
    raw = {"providers": providers("http://127.0.0.1:9/v1"), "models": MODELS, "aliases": ALIASES,
           "auto_providers": False}
    settings = parse_settings(raw, "<test>", env={})
    models = ModelTable(settings, load_catalog())
    return create_stage(StageContext("routing", OPTIONS if options is None else options, settings, models))


@pytest.fixture(scope="module")
def stage() -> RoutingStage:
    return make_stage()


def make_call(params: dict[str, Any] | None = None, model: str | None = None,
              headers: dict[str, str] | None = None) -> Call:
    body: dict[str, Any] = {"messages": HI}
    if model is not None:
        body["model"] = model
    return Call(endpoint="chat", path="/api/chat/completions", body=body,
                params=to_params(dict(params or {})), headers=headers or {})


async def _ok(call: Call) -> Reply:
    return Reply(200, body=b"{}")


def run(stage: RoutingStage, call: Call) -> Call:
    reply = asyncio.run(stage(call, _ok))
    assert reply.status == 200
    assert call.target is call.plan[0]
    return call


def plan(call: Call) -> list[tuple[str, str]]:
    return [(t.provider, t.model) for t in call.plan]


def test_model_alone_is_a_plan_of_one(stage):
    call = run(stage, make_call(model="gpt-test"))
    assert plan(call) == [("mock", "mock-ok")]
    assert call.target.requested == "gpt-test"
    assert call.target.credentials is None and call.target.group_id is None
    assert call.routing_time > 0
    assert call.warnings == []


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("gpt-test", ("mock", "mock-ok")),
        ("gpt-test-alias", ("mock", "mock-ok")),
        ("fast", ("mock", "mock-ok")),  # config alias -> model
        ("fast2", ("mock", "mock-ok")),  # alias -> alias -> model
        ("slugged", ("mockb", "mock-c")),  # alias -> provider/model slug
        ("bee", ("mockb", "mock-bee")),
        ("mock/mock-a", ("mock", "mock-a")),
        ("mockb/mock-a", ("mockb", "mock-a")),
        ("mock-ok", ("mock", "mock-ok")),  # a configured model's bare upstream name
    ],
)
def test_resolution(stage, requested, expected):
    call = run(stage, make_call(model=requested))
    assert plan(call) == [expected]
    assert call.target.requested == requested


def test_unknown_model_is_404(stage):
    with pytest.raises(ModelNotFound) as info:
        run(stage, make_call(model="nope"))
    assert info.value.status == 404
    assert info.value.detail == "Requested model nope is not available in the model list"


def test_no_model_at_all_is_400(stage):
    with pytest.raises(BadRequest) as info:
        run(stage, make_call())
    assert info.value.status == 400
    assert info.value.detail == NO_MODEL
    assert info.value.detail == ("Invalid request format: `model` is required (or `models`, "
                                 "`load_balance_group`, `load_balance_models`)")


def test_empty_lists_count_as_absent(stage):
    with pytest.raises(BadRequest):
        run(stage, make_call({"models": [], "load_balance_models": []}))


# -- precedence ------------------------------------------------------------------------


def test_model_wins_over_everything(stage):
    call = run(stage, make_call({
        "load_balance_group": {"group_id": "solo"},
        "load_balance_models": [{"model": "mock/mock-x", "weight": 1}],
        "loadbalance_models": [{"model": "mock/mock-y", "weight": 1}],
    }, model="b-model"))
    assert plan(call) == [("mockb", "mock-bee")]
    assert call.target.group_id is None and call.target.credentials is None


def test_group_wins_over_load_balance_models(stage):
    call = run(stage, make_call({
        "load_balance_group": {"group_id": "solo"},
        "load_balance_models": [{"model": "mock/mock-x", "weight": 1}],
    }))
    assert plan(call) == [("mock", "mock-ok")]
    assert call.target.group_id == "solo"
    assert call.target.credentials == {"api_key": "sk-solo"}
    assert call.target.requested == "gpt-test"
    assert call.model == "gpt-test"  # the chosen model stands for `model` from here on


def test_load_balance_models_win_over_the_deprecated_spelling(stage):
    call = run(stage, make_call({
        "load_balance_models": [{"model": "mock/mock-x", "weight": 1, "credentials": {"api_key": "k"}}],
        "loadbalance_models": [{"model": "mock/mock-y", "weight": 1}],
        "models": ["b-model", "gpt-test"],
    }))
    assert call.plan[0].model == "mock-x"
    assert call.plan[0].credentials == {"api_key": "k"}
    assert call.plan[0].group_id is None


def test_deprecated_loadbalance_models(stage):
    call = run(stage, make_call({"loadbalance_models": [{"model": "mock/mock-y", "weight": 3}]}))
    assert plan(call) == [("mock", "mock-y")]


def test_lb_wins_over_the_router_and_models_become_extras(stage):
    call = run(stage, make_call({
        "load_balance_models": [{"model": "mock/mock-x", "weight": 1}],
        "models": ["b-model", "mock/mock-x"],
        "exclude_models": ["b-model"],  # router-only: no effect here
    }))
    assert plan(call) == [("mock", "mock-x"), ("mockb", "mock-bee")]


def test_inline_group_models_replace_the_configured_list(stage):
    call = run(stage, make_call({"load_balance_group": {
        "group_id": "solo", "models": [{"model": "mockb/mock-z", "weight": 1}]}}))
    assert plan(call) == [("mockb", "mock-z")]
    assert call.target.group_id == "solo"
    assert call.target.credentials is None


def test_inline_group_models_need_no_configured_group(stage):
    call = run(stage, make_call({"load_balance_group": {
        "group_id": "adhoc", "models": [{"model": "mockb/mock-z", "weight": 1, "credentials": {"api_key": "c"}}]}}))
    assert plan(call) == [("mockb", "mock-z")]
    assert call.target.group_id == "adhoc"
    assert call.target.credentials == {"api_key": "c"}


def test_unknown_group_is_400_naming_it_and_the_configured_ones(stage):
    with pytest.raises(BadRequest) as info:
        run(stage, make_call({"load_balance_group": {"group_id": "nope"}}))
    assert info.value.detail == ("Invalid request format: load_balance_group 'nope' is not configured "
                                 "(configured groups: g1, solo, weighted)")


def test_unknown_model_in_an_inline_lb_list_is_404(stage):
    with pytest.raises(ModelNotFound):
        run(stage, make_call({"load_balance_models": [{"model": "nope", "weight": 1}]}))


def test_lb_weight_zero_is_rejected_by_param_validation():
    with pytest.raises(ParamsError) as info:
        split_params({"load_balance_models": [{"model": "a", "weight": 0}]})
    assert info.value.field == "load_balance_models[0].weight"
    with pytest.raises(ParamsError) as info:
        split_params({"load_balance_group": {"group_id": "g1", "models": [{"model": "a", "weight": -1}]}})
    assert info.value.field == "load_balance_group.models[0].weight"


# -- weighted choice ----------------------------------------------------------------------


def chi_square(observed: Counter, expected: dict[str, float]) -> float:
    total = sum(observed.values())
    weight_sum = sum(expected.values())
    return sum((observed[k] - total * w / weight_sum) ** 2 / (total * w / weight_sum) for k, w in expected.items())


def test_configured_group_weights(stage):
    counts: Counter = Counter()
    for _ in range(6000):
        call = make_call({"load_balance_group": {"group_id": "weighted"}})
        stage.route(call)
        counts[call.target.model] += 1
        assert call.target.group_id == "weighted"
    assert set(counts) == {"mock-a", "mock-b", "mock-c"}
    assert chi_square(counts, {"mock-a": 1, "mock-b": 2, "mock-c": 3}) < CHI2_CRITICAL_2DOF_P001


def test_inline_weights(stage):
    lb = [{"model": "mock/mock-a", "weight": 0.5}, {"model": "mock/mock-b", "weight": 1.5}]
    counts: Counter = Counter()
    for _ in range(4000):
        call = make_call({"load_balance_models": lb})
        stage.route(call)
        counts[call.target.model] += 1
    assert chi_square(counts, {"mock-a": 0.5, "mock-b": 1.5}) < 10.83  # 1 d.o.f., p = 0.001


# -- the router list ----------------------------------------------------------------------


def test_router_single_entry_acts_as_model(stage):
    call = run(stage, make_call({"models": ["b-model"], "exclude_models": ["b-model"],
                                 "exclude_providers": ["mockb"]}))
    assert plan(call) == [("mockb", "mock-bee")]
    assert call.model == "b-model"


def test_router_takes_the_first_entry_and_the_rest_as_extras(stage):
    call = run(stage, make_call({"models": ["b-model", "gpt-test", "mock/mock-a"]}))
    assert plan(call) == [("mockb", "mock-bee"), ("mock", "mock-ok"), ("mock", "mock-a")]
    assert call.model == "b-model"


def test_router_exclude_models(stage):
    call = run(stage, make_call({"models": ["b-model", "gpt-test", "mock/mock-a"],
                                 "exclude_models": ["b-model", "mock-a"]}))  # by name or by upstream name
    assert plan(call) == [("mock", "mock-ok")]


def test_router_exclude_providers(stage):
    call = run(stage, make_call({"models": ["b-model", "slugged", "gpt-test", "openai/mock-o"],
                                 "exclude_providers": ["MOCKB", "backup"]}))
    assert plan(call) == [("mock", "mock-ok"), ("openai", "mock-o")]
    call = run(stage, make_call({"models": ["openai/mock-o", "gpt-test"], "exclude_providers": ["openai"]}))
    assert plan(call) == [("mock", "mock-ok")]


def test_router_everything_excluded_is_400(stage):
    with pytest.raises(BadRequest) as info:
        run(stage, make_call({"models": ["b-model", "gpt-test"], "exclude_providers": ["mock", "mockb"]}))
    assert "excluded" in info.value.detail


def test_router_unknown_entries_are_skipped_with_a_warning(stage):
    call = run(stage, make_call({"models": ["nope", "gpt-test"]}))
    assert plan(call) == [("mock", "mock-ok")]
    assert call.warnings == ["models entry 'nope' skipped: not available in the model list"]
    with pytest.raises(ModelNotFound) as info:
        run(stage, make_call({"models": ["nope", "nope2"]}))
    assert "nope " in info.value.detail


def test_exclusions_never_apply_to_model_extras_or_fallbacks(stage):
    call = run(stage, make_call({"models": ["b-model"], "fallback_models": ["slugged"],
                                 "exclude_models": ["gpt-test", "b-model", "slugged"],
                                 "exclude_providers": ["mock", "mockb"]}, model="gpt-test"))
    assert plan(call) == [("mock", "mock-ok"), ("mockb", "mock-bee"), ("mockb", "mock-c")]


# -- the plan ---------------------------------------------------------------------------


def test_plan_order_primary_extras_fallbacks(stage):
    call = run(stage, make_call({"models": ["b-model", "mock/mock-a"], "fallback_models": ["slugged", "mock/mock-f"]},
                                model="gpt-test"))
    assert plan(call) == [("mock", "mock-ok"), ("mockb", "mock-bee"), ("mock", "mock-a"),
                          ("mockb", "mock-c"), ("mock", "mock-f")]
    assert [t.requested for t in call.plan] == ["gpt-test", "b-model", "mock/mock-a", "slugged", "mock/mock-f"]


def test_plan_drops_duplicates_keeping_the_first(stage):
    call = run(stage, make_call({"models": ["gpt-test-alias", "b-model", "fast"],
                                 "fallback_models": ["mock/mock-ok", "bee", "mockb/mock-bee", "mock-ok", "gpt-test"]},
                                model="gpt-test"))
    assert plan(call) == [("mock", "mock-ok"), ("mockb", "mock-bee")]


def test_unresolvable_extras_and_fallbacks_are_skipped_with_warnings(stage):
    call = run(stage, make_call({"models": ["nope-1"], "fallback_models": ["nope-2", "b-model"]}, model="gpt-test"))
    assert plan(call) == [("mock", "mock-ok"), ("mockb", "mock-bee")]
    assert call.warnings == [
        "models entry 'nope-1' skipped: not available in the model list",
        "fallback model 'nope-2' skipped: not available in the model list",
    ]


def test_disable_fallback_keeps_only_the_primary(stage):
    call = run(stage, make_call({"models": ["b-model"], "fallback_models": ["slugged"], "disable_fallback": True},
                                model="gpt-test"))
    assert plan(call) == [("mock", "mock-ok")]


def test_default_fallback_models():
    stage = make_stage({"default_fallback_models": ["b-model", "gpt-test", "mock/mock-d"]})
    call = run(stage, make_call(model="gpt-test"))
    assert plan(call) == [("mock", "mock-ok"), ("mockb", "mock-bee"), ("mock", "mock-d")]
    # a request's own list replaces the default one, even when empty
    call = run(stage, make_call({"fallback_models": ["slugged"]}, model="gpt-test"))
    assert plan(call) == [("mock", "mock-ok"), ("mockb", "mock-c")]
    call = run(stage, make_call({"fallback_models": []}, model="gpt-test"))
    assert plan(call) == [("mock", "mock-ok")]
    call = run(stage, make_call({"disable_fallback": True}, model="gpt-test"))
    assert plan(call) == [("mock", "mock-ok")]
    # extras come before the default list
    call = run(stage, make_call({"models": ["mock/mock-e"]}, model="gpt-test"))
    assert plan(call) == [("mock", "mock-ok"), ("mock", "mock-e"), ("mockb", "mock-bee"), ("mock", "mock-d")]


def test_targets_are_shared_and_never_mutated(stage):
    before = stage.resolve("gpt-test")
    run(stage, make_call({"load_balance_group": {"group_id": "solo"}}))
    run(stage, make_call(model="gpt-test", headers={"x-respan-route-provider": "mockb"}))
    assert stage.resolve("gpt-test") is before
    assert before.credentials is None and before.group_id is None and before.provider == "mock"


# -- X-Respan-Route-Provider ---------------------------------------------------------------


def pinned(stage: RoutingStage, value: str, model: str = "gpt-test", params: dict[str, Any] | None = None) -> Call:
    return run(stage, make_call(params, model=model, headers={"x-respan-route-provider": value}))


@pytest.mark.parametrize("value", ["mockb", "MockB", " mockb ", "backup", "second", "SECOND"])
def test_route_provider_pins_the_primary(stage, value):
    call = pinned(stage, value, params={"fallback_models": ["mock/mock-f"]})
    assert plan(call) == [("mockb", "mock-ok"), ("mock", "mock-f")]  # fallbacks keep their provider
    assert call.target.requested == "gpt-test"
    assert call.target.api_key == MOCKB_KEY


def test_route_provider_on_a_builtin_name(stage):
    assert plan(pinned(stage, "OpenAI", model="b-model")) == [("openai", "mock-bee")]


def test_route_provider_same_provider_is_a_no_op(stage):
    call = pinned(stage, "mock")
    assert call.target is stage.resolve("gpt-test")


def test_route_provider_unknown_value_is_400_listing_the_accepted_ones(stage):
    with pytest.raises(BadRequest) as info:
        pinned(stage, "nowhere")
    detail = info.value.detail
    assert detail.startswith("Invalid request format: X-Respan-Route-Provider 'nowhere' is not a known provider; "
                             "accepted values: ")
    accepted = detail.rpartition("accepted values: ")[2].split(", ")
    for value in ("vertex_ai", "google_vertex_ai", "vertex", "azure", "azure_openai", "bedrock", "aws_bedrock",
                  "openai", "anthropic", "gemini", "google", "groq", "together_ai", "togetherai", "together",
                  "fireworks", "fireworks_ai", "deepseek", "xai", "mistral", "openrouter", "perplexity",
                  "perplexityai", "cerebras", "mock", "mockb", "demo", "backup", "second"):
        assert value in accepted
    assert accepted == sorted(accepted)


@pytest.mark.parametrize("value", ["vertex_ai", "Vertex", "azure", "bedrock", "anthropic", "google"])
def test_route_provider_known_but_unconfigured_is_400(stage, value):
    with pytest.raises(BadRequest) as info:
        pinned(stage, value)
    assert info.value.detail == (
        f"Invalid request format: X-Respan-Route-Provider {value!r} names a provider that is not configured on "
        f"this gateway; configured providers: demo, mock, mockb, openai"
    )


def test_route_provider_does_not_make_an_unknown_model_resolvable(stage):
    with pytest.raises(ModelNotFound):
        pinned(stage, "mockb", model="nope")
    with pytest.raises(ModelNotFound):  # the model is checked before the header
        pinned(stage, "nowhere", model="nope")


def test_route_provider_empty_value_is_ignored(stage):
    assert plan(pinned(stage, " ")) == [("mock", "mock-ok")]


def test_route_provider_on_an_lb_pick_keeps_the_group_and_drops_its_credentials(stage):
    call = pinned(stage, "mockb", model="", params={"load_balance_group": {"group_id": "solo"}})
    assert plan(call) == [("mockb", "mock-ok")]
    assert call.target.group_id == "solo"
    assert call.target.credentials is None
    assert call.warnings == ["load-balance credentials for 'mock' not used: X-Respan-Route-Provider moved the "
                             "request to 'mockb'"]


def test_route_provider_maps_a_builtin_name_to_a_configured_sibling():
    raw = {"providers": [{"id": "azure_openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}],
           "models": [{"name": "m", "provider": "azure_openai"}], "auto_providers": False}
    settings = parse_settings(raw, "<test>", env={})
    stage = create_stage(StageContext("routing", {}, settings, ModelTable(settings, load_catalog())))
    call = run(stage, make_call(model="m", headers={"x-respan-route-provider": "azure"}))
    assert call.target.provider == "azure_openai"


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nope": 1}, "Object contains unknown field `nope`"),
        ({"load_balance_groups": {"g": [{"model": "gpt-test", "weight": 0}]}},
         "load_balance_groups.g[0].weight: Expected `float` > 0.0"),
        ({"load_balance_groups": {"g": [{"model": "gpt-test", "weight": -2}]}},
         "load_balance_groups.g[0].weight: Expected `float` > 0.0"),
        ({"load_balance_groups": {"g": [{"model": "gpt-test"}]}}, "missing required field `weight`"),
        ({"load_balance_groups": {"g": [{"model": "gpt-test", "weight": 1, "extra": 1}]}}, "unknown field `extra`"),
        ({"load_balance_groups": {"g": []}}, "load_balance_groups.g: expected at least one entry"),
        ({"load_balance_groups": {"g": [{"model": "nope", "weight": 1}]}},
         "load_balance_groups.g[0].model: Requested model nope is not available in the model list"),
        ({"default_fallback_models": ["gpt-test", "nope"]},
         "default_fallback_models[1]: Requested model nope is not available in the model list"),
        ({"default_fallback_models": "gpt-test"}, "default_fallback_models: Expected `array`, got `str`"),
        ({"route_provider_aliases": {"x": "vertex_ai"}},
         "route_provider_aliases.x: provider 'vertex_ai' is not configured on this gateway"),
        ({"route_provider_aliases": {"x": "nowhere"}}, "route_provider_aliases.x: provider 'nowhere' is not configured"),
    ],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError) as info:
        make_stage(options)
    assert message in str(info.value)


def test_bad_options_fail_start_up_naming_the_pipeline_entry():
    raw = {"providers": providers("http://127.0.0.1:9/v1"), "models": MODELS, "auto_providers": False,
           "pipeline": ["auth", {"name": "routing", "options": {"load_balance_groups": {"g": [{"model": "gpt-test",
                                                                                                  "weight": 0}]}}}]}
    settings = parse_settings(raw, "cfg.yaml", env={})
    with pytest.raises(ConfigError) as info:
        load_stages(settings, ModelTable(settings, load_catalog()))
    assert str(info.value).startswith("cfg.yaml: $.pipeline[1].options: stage 'routing' rejected its options: "
                                      "load_balance_groups.g[0].weight: Expected `float` > 0.0")


def test_options_are_optional():
    stage = make_stage({})
    assert plan(run(stage, make_call(model="gpt-test"))) == [("mock", "mock-ok")]


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("routing")
    process = GatewayProcess(routing_config(mock_upstream, workdir), workdir).start()
    yield process
    process.stop()


def client(gateway) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/api", api_key=KEY, max_retries=0)


def post(gateway, body: dict[str, Any], headers: dict[str, str] | None = None,
         http: httpx.Client | None = None) -> httpx.Response:
    sender = http or httpx
    return sender.post(f"{gateway.url}/api/chat/completions", json={"messages": HI, **body}, timeout=10,
                       headers={"Authorization": f"Bearer {KEY}", **(headers or {})})


def upstream_auth(mock: MockUpstream) -> str:
    return {k.lower(): v for k, v in mock.last()["headers"].items()}["authorization"]


@pytest.mark.parametrize(
    ("requested", "provider", "upstream_model", "key"),
    [
        ("gpt-test", "mock", "mock-ok", UPSTREAM_KEY),
        ("mock/mock-a", "mock", "mock-a", UPSTREAM_KEY),  # provider/model slug
        ("mockb/mock-a", "mockb", "mock-a", MOCKB_KEY),
        ("mock-ok", "mock", "mock-ok", UPSTREAM_KEY),  # bare upstream name of a configured model
        ("gpt-test-alias", "mock", "mock-ok", UPSTREAM_KEY),  # a model's own alias
        ("fast", "mock", "mock-ok", UPSTREAM_KEY),  # config `aliases`: alias -> model
        ("fast2", "mock", "mock-ok", UPSTREAM_KEY),  # alias -> alias -> model
        ("slugged", "mockb", "mock-c", MOCKB_KEY),  # alias -> provider/model slug
    ],
)
def test_e2e_resolution(gw, mock, requested, provider, upstream_model, key):
    raw = client(gw).chat.completions.with_raw_response.create(model=requested, messages=HI)
    assert raw.parse().choices[0].message.content
    assert mock.last()["body"]["model"] == upstream_model
    assert upstream_auth(mock) == f"Bearer {key}"
    assert raw.headers["x-llmrelay-provider"] == provider
    assert raw.headers["x-llmrelay-model"] == upstream_model
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["model_requested"] == requested
    assert record["provider_id"] == provider
    assert record["model"] == upstream_model
    assert 0 < record["routing_time"] < 0.05
    assert record["load_balance_group_id"] is None


def test_e2e_unknown_model_is_404(gw, mock):
    response = post(gw, {"model": "nope"})
    assert response.status_code == 404
    assert response.json() == {"detail": "Requested model nope is not available in the model list"}
    assert mock.requests == []


def test_e2e_no_model_is_400(gw, mock):
    response = post(gw, {})
    assert response.status_code == 400
    assert response.json() == {"detail": NO_MODEL}
    assert mock.requests == []
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 400
    assert record["routing_time"] > 0


@pytest.mark.parametrize("value", ["mockb", "MOCKB", "backup"])
def test_e2e_route_provider_pins_the_provider(gw, mock, value):
    client_ = OpenAI(base_url=f"{gw.url}/api", api_key=KEY, max_retries=0,
                     default_headers={"X-Respan-Route-Provider": value})
    raw = client_.chat.completions.with_raw_response.create(model="gpt-test", messages=HI)
    assert raw.parse().choices[0].message.content
    assert mock.last()["body"]["model"] == "mock-ok"  # the slug is unchanged
    assert upstream_auth(mock) == f"Bearer {MOCKB_KEY}"
    assert raw.headers["x-llmrelay-provider"] == "mockb"
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["provider_id"] == "mockb"
    assert record["model_requested"] == "gpt-test"


def test_e2e_route_provider_without_the_header_uses_the_default(gw, mock):
    response = post(gw, {"model": "b-model"})
    assert response.headers["x-llmrelay-provider"] == "mockb"
    response = post(gw, {"model": "b-model"}, {"X-Respan-Route-Provider": "mock"})
    assert response.status_code == 200
    assert response.headers["x-llmrelay-provider"] == "mock"
    assert upstream_auth(mock) == f"Bearer {UPSTREAM_KEY}"
    assert mock.last()["body"]["model"] == "mock-bee"


def test_e2e_route_provider_unknown_value_is_400(gw, mock):
    response = post(gw, {"model": "gpt-test"}, {"X-Respan-Route-Provider": "nowhere"})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "X-Respan-Route-Provider 'nowhere' is not a known provider; accepted values: " in detail
    for value in ("vertex_ai", "azure", "bedrock", "openai", "anthropic", "mock", "mockb", "backup"):
        assert value in detail.rpartition(": ")[2].split(", ")
    assert mock.requests == []


def test_e2e_route_provider_known_but_unconfigured_is_400(gw, mock):
    response = post(gw, {"model": "gpt-test"}, {"X-Respan-Route-Provider": "vertex_ai"})
    assert response.status_code == 400
    assert response.json() == {"detail": (
        "Invalid request format: X-Respan-Route-Provider 'vertex_ai' names a provider that is not configured "
        "on this gateway; configured providers: demo, mock, mockb, openai")}
    assert mock.requests == []


def test_e2e_route_provider_unknown_model_is_still_404(gw, mock):
    response = post(gw, {"model": "nope"}, {"X-Respan-Route-Provider": "mockb"})
    assert response.status_code == 404
    assert response.json() == {"detail": "Requested model nope is not available in the model list"}


def test_e2e_load_balance_group(gw, mock):
    seen = set()
    for _ in range(20):
        response = post(gw, {"load_balance_group": {"group_id": "g1"}})
        assert response.status_code == 200, response.text
        seen.add(mock.last()["body"]["model"])
        assert response.headers["x-llmrelay-provider"] == "mock"
    assert seen == {"mock-a", "mock-b"}
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["load_balance_group_id"] == "g1"
    assert record["model_requested"] in ("mock/mock-a", "mock/mock-b")


def test_e2e_inline_group_models_override(gw, mock):
    response = post(gw, {"load_balance_group": {"group_id": "g1", "models": [{"model": "mockb/mock-z", "weight": 2}]}})
    assert response.status_code == 200
    assert mock.last()["body"]["model"] == "mock-z"
    assert upstream_auth(mock) == f"Bearer {MOCKB_KEY}"
    assert gw.record(response.headers["x-respan-log-id"])["load_balance_group_id"] == "g1"


def test_e2e_unknown_group_is_400(gw, mock):
    response = post(gw, {"load_balance_group": {"group_id": "nope"}})
    assert response.status_code == 400
    assert response.json() == {"detail": "Invalid request format: load_balance_group 'nope' is not configured "
                                         "(configured groups: g1, solo, weighted)"}
    assert mock.requests == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"load_balance_group": {"group_id": "g1", "models": [{"model": "mock/mock-a", "weight": 0}]}},
         "load_balance_group.models[0].weight"),
        ({"load_balance_models": [{"model": "mock/mock-a", "weight": 0}]}, "load_balance_models[0].weight"),
        ({"respan_params": {"loadbalance_models": [{"model": "mock/mock-a", "weight": -1}]}},
         "loadbalance_models[0].weight"),
    ],
)
def test_e2e_weight_zero_is_422(gw, mock, body, field):
    response = post(gw, body)
    assert response.status_code == 422
    assert response.json()["detail"] == "Validation error"
    assert list(response.json()["errors"]) == [field]
    assert mock.requests == []


def test_e2e_model_wins_over_load_balance_group(gw, mock):
    response = client(gw).chat.completions.with_raw_response.create(
        model="b-model", messages=HI, extra_body={"load_balance_group": {"group_id": "g1"}})
    assert mock.last()["body"]["model"] == "mock-bee"
    assert response.headers["x-llmrelay-provider"] == "mockb"
    assert gw.record(response.headers["x-respan-log-id"])["load_balance_group_id"] is None


@pytest.mark.parametrize("field", ["load_balance_models", "loadbalance_models"])
def test_e2e_load_balance_models(gw, mock, field):
    response = post(gw, {"respan_params": {field: [{"model": "mockb/mock-lb", "weight": 3}]}})
    assert response.status_code == 200
    assert mock.last()["body"]["model"] == "mock-lb"
    assert response.headers["x-llmrelay-provider"] == "mockb"
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["model_requested"] == "mockb/mock-lb"
    assert record["load_balance_group_id"] is None


def test_e2e_weighted_distribution_passes_chi_square(gw, mock):
    """600 requests over weights 1:2:3; goodness of fit at p = 0.001 (2 d.o.f.: 13.82)."""
    counts: Counter = Counter()
    with httpx.Client() as http:
        for _ in range(600):
            response = post(gw, {"load_balance_group": {"group_id": "weighted"}}, http=http)
            assert response.status_code == 200
            counts[response.headers["x-llmrelay-model"]] += 1
    assert sum(counts.values()) == 600
    assert Counter(r["body"]["model"] for r in mock.requests) == counts
    expected = {"mock-a": 100, "mock-b": 200, "mock-c": 300}
    statistic = sum((counts[m] - e) ** 2 / e for m, e in expected.items())
    assert statistic < CHI2_CRITICAL_2DOF_P001, (counts, statistic)


def test_e2e_router_models_with_exclusions(gw, mock):
    response = post(gw, {"models": ["b-model", "mockb/mock-x", "gpt-test", "mock/mock-r"],
                         "exclude_providers": ["mockb"], "exclude_models": ["gpt-test"]})
    assert response.status_code == 200
    assert mock.last()["body"]["model"] == "mock-r"
    assert response.headers["x-llmrelay-provider"] == "mock"
    assert gw.record(response.headers["x-respan-log-id"])["model_requested"] == "mock/mock-r"

    response = post(gw, {"models": ["b-model", "gpt-test"]})
    assert mock.last()["body"]["model"] == "mock-bee"

    response = post(gw, {"models": ["b-model", "gpt-test"], "exclude_models": ["b-model", "gpt-test"]})
    assert response.status_code == 400
    assert "excluded" in response.json()["detail"]

    response = post(gw, {"models": ["b-model"], "exclude_models": ["b-model"]})  # one entry acts as `model`
    assert mock.last()["body"]["model"] == "mock-bee"


def test_e2e_skipped_fallbacks_are_logged_as_warnings(gw, mock):
    response = post(gw, {"model": "gpt-test", "fallback_models": ["nope", "b-model"]})
    assert response.status_code == 200
    assert mock.last()["body"]["model"] == "mock-ok"
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["warnings"] == ["fallback model 'nope' skipped: not available in the model list",
                                  "no price known for mock/mock-ok: cost not computed"]


def test_e2e_stream_through_routing(gw, mock):
    stream = client(gw).chat.completions.create(
        model="mock/mock-x", messages=HI, stream=True,
        extra_body={"load_balance_models": [{"model": "mockb/mock-s", "weight": 1}]})  # `model` wins
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    assert mock.last()["body"]["model"] == "mock-x"


def test_e2e_bad_options_fail_start_up(start_gateway, mock_upstream, tmp_path):
    config = routing_config(mock_upstream, tmp_path / "gw0", {"load_balance_groups": {"g": [{"model": "nope", "weight": 1}]}})
    with pytest.raises(RuntimeError) as info:
        start_gateway(config=config)
    assert "$.pipeline[1].options: stage 'routing' rejected its options: load_balance_groups.g[0].model: " \
           "Requested model nope is not available in the model list" in str(info.value)


def test_e2e_default_fallback_option_is_used(start_gateway, mock_upstream, mock, tmp_path):
    """Without a fallback stage, dispatch sends call.target: the plan's other entries are unused, but a
    gateway with default fallbacks configured still serves and records no warning of them."""
    config = routing_config(mock_upstream, tmp_path / "gw0", {"default_fallback_models": ["b-model"]})
    gateway = start_gateway(config=config)
    response = post(gateway, {"model": "gpt-test"})
    assert response.status_code == 200
    assert mock.last()["body"]["model"] == "mock-ok"
    # (routing_config's models have no prices: that is the only warning)
    assert gateway.record(response.headers["x-respan-log-id"])["warnings"] == [
        "no price known for mock/mock-ok: cost not computed"]



# -- context windows ----------------------------------------------------------------------------


def window_stage() -> RoutingStage:
    raw = {"providers": providers("http://127.0.0.1:9/v1"), "auto_providers": False, "models": [
        {"name": "small", "provider": "mock", "model": "mock-small", "context_window": 100},
        {"name": "large", "provider": "mockb", "model": "mock-large", "context_window": 100_000},
        {"name": "tiny", "provider": "mockb", "model": "mock-tiny", "context_window": 50}]}
    settings = parse_settings(raw, "<test>", env={})
    return create_stage(StageContext("routing", {}, settings, ModelTable(settings, load_catalog())))


def long_call(model: str, fallbacks: list[str], chars: int) -> Call:
    return Call(endpoint="chat", path="/api/chat/completions",
                body={"model": model, "messages": [{"role": "user", "content": "x" * chars}]},
                params=to_params({"fallback_models": fallbacks}), headers={})


def test_a_prompt_larger_than_the_window_skips_that_model():
    call = run(window_stage(), long_call("small", ["large"], 2000))  # about 500 tokens > 100
    assert plan(call) == [("mockb", "mock-large")]
    assert any("mock/mock-small skipped" in w and "context window of 100" in w for w in call.warnings)


def test_a_prompt_that_fits_keeps_the_plan():
    call = run(window_stage(), long_call("small", ["large"], 200))  # about 50 tokens
    assert plan(call) == [("mock", "mock-small"), ("mockb", "mock-large")]
    assert call.warnings == []


def test_when_no_candidate_fits_the_provider_decides():
    call = run(window_stage(), long_call("small", ["tiny"], 2000))
    assert plan(call) == [("mock", "mock-small"), ("mockb", "mock-tiny")]


def test_catalog_context_windows_reach_the_target():
    stage = window_stage()
    assert stage.models.resolve("large").context_window == 100_000
    raw = {"providers": [{"id": "openai", "api_key": "k"}], "auto_providers": False}
    settings = parse_settings(raw, "<test>", env={})
    table = ModelTable(settings, load_catalog())
    assert (table.resolve("openai/gpt-4o").context_window or 0) >= 128_000
