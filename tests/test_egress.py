"""Egress policy (proxy/egress.py): a tenant-supplied base URL cannot reach loopback, link-local /
cloud metadata, private or reserved addresses unless the operator allows it; header injection
through params and admin calls is refused. Unit tests of the policy, the connect-time check on
the real UpstreamClient, then `llmrelay serve` in front of the mock provider."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from proxy.egress import EgressDenied, EgressPolicy, header_reason, literal_ip
from proxy.settings import ConfigError, parse_settings
from proxy.upstream import UpstreamClient
from tests.conftest import ADMIN_KEYS, KEY, GatewayProcess, admin_request
from tests.mock_upstream import MockUpstream

SECRET = "sk-tenant-secret-egress-5f3a9c"
PIPELINE = ["auth", "routing", "credentials", "fallback"]
HOSTNAME = socket.gethostname()


def assert_host_name_is_loopback() -> None:
    """The end-to-end rebinding cases need a name the gateway process resolves to loopback through the
    machine's own resolver: its host name (in /etc/hosts on the gateway's machines). A machine without
    that fails here loudly rather than skipping the case."""
    try:
        addresses = {i[4][0] for i in socket.getaddrinfo(HOSTNAME, 80)}
    except OSError as exc:
        pytest.fail(f"this machine's host name {HOSTNAME!r} does not resolve ({exc}); add it to /etc/hosts")
    assert addresses == {"127.0.0.1"}, f"{HOSTNAME!r} resolves to {addresses}: expected 127.0.0.1 (/etc/hosts)"


# -- unit: the policy -------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "reason"), [
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://2852039166/", "169.254.169.254 is a link-local"),  # decimal
    ("http://0251.0376.0251.0376/", "169.254.169.254 is a link-local"),  # octal
    ("http://0xa9.0xfe.0xa9.0xfe/", "169.254.169.254 is a link-local"),  # hex
    ("http://[::ffff:169.254.169.254]/", "169.254.169.254 is a link-local"),  # IPv4-mapped IPv6
    ("http://[::ffff:a9fe:a9fe]/", "169.254.169.254 is a link-local"),
    ("http://[64:ff9b::a9fe:a9fe]/", "169.254.169.254 is a link-local"),  # NAT64
    ("http://[2002:a9fe:a9fe::1]/", "169.254.169.254 is a link-local"),  # 6to4
    ("http://[fd00:ec2::254]/", "private (unique local)"),  # AWS IMDS over IPv6
    ("http://[::1]:8000/v1", "::1 is a loopback"),
    ("http://[fe80::1]/", "link-local"),
    ("http://127.0.0.1:8000/v1", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://169.254.169.254./", "link-local"),  # a trailing dot
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://10.0.0.8/v1", "private"),
    ("http://172.20.1.1/v1", "private"),
    ("http://192.168.1.1/v1", "private"),
    ("http://100.100.100.200/", "carrier-grade NAT"),  # Alibaba's metadata address
    ("http://224.0.0.1/", "multicast"),
    ("http://255.255.255.255/", "reserved"),
    ("http://localhost:8000/v1", "host localhost is a local or cloud metadata host name"),
    ("http://api.localhost/v1", "local or cloud metadata host name"),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata.google.internal is a local or cloud metadata"),
    ("http://METADATA.google.internal./", "local or cloud metadata"),
    ("http://user:pw@api.example.com/v1", "user info"),
    ("file:///etc/passwd", "only http:// and https://"),
    ("gopher://api.example.com/", "only http:// and https://"),
    ("http://api.example.com:99999/", "not a valid URL"),
])
def test_default_policy_refuses(url: str, reason: str) -> None:
    found = EgressPolicy().url_reason(url)
    assert found is not None and reason in found, found


@pytest.mark.parametrize("url", [
    "https://api.openai.com/v1", "http://8.8.8.8/v1", "https://[2606:4700::1111]/v1", "http://vllm.example.com:8000/v1",
])
def test_default_policy_lets_public_urls_through(url: str) -> None:
    assert EgressPolicy().url_reason(url) is None


def test_allow_wins_over_the_default_deny_and_deny_wins_over_allow() -> None:
    policy = EgressPolicy(allow=["10.1.0.0/16", "127.0.0.1", "vllm.internal", ".corp.example", "localhost"],
                          deny=["10.1.2.0/24", "8.8.8.8", "*.evil.example", "bad.corp.example"])
    assert policy.url_reason("http://10.1.9.9/v1") is None
    assert policy.url_reason("http://127.0.0.1:8000/v1") is None
    assert policy.url_reason("http://localhost:8000/v1") is None
    assert policy.host_allowed_by_name("vllm.internal") and policy.host_allowed_by_name("gpu1.corp.example")
    assert not policy.host_allowed_by_name("vllm.internal.evil.example")
    assert "10.1.2.3 is in egress.deny" in policy.url_reason("http://10.1.2.3/")
    assert "in egress.deny" in policy.url_reason("http://8.8.8.8/")
    assert "in egress.deny" in policy.url_reason("http://[::ffff:8.8.8.8]/")  # the IPv4 inside counts
    assert "in egress.deny" in policy.url_reason("http://x.evil.example/")
    assert "in egress.deny" in policy.url_reason("http://bad.corp.example/")
    assert "loopback" in policy.url_reason("http://127.0.0.2/")  # only the allowed address
    assert "link-local" in policy.url_reason("http://169.254.169.254/")


def test_literal_ip_reads_the_forms_getaddrinfo_reads() -> None:
    for form in ("169.254.169.254", "2852039166", "0251.0376.0251.0376", "0xa9fea9fe", "169.254.43518"):
        assert literal_ip(form) == ipaddress.ip_address("169.254.169.254"), form
        assert socket.getaddrinfo(form, 80)[0][4][0] == "169.254.169.254"  # what a connection would reach
    assert literal_ip("api.example.com") is None and literal_ip("1e100.net") is None


@pytest.mark.parametrize(("egress", "field"), [
    ({"allow": ["300.1.1.1/8"]}, "$.egress.allow[0]"),
    ({"allow": ["10.0.0.0/8", "http://x"]}, "$.egress.allow[1]"),
    ({"deny": ["bad host"]}, "$.egress.deny[0]"),
    ({"deny": [""]}, "$.egress.deny[0]"),
])
def test_config_errors_name_the_field(egress: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"egress": egress}, "test.yaml")
    assert field in str(info.value)


def test_config_unknown_egress_key_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"egress": {"allowed": ["10.0.0.0/8"]}}, "test.yaml")
    assert "allowed" in str(info.value)


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("X-Ok", "a\r\nInjected: 1", "CR, LF"),
    ("X-Ok", "a\nb", "CR, LF"),
    ("X-Ok", "a\0b", "CR, LF, NUL"),
    ("X-Ok", "a\x1bb", "control"),
    ("X-Bad\r\nInjected", "v", "header name"),
    ("X Bad", "v", "header name"),
    ("X-Bad:", "v", "header name"),
    ("", "v", "header name"),
    ("X-Ok", 3, "string"),
])
def test_header_reason_refuses(name: Any, value: Any, reason: str) -> None:
    found = header_reason(name, value)
    assert found is not None and reason in found


def test_header_reason_lets_ordinary_headers_through() -> None:
    assert header_reason("X-Team", "search\tteam") is None
    assert header_reason("anthropic-beta", "tools-2024-04-04,x") is None


# -- unit: the connect-time check on the real client ---------------------------------------------


REBINDING = "rebind.egress.test"  # a name only the tests' resolver knows


def post(client: UpstreamClient, url: str, egress: str | None, resolves_to: list[str] | None = None) -> Any:
    """POST through `client`; with `resolves_to`, the loop's resolver answers those addresses for
    REBINDING (what a DNS rebinding attacker's server would say), whatever this machine's DNS does."""

    async def go() -> Any:
        loop = asyncio.get_running_loop()
        system = loop.getaddrinfo

        async def scripted(host: Any, port: Any, **kwargs: Any) -> Any:
            if host == REBINDING and resolves_to is not None:
                return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port)) for a in resolves_to]
            return await system(host, port, **kwargs)

        loop.getaddrinfo = scripted  # type: ignore[method-assign]
        try:
            response = await client.post("p", url, {"Content-Type": "application/json"}, b"{}", connect_timeout=2,
                                         read_timeout=5, stream=False, egress=egress)
            return response.status, await response.read()
        finally:
            await client.close()
    return asyncio.run(go())


@pytest.mark.parametrize(("addresses", "denied"), [
    (["127.0.0.1"], "127.0.0.1 is a loopback address"),
    (["169.254.169.254"], "169.254.169.254 is a link-local address"),
    (["93.184.215.14", "169.254.169.254"], "169.254.169.254 is a link-local address"),  # one bad answer is enough
])
def test_a_host_name_resolving_to_a_denied_address_is_refused_at_connect(mock: MockUpstream, addresses: list[str],
                                                                          denied: str) -> None:
    url = f"http://{REBINDING}:{mock.port}/v1/chat/completions"
    with pytest.raises(EgressDenied) as info:
        post(UpstreamClient(EgressPolicy()), url, "customer_credentials.mock.api_base", addresses)
    assert info.value.status == 422
    reason = info.value.extra["errors"]["customer_credentials.mock.api_base"][0]
    assert f"host {REBINDING} resolves to {denied.split()[0]}" in reason and denied.split(" is ")[1] in reason
    assert mock.requests == []
    # the operator's own URL (no egress field) is not checked at all
    assert post(UpstreamClient(EgressPolicy()), url, None, ["127.0.0.1"])[0] == 200


def test_an_allowed_address_connects_to_the_checked_address_with_the_host_name(mock: MockUpstream) -> None:
    url = f"http://{REBINDING}:{mock.port}/v1/chat/completions"
    status, _ = post(UpstreamClient(EgressPolicy(allow=["127.0.0.0/8"])), url, "field", ["127.0.0.1"])
    assert status == 200
    assert mock.last()["headers"]["Host"] == f"{REBINDING}:{mock.port}"


# -- end to end: llmrelay serve ---------------------------------------------------------------------


@pytest.fixture
def mock(mock_upstream: MockUpstream) -> Iterator[MockUpstream]:
    mock_upstream.reset()
    yield mock_upstream


def start(start_gateway: Any, egress: dict[str, Any] | None = None) -> GatewayProcess:
    return start_gateway(pipeline=PIPELINE, admin_keys=ADMIN_KEYS, egress=egress or {})


def chat(gw: GatewayProcess, **params: Any) -> httpx.Response:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], **params}
    if body["model"] is None:
        del body["model"]
    return httpx.post(f"{gw.url}/api/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=10)


def assert_refused(gw: GatewayProcess, mock: MockUpstream, response: httpx.Response, field: str, reason: str) -> None:
    """422 naming the field and the reason; nothing reached the mock; the refusal is logged, without the secret."""
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert field in errors, errors
    assert reason in errors[field][0], errors
    assert SECRET not in response.text
    assert mock.requests == []
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 422
    assert SECRET not in orjson.dumps(record, default=str).decode()


def tenant(url: str, **more: Any) -> dict[str, Any]:
    return {"customer_credentials": {"mock": {"api_key": SECRET, "api_base": url, **more}}}


def test_e2e_tenant_urls_to_denied_addresses_are_refused_before_any_connection(start_gateway, mock) -> None:
    gw = start(start_gateway)
    port = mock.port
    field = "customer_credentials.mock.api_base"
    cases = [
        ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "169.254.169.254 is a link-local"),
        (f"http://127.0.0.1:{port}/v1", "127.0.0.1 is a loopback address"),
        (f"http://localhost:{port}/v1", "host localhost is a local or cloud metadata host name"),
        (f"http://[::1]:{port}/v1", "::1 is a loopback address"),
        ("http://[::ffff:169.254.169.254]/v1", "169.254.169.254 is a link-local"),
        ("http://2852039166/v1", "169.254.169.254 is a link-local"),
        ("http://0251.0376.0251.0376/v1", "169.254.169.254 is a link-local"),
        ("http://metadata.google.internal/computeMetadata/v1", "metadata.google.internal"),
        ("http://10.0.0.1/v1", "private address"),
    ]
    for url, reason in cases:
        assert_refused(gw, mock, chat(gw, **tenant(url)), field, reason)
    # other shapes name their own field
    response = chat(gw, credential_override={"gpt-test": {"api_key": SECRET, "base_url": "http://169.254.169.254/v1"}})
    assert_refused(gw, mock, response, "credential_override.gpt-test.base_url", "link-local")
    response = chat(gw, customer_credentials=[{"credentials": {"mock": {"api_key": SECRET,
                                                                            "endpoint": f"http://127.0.0.1:{port}"}}}])
    assert_refused(gw, mock, response, "customer_credentials[0].credentials.mock.endpoint", "loopback")
    response = chat(gw, model=None, load_balance_models=[{"model": "gpt-test", "weight": 1, "credentials": {
        "api_key": SECRET, "api_base": "http://[::ffff:a9fe:a9fe]/v1"}}])
    assert_refused(gw, mock, response, "load_balance.credentials.api_base", "169.254.169.254 is a link-local")
    response = chat(gw, **tenant(f"http://user:{SECRET}@api.example.com/v1"))
    assert response.status_code == 422 and SECRET not in response.text and mock.requests == []
    assert "customer_credentials.mock.api_base" in response.json()["errors"]


def test_e2e_a_host_name_that_resolves_to_loopback_is_refused_at_connect(start_gateway, mock) -> None:
    assert_host_name_is_loopback()
    gw = start(start_gateway)
    response = chat(gw, **tenant(f"http://{HOSTNAME}:{mock.port}/v1"))
    assert_refused(gw, mock, response, "customer_credentials.mock.api_base",
                   f"host {HOSTNAME.lower()} resolves to 127.0.0.1: 127.0.0.1 is a loopback address")
    # the operator's own provider on the same mock still answers: config-file providers are trusted
    ok = chat(gw, model="gpt-test")
    assert ok.status_code == 200, ok.text


def test_e2e_the_allow_list_lets_an_internal_host_through(start_gateway, mock) -> None:
    gw = start(start_gateway, {"allow": ["127.0.0.1/32", HOSTNAME]})
    response = chat(gw, **tenant(f"http://127.0.0.1:{mock.port}/v1"))
    assert response.status_code == 200, response.text
    assert mock.last()["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert_host_name_is_loopback()
    response = chat(gw, **tenant(f"http://{HOSTNAME}:{mock.port}/v1"))
    assert response.status_code == 200, response.text
    assert mock.last()["headers"]["Host"] == f"{HOSTNAME}:{mock.port}"
    mock.reset()
    # what the allow list does not name stays refused
    assert_refused(gw, mock, chat(gw, **tenant("http://169.254.169.254/v1")), "customer_credentials.mock.api_base",
                   "link-local")


def test_e2e_header_injection_through_params_is_refused(start_gateway, mock) -> None:
    gw = start(start_gateway)
    for headers, field in [
        ({"X-Ok": "a\r\nX-Injected: 1"}, "extra_headers.X-Ok"),
        ({"X-Bad\r\nX-Injected": "1"}, "extra_headers.X-Bad??X-Injected"),
        ({"X Bad": "1"}, "extra_headers.X?Bad"),
        ({"X-Ok": "a\0b"}, "extra_headers.X-Ok"),
    ]:
        response = chat(gw, model="gpt-test", extra_headers=headers)
        assert response.status_code == 422, response.text
        assert field in response.text, response.text
        assert mock.requests == []
    response = chat(gw, customer_credentials={"mock": {"api_key": SECRET + "\r\nX-Injected: 1"}})
    assert response.status_code == 422 and "customer_credentials.mock.api_key" in response.text
    assert SECRET not in response.text and mock.requests == []
    response = chat(gw, customer_credentials={"mock": {"api_key": SECRET, "api_version": "2024\r\nX: 1"}})
    assert response.status_code == 422 and "customer_credentials.mock.api_version" in response.text
    assert mock.requests == []


def test_e2e_admin_providers_get_the_policy_and_header_checks(start_gateway, mock) -> None:
    gw = start(start_gateway)

    def create(base_url: str, **kwargs: Any) -> httpx.Response:
        provider = f"p-{uuid.uuid4().hex[:6]}"
        body = {"provider_id": provider, "provider_name": "tenant", "api_key": SECRET,
                "extra_kwargs": {"base_url": base_url, **kwargs}}
        return admin_request(gw, "POST", "/api/providers/", body)

    for url, reason in [("http://169.254.169.254/v1", "link-local"), (f"http://127.0.0.1:{mock.port}/v1", "loopback"),
                        ("http://[::ffff:169.254.169.254]/v1", "link-local"), ("http://2852039166/", "link-local"),
                        ("http://localhost/v1", "local or cloud metadata host name")]:
        response = create(url)
        assert response.status_code == 400, response.text  # the admin API's invalid-field status
        assert "extra_kwargs.base_url" in response.text and reason in response.text, response.text
        assert SECRET not in response.text
    for headers, field in [({"X-Team": "a\r\nX-Injected: 1"}, "extra_kwargs.headers.X-Team"),
                           ({"X Team": "a"}, "extra_kwargs.headers.X?Team"),
                           ({"X-Team:": "a"}, "extra_kwargs.headers.X-Team:")]:
        response = create("https://api.example.com/v1", headers=headers)
        assert response.status_code == 400 and field in response.text, response.text
    # a host name passes at creation; its connections are checked
    assert_host_name_is_loopback()
    provider = f"p-{uuid.uuid4().hex[:6]}"
    body = {"provider_id": provider, "provider_name": "tenant", "api_key": SECRET,
            "extra_kwargs": {"base_url": f"http://{HOSTNAME}:{mock.port}/v1"}}
    assert admin_request(gw, "POST", "/api/providers/", body).status_code == 201
    response = chat(gw, model=f"{provider}/mock-ok")
    assert_refused(gw, mock, response, f"providers.{provider}.extra_kwargs.base_url",
                   f"host {HOSTNAME.lower()} resolves to 127.0.0.1")
    assert mock.requests == []


def test_e2e_admin_provider_on_an_allowed_internal_host_answers(start_gateway, mock) -> None:
    gw = start(start_gateway, {"allow": ["127.0.0.1"]})
    provider = f"p-{uuid.uuid4().hex[:6]}"
    body = {"provider_id": provider, "provider_name": "our vllm", "api_key": SECRET,
            "extra_kwargs": {"base_url": f"http://127.0.0.1:{mock.port}/v1", "headers": {"X-Team": "search"}}}
    assert admin_request(gw, "POST", "/api/providers/", body).status_code == 201
    response = chat(gw, model=f"{provider}/mock-ok")
    assert response.status_code == 200, response.text
    assert mock.last()["headers"]["X-Team"] == "search"


def test_e2e_alert_urls_set_through_the_admin_api_get_the_policy(start_gateway, mock) -> None:
    gw = start_gateway(pipeline=["auth", {"name": "limits", "options": {"policies": []}}], admin_keys=ADMIN_KEYS,
                       egress={})
    policy = {"name": "spend", "scope": "organization", "metric": "requests", "window": "minute", "warn_threshold": 5}
    for notify, field, reason in [
        ({"webhooks": [{"url": "http://169.254.169.254/latest/", "secret": "s"}]}, "notify.webhooks[0].url", "link-local"),
        ({"slack_webhook_urls": ["https://hooks.slack.com/x", f"http://127.0.0.1:{mock.port}/hook"]},
         "notify.slack_webhook_urls[1]", "loopback"),
    ]:
        response = admin_request(gw, "POST", "/api/limits/", {**policy, "notify": notify})
        assert response.status_code == 400, response.text
        assert field in response.text and reason in response.text, response.text
    ok = admin_request(gw, "POST", "/api/limits/", {**policy, "notify": {"slack_webhook_urls": ["https://hooks.slack.com/x"]}})
    assert ok.status_code == 201, ok.text
