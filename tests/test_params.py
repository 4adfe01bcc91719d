"""Gateway params: their channels, precedence, validation, and that none of them reach the provider.

The first part runs proxy.params.split_params directly; the rest goes through a gateway process.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import orjson
import pytest
from openai import OpenAI

from proxy.params import EMPTY, GATEWAY_KEYS, GatewayParams, ParamsError, split_params
from tests.conftest import KEY
from tests.mock_upstream import WORDS

ANSWER = "".join(WORDS)
HI = [{"role": "user", "content": "hi"}]
BASE = {"model": "gpt-test", "messages": HI}


def b64(data: Any) -> str:
    return base64.b64encode(orjson.dumps(data)).decode()


# -- split_params, directly ------------------------------------------------------------------------


def test_split_no_params_returns_empty_and_leaves_body():
    body = {"model": "m", "messages": HI, "temperature": 0.2, "user": "u1"}
    assert split_params(body) is EMPTY
    assert body == {"model": "m", "messages": HI, "temperature": 0.2, "user": "u1"}


def test_split_removes_every_gateway_key_from_the_body():
    body = {"model": "m", "messages": HI, "customer_identifier": "c", "metadata": {"a": "b"},
            "disable_log": True, "fallback_models": ["x"], "respan_params": {"thread_identifier": "t"},
            "keywordsai_params": {"custom_identifier": "ci"}, "temperature": 1}
    params = split_params(body)
    assert body == {"model": "m", "messages": HI, "temperature": 1}
    assert params.customer_identifier == "c"
    assert params.metadata == {"a": "b"}
    assert params.disable_log is True
    assert params.fallback_models == ["x"]
    assert params.thread_identifier == "t"
    assert params.custom_identifier == "ci"


def test_split_precedence_per_key():
    body = {
        "customer_identifier": "top",
        "respan_params": {"customer_identifier": "respan", "thread_identifier": "respan-t",
                          "metadata": {"from": "respan"}},
        "keywordsai_params": {"customer_identifier": "kw", "thread_identifier": "kw-t", "custom_identifier": "kw-c"},
    }
    header = b64({"customer_identifier": "hdr", "thread_identifier": "hdr-t", "custom_identifier": "hdr-c",
                  "group_identifier": "hdr-g", "metadata": {"from": "header", "only": "header"}})
    params = split_params(body, header, "cust-header")
    assert params.customer_identifier == "top"
    assert params.thread_identifier == "respan-t"
    assert params.custom_identifier == "kw-c"
    assert params.group_identifier == "hdr-g"
    assert params.metadata == {"from": "respan"}  # a whole value replaces, it is not deep-merged


def test_split_customer_header_is_the_lowest_channel():
    assert split_params({}, None, "from-header").customer() == "from-header"
    assert split_params({}, b64({"customer_identifier": "params-header"}), "from-header").customer() == "params-header"


def test_split_header_raw_json_and_base64_without_padding():
    assert split_params({}, '{"customer_identifier": "raw"}').customer_identifier == "raw"
    assert split_params({}, '  {"customer_identifier": "spaced"}  ').customer_identifier == "spaced"
    unpadded = b64({"customer_identifier": "ab"}).rstrip("=")
    assert split_params({}, unpadded).customer_identifier == "ab"


@pytest.mark.parametrize("header", ["not base64 and not json!", "{broken json", b64([1, 2]), "[1, 2]"])
def test_split_bad_header(header):
    with pytest.raises(ParamsError) as info:
        split_params({"model": "m"}, header)
    assert info.value.field == "X-Data-Respan-Params"


def test_split_metadata_values_become_strings():
    params = split_params({"metadata": {"s": "x", "i": 3, "f": 1.5, "b": True, "n": None, "o": {"k": [1]}}})
    assert params.metadata == {"s": "x", "i": "3", "f": "1.5", "b": "true", "n": "null", "o": '{"k":[1]}'}


def test_split_unknown_respan_params_keys_are_kept_as_extra():
    body = {"model": "m", "respan_params": {"customer_identifier": "c", "my_tag": "v", "count": 2}}
    params = split_params(body)
    assert params.extra == {"my_tag": "v", "count": 2}
    assert body == {"model": "m"}


def test_split_unknown_top_level_keys_stay_in_the_body():
    body = {"model": "m", "seed": 7, "some_provider_field": {"x": 1}}
    assert split_params(body) is EMPTY
    assert body == {"model": "m", "seed": 7, "some_provider_field": {"x": 1}}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"customer_identifier": ["a"]}, "customer_identifier"),
        ({"retry_params": {"num_retries": 0}}, "retry_params.num_retries"),
        ({"retry_params": {"retry_after": -1}}, "retry_params.retry_after"),
        ({"retry_params": {"bogus": 1}}, "retry_params"),
        ({"load_balance_models": [{"model": "a", "weight": 0}]}, "load_balance_models[0].weight"),
        ({"load_balance_models": [{"model": "a", "weight": 1}, {"model": "b"}]}, "load_balance_models[1]"),
        ({"disable_log": "yes"}, "disable_log"),
        ({"metadata": "text"}, "metadata"),
        ({"fallback_models": "gpt-4o"}, "fallback_models"),
        ({"extra_headers": {"x-a": "b\r\nInjected: 1"}}, "extra_headers.x-a"),
    ],
)
def test_split_validation_errors_name_the_field(params, field):
    with pytest.raises(ParamsError) as info:
        split_params({"model": "m", **params})
    assert info.value.field == field
    assert info.value.message


def test_split_container_of_wrong_type():
    with pytest.raises(ParamsError) as info:
        split_params({"respan_params": ["customer_identifier"]})
    assert info.value.field == "respan_params"


def test_split_customer_from_customer_params_and_truncation():
    assert split_params({"customer_params": {"customer_identifier": 42}}).customer() == "42"
    assert split_params({"customer_identifier": 7}).customer() == "7"
    assert split_params({"customer_identifier": "x" * 300}).customer() == "x" * 254


def test_gateway_keys_cover_the_documented_params():
    for name in ("customer_identifier", "metadata", "thread_identifier", "custom_identifier", "disable_log",
                 "fallback_models", "load_balance_group", "retry_params", "cache_enabled", "prompt",
                 "credential_override", "customer_credentials", "request_breakdown", "models"):
        assert name in GATEWAY_KEYS
    assert "extra" not in GATEWAY_KEYS
    assert isinstance(EMPTY, GatewayParams)


# -- through the gateway -------------------------------------------------------------------------


def client(gateway, headers: dict[str, str] | None = None) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/api", api_key=KEY, max_retries=0, default_headers=headers)


def post(gateway, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{gateway.url}/api/chat/completions", content=orjson.dumps(body), timeout=10,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})})


def test_top_level_params_via_extra_body(gateway, mock):
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="gpt-test", messages=HI,
        extra_body={"customer_identifier": "c-top", "thread_identifier": "t-top", "custom_identifier": "ci-top",
                    "group_identifier": "g-top", "metadata": {"env": "ci", "n": 1}},
    )
    assert raw.parse().choices[0].message.content == ANSWER
    assert mock.last()["body"] == {"model": "mock-ok", "messages": HI}
    record = gateway.record(raw.headers["x-respan-log-id"])
    assert record["customer_identifier"] == "c-top"
    assert record["thread_identifier"] == "t-top"
    assert record["custom_identifier"] == "ci-top"
    assert record["group_identifier"] == "g-top"
    assert record["metadata"] == {"env": "ci", "n": "1"}


@pytest.mark.parametrize("container", ["respan_params", "keywordsai_params"])
def test_nested_params(gateway, mock, container):
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="gpt-test", messages=HI,
        extra_body={container: {"customer_identifier": f"c-{container}", "metadata": {"k": True}}},
    )
    raw.parse()
    assert mock.last()["body"] == {"model": "mock-ok", "messages": HI}
    record = gateway.record(raw.headers["x-respan-log-id"])
    assert record["customer_identifier"] == f"c-{container}"
    assert record["metadata"] == {"k": "true"}


@pytest.mark.parametrize("encoding", ["base64", "raw"])
@pytest.mark.parametrize("header", ["X-Data-Respan-Params", "X-Data-Keywordsai-Params"])
def test_params_header(gateway, mock, encoding, header):
    params = {"customer_identifier": f"c-{encoding}", "thread_identifier": "t-hdr", "metadata": {"via": header}}
    value = b64(params) if encoding == "base64" else orjson.dumps(params).decode()
    raw = client(gateway, {header: value}).chat.completions.with_raw_response.create(model="gpt-test", messages=HI)
    raw.parse()
    upstream = mock.last()
    assert upstream["body"] == {"model": "mock-ok", "messages": HI}
    assert not any(name.lower().startswith("x-data-") for name in upstream["headers"])
    record = gateway.record(raw.headers["x-respan-log-id"])
    assert record["customer_identifier"] == f"c-{encoding}"
    assert record["thread_identifier"] == "t-hdr"
    assert record["metadata"] == {"via": header}


def test_customer_identifier_header(gateway, mock):
    raw = client(gateway, {"X-Respan-Customer-Identifier": "c-hdr"}).chat.completions.with_raw_response.create(
        model="gpt-test", messages=HI)
    raw.parse()
    assert mock.last()["body"] == {"model": "mock-ok", "messages": HI}
    assert "x-respan-customer-identifier" not in {name.lower() for name in mock.last()["headers"]}
    assert gateway.record(raw.headers["x-respan-log-id"])["customer_identifier"] == "c-hdr"


def test_precedence_through_the_gateway(gateway, mock):
    header = b64({"customer_identifier": "hdr", "thread_identifier": "hdr-t", "custom_identifier": "hdr-c",
                  "metadata": {"level": "header"}, "group_identifier": "hdr-g"})
    headers = {"X-Data-Respan-Params": header, "X-Respan-Customer-Identifier": "cust-hdr"}
    raw = client(gateway, headers).chat.completions.with_raw_response.create(
        model="gpt-test", messages=HI,
        extra_body={
            "customer_identifier": "top",
            "respan_params": {"customer_identifier": "respan", "thread_identifier": "respan-t",
                              "metadata": {"level": "respan_params"}},
            "keywordsai_params": {"customer_identifier": "kw", "thread_identifier": "kw-t",
                                  "custom_identifier": "kw-c", "metadata": {"level": "keywordsai"}},
        },
    )
    raw.parse()
    assert mock.last()["body"] == {"model": "mock-ok", "messages": HI}
    record = gateway.record(raw.headers["x-respan-log-id"])
    assert record["customer_identifier"] == "top"  # top level > everything
    assert record["thread_identifier"] == "respan-t"  # respan_params > keywordsai_params > header
    assert record["custom_identifier"] == "kw-c"  # keywordsai_params > header
    assert record["group_identifier"] == "hdr-g"  # header, the only channel that had it
    assert record["metadata"] == {"level": "respan_params"}


def test_params_header_beats_customer_header(gateway, mock):
    headers = {"X-Data-Respan-Params": b64({"customer_identifier": "from-params"}),
               "X-Respan-Customer-Identifier": "from-shortcut"}
    response = post(gateway, BASE, headers)
    assert response.status_code == 200
    assert gateway.record(response.headers["x-respan-log-id"])["customer_identifier"] == "from-params"


def test_no_gateway_param_reaches_the_provider(gateway, mock):
    everything = {
        "customer_identifier": "c", "customer_params": {"customer_identifier": "c", "name": "N"},
        "metadata": {"a": "b"}, "properties": {"p": 1}, "custom_identifier": "ci", "thread_identifier": "t",
        "group_identifier": "g", "trace_unique_id": "tr", "span_name": "s", "span_parent_id": "sp",
        "span_workflow_name": "wf", "trace_group_identifier": "tg", "positive_feedback": True,
        "disable_log": False, "request_breakdown": False, "eval_params": {"evaluators": []},
        "exclude_models": [], "exclude_providers": [], "disable_fallback": True,
        "respan_params": {"my_unknown": "u"}, "keywordsai_params": {"other_unknown": "o"},
    }
    body = {**BASE, "temperature": 0.5, "seed": 3, "user": "end-user", **everything}
    response = post(gateway, body, {"X-Data-Respan-Params": b64({"header_unknown": "h"})})
    assert response.status_code == 200, response.text
    assert mock.last()["body"] == {"model": "mock-ok", "messages": HI, "temperature": 0.5, "seed": 3,
                                   "user": "end-user"}
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["trace_unique_id"] == "tr"
    assert record["span_workflow_name"] == "wf"
    assert record["properties"] == {"p": 1}
    assert record["customer_params"] == {"customer_identifier": "c", "name": "N"}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"customer_identifier": ["a", "b"]}, "customer_identifier"),
        ({"retry_params": {"num_retries": 0}}, "retry_params.num_retries"),
        ({"load_balance_models": [{"model": "gpt-test", "weight": 0}]}, "load_balance_models[0].weight"),
        ({"disable_log": "yes"}, "disable_log"),
        ({"respan_params": {"customer_identifier": {"id": 1}}}, "customer_identifier"),
        ({"respan_params": "customer"}, "respan_params"),
    ],
)
def test_wrong_type_is_422_naming_the_field(gateway, mock, extra, field):
    response = post(gateway, {**BASE, **extra})
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"detail", "errors"}
    assert body["detail"] == "Validation error"
    assert list(body["errors"]) == [field]
    messages = body["errors"][field]
    assert isinstance(messages, list) and len(messages) == 1
    assert isinstance(messages[0], str) and messages[0]
    assert mock.requests == []
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 422


def test_wrong_type_in_header_params_is_422(gateway, mock):
    response = post(gateway, BASE, {"X-Data-Respan-Params": b64({"disable_log": "yes"})})
    assert response.status_code == 422
    assert list(response.json()["errors"]) == ["disable_log"]
    assert mock.requests == []


@pytest.mark.parametrize("value", ["%%% definitely not base64 or json", "{not json", b64(["a list"])])
def test_undecodable_params_header_is_422(gateway, mock, value):
    response = post(gateway, BASE, {"X-Data-Respan-Params": value})
    assert response.status_code == 422
    body = response.json()
    assert body["detail"] == "Validation error"
    assert list(body["errors"]) == ["X-Data-Respan-Params"]
    assert body["errors"]["X-Data-Respan-Params"][0]
    assert mock.requests == []


def test_disable_log_drops_content_keeps_tokens(gateway, mock):
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="mock/mock-tools", messages=[{"role": "user", "content": "secret prompt"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        extra_body={"disable_log": True, "customer_identifier": "c-private"},
    )
    assert raw.parse().choices[0].message.tool_calls[0].function.name == "get_weather"
    assert "disable_log" not in mock.last()["body"]
    record = gateway.record(raw.headers["x-respan-log-id"])
    for field in ("prompt_messages", "completion_message", "completion_messages", "tools", "tool_calls", "full_request"):
        assert record[field] is None, field
    assert (record["prompt_tokens"], record["completion_tokens"]) == (11, 7)
    assert record["customer_identifier"] == "c-private"
    assert record["status_code"] == 200
    assert "secret prompt" not in (gateway.workdir / "logs.jsonl").read_text()


def test_unknown_respan_params_keys_land_in_metadata(gateway, mock):
    response = post(gateway, {**BASE, "metadata": {"known": "m"},
                              "respan_params": {"experiment": "exp-7", "cohort": 3, "beta": True,
                                                "tags": {"a": [1]}}})
    assert response.status_code == 200
    assert mock.last()["body"] == {"model": "mock-ok", "messages": HI}
    record = gateway.record(response.headers["x-respan-log-id"])
    # stored as strings like metadata values: JSON text ("true", not Python's "True")
    assert record["metadata"] == {"known": "m", "experiment": "exp-7", "cohort": "3", "beta": "true",
                                  "tags": '{"a":[1]}'}


def test_metadata_wins_over_an_unknown_key_of_the_same_name(gateway, mock):
    response = post(gateway, {**BASE, "metadata": {"experiment": "from-metadata"},
                              "respan_params": {"experiment": "from-extra"}})
    assert response.status_code == 200
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["metadata"] == {"experiment": "from-metadata"}
