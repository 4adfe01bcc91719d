from collections import Counter
from importlib import resources

import pytest
import yaml

from proxy.catalog import Catalog, ModelSpec, ProviderSpec, claude_name, load_catalog
from proxy.providers import PROTOCOLS
from proxy.settings import ENVIRONMENT_PROTOCOLS

OPENAI_COMPATIBLE = {
    "openai",
    "groq",
    "together_ai",
    "fireworks",
    "deepseek",
    "xai",
    "mistral",
    "openrouter",
    "perplexity",
    "cerebras",
}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def test_loads_and_is_cached(catalog: Catalog) -> None:
    assert load_catalog() is catalog
    assert catalog.providers and catalog.models
    assert all(isinstance(p, ProviderSpec) for p in catalog.providers.values())
    assert all(isinstance(m, ModelSpec) for m in catalog.models.values())


def test_expected_providers(catalog: Catalog) -> None:
    assert OPENAI_COMPATIBLE | {"anthropic", "gemini", "azure", "vertex_ai", "bedrock"} <= catalog.providers.keys()
    for pid in OPENAI_COMPATIBLE:
        assert catalog.providers[pid].protocol == "openai"
    for pid in ("anthropic", "gemini", "azure", "vertex_ai", "bedrock"):
        assert catalog.providers[pid].protocol == pid
    assert catalog.providers["vertex_ai"].base_url == "https://aiplatform.googleapis.com"
    assert catalog.providers["bedrock"].base_url == "https://bedrock-runtime.us-east-1.amazonaws.com"


def test_every_protocol_has_an_adapter(catalog: Catalog) -> None:
    assert {p.protocol for p in catalog.providers.values()} <= PROTOCOLS.keys()


def test_environment_keys(catalog: Catalog) -> None:
    """Providers enabled from the environment name their key; Vertex AI and Bedrock are config-only."""
    for p in catalog.providers.values():
        if p.protocol in ENVIRONMENT_PROTOCOLS:
            assert p.api_key_env, p.id
    assert catalog.providers["vertex_ai"].protocol not in ENVIRONMENT_PROTOCOLS
    assert catalog.providers["bedrock"].protocol not in ENVIRONMENT_PROTOCOLS


def test_provider_fields(catalog: Catalog) -> None:
    for pid, p in catalog.providers.items():
        assert p.id == pid
        assert p.name
        if p.protocol == "azure":  # one endpoint per resource: the config gives it
            assert p.base_url == ""
        else:
            assert p.base_url.startswith("https://") and not p.base_url.endswith("/")
        assert p.api_key_env is None or (p.api_key_env and p.api_key_env.isupper())


def test_provider_ids_unique() -> None:
    raw = yaml.safe_load(resources.files("proxy.catalog").joinpath("providers.yaml").read_text())
    ids = [p["id"] for p in raw["providers"]]
    assert [i for i, n in Counter(ids).items() if n > 1] == []


def test_model_keys_unique() -> None:
    raw = yaml.safe_load(resources.files("proxy.catalog").joinpath("models.yaml").read_text())
    keys = [f"{m['provider']}/{m['name']}" for m in raw["models"]]
    assert [k for k, n in Counter(keys).items() if n > 1] == []
    assert len(load_catalog().models) == len(keys)


def test_every_model_provider_exists(catalog: Catalog) -> None:
    for key, m in catalog.models.items():
        assert m.provider in catalog.providers, key
        assert key == f"{m.provider}/{m.name}"


def test_every_provider_has_models(catalog: Catalog) -> None:
    served = {m.provider for m in catalog.models.values()}
    assert served == catalog.providers.keys()


def test_prices_non_negative(catalog: Catalog) -> None:
    for key, m in catalog.models.items():
        assert m.input >= 0 and m.output >= 0, key
        assert m.cached_input is None or 0 <= m.cached_input <= m.input, key
        assert m.cache_write is None or m.cache_write >= m.input, key
        assert m.context_window is None or m.context_window > 0, key


def test_claude_cache_writes_are_five_minute_rate(catalog: Catalog) -> None:
    """Claude (Anthropic, Vertex, Bedrock): 5-minute cache writes at 1.25x input; cache reads are
    priced and at most 0.1x input (0.1x on most models, less on some: Sonnet 5.5 0.05x, Fable 5.1
    0.025x)."""
    claude = [m for m in catalog.models.values() if "claude" in m.name]
    assert {m.provider for m in claude} >= {"anthropic", "vertex_ai", "bedrock"}
    for m in claude:
        assert m.cache_write == pytest.approx(m.input * 1.25), m.key
        assert m.cached_input is not None and 0 < m.cached_input <= m.input * 0.1 + 1e-9, m.key
    # the older models keep the 0.1x rate
    for key in ("anthropic/claude-sonnet-4-5", "anthropic/claude-haiku-4-5", "vertex_ai/claude-opus-4-5@20251101",
                "bedrock/anthropic.claude-sonnet-4-5-20250929-v1:0"):
        assert catalog.models[key].cached_input == pytest.approx(catalog.models[key].input * 0.1), key


def test_claude_is_priced_alike_on_every_provider(catalog: Catalog) -> None:
    """A Claude model listed on Vertex AI or Bedrock carries the Anthropic API's prices."""
    for m in catalog.models.values():
        parts = claude_name(m.name)
        if parts is None or m.provider == "anthropic":
            continue
        first_party = catalog.spec("anthropic", parts[0])
        if first_party is None or claude_name(first_party.name)[0] != parts[0]:
            continue  # retired on Anthropic's API (e.g. Opus 4.1), still served by the partner
        assert (m.input, m.output, m.cached_input, m.cache_write, m.context_window) == (
            first_party.input, first_party.output, first_party.cached_input, first_party.cache_write,
            first_party.context_window), m.key


@pytest.mark.parametrize(("key", "prices", "window"), [
    # (input, output, cached_input, cache_write) per 1M tokens, as of November 2026
    ("anthropic/claude-sonnet-5-5", (2.00, 10.00, 0.10, 2.50), 1_000_000),
    ("anthropic/claude-opus-5-5", (4.00, 20.00, 0.20, 5.00), 1_000_000),
    ("anthropic/claude-haiku-5-5", (0.10, 0.50, 0.01, 0.125), 1_000_000),
    ("anthropic/claude-opus-4-6", (5.00, 25.00, 0.50, 6.25), 1_000_000),
    ("vertex_ai/claude-sonnet-5-5", (2.00, 10.00, 0.10, 2.50), 1_000_000),
    ("bedrock/us.anthropic.claude-haiku-5-5", (0.10, 0.50, 0.01, 0.125), 1_000_000),
    ("openai/gpt-6.2-sol", (2.00, 10.00, 0.10, 2.50), 1_050_000),
    ("openai/gpt-6-astra", (10.00, 50.00, 1.00, 12.50), 1_050_000),
    ("gemini/gemini-3.8-flash", (0.75, 3.75, 0.075, None), 1_048_576),
    ("gemini/gemini-3.1-pro-preview", (2.00, 12.00, 0.20, None), 1_048_576),
    ("gemini/gemini-embedding-2", (0.20, 0.00, None, None), 8192),
    ("deepseek/deepseek-v4-pro", (1.32, 3.96, 0.044, None), 1_000_000),
    ("xai/grok-4.7", (2.00, 6.00, 0.50, None), 500_000),
    ("mistral/mistral-medium-latest", (1.50, 7.50, None, None), 262_144),
])
def test_current_models_and_prices(catalog: Catalog, key, prices, window) -> None:
    m = catalog.models[key]
    assert (m.input, m.output, m.cached_input, m.cache_write) == pytest.approx(prices), key
    assert m.context_window == window, key


@pytest.mark.parametrize("key", [
    "anthropic/claude-opus-4-1",  # retired on Anthropic's API (still on Vertex AI and Bedrock)
    "anthropic/claude-sonnet-4-0",
    "gemini/gemini-3-pro-preview",  # shut down 2026-03-09
    "gemini/gemini-2.0-flash",  # shut down 2026-06-01
    "deepseek/deepseek-chat",  # retired 2026-07-24
    "deepseek/deepseek-reasoner",
    "cerebras/llama-3.3-70b",
])
def test_retired_models_are_gone(catalog: Catalog, key) -> None:
    assert key not in catalog.models


def test_new_claude_ids_on_vertex_and_bedrock(catalog: Catalog) -> None:
    """The undated partner ids of newer Claude models; a Bedrock inference profile comes first."""
    assert catalog.model_on("vertex_ai", "claude-sonnet-5-5") == "claude-sonnet-5-5"
    assert catalog.model_on("bedrock", "claude-sonnet-5-5") == "us.anthropic.claude-sonnet-5-5"
    assert catalog.model_on("bedrock", "claude-opus-4-6") == "us.anthropic.claude-opus-4-6-v1"
    assert catalog.spec("bedrock", "claude-haiku-5-5").name == "us.anthropic.claude-haiku-5-5"
    assert claude_name("anthropic.claude-opus-4-6-v1") == ("claude-opus-4-6", None)


def test_vertex_and_bedrock_models(catalog: Catalog) -> None:
    vertex = {m.name for m in catalog.models.values() if m.provider == "vertex_ai"}
    assert "claude-sonnet-4-5@20250929" in vertex and "gemini-2.5-pro" in vertex
    bedrock = {m.name for m in catalog.models.values() if m.provider == "bedrock"}
    assert {"anthropic.claude-sonnet-4-5-20250929-v1:0", "amazon.nova-pro-v1:0",
            "meta.llama3-3-70b-instruct-v1:0"} <= bedrock
    assert catalog.provider("vertex").id == "vertex_ai"


def test_by_name_indexes_every_model(catalog: Catalog) -> None:
    flat = [m for specs in catalog.by_name.values() for m in specs]
    assert len(flat) == len(catalog.models)
    for name, specs in catalog.by_name.items():
        assert all(m.name == name for m in specs)
    # A bare name served by several providers lists each of them.
    assert {m.provider for m in catalog.by_name["openai/gpt-oss-120b"]} == {"groq", "together_ai"}


def test_aliases_do_not_collide(catalog: Catalog) -> None:
    ids = set(catalog.providers)
    aliases = [a for p in catalog.providers.values() for a in p.aliases]
    assert ids.isdisjoint(aliases)
    assert len(aliases) == len(set(aliases))
    assert all(a == a.lower() for a in aliases)


def test_provider_lookup_by_alias(catalog: Catalog) -> None:
    assert catalog.provider("together").id == "together_ai"
    assert catalog.provider("TogetherAI").id == "together_ai"
    assert catalog.provider("fireworks_ai").id == "fireworks"
    assert catalog.provider("perplexityai").id == "perplexity"
    assert catalog.provider("google").id == "gemini"
    assert catalog.provider("openai").id == "openai"
    assert catalog.provider("nope") is None


@pytest.mark.parametrize(("name", "expected"), [
    ("claude-sonnet-4-5-20250929", ("claude-sonnet-4-5", "20250929")),
    ("claude-sonnet-4-5", ("claude-sonnet-4-5", None)),
    ("claude-sonnet-4-5@20250929", ("claude-sonnet-4-5", "20250929")),
    ("anthropic.claude-haiku-4-5-20251001-v1:0", ("claude-haiku-4-5", "20251001")),
    ("eu.anthropic.claude-opus-4-1-20250805-v1:0", ("claude-opus-4-1", "20250805")),
    ("gpt-4o", None),
    ("gemini-2.5-pro", None),
])
def test_claude_names_in_every_spelling(name, expected) -> None:
    assert claude_name(name) == expected


@pytest.mark.parametrize(("name", "anthropic", "vertex", "bedrock"), [
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5@20250929",
     "us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
    # undated: the provider's listed version
    ("claude-haiku-4-5", "claude-haiku-4-5", "claude-haiku-4-5@20251001", "us.anthropic.claude-haiku-4-5-20251001-v1:0"),
    ("anthropic.claude-opus-4-1-20250805-v1:0", "claude-opus-4-1-20250805", "claude-opus-4-1@20250805",
     "anthropic.claude-opus-4-1-20250805-v1:0"),
    # dated but not in the catalog: spelled by each provider's rule
    ("claude-future-9-20300101", "claude-future-9-20300101", "claude-future-9@20300101",
     "anthropic.claude-future-9-20300101-v1:0"),
    # neither dated nor known: kept as it is
    ("claude-local-test", "claude-local-test", "claude-local-test", "claude-local-test"),
    ("gemini-2.5-flash", "gemini-2.5-flash", "gemini-2.5-flash", "gemini-2.5-flash"),
])
def test_model_on_respells_claude(catalog: Catalog, name, anthropic, vertex, bedrock) -> None:
    assert [catalog.model_on(p, name) for p in ("anthropic", "vertex_ai", "bedrock")] == [anthropic, vertex, bedrock]


def test_spec_finds_claude_in_another_spelling(catalog: Catalog) -> None:
    assert catalog.spec("anthropic", "claude-sonnet-4-5-20250929").name == "claude-sonnet-4-5"
    assert catalog.spec("vertex_ai", "claude-sonnet-4-5").name == "claude-sonnet-4-5@20250929"
    assert catalog.spec("anthropic", "claude-local-test") is None
    assert catalog.spec("openai", "gpt-4o").input == 2.5
