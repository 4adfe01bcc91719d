"""proxy.settings: the YAML config, its ${ENV} interpolation, its errors and the embedded defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.keys import hash_key
from proxy.settings import DEMO_KEY, ConfigError, Settings, StageEntry, load_settings, parse_settings

GOOD_HASH = hash_key("sk-config-test")


def write(tmp_path: Path, config: dict[str, Any] | str, name: str = "llmrelay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def load_error(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={} if env is None else env)
    return str(info.value)


def minimal(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "providers": [{"id": "up", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}],
        "models": [{"name": "m", "provider": "up", "model": "upstream-m"}],
        "keys": [{"name": "k1", "key_hash": GOOD_HASH}],
        "auto_providers": False,
    }
    config.update(overrides)
    return config


# -- interpolation -----------------------------------------------------------------------


def test_env_interpolation_with_and_without_default(tmp_path):
    path = write(tmp_path, minimal(providers=[{
        "id": "up",
        "base_url": "${UP_URL:-http://127.0.0.1:9/v1}",
        "api_key": "${UP_KEY}",
        "headers": {"x-team": "team-${TEAM:-none}-${REGION}"},
    }]))
    settings = load_settings(path, env={"UP_KEY": "sk-from-env", "REGION": "eu"})
    provider = settings.provider("up")
    assert provider is not None
    assert provider.api_key == "sk-from-env"
    assert provider.base_url == "http://127.0.0.1:9/v1"  # the default
    assert provider.headers == {"x-team": "team-none-eu"}
    assert settings.source == str(path)

    # a set variable wins over the default, even when it is empty
    settings = load_settings(path, env={"UP_KEY": "k", "REGION": "us", "UP_URL": "https://example.test/v1", "TEAM": ""})
    provider = settings.provider("up")
    assert provider is not None and provider.base_url == "https://example.test/v1"
    assert provider.headers == {"x-team": "team--us"}


def test_interpolated_value_is_then_type_checked(tmp_path):
    path = write(tmp_path, minimal(server={"port": "${PORT:-9123}", "workers": "${WORKERS}"}))
    settings = load_settings(path, env={"WORKERS": "3"})
    assert settings.server.port == 9123
    assert settings.server.workers == 3


def test_missing_env_var_names_file_path_and_variable(tmp_path):
    path = write(tmp_path, minimal(providers=[{"id": "up", "base_url": "http://127.0.0.1:9/v1", "api_key": "${NOT_SET_KEY}"}]))
    message = load_error(path)
    assert str(path) in message
    assert "$.providers[0].api_key" in message
    assert "NOT_SET_KEY" in message


# -- validation errors -------------------------------------------------------------------


def test_wrong_type_names_file_and_field_path(tmp_path):
    path = write(tmp_path, minimal(server={"port": "abc"}))
    message = load_error(path)
    assert str(path) in message
    assert "$.server.port" in message
    assert "int" in message  # what was expected


def test_wrong_type_deep_in_a_list(tmp_path):
    path = write(tmp_path, minimal(models=[{"name": "m", "provider": "up", "prices": {"input": "cheap"}}]))
    message = load_error(path)
    assert str(path) in message
    assert "$.models[0].prices.input" in message
    assert "float" in message


def test_unknown_field_rejected(tmp_path):
    path = write(tmp_path, minimal(server={"prot": 8080}))
    message = load_error(path)
    assert str(path) in message
    assert "prot" in message
    assert "$.server" in message

    path = write(tmp_path, minimal(surprise=True), "top.yaml")
    message = load_error(path)
    assert str(path) in message and "surprise" in message


def test_bad_literal_value(tmp_path):
    path = write(tmp_path, minimal(keys=[{"name": "k1", "key_hash": GOOD_HASH, "environment": "staging"}]))
    message = load_error(path)
    assert "$.keys[0].environment" in message
    assert "production" in message or "test" in message


def test_duplicate_provider_id(tmp_path):
    path = write(tmp_path, minimal(providers=[
        {"id": "up", "base_url": "http://127.0.0.1:9/v1"},
        {"id": "up", "base_url": "http://127.0.0.1:10/v1"},
    ]))
    message = load_error(path)
    assert str(path) in message
    assert "$.providers[1].id" in message
    assert "duplicate" in message and "'up'" in message


def test_model_naming_unknown_provider(tmp_path):
    path = write(tmp_path, minimal(models=[{"name": "m", "provider": "nowhere"}]))
    message = load_error(path)
    assert str(path) in message
    assert "$.models[0].provider" in message
    assert "nowhere" in message


def test_duplicate_model_name_or_alias(tmp_path):
    path = write(tmp_path, minimal(models=[
        {"name": "m", "provider": "up"},
        {"name": "m2", "provider": "up", "aliases": ["m"]},
    ]))
    message = load_error(path)
    assert "$.models[1]" in message and "'m'" in message


def test_bad_key_hash(tmp_path):
    for bad in ("sk-plain-text-key", "sha256:abc", "md5:" + "0" * 32):
        path = write(tmp_path, minimal(keys=[{"name": "k1", "key_hash": bad}]))
        message = load_error(path)
        assert str(path) in message
        assert "$.keys[0].key_hash" in message
        assert "hash-key" in message  # tells how to make one
        assert bad not in message or bad.startswith("sha256")  # never echo what may be a plain key


def test_bad_base_url_and_server_limits(tmp_path):
    path = write(tmp_path, minimal(providers=[{"id": "up", "base_url": "ftp://x"}]))
    assert "$.providers[0].base_url" in load_error(path)
    path = write(tmp_path, minimal(server={"workers": 0}))
    assert "$.server.workers" in load_error(path)
    path = write(tmp_path, minimal(server={"port": 70000}))
    assert "$.server.port" in load_error(path)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "server:\n  port: 8080\n providers: [\n")
    message = load_error(path)
    assert str(path) in message
    assert "line" in message and "YAML" in message


def test_unreadable_file(tmp_path):
    message = load_error(tmp_path / "missing.yaml")
    assert str(tmp_path / "missing.yaml") in message


def test_top_level_must_be_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    message = load_error(path)
    assert str(path) in message and "mapping" in message


def test_pipeline_entries_strings_and_mappings(tmp_path):
    path = write(tmp_path, minimal(pipeline=["auth", {"name": "stamp", "options": {"value": "v"}}]))
    settings = load_settings(path, env={})
    assert settings.stage_entries() == [StageEntry(name="auth"), StageEntry(name="stamp", options={"value": "v"})]
    path = write(tmp_path, minimal(pipeline=[{"options": {}}]))
    assert "$.pipeline[0]" in load_error(path)


def test_empty_file_is_the_struct_defaults(tmp_path):
    settings = load_settings(write(tmp_path, ""), env={})
    assert isinstance(settings, Settings)
    assert settings.providers == [] and settings.keys == []
    assert [e.name for e in settings.stage_entries()] == ["auth", "prompts", "limits", "cache", "routing", "credentials", "fallback"]


# -- embedded defaults and providers from the environment ------------------------------------


def test_embedded_defaults():
    settings = load_settings(None, env={})
    assert settings.source == "<embedded defaults>"
    assert [p.id for p in settings.providers] == ["demo"]
    assert settings.providers[0].protocol == "demo"
    assert [(m.name, m.provider) for m in settings.models] == [("demo", "demo")]
    assert len(settings.keys) == 1
    assert settings.keys[0].key_hash == hash_key(DEMO_KEY)
    assert settings.keys[0].environment == "test"
    assert [e.name for e in settings.stage_entries()] == ["auth", "prompts", "limits", "cache", "routing", "credentials", "fallback"]
    assert [s.type for s in settings.logs.sinks] == ["sqlite"]
    assert settings.logs.sinks[0].path.startswith("./llmrelay-data/")


def test_auto_providers_from_environment():
    settings = load_settings(None, env={"OPENAI_API_KEY": "x"})
    ids = [p.id for p in settings.providers]
    assert ids == ["demo", "openai"]
    openai = settings.provider("openai")
    assert openai is not None
    assert openai.api_key == "x"
    assert openai.protocol == "openai"
    assert openai.base_url == "https://api.openai.com/v1"

    settings = load_settings(None, env={"OPENAI_API_KEY": "x", "GROQ_API_KEY": "g", "UNRELATED": "1"})
    assert sorted(p.id for p in settings.providers) == ["demo", "groq", "openai"]
    groq = settings.provider("groq")
    assert groq is not None and groq.api_key == "g" and groq.base_url.startswith("https://api.groq.com/")

    # an empty variable enables nothing
    assert [p.id for p in load_settings(None, env={"OPENAI_API_KEY": ""}).providers] == ["demo"]

    gemini = load_settings(None, env={"GEMINI_API_KEY": "gk"}).provider("gemini")
    assert gemini is not None and gemini.protocol == "gemini" and gemini.api_key == "gk"


def test_auto_providers_respect_config(tmp_path):
    # a provider the config declares keeps its own settings
    config = minimal(providers=[{"id": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "mine"}],
                     models=[], auto_providers=True)
    settings = parse_settings(config, "inline.yaml", {"OPENAI_API_KEY": "env-key", "GROQ_API_KEY": "g"})
    openai = settings.provider("openai")
    assert openai is not None and openai.api_key == "mine" and openai.base_url == "http://127.0.0.1:9/v1"
    assert settings.provider("groq") is not None
    assert sum(p.id == "openai" for p in settings.providers) == 1

    # auto_providers: false switches it off
    settings = parse_settings(minimal(), "inline.yaml", {"OPENAI_API_KEY": "env-key"})
    assert settings.provider("openai") is None


def _table(raw: dict[str, Any]):
    from proxy.catalog import load_catalog
    from proxy.model_table import ModelTable

    settings = parse_settings(raw, "cfg.yaml", env={})
    return ModelTable(settings, load_catalog())


PROVIDERS = [{"id": "p1", "base_url": "http://127.0.0.1:1/v1", "api_key": "k"},
             {"id": "p2", "base_url": "http://127.0.0.1:2/v1",
              "deployments": [{"name": "d1", "api_key": "k1"}, {"name": "d2", "api_key": "k2", "weight": 2}]}]


def test_aliases_name_models_aliases_and_slugs():
    table = _table({"providers": PROVIDERS, "models": [{"name": "fast", "provider": "p1", "model": "m-fast"}],
                    "aliases": {"quick": "fast", "quicker": "quick", "other": "p2/m-other"}})
    assert table.resolve("quicker").model == "m-fast" and table.resolve("quicker").requested == "quicker"
    assert (table.resolve("other").provider, table.resolve("other").model) == ("p2", "m-other")
    # a provider with only deployments serves with its first one when no credentials stage chooses
    assert (table.resolve("other").deployment, table.resolve("other").api_key) == ("d1", "k1")
    names = {m["model_name"] for m in table.public_models()}
    assert {"fast", "quick", "quicker", "other"} <= names


def test_alias_cycle_and_dangling_alias_are_config_errors():
    with pytest.raises(ConfigError, match=r"cfg.yaml: \$.aliases.a: .*alias cycle: a -> b -> a"):
        _table({"providers": PROVIDERS, "aliases": {"a": "b", "b": "a"}})
    with pytest.raises(ConfigError, match=r"\$.aliases.x: Requested model nowhere is not available"):
        _table({"providers": PROVIDERS, "aliases": {"x": "nowhere"}})


def test_alias_may_not_shadow_a_model_name():
    with pytest.raises(ConfigError, match=r"\$.aliases.fast: 'fast' is already a model name"):
        parse_settings({"providers": PROVIDERS, "models": [{"name": "fast", "provider": "p1"}],
                        "aliases": {"fast": "p1/x"}}, "cfg.yaml", env={})


def test_deployment_rules():
    bad = {"providers": [{"id": "p", "base_url": "http://h/v1",
                          "deployments": [{"name": "a", "api_key": "k"}, {"name": "a", "api_key": "k"}]}]}
    with pytest.raises(ConfigError, match=r"\$.providers\[0\].deployments\[1\].name: duplicate deployment name 'a'"):
        parse_settings(bad, "cfg.yaml", env={})
    bad["providers"][0]["deployments"] = [{"name": "a", "weight": 0}]
    with pytest.raises(ConfigError, match=r"\$.providers\[0\].deployments\[0\].weight: expected a number > 0"):
        parse_settings(bad, "cfg.yaml", env={})


def test_redis_backend_needs_a_redis_url():
    with pytest.raises(ConfigError, match=r"\$.state.cooldowns.url: expected a redis:// URL"):
        parse_settings({"state": {"cooldowns": {"backend": "redis"}}}, "cfg.yaml", env={})
    settings = parse_settings({"state": {"cooldowns": {"backend": "redis", "url": "redis://127.0.0.1:6379/0"}}},
                              "cfg.yaml", env={})
    assert settings.cooldowns.failures == 3 and settings.cooldowns.duration == 30.0


def test_deployment_base_url_may_not_carry_credentials():
    raw = {"providers": [{"id": "p", "base_url": "http://h/v1",
                          "deployments": [{"name": "a", "api_key": "k", "base_url": "https://user:pw@h/v1"}]}]}
    with pytest.raises(ConfigError, match=r"\$.providers\[0\].deployments\[0\].base_url: credentials in the URL"):
        parse_settings(raw, "cfg.yaml", env={})
