"""The Vertex AI adapter (proxy/providers/vertex.py) and its OAuth tokens (proxy/providers/google_auth.py).

End to end through real gateway processes with the official `openai` SDK against tests/mock_vertex.py,
whose token endpoint verifies the JWT (claims and RS256 signature, with the public key of test
keypairs made here by `openssl`), plus unit tests of the signing, parsing and URL choices.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from proxy.call import Target
from proxy.providers.google_auth import InvalidServiceAccount, RSAPrivateKey, ServiceAccount, TokenCache
from proxy.providers.vertex import VertexAI, VertexBase
from proxy.settings import ConfigError, Provider, Timeouts
from proxy.upstream import UpstreamClient
from tests.conftest import GatewayProcess, base_config, module_gateway
from tests.conftest import openai_client as client
from tests.mock_anthropic import TEXT as CLAUDE_TEXT
from tests.mock_gemini import ANSWER as GEMINI_TEXT
from tests.mock_vertex import MockVertex, rs256_valid

PRICES = {"input": 1.0, "output": 2.0, "cached_input": 0.5}
HI = [{"role": "user", "content": "hi"}]
GEMINI_COST = ((12 - 4) * 1.0 + 4 * 0.5 + 6 * 2.0) / 1e6  # mock_gemini.USAGE: 12 prompt (4 cached), 6 completion
CLAUDE_COST = (12 * 1.0 + 6 * 2.0) / 1e6  # mock_anthropic.USAGE: 12 input, 6 output
GATEWAY_EMAIL = "gateway@proj-test.iam.gserviceaccount.com"
CUSTOMER_EMAIL = "customer@cust-proj.iam.gserviceaccount.com"
CLAUDE_MODEL = "claude-sonnet-4-5@20250929"


class Keypair:
    """An RSA test key made by openssl: the private PEM and the public modulus / exponent."""

    def __init__(self, directory: Path, name: str, traditional: bool = False) -> None:
        private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
        subprocess.run(["openssl", "genrsa", "-out", str(private), "2048"], check=True, capture_output=True)
        if traditional:  # PKCS#1 ("BEGIN RSA PRIVATE KEY") instead of OpenSSL 3's PKCS#8
            subprocess.run(["openssl", "rsa", "-in", str(private), "-traditional", "-out", str(private)],
                           check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(private), "-pubout", "-out", str(public)],
                       check=True, capture_output=True)
        out = subprocess.run(["openssl", "rsa", "-pubin", "-in", str(public), "-noout", "-text"],
                             check=True, capture_output=True, text=True).stdout
        self.pem = private.read_text()
        modulus = subprocess.run(["openssl", "rsa", "-pubin", "-in", str(public), "-noout", "-modulus"],
                                 check=True, capture_output=True, text=True).stdout
        self.n = int(modulus.strip().partition("=")[2], 16)
        assert "Exponent: 65537" in out
        self.e = 65537

    def account(self, email: str, token_uri: str, project: str = "proj-test") -> dict[str, Any]:
        return {"type": "service_account", "project_id": project, "private_key_id": "kid-1",
                "private_key": self.pem, "client_email": email, "client_id": "1234567890",
                "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": token_uri}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Keypair]:
    directory = tmp_path_factory.mktemp("vertex-keys")
    return {"gateway": Keypair(directory, "gateway"), "customer": Keypair(directory, "customer", traditional=True),
            "rogue": Keypair(directory, "rogue")}


@pytest.fixture(scope="module")
def vertex_mock(keys) -> Iterator[MockVertex]:
    mock = MockVertex().start()
    mock.add_account(GATEWAY_EMAIL, keys["gateway"].n, keys["gateway"].e)
    mock.add_account(CUSTOMER_EMAIL, keys["customer"].n, keys["customer"].e)
    yield mock
    mock.stop()


@pytest.fixture
def vx(vertex_mock: MockVertex) -> MockVertex:
    vertex_mock.reset()
    return vertex_mock


def vertex_config(mock: MockVertex, upstream, workdir: Path) -> dict[str, Any]:
    return base_config(
        upstream, workdir,
        providers=[
            # the service-account JSON text comes from the environment, as a deployment would do it
            {"id": "vertex", "protocol": "vertex_ai", "api_key": "${VERTEX_SA_JSON}",
             "base_url": f"{mock.base_url}/v1/projects/proj-test/locations/us-central1"},
            {"id": "vertex-bad", "protocol": "vertex_ai", "api_key": "${VERTEX_BAD_SA_JSON}",
             "base_url": f"{mock.base_url}/v1/projects/proj-test/locations/us-central1"},
        ],
        models=[
            {"name": "vx-gemini", "provider": "vertex", "model": "gemini-2.5-flash", "prices": PRICES},
            {"name": "vx-claude", "provider": "vertex", "model": CLAUDE_MODEL, "prices": PRICES},
            {"name": "vx-bad", "provider": "vertex-bad", "model": "gemini-2.5-flash", "prices": PRICES},
        ],
        pipeline=["auth", "routing", "credentials"],
    )


def vertex_env(mock: MockVertex, keys: dict[str, Keypair]) -> dict[str, str]:
    good = keys["gateway"].account(GATEWAY_EMAIL, mock.token_uri)
    bad = keys["rogue"].account(GATEWAY_EMAIL, mock.token_uri)  # the right email, a key Google does not know
    return {"VERTEX_SA_JSON": orjson.dumps(good).decode(), "VERTEX_BAD_SA_JSON": orjson.dumps(bad).decode()}


def serving_vertex(directory: Path) -> Iterator[tuple[MockVertex, dict[str, str]]]:
    """For another module's fixture: a running mock that knows the gateway's service account, and
    the environment (VERTEX_SA_JSON) a gateway needs to use it."""
    mock = MockVertex().start()
    keypair = Keypair(directory, "gateway")
    mock.add_account(GATEWAY_EMAIL, keypair.n, keypair.e)
    yield mock, vertex_env(mock, {"gateway": keypair, "rogue": keypair})
    mock.stop()


@pytest.fixture(scope="module")
def gw(vertex_mock, keys, mock_upstream, tmp_path_factory) -> Iterator[GatewayProcess]:
    yield from module_gateway(tmp_path_factory, "vertex-gateway", env=vertex_env(vertex_mock, keys),
                              config=lambda workdir: vertex_config(vertex_mock, mock_upstream, workdir))


def bearer(request: dict[str, Any]) -> str:
    return request["headers"]["Authorization"].removeprefix("Bearer ")


# -- end to end ------------------------------------------------------------------------------


def test_gemini_model_non_stream_and_stream(gw, vx):
    raw = client(gw).chat.completions.with_raw_response.create(model="vx-gemini", messages=HI, max_tokens=50)
    completion = raw.parse()
    assert completion.choices[0].message.content == GEMINI_TEXT
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (12, 6)
    sent = vx.requests[-1]
    assert sent["publisher"] == "google" and sent["method"] == "generateContent"
    assert sent["path"] == ("/v1/projects/proj-test/locations/us-central1/publishers/google/models/"
                            "gemini-2.5-flash:generateContent")
    assert sent["body"]["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]
    assert sent["body"]["generationConfig"]["maxOutputTokens"] == 50
    assert bearer(sent).startswith("ya29.mock-") and "x-goog-api-key" not in {k.lower() for k in sent["headers"]}
    record = gw.record(raw.headers["x-respan-log-id"])
    assert (record["prompt_tokens"], record["completion_tokens"]) == (12, 6)
    assert record["cost"] == pytest.approx(GEMINI_COST)

    with client(gw).chat.completions.with_streaming_response.create(
            model="vx-gemini", messages=HI, stream=True) as response:
        chunks = list(response.parse())
        log_id = response.headers["x-respan-log-id"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == GEMINI_TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"
    sent = vx.requests[-1]
    assert sent["method"] == "streamGenerateContent" and sent["query"] == {"alt": "sse"}
    record = gw.record(log_id)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (12, 6)
    assert record["cost"] == pytest.approx(GEMINI_COST)


def test_claude_model_non_stream_and_stream(gw, vx):
    raw = client(gw).chat.completions.with_raw_response.create(
        model="vx-claude", messages=[{"role": "system", "content": "Be brief."}, *HI])
    completion = raw.parse()
    assert completion.choices[0].message.content == CLAUDE_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (12, 6)
    sent = vx.requests[-1]
    assert sent["publisher"] == "anthropic"
    assert sent["path"] == ("/v1/projects/proj-test/locations/us-central1/publishers/anthropic/models/"
                            f"{CLAUDE_MODEL}:rawPredict")
    body = sent["body"]
    assert body["anthropic_version"] == "vertex-2023-10-16" and "model" not in body
    assert body["system"] == "Be brief." and body["max_tokens"] == 4096
    lower = {k.lower() for k in sent["headers"]}
    assert "x-api-key" not in lower and "anthropic-version" not in lower and bearer(sent).startswith("ya29.")
    record = gw.record(raw.headers["x-respan-log-id"])
    assert (record["prompt_tokens"], record["completion_tokens"]) == (12, 6)
    assert record["cost"] == pytest.approx(CLAUDE_COST)

    with client(gw).chat.completions.with_streaming_response.create(
            model="vx-claude", messages=HI, stream=True, stream_options={"include_usage": True}) as response:
        chunks = list(response.parse())
        log_id = response.headers["x-respan-log-id"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CLAUDE_TEXT
    assert chunks[-1].usage.prompt_tokens == 12 and chunks[-1].usage.completion_tokens == 6
    sent = vx.requests[-1]
    assert sent["method"] == "streamRawPredict" and sent["body"]["stream"] is True
    assert "model" not in sent["body"]
    record = gw.record(log_id)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (12, 6)
    assert record["cost"] == pytest.approx(CLAUDE_COST)


def test_bad_key_is_a_clear_502(gw, vx, keys):
    with pytest.raises(openai.APIStatusError) as caught:
        client(gw).chat.completions.create(model="vx-bad", messages=HI)
    error = caught.value
    assert error.status_code == 502
    detail = error.response.json()["detail"]
    assert "vertex-bad" in detail and "token endpoint" in detail and "Invalid JWT Signature" in detail
    assert GATEWAY_EMAIL in detail
    text = error.response.text
    assert "PRIVATE KEY" not in text and keys["rogue"].pem.splitlines()[1][:20] not in text
    assert vx.token_refusals == ["Invalid JWT Signature."] and vx.requests == []
    record = gw.record(error.response.headers["x-respan-log-id"])
    assert record["status_code"] == 502


def test_customer_credentials(gw, vx, keys):
    account = keys["customer"].account(CUSTOMER_EMAIL, vx.token_uri, project="ignored-project")
    credentials = {"vertex": {"vertex_ai_credentials": account, "vertex_ai_project": "cust-proj",
                              "vertex_ai_location": "europe-west4"}}
    for model in ("vx-gemini", "vx-claude"):
        completion = client(gw).chat.completions.create(model=model, messages=HI,
                                                        extra_body={"customer_credentials": credentials})
        assert completion.choices[0].message.content in (GEMINI_TEXT, CLAUDE_TEXT)
        sent = vx.requests[-1]
        assert (sent["project"], sent["location"]) == ("cust-proj", "europe-west4")
    # one token, for the customer's service account (its JSON given as text works too)
    assert len(vx.token_requests) == 1
    assertion = vx.token_requests[0]["form"]["assertion"][0]
    claims = orjson.loads(base64.urlsafe_b64decode(assertion.split(".")[1] + "=="))
    assert claims["iss"] == CUSTOMER_EMAIL
    text_credentials = {"vertex": {"vertex_ai_credentials": orjson.dumps(account).decode(),
                                   "vertex_ai_location": "asia-east1"}}
    client(gw).chat.completions.create(model="vx-gemini", messages=HI,
                                       extra_body={"customer_credentials": text_credentials})
    assert (vx.requests[-1]["project"], vx.requests[-1]["location"]) == ("ignored-project", "asia-east1")
    assert len(vx.token_requests) == 1  # the same account: the cached token
    # a credential without a service account is the caller's error, never the gateway's account
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client(gw).chat.completions.create(model="vx-gemini", messages=HI, extra_body={
            "customer_credentials": {"vertex": {"vertex_ai_project": "p"}}})
    assert "vertex_ai_credentials" in caught.value.response.text
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client(gw).chat.completions.create(model="vx-gemini", messages=HI, extra_body={
            "customer_credentials": {"vertex": {"vertex_ai_credentials": {"client_email": "x@y"}}}})
    assert "private_key" in caught.value.response.text


def test_token_reused_and_shared_by_concurrent_requests(start_gateway, vertex_mock, keys, mock_upstream, tmp_path):
    vx = vertex_mock
    vx.reset()
    vx.token_delay = 0.3  # every request arrives while the first refresh is under way
    workdir = tmp_path / "reuse"
    gateway = start_gateway(config=vertex_config(vx, mock_upstream, workdir), env=vertex_env(vx, keys))
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda m: client(gateway).chat.completions.create(model=m, messages=HI),
                                ["vx-gemini", "vx-claude"] * 3))
    assert all(r.choices[0].message.content for r in results)
    for _ in range(2):
        client(gateway).chat.completions.create(model="vx-claude", messages=HI)
    assert len(vx.token_requests) == 1 and vx.token_refusals == []
    assert len(vx.requests) == 8 and len({bearer(r) for r in vx.requests}) == 1


# -- units -----------------------------------------------------------------------------------


def test_rs256_signature_verifies_with_openssl_public_key(keys, tmp_path):
    for name in ("gateway", "customer"):  # PKCS#8 and PKCS#1
        key = RSAPrivateKey.from_pem(keys[name].pem)
        assert key.n == keys[name].n and key.e == keys[name].e
        signature = key.sign_sha256(b"header.claims")
        assert rs256_valid(b"header.claims", signature, keys[name].n, keys[name].e)
        assert not rs256_valid(b"header.claimz", signature, keys[name].n, keys[name].e)
        # and openssl agrees
        (tmp_path / "msg").write_bytes(b"header.claims")
        (tmp_path / "sig").write_bytes(signature)
        (tmp_path / "pub.pem").write_text(subprocess.run(
            ["openssl", "rsa", "-pubout"], input=keys[name].pem, capture_output=True, text=True, check=True).stdout)
        out = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "pub.pem"), "-signature",
                              str(tmp_path / "sig"), str(tmp_path / "msg")], capture_output=True, text=True)
        assert "Verified OK" in out.stdout


def test_service_account_parsing(keys):
    account = keys["gateway"].account(GATEWAY_EMAIL, "https://oauth2.googleapis.com/token")
    parsed = ServiceAccount.parse(orjson.dumps(account).decode())
    assert (parsed.email, parsed.project_id, parsed.token_uri) == (
        GATEWAY_EMAIL, "proj-test", "https://oauth2.googleapis.com/token")
    jwt = parsed.assertion(1_700_000_000)
    header, claims, _ = jwt.split(".")
    decode = base64.urlsafe_b64decode
    assert orjson.loads(decode(header + "==")) == {"alg": "RS256", "typ": "JWT"}
    assert orjson.loads(decode(claims + "==")) == {
        "iss": GATEWAY_EMAIL, "scope": "https://www.googleapis.com/auth/cloud-platform",
        "aud": "https://oauth2.googleapis.com/token", "iat": 1_700_000_000, "exp": 1_700_003_600}
    for bad, message in [("not json", "JSON"), ({"type": "authorized_user"}, "service_account"),
                         ({"client_email": "a@b"}, "private_key"),
                         ({"client_email": "a@b", "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"},
                          "private_key")]:
        with pytest.raises(InvalidServiceAccount, match=message):
            ServiceAccount.parse(bad)


def test_base_urls_and_config_errors(keys):
    base = VertexBase("https://europe-west4-aiplatform.googleapis.com")
    assert (base.root, base.project, base.location) == ("https://europe-west4-aiplatform.googleapis.com", None,
                                                        "europe-west4")
    assert base.root_for("us-east5") == "https://us-east5-aiplatform.googleapis.com"
    assert base.root_for("global") == "https://aiplatform.googleapis.com"
    assert VertexBase("https://aiplatform.googleapis.com/").location == "global"
    full = VertexBase("http://127.0.0.1:9/v1/projects/p1/locations/l1/")
    assert (full.root, full.project, full.location) == ("http://127.0.0.1:9", "p1", "l1")
    assert full.root_for("x") == "http://127.0.0.1:9"

    sa = orjson.dumps(keys["gateway"].account(GATEWAY_EMAIL, "https://oauth2.googleapis.com/token")).decode()
    adapter = VertexAI(Provider(id="vertex", protocol="vertex_ai", api_key=sa,
                                base_url="https://us-east5-aiplatform.googleapis.com", headers={"X-Extra": "1"}),
                       Timeouts(), UpstreamClient())
    target = Target(provider="vertex", protocol="vertex_ai", model=CLAUDE_MODEL, api_key=sa)
    account, prefix, headers = adapter.resolve(target)
    assert account.email == GATEWAY_EMAIL
    assert prefix == "https://us-east5-aiplatform.googleapis.com/v1/projects/proj-test/locations/us-east5"
    assert headers == {"Content-Type": "application/json", "X-Extra": "1"}
    custom = Target(provider="vertex", protocol="vertex_ai", model="gemini-2.5-pro", custom_credential=True,
                    base_url="https://us-east5-aiplatform.googleapis.com",
                    credentials={"vertex_ai_credentials": sa, "vertex_ai_location": "global",
                                 "vertex_ai_project": "other"})
    _, prefix, headers = adapter.resolve(custom)
    assert prefix == "https://aiplatform.googleapis.com/v1/projects/other/locations/global"
    with pytest.raises(ConfigError, match="service-account JSON"):
        VertexAI(Provider(id="v", protocol="vertex_ai", api_key="sk-not-json", base_url="https://x"),
                 Timeouts(), UpstreamClient())
    asyncio.run(adapter.close())


class _FakeTokenEndpoint:
    """Stands in for UpstreamClient.post: answers token requests with a given expires_in."""

    def __init__(self, expires_in: int) -> None:
        self.expires_in = expires_in
        self.calls = 0

    async def post(self, provider: str, url: str, headers: dict[str, str], body: bytes, **_: Any) -> Any:
        self.calls += 1
        assert headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert body.startswith(b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=")
        data = orjson.dumps({"access_token": f"tok-{self.calls}", "expires_in": self.expires_in})

        class Response:
            status = 200

            async def read(self) -> bytes:
                return data

        return Response()


def test_token_cache_refreshes_five_minutes_before_expiry(keys):
    account = ServiceAccount.parse(keys["gateway"].account(GATEWAY_EMAIL, "https://oauth2.googleapis.com/token"))

    async def run(expires_in: int) -> list[str]:
        endpoint = _FakeTokenEndpoint(expires_in)
        cache = TokenCache(endpoint)  # type: ignore[arg-type]
        return [await cache.token("vertex", account) for _ in range(3)]

    assert asyncio.run(run(3599)) == ["tok-1"] * 3  # valid for 55 more minutes: cached
    assert asyncio.run(run(200)) == ["tok-1", "tok-2", "tok-3"]  # within the 5-minute margin: renewed
