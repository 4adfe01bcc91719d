"""Azure OpenAI (protocol `azure`): deployment URLs, api-version, the `api-key` header.

Unit tests build the adapter and check the URL and headers it would send. End-to-end tests run
`llmrelay serve` in front of the mock's Azure route (tests/mock_upstream.py), which records the
path, the query and the headers, with the official `openai` SDK as the client.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.call import Call, Target
from proxy.errors import ValidationFailed
from proxy.params import EMPTY
from proxy.providers import build_adapters
from proxy.providers.azure import DEFAULT_API_VERSION, AzureOpenAI
from proxy.providers.openai_compatible import OpenAICompatible
from proxy.settings import ConfigError, Provider, Timeouts, parse_settings
from proxy.upstream import UpstreamClient
from tests.conftest import KEY, GatewayProcess, module_gateway, server_fixtures
from tests.conftest import openai_client as client
from tests.mock_upstream import WORDS, MockUpstream

ANSWER = "".join(WORDS)
HI = [{"role": "user", "content": "hi"}]
RES = "https://res.openai.azure.com"

# -- unit: URLs and headers --------------------------------------------------------------------


def adapter(base_url: str = RES, api_version: str | None = "2024-06-01", **extra: Any) -> AzureOpenAI:
    config = Provider(id="azure", protocol="azure", base_url=base_url, api_key="cfg-key",
                      api_version=api_version, **extra)
    return AzureOpenAI(config, Timeouts(), UpstreamClient())


def target(model: str = "my-deployment", base_url: str = RES, api_key: str | None = "cfg-key",
           credentials: dict[str, Any] | None = None, custom: bool = False) -> Target:
    return Target(provider="azure", protocol="azure", model=model, base_url=base_url, api_key=api_key,
                  credentials=credentials, custom_credential=custom)


def call(body: dict[str, Any] | None = None) -> Call:
    body = body if body is not None else {"model": "azure/my-deployment", "messages": HI}
    return Call(endpoint="chat", path="/api/chat/completions", body=body, params=EMPTY, headers={})


def url(az: AzureOpenAI, t: Target) -> str:
    return az.url(call(), t)


@pytest.mark.parametrize("base_url", [RES, RES + "/", RES + "/openai", RES + "/openai/"])
def test_deployment_url(base_url):
    assert url(adapter(), target(base_url=base_url)) == (
        f"{RES}/openai/deployments/my-deployment/chat/completions?api-version=2024-06-01"
    )


def test_api_version_precedence():
    # the credential's, else the provider's, else the default
    assert url(adapter(), target(credentials={"api_key": "k", "api_version": "2025-01-01-preview"})).endswith(
        "/openai/deployments/my-deployment/chat/completions?api-version=2025-01-01-preview"
    )
    assert url(adapter(), target(credentials={"api_key": "k"})).endswith("?api-version=2024-06-01")
    assert url(adapter(api_version=None), target()).endswith(f"?api-version={DEFAULT_API_VERSION}")
    assert DEFAULT_API_VERSION == "2024-10-21"


def test_target_base_url_wins_and_deployment_is_one_path_segment():
    az = adapter()
    assert url(az, target(base_url="https://other.openai.azure.com")).startswith(
        "https://other.openai.azure.com/openai/deployments/"
    )
    assert url(az, target(base_url="")).startswith(f"{RES}/openai/deployments/")  # the provider's
    assert url(az, target(model="a/b c?d")) == (
        f"{RES}/openai/deployments/a%2Fb%20c%3Fd/chat/completions?api-version=2024-06-01"
    )


def test_full_deployment_url():
    full = f"{RES}/openai/deployments/fixed"
    az = adapter()
    expected = f"{full}/chat/completions?api-version=2024-06-01"
    assert url(az, target(base_url=full)) == expected  # the deployment in the URL wins over the model
    assert url(az, target(base_url=full + "/")) == expected
    assert url(az, target(base_url=full + "/chat/completions")) == expected
    # its own api-version is kept (over the provider's), a credential's still wins; other params stay
    with_query = f"{full}/chat/completions?foo=1&api-version=2023-05-15"
    assert url(az, target(base_url=with_query)) == f"{full}/chat/completions?foo=1&api-version=2023-05-15"
    assert url(az, target(base_url=with_query, credentials={"api_version": "2025-01-01-preview"})) == (
        f"{full}/chat/completions?foo=1&api-version=2025-01-01-preview"
    )
    # a malformed version in the URL is ignored
    assert url(az, target(base_url=f"{full}?api-version=a%26b")) == expected


def test_v1_api():
    v1 = f"{RES}/openai/v1/chat/completions"
    assert url(adapter(api_version="v1"), target()) == v1
    assert url(adapter(), target(credentials={"api_version": "v1"})) == v1
    assert url(adapter(base_url=RES + "/openai/v1/"), target(base_url="")) == v1
    assert url(adapter(), target(base_url=RES + "/openai/v1")) == v1
    # the deployment travels as the body's model
    body = orjson.loads(adapter(api_version="v1").request_body(call(), target()))
    assert body["model"] == "my-deployment"


@pytest.mark.parametrize("version", ["", "2024-10-21&x=1", "2024 10", "../x", 2024, ["v1"], "x" * 65])
def test_a_bad_request_api_version_is_422(version):
    with pytest.raises(ValidationFailed) as caught:
        url(adapter(), target(credentials={"api_key": "k", "api_version": version}))
    assert caught.value.status == 422 and caught.value.field == "api_version"


def test_a_bad_configured_api_version_is_a_config_error():
    with pytest.raises(ConfigError, match="api_version"):
        adapter(api_version="2024-10-21?x=1")


def test_built_from_config():
    settings = parse_settings({"providers": [
        {"id": "azure", "protocol": "azure", "base_url": RES, "api_key": "k", "api_version": "2024-10-21"},
    ], "auto_providers": False}, "test")
    built = build_adapters(settings, UpstreamClient())["azure"]
    assert isinstance(built, AzureOpenAI) and isinstance(built, OpenAICompatible)


def test_api_key_header():
    headers = adapter(headers={"x-extra": "1"}).request_headers(target())
    assert headers == {"Content-Type": "application/json", "x-extra": "1", "api-key": "cfg-key"}
    assert "Authorization" not in adapter().request_headers(target(api_key=None))


def test_request_credential_headers():
    az = adapter(headers={"x-secret": "s"})
    # the caller's own key, to the provider's URL: configured headers kept
    assert az.request_headers(target(api_key="k2", custom=True)) == {
        "Content-Type": "application/json", "x-secret": "s", "api-key": "k2"}
    # to a URL the caller chose: configured headers never go there
    assert az.request_headers(target(api_key="k2", base_url="https://x.example", custom=True)) == {
        "Content-Type": "application/json", "api-key": "k2"}
    # Microsoft Entra ID token instead of a key; a key in the same credential wins
    entra = az.request_headers(target(api_key=None, custom=True, credentials={"azure_ad_token": "tok"}))
    assert entra["Authorization"] == "Bearer tok" and "api-key" not in entra
    both = az.request_headers(target(api_key="k2", custom=True, credentials={"api_key": "k2", "azure_ad_token": "t"}))
    assert both["api-key"] == "k2" and "Authorization" not in both
    with pytest.raises(ValidationFailed):
        az.request_headers(target(api_key=None, custom=True, credentials={"azure_ad_token": "a\r\nb"}))


def test_body_is_the_openai_body():
    config = Provider(id="azure", protocol="azure", base_url=RES, api_key="k")
    plain = OpenAICompatible(config, Timeouts(), UpstreamClient())
    for body in ({"model": "azure/my-deployment", "messages": HI},
                 {"model": "x", "messages": HI, "stream": True},
                 {"model": "x", "messages": HI, "stream": True, "stream_options": {"include_usage": True}}):
        c = call(body)
        assert adapter().request_body(c, target()) == plain.request_body(c, target())
    sent = orjson.loads(adapter().request_body(call({"model": "x", "messages": HI, "stream": True}), target()))
    assert sent["model"] == "my-deployment" and sent["stream_options"] == {"include_usage": True}


# -- end to end ----------------------------------------------------------------------------------

PRICES = {"input": 1.0, "output": 2.0, "cached_input": 0.5}
COST = (9 * 1.0 + 2 * 0.5 + 7 * 2.0) / 1e6  # the mock's usage: 11 prompt (2 cached), 7 completion


# `second`: another Azure resource, for credentials that name their own api_base; `other`: it, reset
second, other = server_fixtures(MockUpstream, "second", "other")


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = mock_upstream.root_url
    yield from module_gateway(
        tmp_path_factory, "azure", mock_upstream,
        providers=[
            {"id": "azure", "protocol": "azure", "base_url": root, "api_key": "az-key", "api_version": "2024-10-21"},
            {"id": "azure_fixed", "protocol": "azure", "base_url": f"{root}/openai/deployments/fixed-dep",
             "api_key": "fixed-key", "api_version": "2024-06-01"},
        ],
        models=[
            {"name": "my-gpt", "provider": "azure", "model": "my-deployment", "prices": PRICES},
            {"name": "fixed", "provider": "azure_fixed", "model": "ignored"},
        ],
        pipeline=["auth", "routing", "credentials"],
    )


def post(gw: GatewayProcess, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gw.url}/api/chat/completions", content=orjson.dumps(body), timeout=10,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})


def assert_sent(request: dict[str, Any], deployment: str, version: str, key: str) -> None:
    assert request["azure"] is True
    assert request["path"] == f"/openai/deployments/{deployment}/chat/completions"
    assert request["query"] == {"api-version": version}
    assert request["headers"]["api-key"] == key
    assert "Authorization" not in request["headers"]


@pytest.mark.parametrize("model", ["azure/my-deployment", "my-gpt"])
def test_e2e_non_stream(gw, mock, model):
    raw = client(gw).chat.completions.with_raw_response.create(model=model, messages=HI, temperature=0.2)
    completion = raw.parse()
    assert completion.choices[0].message.content == ANSWER
    assert completion.usage.total_tokens == 18
    assert len(mock.requests) == 1
    sent = mock.last()
    assert_sent(sent, "my-deployment", "2024-10-21", "az-key")
    assert sent["body"] == {"model": "my-deployment", "messages": HI, "temperature": 0.2}  # Azure ignores model

    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["status_code"] == 200 and record["provider_id"] == "azure"
    assert (record["prompt_tokens"], record["completion_tokens"], record["prompt_cache_hit_tokens"]) == (11, 7, 2)
    assert record["cost"] == pytest.approx(COST)
    assert float(raw.headers["x-llmrelay-cost"]) == pytest.approx(COST)
    assert record["completion_message"] == {"role": "assistant", "content": ANSWER}
    assert (record["deployment_name"], record["used_custom_credential"]) == ("azure", False)


@pytest.mark.parametrize(("model", "include_usage"), [("azure/my-deployment", False), ("my-gpt", True)])
def test_e2e_stream(gw, mock, model, include_usage):
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    raw = client(gw).chat.completions.with_raw_response.create(model=model, messages=HI, stream=True, **options)
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    # Azure's prompt-filter chunk (no choices) reaches the client; the usage chunk only if asked
    assert any(getattr(c, "prompt_filter_results", None) for c in chunks)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert [(u.prompt_tokens, u.completion_tokens) for u in usage] == ([(11, 7)] if include_usage else [])

    sent = mock.last()
    assert_sent(sent, "my-deployment", "2024-10-21", "az-key")
    assert sent["body"]["stream"] is True and sent["body"]["stream_options"] == {"include_usage": True}

    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["stream"] is True and record["status_code"] == 200
    assert (record["prompt_tokens"], record["completion_tokens"]) == (11, 7)
    assert record["cost"] == pytest.approx(COST)
    assert record["completion_message"] == {"role": "assistant", "content": ANSWER}


def test_e2e_credential_override_reaches_its_resource(gw, mock, other):
    override = {"azure/my-deployment": {"api_key": "k2", "api_base": other.root_url,
                                        "api_version": "2025-01-01-preview"}}
    for stream in (False, True):
        raw = client(gw).chat.completions.with_raw_response.create(
            model="azure/my-deployment", messages=HI, stream=stream, extra_body={"credential_override": override})
        parsed = raw.parse()
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) == ANSWER
        else:
            assert parsed.choices[0].message.content == ANSWER
        assert mock.requests == []  # never the configured resource
        assert_sent(other.last(), "my-deployment", "2025-01-01-preview", "k2")
        record = gw.record(raw.headers["x-respan-log-id"])
        assert (record["deployment_name"], record["used_custom_credential"]) == ("credential_override", True)
        assert record["cost"] == pytest.approx(COST)
    assert len(other.requests) == 2


def test_e2e_request_credentials_on_the_configured_resource(gw, mock):
    # api_version alone changes the version; the key is the caller's (never the gateway's)
    override = {"my-gpt": {"api_key": "k3", "api_version": "2024-08-01-preview"}}
    response = post(gw, {"model": "my-gpt", "messages": HI, "credential_override": override})
    assert response.status_code == 200, response.text
    assert_sent(mock.last(), "my-deployment", "2024-08-01-preview", "k3")
    # customer_credentials per provider id
    response = post(gw, {"model": "azure/my-deployment", "messages": HI,
                         "customer_credentials": {"azure": {"api_key": "k4"}}})
    assert response.status_code == 200, response.text
    assert_sent(mock.last(), "my-deployment", "2024-10-21", "k4")
    # Microsoft Entra ID token
    response = post(gw, {"model": "azure/my-deployment", "messages": HI,
                         "customer_credentials": {"azure": {"azure_ad_token": "entra-token"}}})
    assert response.status_code == 200, response.text
    headers = mock.last()["headers"]
    assert headers["Authorization"] == "Bearer entra-token" and "api-key" not in headers


def test_e2e_bad_api_version_is_422(gw, mock):
    override = {"azure/my-deployment": {"api_key": "k", "api_version": "2024-10-21&evil=1"}}
    response = post(gw, {"model": "azure/my-deployment", "messages": HI, "credential_override": override})
    assert response.status_code == 422, response.text
    assert "api_version" in response.json()["errors"]
    assert mock.requests == []


def test_e2e_full_deployment_url(gw, mock):
    response = post(gw, {"model": "fixed", "messages": HI})
    assert response.status_code == 200, response.text
    assert_sent(mock.last(), "fixed-dep", "2024-06-01", "fixed-key")
    assert mock.last()["body"]["model"] == "ignored"


@pytest.mark.parametrize("status", [429, 500])
def test_e2e_upstream_errors_pass_through(gw, mock, status):
    with pytest.raises(openai.APIStatusError) as caught:
        client(gw).chat.completions.create(model=f"azure/mock-status-{status}", messages=HI)
    error = caught.value
    assert error.status_code == status
    assert error.body["code"] == f"mock_{status}"  # the provider's own OpenAI-shaped error
    assert error.response.headers.get("x-request-id") == "req-mock"
    assert_sent(mock.last(), f"mock-status-{status}", "2024-10-21", "az-key")
    record = gw.record(error.response.headers["x-respan-log-id"])
    assert record["status_code"] == status and record["status"] == "error"
    # and in a stream request: the error comes before any byte, with its status
    response = post(gw, {"model": f"azure/mock-status-{status}", "messages": HI, "stream": True})
    assert response.status_code == status
    assert response.json()["error"]["code"] == f"mock_{status}"


def test_azure_openai_is_an_alias_of_the_azure_provider():
    from proxy.catalog import load_catalog
    from proxy.model_table import ModelTable
    from proxy.settings import parse_settings

    settings = parse_settings({"providers": [{"id": "azure", "protocol": "azure", "base_url": "https://r.openai.azure.com",
                                              "api_key": "k"}], "auto_providers": False}, "<test>", env={})
    table = ModelTable(settings, load_catalog())
    assert table.provider_id("azure_openai") == "azure"
    assert table.resolve("azure_openai/my-dep").provider == "azure"
    assert table.public_models() == [] or all(
        m["provider"]["credential_fields"] == ["api_key", "api_base", "api_version"] for m in table.public_models())
