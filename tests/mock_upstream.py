"""A scriptable OpenAI-compatible provider on loopback, for tests.

It runs an aiohttp server on its own event loop in a background thread. The upstream model name
picks the behaviour:

  mock-*            a normal answer; streams send `chunks` words, then usage if asked, then [DONE]
  mock-status-CODE  that status with an OpenAI-shaped error body
  mock-cut-N        a stream that sends N chunks and then drops the connection
  mock-slow         a stream of 200 chunks, one every 50 ms (for client-disconnect tests)
  mock-slow-N       the same with N chunks
  mock-no-done      a stream that ends cleanly but without [DONE] and without a finish_reason
  mock-tools        answers with a tool call (streamed as tool_call deltas)
  mock-linger       a normal stream whose response stays open 0.5 s after [DONE]

Failure scenarios for fallbacks, retries and cooldowns (anything after the prefix is free text,
so a test can make its name unique):

  mock-status-429           429 without Retry-After (see mock-status-CODE); mock-status-503: persistent 503
  mock-retry-after-S        429 with `Retry-After: S` (seconds)
  mock-retry-after-ms-N     429 with `retry-after-ms: N`
  mock-flaky-*              the first request for that exact model name fails with 500, later ones succeed
  mock-headers-after-N      the response headers (stream or not) come only after N ms, then a normal answer
  mock-first-byte-after-N   a stream whose headers come at once and whose first byte comes after N ms
  mock-malformed            a stream with a malformed SSE chunk in the middle; it completes normally
  mock-context-length       400 with the OpenAI error code context_length_exceeded
  mock-stream-error-CODE    a 200 stream whose first event is `data: {"error": {..., "code": CODE}}`

Every request is recorded (path, headers, JSON body) and counted per model name (`count(model)`);
`stream_closed_early` records streams whose client went away before the end.

Azure OpenAI: `POST /openai/deployments/{deployment}/chat/completions?api-version=...` (on
`root_url`) answers like the chat route, with the deployment name in place of the body's model
(so `mock-status-429` etc. work as deployment names). Its records also hold `query` (a dict),
`deployment` and `azure: True`. Like Azure, its answers carry `prompt_filter_results` (a stream
starts with a chunk that has no choices, only prompt_filter_results) and per-choice
`content_filter_results`; a request without an `api-version` query gets Azure's 404.

Embeddings: `POST /v1/embeddings` and `POST /openai/deployments/{deployment}/embeddings` (Azure) take
the same model-name scripts (mock-status-CODE and the failure scenarios above; on Azure, the
deployment name). An answer has one deterministic vector per input (`dimensions` long, default
EMBEDDING_DIMENSIONS; base64 little-endian float32 with `encoding_format: base64`) and usage
`prompt_tokens == total_tokens == EMBEDDING_TOKENS_PER_INPUT * inputs`.

Responses API: `POST /v1/responses`, and Azure's `POST /openai/responses?api-version=...` and
`POST /openai/v1/responses` (on `root_url`), take the model-name scripts of embeddings (the body's
`model` on every route). An answer is a Response whose output text is WORDS joined and whose usage
is RESPONSES_USAGE; a stream sends response.created, response.output_text.delta per word,
response.output_text.done and response.completed (with usage). `mock-cut-N` streams N deltas and
drops the connection; `mock-stream-error-CODE` streams response.created then response.failed;
`mock-stream-late-error-CODE` the same with one output delta before the failure.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

import orjson
from aiohttp import web

from tests.mock_server import MockServer, free_port

__all__ = ["MockUpstream", "free_port"]

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
         "prompt_tokens_details": {"cached_tokens": 2}}
WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]


EMBEDDING_DIMENSIONS = 4
EMBEDDING_TOKENS_PER_INPUT = 5
RESPONSES_USAGE = {"input_tokens": 13, "input_tokens_details": {"cached_tokens": 3}, "output_tokens": 9,
                   "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 22}


def mock_vector(index: int, dimensions: int) -> list[float]:
    """The vector the mock answers for the input at `index` (exact in float32)."""
    return [float(index) + (j + 1) / 8 for j in range(dimensions)]


MALFORMED = b"data: {this is not json\n\n"  # what mock-malformed sends after its third word

AZURE_FILTER = {name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")}
AZURE_PROMPT_FILTER = [{"prompt_index": 0, "content_filter_results": AZURE_FILTER}]


def chunk(model: str, delta: dict[str, Any] | None, finish: str | None = None, index: int = 0, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish}]
    data = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": choices, **extra}
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    error = {"error": {"message": f"mock upstream error {status}: {message}", "type": "mock_error",
                       "param": None, "code": f"mock_{status}"}}
    return web.json_response(error, status=status, headers=headers)


class MockUpstream(MockServer):
    cleanup_on_stop = False

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}  # requests per upstream model name

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def root_url(self) -> str:
        """The server's origin, e.g. an Azure resource endpoint."""
        return super().base_url

    def reset(self) -> None:
        super().reset()
        self.counts.clear()

    def count(self, model: str) -> int:
        """Requests received so far for this upstream model name."""
        return self.counts.get(model, 0)

    def sent_with_key(self, api_key: str) -> list[dict[str, Any]]:
        """The requests that carried `Authorization: Bearer <api_key>`."""
        return [r for r in list(self.requests) if r["headers"].get("Authorization") == f"Bearer {api_key}"]

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/chat/completions", self.chat)
        router.add_post("/openai/deployments/{deployment}/chat/completions", self.azure_chat)
        router.add_post("/v1/embeddings", self.embeddings)
        router.add_post("/openai/deployments/{deployment}/embeddings", self.azure_embeddings)
        router.add_post("/v1/responses", self.responses)
        router.add_post("/openai/responses", self.responses)
        router.add_post("/openai/v1/responses", self.responses)

    def azure_record(self, request: web.Request, body: Any) -> web.Response | None:
        """Record an Azure deployment request; Azure's 404 when it has no api-version."""
        self.record(request, body, query=dict(request.query), deployment=request.match_info["deployment"], azure=True)
        if not request.query.get("api-version"):
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json(loads=orjson.loads)
        self.record(request, body)
        return await self.answer(request, body, body.get("model", ""))

    async def azure_chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json(loads=orjson.loads)
        if (refused := self.azure_record(request, body)) is not None:
            return refused
        return await self.answer(request, body, request.match_info["deployment"], azure=True)

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json(loads=orjson.loads)
        self.record(request, body)
        return await self.embed(body, body.get("model", ""))

    async def azure_embeddings(self, request: web.Request) -> web.Response:
        body = await request.json(loads=orjson.loads)
        if (refused := self.azure_record(request, body)) is not None:
            return refused
        return await self.embed(body, request.match_info["deployment"])

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json(loads=orjson.loads)
        if request.path.startswith("/openai/"):
            self.record(request, body, query=dict(request.query), azure=True)
        else:
            self.record(request, body)
        if request.path == "/openai/responses" and not request.query.get("api-version"):
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        model = body.get("model", "")
        count = self.counts[model] = self.counts.get(model, 0) + 1
        if model.startswith("mock-status-"):
            status = int(model.rsplit("-", 1)[1])
            return _error(status, f"mock upstream error {status}", {"x-request-id": "req-mock"})
        failure = await self.failure(model, count)
        if failure is not None:
            return failure
        text = "".join(WORDS)
        message = {"id": "msg_mock", "type": "message", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        response: dict[str, Any] = {"id": "resp_mock", "object": "response", "created_at": 1, "status": "completed",
                                    "model": model, "output": [message], "usage": RESPONSES_USAGE,
                                    "error": None, "incomplete_details": None, "parallel_tool_calls": True,
                                    "tool_choice": "auto", "tools": []}
        if not body.get("stream"):
            return web.Response(body=orjson.dumps(response), content_type="application/json")
        stream = await self.open_stream(request)
        seq = 0

        async def event(data: dict[str, Any]) -> None:
            nonlocal seq
            data["sequence_number"] = seq
            seq += 1
            await stream.write(f"event: {data['type']}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n")

        try:
            start = {**response, "status": "in_progress", "output": [], "usage": None}
            await event({"type": "response.created", "response": start})
            failed = {**start, "status": "failed", "error": {"code": "server_error", "message": "mock failure"}}
            if model.startswith("mock-stream-error-"):
                await event({"type": "response.failed", "response": failed})
                return stream
            if model.startswith("mock-stream-late-error-"):
                await event({"type": "response.output_text.delta", "item_id": "msg_mock", "output_index": 0,
                             "content_index": 0, "delta": WORDS[0]})
                await event({"type": "response.failed", "response": failed})
                return stream
            words = WORDS[: int(model.rsplit("-", 1)[1])] if model.startswith("mock-cut-") else WORDS
            for word in words:
                await event({"type": "response.output_text.delta", "item_id": "msg_mock", "output_index": 0,
                             "content_index": 0, "delta": word})
            if model.startswith("mock-cut-"):
                await asyncio.sleep(0.05)
                request.transport.close()
                return stream
            await event({"type": "response.output_text.done", "item_id": "msg_mock", "output_index": 0,
                         "content_index": 0, "text": text})
            await event({"type": "response.completed", "response": response})
        except (ConnectionResetError, asyncio.CancelledError):
            self.stream_closed_early.append({"model": model, "sent": seq})
        return stream

    async def embed(self, body: dict[str, Any], model: str) -> web.Response:
        count = self.counts[model] = self.counts.get(model, 0) + 1
        if model.startswith("mock-status-"):
            return _error(int(model.rsplit("-", 1)[1]), "embeddings", {"x-request-id": "req-mock"})
        failure = await self.failure(model, count)
        if failure is not None:
            return failure
        value = body.get("input")
        one = isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int))
        inputs = [value] if one else list(value or [])
        dimensions = body.get("dimensions") or EMBEDDING_DIMENSIONS
        data = []
        for i in range(len(inputs)):
            vector = mock_vector(i, dimensions)
            embedding: Any = vector
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = EMBEDDING_TOKENS_PER_INPUT * len(inputs)
        return web.json_response({"object": "list", "data": data, "model": model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def answer(self, request: web.Request, body: dict[str, Any], model: str,
                     azure: bool = False) -> web.StreamResponse:
        count = self.counts[model] = self.counts.get(model, 0) + 1
        if model.startswith("mock-status-"):
            status = int(model.rsplit("-", 1)[1])
            error = {"error": {"message": f"mock upstream error {status}", "type": "mock_error",
                               "param": None, "code": f"mock_{status}"}}
            return web.json_response(error, status=status, headers={"x-request-id": "req-mock"})
        failure = await self.failure(model, count)
        if failure is not None:
            return failure
        if body.get("stream"):
            return await self.stream(request, body, model, azure)
        n = body.get("n") or 1
        if model == "mock-tools":
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": "".join(WORDS)}
            finish = "stop"
        data = {"id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": i, "message": message, "finish_reason": finish} for i in range(n)],
                "usage": USAGE}
        if azure:
            data["prompt_filter_results"] = AZURE_PROMPT_FILTER
            for choice in data["choices"]:
                choice["content_filter_results"] = AZURE_FILTER
        return web.Response(body=orjson.dumps(data), content_type="application/json")

    async def failure(self, model: str, count: int) -> web.Response | None:
        """The failure scenarios of the fallback tests; None: answer normally (maybe after a delay)."""
        if model.startswith("mock-retry-after-ms-"):
            return _error(429, "rate limited", {"retry-after-ms": model.rsplit("-", 1)[1]})
        if model.startswith("mock-retry-after-"):
            return _error(429, "rate limited", {"Retry-After": model.rsplit("-", 1)[1]})
        if model.startswith("mock-flaky-") and count == 1:
            return _error(500, "flaky: first request fails")
        if model == "mock-context-length":
            return web.json_response({"error": {
                "message": "This model's maximum context length is 8192 tokens. However, your messages resulted "
                           "in 9000 tokens. Please reduce the length of the messages.",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}, status=400)
        if model.startswith("mock-headers-after-"):
            await asyncio.sleep(int(model.rsplit("-", 1)[1]) / 1000)
        return None

    async def stream(self, request: web.Request, body: dict[str, Any], model: str,
                     azure: bool = False) -> web.StreamResponse:
        response = await self.open_stream(request)
        if azure:  # Azure's first chunk: no choices, no id, no model; only the prompt filter results
            await response.write(b"data: " + orjson.dumps({
                "choices": [], "created": 0, "id": "", "model": "", "object": "",
                "prompt_filter_results": AZURE_PROMPT_FILTER}) + b"\n\n")
        wants_usage = (body.get("stream_options") or {}).get("include_usage") is True
        sent = 0
        try:
            if model.startswith("mock-first-byte-after-"):
                await asyncio.sleep(int(model.rsplit("-", 1)[1]) / 1000)
            if model.startswith("mock-stream-error-"):
                code = int(model.rsplit("-", 1)[1])
                await response.write(b"data: " + orjson.dumps(
                    {"error": {"message": f"mock stream error {code}", "type": "server_error", "code": code}}) + b"\n\n")
                await response.write(b"data: [DONE]\n\n")
                return response
            if model.startswith("mock-cut-"):
                for word in WORDS[: int(model.rsplit("-", 1)[1])]:
                    await response.write(chunk(model, {"content": word}))
                    sent += 1
                await asyncio.sleep(0.05)
                request.transport.close()  # drop the connection mid-stream
                return response
            if model.startswith("mock-slow"):
                for i in range(int(model.rsplit("-", 1)[1]) if model.count("-") == 2 else 200):
                    await response.write(chunk(model, {"content": f" w{i}"}))
                    sent += 1
                    await asyncio.sleep(0.05)
            elif model == "mock-tools":
                await response.write(chunk(model, {"role": "assistant", "content": None, "tool_calls": [
                    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}))
                for part in ('{"city"', ':"Paris"}'):
                    await response.write(chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
                await response.write(chunk(model, {}, "tool_calls"))
            else:
                n = body.get("n") or 1
                await response.write(chunk(model, {"role": "assistant", "content": ""}))
                for word in WORDS:
                    for i in range(n):
                        await response.write(chunk(model, {"content": word}, index=i))
                    sent += 1
                    if model == "mock-malformed" and sent == 3:
                        await response.write(MALFORMED)
                if model == "mock-no-done":
                    return response
                for i in range(n):
                    await response.write(chunk(model, {}, "stop", index=i))
            if wants_usage:
                await response.write(chunk(model, None, usage=USAGE))
            await response.write(b"data: [DONE]\n\n")
            if model == "mock-linger":  # the answer is complete, but the response stays open a while
                await asyncio.sleep(0.5)
            return response
        except (ConnectionResetError, asyncio.CancelledError):
            self.stream_closed_early.append({"model": model, "sent": sent})
        return response
