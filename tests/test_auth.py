"""End to end: the `auth` stage. Gateway keys from Authorization: Bearer, x-api-key, x-goog-api-key."""

from __future__ import annotations

import httpx
import openai
import orjson
import pytest
from openai import OpenAI

from tests.conftest import EXPIRED_KEY, KEY, TEST_KEY, UPSTREAM_KEY
from tests.mock_upstream import WORDS

ANSWER = "".join(WORDS)
HI = [{"role": "user", "content": "hi"}]
BODY = orjson.dumps({"model": "gpt-test", "messages": HI})
INVALID = {"detail": "Your API key is invalid or expired, please check your API key at "
                     "https://platform.respan.ai/platform/api/api-keys"}


def post(gateway, headers: dict[str, str], body: bytes = BODY) -> httpx.Response:
    return httpx.post(f"{gateway.url}/api/chat/completions", content=body, timeout=10,
                      headers={"Content-Type": "application/json", **headers})


def assert_401(gateway, mock, response: httpx.Response) -> dict:
    assert response.status_code == 401
    assert response.json() == INVALID
    assert mock.requests == []
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 401
    assert record["status"] == "error"
    assert record["error_message"] == INVALID["detail"]
    assert record["key_name"] is None
    return record


def test_no_key_is_401_with_spec_body(gateway, mock):
    response = post(gateway, {})
    record = assert_401(gateway, mock, response)
    assert record["model_requested"] == "gpt-test"
    assert record["prompt_tokens"] == 0


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer sk-wrong-key"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": f"Basic {KEY}"},  # not a bearer token
        {"Authorization": "Bearer"},
        {"Authorization": KEY},  # no scheme
        {"x-api-key": "sk-wrong-key"},
        {"x-goog-api-key": "sk-wrong-key"},
        {"Authorization": f"Bearer {UPSTREAM_KEY}"},  # the provider's key is not a gateway key
    ],
)
def test_wrong_key_is_401(gateway, mock, headers):
    assert_401(gateway, mock, post(gateway, headers))


def test_expired_key_is_401(gateway, mock):
    assert_401(gateway, mock, post(gateway, {"Authorization": f"Bearer {EXPIRED_KEY}"}))


def test_sdk_raises_authentication_error(gateway, mock):
    bad = OpenAI(base_url=f"{gateway.url}/api", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="gpt-test", messages=HI)
    assert info.value.status_code == 401
    assert info.value.body == INVALID
    assert mock.requests == []


def test_wrong_key_on_a_stream_is_a_json_401(gateway, mock):
    body = orjson.dumps({"model": "gpt-test", "messages": HI, "stream": True})
    response = post(gateway, {"Authorization": "Bearer sk-wrong"}, body)
    assert response.headers["content-type"].startswith("application/json")
    assert_401(gateway, mock, response)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"bearer {KEY}"},
        {"Authorization": f"BEARER {KEY}"},
        {"Authorization": f"BeArEr   {KEY}"},
        {"x-api-key": KEY},
        {"X-Api-Key": KEY},
        {"x-goog-api-key": KEY},
    ],
)
def test_key_channels(gateway, mock, headers):
    response = post(gateway, headers)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == ANSWER
    # the gateway key never reaches the provider, whichever header carried it
    upstream_headers = {name.lower(): value for name, value in mock.last()["headers"].items()}
    assert upstream_headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-api-key" not in upstream_headers
    assert "x-goog-api-key" not in upstream_headers
    assert KEY not in str(upstream_headers)
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["key_name"] == "tests"
    assert record["environment"] == "production"
    assert record["status_code"] == 200


def test_bearer_takes_precedence_over_x_api_key(gateway, mock):
    response = post(gateway, {"Authorization": f"Bearer {TEST_KEY}", "x-api-key": KEY})
    assert response.status_code == 200
    assert gateway.record(response.headers["x-respan-log-id"])["key_name"] == "tests-env"


def test_key_name_and_environment_in_the_log(gateway, mock):
    for key, name, environment in ((KEY, "tests", "production"), (TEST_KEY, "tests-env", "test")):
        raw = OpenAI(base_url=f"{gateway.url}/api", api_key=key, max_retries=0) \
            .chat.completions.with_raw_response.create(model="gpt-test", messages=HI)
        assert raw.parse().choices[0].message.content == ANSWER
        record = gateway.record(raw.headers["x-respan-log-id"])
        assert record["key_name"] == name
        assert record["environment"] == environment


def test_key_is_checked_on_streams(gateway, mock):
    client = OpenAI(base_url=f"{gateway.url}/api", api_key=TEST_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=HI, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices) == ANSWER
    record = gateway.record(raw.headers["x-respan-log-id"])
    assert (record["key_name"], record["environment"]) == ("tests-env", "test")


def test_the_key_is_never_logged(gateway, mock):
    response = post(gateway, {"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    bad = post(gateway, {"Authorization": "Bearer sk-presented-but-wrong-0123456789"})
    assert bad.status_code == 401
    gateway.record(response.headers["x-respan-log-id"])
    gateway.record(bad.headers["x-respan-log-id"])
    logs = (gateway.workdir / "logs.jsonl").read_text()
    assert KEY not in logs
    assert "sk-presented-but-wrong-0123456789" not in logs
    assert UPSTREAM_KEY not in logs


@pytest.mark.parametrize("path", ["/api/models/public", "/api/health-check/"])
def test_public_endpoints_need_no_key(gateway, path):
    assert httpx.get(f"{gateway.url}{path}", timeout=5).status_code == 200


def test_auth_runs_before_model_resolution(gateway, mock):
    body = orjson.dumps({"model": "nope", "messages": HI})
    assert_401(gateway, mock, post(gateway, {"Authorization": "Bearer sk-wrong"}, body))
