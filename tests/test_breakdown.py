"""`request_breakdown: true` (spec 2.1.2): a top-level object, or a final chunk before [DONE]."""

from __future__ import annotations

import httpx
import orjson
from openai import OpenAI

from tests.conftest import KEY

HI = [{"role": "user", "content": "hi"}]
COST = (9 * 1.0 + 2 * 0.5 + 7 * 2.0) / 1e6  # gpt-test prices; mock usage 11 prompt (2 cached) / 7 completion


def test_non_stream_answer_carries_the_breakdown(gateway, mock):
    client = OpenAI(base_url=f"{gateway.url}/api", api_key=KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=HI, extra_body={"request_breakdown": True, "metadata": {"team": "a"}})
    data = orjson.loads(raw.content)
    breakdown = data["request_breakdown"]
    assert breakdown["prompt_tokens"] == 11 and breakdown["completion_tokens"] == 7
    assert abs(breakdown["cost"] - COST) < 1e-12
    assert breakdown["model"] == "mock-ok" and breakdown["stream"] is False and breakdown["cached"] is False
    assert breakdown["status_code"] == 200 and breakdown["metadata"] == {"team": "a"}
    assert breakdown["prompt_messages"] == HI and breakdown["completion_message"]["content"]
    assert data["choices"][0]["message"]["content"]  # the answer itself is intact
    assert "request_breakdown" not in mock.last()["body"]


def test_without_the_flag_the_body_passes_through_unchanged(gateway, mock):
    response = httpx.post(f"{gateway.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "gpt-test", "messages": HI})
    assert "request_breakdown" not in response.json()


def test_stream_ends_with_a_breakdown_chunk_then_done(gateway, mock):
    with httpx.stream("POST", f"{gateway.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "gpt-test", "messages": HI, "stream": True, "request_breakdown": True,
                            "disable_log": True}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunk = orjson.loads(events[-2])
    assert chunk["id"] == "request_breakdown" and chunk["model"] == "extra_parameter"
    breakdown = chunk["choices"][0]["request_breakdown"]
    assert breakdown["prompt_tokens"] == 11 and breakdown["completion_tokens"] == 7 and breakdown["stream"] is True
    assert abs(breakdown["cost"] - COST) < 1e-12
    assert breakdown["prompt_messages"] is None and breakdown["full_request"] is None  # disable_log


def test_the_openai_sdk_reads_a_stream_with_the_breakdown_chunk(gateway, mock):
    client = OpenAI(base_url=f"{gateway.url}/api", api_key=KEY, max_retries=0)
    chunks = list(client.chat.completions.create(model="gpt-test", messages=HI, stream=True,
                                                 extra_body={"request_breakdown": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The quick brown fox jumps over the lazy dog."
    last = chunks[-1].model_dump()
    assert last["id"] == "request_breakdown" and last["choices"][0]["request_breakdown"]["completion_tokens"] == 7


def test_cost_header_on_answers(gateway, mock):
    response = httpx.post(f"{gateway.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "gpt-test", "messages": HI})
    assert abs(float(response.headers["x-llmrelay-cost"]) - COST) < 1e-12
    record = gateway.record(response.headers["x-respan-log-id"])
    assert abs(record["cost"] - COST) < 1e-12
