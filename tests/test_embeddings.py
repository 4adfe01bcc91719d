"""POST /api/embeddings (and /api/v1, /v1): the official `openai` SDK through a real gateway process
in front of the mock's embeddings routes (tests/mock_upstream.py), with the default pipeline."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from proxy.providers.demo import demo_vector
from proxy.settings import DEMO_KEY
from tests.conftest import KEY, GatewayProcess, azure_url, module_gateway
from tests.conftest import openai_client as client
from tests.mock_upstream import EMBEDDING_DIMENSIONS, EMBEDDING_TOKENS_PER_INPUT, MockUpstream, mock_vector

PRICES = {"input": 0.02, "output": 0.0}


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = mock_upstream.root_url
    yield from module_gateway(
        tmp_path_factory, "embeddings", mock_upstream,
        pipeline=["auth", "routing", "credentials", "fallback"],
        models=[
            {"name": "emb", "provider": "mock", "model": "mock-emb", "prices": PRICES},
            {"name": "emb-down", "provider": "mock", "model": "mock-status-503"},
            {"name": "emb-azure", "provider": "azure", "model": "emb-deployment", "prices": PRICES},
            {"name": "claude-emb", "provider": "anthropic", "model": "claude-x"},
        ],
        extra_providers=[
            {"id": "azure", "protocol": "azure", "base_url": root, "api_key": "az-key", "api_version": "2024-10-21"},
            {"id": "anthropic", "protocol": "anthropic", "base_url": root, "api_key": "an-key"},
        ],
    )


def floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


@pytest.mark.parametrize("prefix", ["/api", "/api/v1", "/v1"])
def test_single_input(gw, mock, prefix):
    raw = client(gw, prefix).embeddings.with_raw_response.create(model="emb", input="hello world",
                                                                 encoding_format="float")
    result = raw.parse()
    assert len(result.data) == 1
    assert result.data[0].embedding == mock_vector(0, EMBEDDING_DIMENSIONS)
    assert result.usage.prompt_tokens == EMBEDDING_TOKENS_PER_INPUT
    assert mock.last()["path"] == "/v1/embeddings"
    assert mock.last()["body"]["model"] == "mock-emb"
    assert raw.headers["x-llmrelay-provider"] == "mock"
    assert float(raw.headers["x-llmrelay-cost"]) == pytest.approx(EMBEDDING_TOKENS_PER_INPUT * 0.02 / 1e6)


def test_batch_input_usage_cost_and_log(gw, mock):
    texts = ["one", "two", "three"]
    raw = client(gw).embeddings.with_raw_response.create(
        model="emb", input=texts, encoding_format="float",
        extra_body={"customer_identifier": "cust-1", "metadata": {"k": "v"}, "fallback_models": ["emb"]},
    )
    result = raw.parse()
    assert [d.index for d in result.data] == [0, 1, 2]
    assert [d.embedding for d in result.data] == [mock_vector(i, EMBEDDING_DIMENSIONS) for i in range(3)]
    tokens = EMBEDDING_TOKENS_PER_INPUT * 3
    assert result.usage.prompt_tokens == result.usage.total_tokens == tokens
    # gateway params never reach the provider
    assert mock.last()["body"] == {"model": "mock-emb", "input": texts, "encoding_format": "float"}

    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["log_type"] == "embedding"
    assert record["request_url_path"] == "/api/embeddings"
    assert record["status_code"] == 200
    assert record["prompt_tokens"] == tokens and record["completion_tokens"] == 0
    assert record["total_request_tokens"] == tokens
    assert record["cost"] == pytest.approx(tokens * 0.02 / 1e6)
    assert record["customer_identifier"] == "cust-1"
    assert record["full_request"]["input"] == texts  # the prompt is the input
    assert record["prompt_messages"] is None
    assert record["completion_message"] is None
    assert "embedding" not in str(record["full_request"])  # no vectors anywhere
    assert str(mock_vector(0, EMBEDDING_DIMENSIONS)[0]) not in str(record)


def test_disable_log_drops_the_input(gw, mock):
    raw = client(gw).embeddings.with_raw_response.create(model="emb", input="secret text",
                                                         extra_body={"disable_log": True})
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["log_type"] == "embedding" and record["prompt_tokens"] == EMBEDDING_TOKENS_PER_INPUT
    assert record["full_request"] is None
    assert "secret text" not in str(record)


def test_token_input_and_sdk_default_base64(gw, mock):
    # without encoding_format the SDK asks for base64 and decodes it itself
    result = client(gw).embeddings.create(model="emb", input=[[1, 2, 3], [4, 5]])
    assert mock.last()["body"]["encoding_format"] == "base64"
    assert mock.last()["body"]["input"] == [[1, 2, 3], [4, 5]]
    assert [list(d.embedding) for d in result.data] == [mock_vector(i, EMBEDDING_DIMENSIONS) for i in range(2)]


def test_base64_passes_through_and_dimensions_are_forwarded(gw, mock):
    result = client(gw).embeddings.create(model="emb", input="x", encoding_format="base64", dimensions=6)
    assert mock.last()["body"]["dimensions"] == 6
    b64 = result.data[0].embedding
    assert isinstance(b64, str)
    assert b64 == base64.b64encode(struct.pack("<6f", *mock_vector(0, 6))).decode()
    assert floats(b64) == mock_vector(0, 6)


def test_fallback_to_a_second_model_on_503(gw, mock):
    raw = client(gw).embeddings.with_raw_response.create(
        model="emb-down", input="hi", encoding_format="float",
        extra_body={"fallback_models": ["emb"], "retry_params": {"num_retries": 1, "retry_after": 0.01}},
    )
    assert raw.parse().data[0].embedding == mock_vector(0, EMBEDDING_DIMENSIONS)
    assert raw.headers["x-llmrelay-model"] == "mock-emb"
    assert mock.count("mock-status-503") >= 1 and mock.count("mock-emb") == 1
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["fallback"] is True and record["log_type"] == "embedding"
    assert record["prompt_tokens"] == EMBEDDING_TOKENS_PER_INPUT


def test_upstream_error_passes_through(gw, mock):
    with pytest.raises(openai.APIStatusError) as exc:
        client(gw).embeddings.create(model="emb-down", input="hi")
    assert exc.value.status_code == 503
    assert "mock upstream error 503" in exc.value.message


def test_unknown_model_is_404(gw, mock):
    with pytest.raises(openai.NotFoundError):
        client(gw).embeddings.create(model="no-such-model", input="hi")
    assert mock.requests == []


@pytest.mark.parametrize(("body", "field", "status"), [
    ({"model": "emb"}, "input", 400),
    ({"input": "hi"}, "model", 400),
    ({"model": "emb", "input": []}, "input", 422),
    ({"model": "emb", "input": [1, "a"]}, "input", 422),
    ({"model": "emb", "input": {"a": 1}}, "input", 422),
    ({"model": "emb", "input": "a", "encoding_format": "int8"}, "encoding_format", 422),
    ({"model": "emb", "input": "a", "dimensions": 0}, "dimensions", 422),
])
def test_invalid_bodies(gw, mock, body, field, status):
    response = httpx.post(f"{gw.url}/api/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status, response.text
    assert field in response.text
    assert mock.requests == []


def test_auth_applies(gw, mock):
    response = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "emb", "input": "a"},
                          headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert httpx.get(f"{gw.url}/api/embeddings").status_code == 405


def test_provider_without_embeddings_is_400(gw, mock):
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).embeddings.create(model="claude-emb", input="hi")
    assert "does not serve embeddings" in exc.value.response.text
    assert mock.requests == []


def test_azure_embeddings_url(gw, mock):
    raw = client(gw).embeddings.with_raw_response.create(model="emb-azure", input=["a", "b"], encoding_format="float")
    assert [d.embedding for d in raw.parse().data] == [mock_vector(i, EMBEDDING_DIMENSIONS) for i in range(2)]
    sent = mock.last()
    assert sent["path"] == "/openai/deployments/emb-deployment/embeddings"
    assert sent["query"] == {"api-version": "2024-10-21"}
    assert sent["headers"]["api-key"] == "az-key"
    assert float(raw.headers["x-llmrelay-cost"]) == pytest.approx(EMBEDDING_TOKENS_PER_INPUT * 2 * 0.02 / 1e6)


def _azure_url(base_url: str, api_version: str | None = "2024-06-01") -> str:
    return azure_url("embeddings", base_url, api_version)


def test_azure_embeddings_url_shapes():
    res = "https://res.openai.azure.com"
    assert _azure_url(res) == f"{res}/openai/deployments/dep/embeddings?api-version=2024-06-01"
    assert _azure_url(res + "/openai/v1") == f"{res}/openai/v1/embeddings"
    assert _azure_url(f"{res}/openai/deployments/fixed") == (
        f"{res}/openai/deployments/fixed/embeddings?api-version=2024-06-01")
    assert _azure_url(f"{res}/openai/deployments/fixed/chat/completions") == (
        f"{res}/openai/deployments/fixed/embeddings?api-version=2024-06-01")


def test_demo_provider_with_the_embedded_defaults(tmp_path):
    process = GatewayProcess(None, tmp_path / "demo").start()
    try:
        demo = OpenAI(base_url=f"{process.url}/v1", api_key=DEMO_KEY, max_retries=0)
        result = demo.embeddings.create(model="demo", input=["hello there", "hi"], encoding_format="float")
        assert [d.embedding for d in result.data] == [demo_vector("hello there", 8), demo_vector("hi", 8)]
        assert result.usage.prompt_tokens == 3
        again = demo.embeddings.create(model="demo", input="hello there", dimensions=16)  # SDK: base64
        first: Any = again.data[0].embedding
        assert len(first) == 16
        assert first == pytest.approx(demo_vector("hello there", 16), abs=1e-6)
    finally:
        process.stop()
