"""Cost of a request from its usage and the model's prices (proxy.call.Prices), and where the
prices come from: config `models[].prices` over the catalog's, reaching the resolved Target."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.call import Prices, Usage
from proxy.catalog import load_catalog
from proxy.model_table import ModelTable
from proxy.settings import ENVIRONMENT_PROTOCOLS, parse_settings

M = 1_000_000


def usage(**fields: Any) -> Usage:
    return Usage(**fields)


# -- the formula -------------------------------------------------------------------------


def test_plain_prompt_and_completion() -> None:
    prices = Prices(input=2.0, output=8.0)
    assert prices.cost(usage(prompt_tokens=M, completion_tokens=M)) == pytest.approx(10.0)
    assert prices.cost(Usage()) == 0.0


def test_openai_style_cached_tokens_inside_prompt() -> None:
    # OpenAI: prompt_tokens 1000 of which 400 were cache hits; no cache creation.
    prices = Prices(input=2.0, output=8.0, cached_input=0.5)
    u = Usage.from_openai({"prompt_tokens": 1000, "completion_tokens": 100,
                           "prompt_tokens_details": {"cached_tokens": 400}})
    assert (u.cached_tokens, u.cache_creation_tokens) == (400, 0)
    assert prices.cost(u) == pytest.approx((600 * 2.0 + 400 * 0.5 + 100 * 8.0) / M)


def test_anthropic_style_read_and_write_not_double_counted() -> None:
    # The Anthropic / Bedrock adapters report prompt_tokens = input + cache read + cache creation.
    prices = Prices(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)
    u = Usage.from_openai({
        "prompt_tokens": 100 + 2000 + 500, "completion_tokens": 50,
        "prompt_tokens_details": {"cached_tokens": 2000, "cache_creation_tokens": 500},
        "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 500,
    })
    assert (u.prompt_tokens, u.cached_tokens, u.cache_creation_tokens) == (2600, 2000, 500)
    expected = (100 * 3.0 + 2000 * 0.3 + 500 * 3.75 + 50 * 15.0) / M
    assert prices.cost(u) == pytest.approx(expected)


def test_anthropic_adapter_usage_feeds_the_formula() -> None:
    """The adapter's own translation of an Anthropic usage block, priced once per token."""
    from proxy.providers import anthropic

    converted = anthropic.openai_usage({"input_tokens": 10, "output_tokens": 20,
                                  "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 300})
    u = Usage.from_openai(converted)
    assert u.prompt_tokens == 1310
    prices = Prices(input=1.0, output=5.0, cached_input=0.1, cache_write=1.25)
    assert prices.cost(u) == pytest.approx((10 * 1.0 + 1000 * 0.1 + 300 * 1.25 + 20 * 5.0) / M)


def test_gemini_style_cached_content() -> None:
    # Gemini: promptTokenCount includes cachedContentTokenCount; thinking is in completion_tokens.
    prices = Prices(input=1.25, output=10.0, cached_input=0.125)
    u = Usage.from_openai({"prompt_tokens": 5000, "completion_tokens": 300,
                           "prompt_tokens_details": {"cached_tokens": 4000}})
    assert prices.cost(u) == pytest.approx((1000 * 1.25 + 4000 * 0.125 + 300 * 10.0) / M)


def test_cache_prices_default_to_input() -> None:
    prices = Prices(input=3.0, output=15.0)
    u = usage(prompt_tokens=2600, completion_tokens=50, cached_tokens=2000, cache_creation_tokens=500)
    # Every prompt token at `input`: the same as having no cache at all.
    assert prices.cost(u) == pytest.approx((2600 * 3.0 + 50 * 15.0) / M)
    only_read = Prices(input=3.0, output=15.0, cached_input=0.3)
    assert only_read.cost(u) == pytest.approx((100 * 3.0 + 2000 * 0.3 + 500 * 3.0 + 50 * 15.0) / M)
    only_write = Prices(input=3.0, output=15.0, cache_write=3.75)
    assert only_write.cost(u) == pytest.approx((100 * 3.0 + 2000 * 3.0 + 500 * 3.75 + 50 * 15.0) / M)


def test_uncached_never_negative() -> None:
    # A provider that reports cache counters larger than prompt_tokens: no negative input charge.
    prices = Prices(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)
    u = usage(prompt_tokens=100, completion_tokens=0, cached_tokens=80, cache_creation_tokens=50)
    assert prices.cost(u) == pytest.approx((80 * 0.3 + 50 * 3.75) / M)
    assert prices.cost(u) >= 0


# -- where prices come from ----------------------------------------------------------------


def table(models: list[dict[str, Any]]) -> ModelTable:
    raw = {
        "providers": [
            {"id": "anthropic", "protocol": "anthropic", "base_url": "http://127.0.0.1:9", "api_key": "k"},
            {"id": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"},
            {"id": "vertex_ai", "protocol": "vertex_ai", "base_url": "https://aiplatform.googleapis.com", "api_key": "{}"},
            {"id": "bedrock", "protocol": "bedrock", "base_url": "http://127.0.0.1:9", "api_key": "a:b"},
        ],
        "models": models,
        "auto_providers": False,
    }
    return ModelTable(parse_settings(raw, "<test>", env={}), load_catalog())


def test_catalog_prices_reach_the_target() -> None:
    models = table([])
    target = models.resolve("claude-sonnet-4-5")
    assert target.provider == "anthropic"
    assert target.prices == Prices(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)
    assert models.resolve("openai/gpt-4o").prices == Prices(input=2.5, output=10.0, cached_input=1.25)
    assert models.resolve("vertex_ai/claude-sonnet-4-5@20250929").prices.cache_write == 3.75
    assert models.resolve("bedrock/amazon.nova-pro-v1:0").prices == Prices(0.8, 3.2, 0.2)
    bedrock_claude = models.resolve("us.anthropic.claude-haiku-4-5-20251001-v1:0")
    assert (bedrock_claude.provider, bedrock_claude.prices.cache_write) == ("bedrock", 1.25)


def test_configured_model_gets_catalog_prices_when_it_gives_none() -> None:
    models = table([{"name": "sonnet", "provider": "anthropic", "model": "claude-sonnet-4-5"}])
    assert models.resolve("sonnet").prices == Prices(3.0, 15.0, 0.3, 3.75)


def test_config_prices_override_catalog_prices() -> None:
    models = table([
        {"name": "sonnet", "provider": "anthropic", "model": "claude-sonnet-4-5",
         "prices": {"input": 2.0, "output": 10.0, "cached_input": 0.2, "cache_write": 2.5}},
        {"name": "plain", "provider": "anthropic", "model": "claude-haiku-4-5",
         "prices": {"input": 0.5, "output": 2.5}},
    ])
    assert models.resolve("sonnet").prices == Prices(2.0, 10.0, 0.2, 2.5)
    # The configured prices replace the catalog's whole: absent cache prices bill at `input`.
    plain = models.resolve("plain").prices
    assert plain == Prices(0.5, 2.5)
    u = usage(prompt_tokens=1000, completion_tokens=10, cached_tokens=500, cache_creation_tokens=200)
    assert plain.cost(u) == pytest.approx((1000 * 0.5 + 10 * 2.5) / M)
    # A slug naming the configured upstream model on the same provider uses the configured prices.
    assert models.resolve("anthropic/claude-sonnet-4-5").prices == Prices(2.0, 10.0, 0.2, 2.5)


def test_cache_write_is_a_config_field() -> None:
    raw = {"providers": [{"id": "up", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}],
           "models": [{"name": "m", "provider": "up", "prices": {"input": 1, "output": 2, "cache_write": 1.25}}],
           "auto_providers": False}
    settings = parse_settings(raw, "<test>", env={})
    assert settings.models[0].prices.cache_write == 1.25
    assert settings.models[0].prices.cached_input is None


# -- vertex_ai / bedrock are never enabled from the environment alone ----------------------


def test_environment_does_not_enable_vertex_or_bedrock() -> None:
    assert not {"vertex_ai", "bedrock"} & ENVIRONMENT_PROTOCOLS
    env = {"VERTEX_SERVICE_ACCOUNT_JSON": "{}", "AWS_BEDROCK_API_KEY": "x", "ANTHROPIC_API_KEY": "sk-ant"}
    settings = parse_settings({"auto_providers": True}, "<test>", env=env)
    ids = {p.id for p in settings.providers}
    assert "anthropic" in ids
    assert not {"vertex_ai", "bedrock"} & ids


def claude_table(providers: list[dict[str, Any]]) -> ModelTable:
    raw = {"providers": providers, "auto_providers": False}
    return ModelTable(parse_settings(raw, "<test>", env={}), load_catalog())


VERTEX = {"id": "vertex", "protocol": "vertex_ai", "base_url": "https://aiplatform.googleapis.com", "api_key": "{}"}
BEDROCK = {"id": "aws", "protocol": "bedrock", "base_url": "http://127.0.0.1:9", "api_key": "a:b"}


def test_claude_names_resolve_on_the_first_claude_provider() -> None:
    """Claude Code sends Anthropic's names; a gateway with only Vertex AI (or Bedrock) serves them."""
    models = claude_table([VERTEX, BEDROCK])
    for name in ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5", "claude-sonnet-4-5@20250929"):
        target = models.resolve(name)
        assert (target.provider, target.model) == ("vertex", "claude-sonnet-4-5@20250929"), name
        assert target.prices == Prices(3.0, 15.0, 0.3, 3.75) and target.context_window == 200000
    # a Bedrock id names its provider: it stays on Bedrock
    bedrock_id = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    assert (models.resolve(bedrock_id).provider, models.resolve(bedrock_id).model) == ("aws", bedrock_id)
    models = claude_table([BEDROCK, VERTEX])
    target = models.resolve("claude-haiku-4-5-20251001")
    assert (target.provider, target.model) == ("aws", "us.anthropic.claude-haiku-4-5-20251001-v1:0")
    assert target.prices == Prices(1.0, 5.0, 0.1, 1.25)


def test_providers_with_their_own_ids_use_the_catalog_of_their_protocol() -> None:
    models = claude_table([VERTEX, BEDROCK])
    assert models.resolve("gemini-2.5-pro").provider == "vertex"  # a bare catalog name of vertex_ai
    assert models.resolve("vertex_ai/gemini-2.5-pro").prices == Prices(1.25, 10.0, 0.125)  # the catalog id as prefix
    assert models.resolve("aws/amazon.nova-pro-v1:0").prices == Prices(0.8, 3.2, 0.2)
    with pytest.raises(Exception, match="not available"):
        models.resolve("claude-local-test")  # a Claude-looking name the catalog does not know


def test_route_header_respells_claude_for_the_provider() -> None:
    models = claude_table([{"id": "anthropic", "protocol": "anthropic", "base_url": "http://127.0.0.1:9",
                            "api_key": "k"}, VERTEX, BEDROCK])
    primary = models.resolve("claude-sonnet-4-5-20250929")
    assert (primary.provider, primary.model) == ("anthropic", "claude-sonnet-4-5-20250929")
    assert primary.prices == Prices(3.0, 15.0, 0.3, 3.75)  # the undated catalog entry's prices
    on_vertex = models.on_provider(primary, "vertex")
    assert on_vertex.model == "claude-sonnet-4-5@20250929" and on_vertex.requested == "claude-sonnet-4-5-20250929"
    assert models.on_provider(primary, "aws").model == "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
