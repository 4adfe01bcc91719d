"""A scriptable Gemini API (generateContent / streamGenerateContent?alt=sse) on loopback, for tests.

A tests.mock_server.MockServer (aiohttp on its own event loop in a background thread). It
serves `POST /{v1,v1beta}/models/{model}:{method}`: generateContent, streamGenerateContent,
countTokens ({"totalTokens": COUNT_TOKENS}), embedContent and batchEmbedContents (EMBEDDING
values, no usage; batchEmbedContents checks that every request names the URL's model). The model
name picks the behaviour of the generate methods:

  gm-text (and any other name)  a text answer (WORDS), one candidate per candidateCount; streamed
                                one word per event, finishReason and final usage on the last one
  gm-tools                      two function calls (the first with a thoughtSignature); streamed as
                                text, then one call per event
  gm-thinking                   a thought part, then text; usage with thoughtsTokenCount
  gm-finish-REASON              a short text with that finishReason (no content for SAFETY)
  gm-blocked                    promptFeedback.blockReason SAFETY and no candidates
  gm-status-CODE                that HTTP status with Gemini's error body (429 adds Retry-After: 7)
  gm-context-length             400: the input token count exceeds the maximum
  gm-not-json                   200 with an HTML body
  gm-stream-error               a stream: one text event, then an `error` object (503 UNAVAILABLE)
  gm-stream-error-first         a stream whose first event is an `error` object (429)
  gm-cut                        a stream: two text events, then the connection drops
  gm-no-finish                  a stream of text events that ends without any finishReason
  gm-slow                       a stream of 200 events, one every 50 ms

Events end with CRLF CRLF, as Google's do. Every request is recorded: path, method, query,
headers, JSON body and the full URL; `stream_closed_early` lists streams whose client left.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from tests.mock_server import MockServer

WORDS = ["Hello", " from", " Gemini", "."]
ANSWER = "".join(WORDS)
USAGE = {"promptTokenCount": 12, "candidatesTokenCount": 6, "totalTokenCount": 18, "cachedContentTokenCount": 4}
THINKING_USAGE = {"promptTokenCount": 9, "candidatesTokenCount": 5, "thoughtsTokenCount": 10, "totalTokenCount": 24}
THOUGHT = "Let me think about this."
COUNT_TOKENS = 21
EMBEDDING = [0.25, -0.5, 0.125]
TOOL_CALLS = [
    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2lnLWFiYw=="},
    {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}},
]
STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
          429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def error_json(code: int, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": STATUS.get(code, "UNKNOWN"),
                      "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "MOCK"}]}}


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\r\n\r\n"


def candidate(parts: list[dict[str, Any]] | None, finish: str | None = None, index: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index}
    if parts is not None:
        out["content"] = {"role": "model", "parts": parts}
    if finish:
        out["finishReason"] = finish
    return out


def answer(model: str, candidates: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"candidates": candidates, "modelVersion": f"{model}-001", "responseId": "resp-mock"}
    if usage is not None:
        data["usageMetadata"] = usage
    return data


class MockGemini(MockServer):
    cleanup_on_stop = False

    @property
    def base_url(self) -> str:
        """Like the catalog's https://generativelanguage.googleapis.com: no version segment."""
        return super().base_url

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1beta/models/{name}", self.handle)
        router.add_post("/v1/models/{name}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["name"].partition(":")
        body = await request.json(loads=orjson.loads)
        self.record(request, body, model=model, method=method, query=dict(request.query), url=str(request.url))
        if model.startswith("gm-status-"):
            code = int(model.rsplit("-", 1)[1])
            headers = {"Retry-After": "7"} if code == 429 else None
            return web.json_response(error_json(code, f"mock gemini error {code}"), status=code, headers=headers)
        if model == "gm-context-length":
            return web.json_response(error_json(
                400, "The input token count (2000000) exceeds the maximum number of tokens allowed (1048576)."),
                status=400)
        if model == "gm-not-json":
            return web.Response(text="<html>oops</html>", content_type="text/html")
        if method == "countTokens":
            return web.json_response({"totalTokens": COUNT_TOKENS})
        if method == "embedContent":
            return web.json_response({"embedding": {"values": EMBEDDING}})
        if method == "batchEmbedContents":
            requests = body.get("requests") or []
            if any(r.get("model") != f"models/{model}" for r in requests):
                return web.json_response(error_json(400, "every request must name the model of the URL"), status=400)
            return web.json_response({"embeddings": [{"values": EMBEDDING} for _ in requests]})
        if method == "streamGenerateContent":
            if request.query.get("alt") != "sse":
                return web.json_response([error_json(400, "the mock only streams with alt=sse")], status=400)
            return await self.stream(request, body, model)
        if method != "generateContent":
            return web.json_response(error_json(404, f"unknown method {method}"), status=404)
        return web.Response(body=orjson.dumps(self.whole(body, model)), content_type="application/json")

    @staticmethod
    def whole(body: dict[str, Any], model: str) -> dict[str, Any]:
        n = (body.get("generationConfig") or {}).get("candidateCount") or 1
        if model == "gm-tools":
            return answer(model, [candidate(TOOL_CALLS, "STOP")], USAGE)
        if model == "gm-thinking":
            return answer(model, [candidate([{"text": THOUGHT, "thought": True}, {"text": ANSWER}], "STOP")],
                          THINKING_USAGE)
        if model.startswith("gm-finish-"):
            reason = model.removeprefix("gm-finish-")
            parts = None if reason == "SAFETY" else [{"text": "Partial"}]
            return answer(model, [candidate(parts, reason)], USAGE)
        if model == "gm-blocked":
            return {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
                    "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7}, "modelVersion": f"{model}-001"}
        return answer(model, [candidate([{"text": ANSWER}], "STOP", i) for i in range(n)], USAGE)

    async def stream(self, request: web.Request, body: dict[str, Any], model: str) -> web.StreamResponse:
        response = await self.open_stream(request)
        sent = 0
        partial = {"promptTokenCount": USAGE["promptTokenCount"], "totalTokenCount": USAGE["promptTokenCount"]}
        try:
            if model == "gm-stream-error-first":
                await response.write(event(error_json(429, "mock quota exceeded")))
                return response
            if model == "gm-tools":
                await response.write(event(answer(model, [candidate([{"text": "Checking."}])], partial)))
                await response.write(event(answer(model, [candidate([TOOL_CALLS[0]])], partial)))
                await response.write(event(answer(model, [candidate([TOOL_CALLS[1]], "STOP")], USAGE)))
                return response
            if model == "gm-thinking":
                await response.write(event(answer(model, [candidate([{"text": THOUGHT, "thought": True}])], partial)))
                await response.write(event(answer(model, [candidate([{"text": ANSWER}], "STOP")], THINKING_USAGE)))
                return response
            if model == "gm-blocked":
                await response.write(event(self.whole(body, model)))
                return response
            if model.startswith("gm-finish-"):
                await response.write(event(self.whole(body, model)))
                return response
            if model == "gm-slow":
                for i in range(200):
                    await response.write(event(answer(model, [candidate([{"text": f" w{i}"}])], partial)))
                    sent += 1
                    await asyncio.sleep(0.05)
                return response
            n = (body.get("generationConfig") or {}).get("candidateCount") or 1
            for position, word in enumerate(WORDS):
                last = position == len(WORDS) - 1
                finish = "STOP" if last and model != "gm-no-finish" else None
                cands = [candidate([{"text": word}], finish, i) for i in range(n)]
                await response.write(event(answer(model, cands, USAGE if last else partial)))
                sent += 1
                if model == "gm-stream-error" and sent == 1:
                    await response.write(event(error_json(503, "The model is overloaded. Please try again later.")))
                    return response
                if model == "gm-cut" and sent == 2:
                    await asyncio.sleep(0.05)
                    assert request.transport is not None
                    request.transport.close()  # drop the connection mid-stream
                    return response
            return response
        except (ConnectionResetError, asyncio.CancelledError):
            self.stream_closed_early.append({"model": model, "sent": sent})
        return response
