"""A scriptable Amazon Bedrock Converse API on loopback that checks AWS Signature Version 4.

A tests.mock_server.MockServer (aiohttp on its own event loop in a background thread) that
records every request (path, headers, JSON body, the signing access key and region).

Every request must carry a valid SigV4 `Authorization` header for service `bedrock`: the mock
recomputes the signature with its own minimal implementation (deliberately separate from
proxy.providers.sigv4) from the secrets in SECRETS, and answers 403 with AWS's message when it
differs (an unknown access key: 403 UnrecognizedClientException).

Behaviour by model id (the URL-decoded `{modelId}` of /model/{modelId}/converse[-stream]):
  default           text TEXT (streamed word by word), stopReason end_turn, usage USAGE
  *cache*           the same with cache read / write tokens (CACHE_USAGE)
  *tools*           text, then the two TOOLS as toolUse blocks (streamed input in pieces), tool_use
  *stop-REASON      the text answer with that stopReason
  *status-CODE      that HTTP status with {"message"} and x-amzn-errortype
  *throttled        a stream: some text, then a throttlingException exception event
  *thinking         a signed reasoningContent block (THOUGHT, SIGNATURE) before the text; 400 unless
                    additionalModelRequestFields.thinking is enabled with a budget below maxTokens
Streams are written a few bytes at a time, so frames arrive split at arbitrary places.

Bedrock's Anthropic API, for the native passthrough (the same signature check and model ids):
  /model/{modelId}/invoke                       an Anthropic Message (ANTHROPIC_USAGE; *tools*: text
                                                and two tool_use blocks), or *status-CODE's error
  /model/{modelId}/invoke-with-response-stream  the Anthropic stream events, each in a `chunk` frame
                                                whose payload is {"bytes": base64(event JSON)}
      *throttled-first  a throttlingException as the first frame
      *throttled        some events, then a throttlingException
      *cut              some events, then the body ends (no message_stop)
      *garbled          some events, then a frame with a broken CRC
  /model/{modelId}/count-tokens                 {"inputTokens": len(JSON of system, messages, tools) // 4};
                                                a cross-Region profile id (us., eu., global.) is a 400,
                                                as CountTokens takes foundation-model ids
The invoke body must be an InvokeModel body for Claude: anthropic_version bedrock-2023-05-31,
max_tokens, messages, no model or stream, anthropic_beta (if any) a list of strings; else 400
ValidationException. Event JSON is written by `json.dumps` (spaces after `:` and `,`), so a
gateway that re-serializes it is caught. `anthropic_events(model)` gives the events as sent.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import json
import re
import struct
import time
import zlib
from typing import Any
from urllib.parse import quote, unquote

import orjson
from aiohttp import web

from tests.mock_server import MockServer

SECRETS = {"AKIDEXAMPLE": "secret", "AKIDCUSTOMER": "customer-secret"}
WORDS = ["Hello", " from", " the", " mock", " Bedrock", "."]
TEXT = "".join(WORDS)
USAGE = {"inputTokens": 12, "outputTokens": 6, "totalTokens": 18}
CACHE_USAGE = {"inputTokens": 5, "outputTokens": 6, "totalTokens": 311, "cacheReadInputTokens": 200,
               "cacheWriteInputTokens": 100}
THOUGHT, SIGNATURE = "Thinking it over.", "sig-bedrock-1"
TOOLS = [("tooluse_01", "get_weather", {"city": "Paris"}), ("tooluse_02", "get_time", {"tz": "Europe/Paris"})]
ERROR_TYPES = {400: "ValidationException", 403: "AccessDeniedException", 404: "ResourceNotFoundException",
               429: "ThrottlingException", 500: "InternalServerException", 503: "ServiceUnavailableException"}
ANTHROPIC_USAGE = {"input_tokens": 12, "output_tokens": 6, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 0}
ANTHROPIC_TOOLS = [("toolu_bdrk_01", "get_weather", {"city": "Paris"}), ("toolu_bdrk_02", "get_time", {"tz": "Europe/Paris"})]
BEDROCK_ANTHROPIC_VERSION = "bedrock-2023-05-31"
BAD_SIGNATURE = ("The request signature we calculated does not match the signature you provided. Check your "
                 "AWS Secret Access Key and signing method. Consult the service documentation for details.")


# -- an independent, minimal SigV4 check ---------------------------------------------------


def _mac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def expected_signature(request: web.Request, body: bytes, secret: str, signed_headers: list[str],
                       scope: list[str]) -> str:
    date, region, service, _ = scope
    canonical_path = quote(request.rel_url.raw_path, safe="/~")  # non-S3 services: encode the path again
    query = "&".join(sorted(p for p in request.rel_url.raw_query_string.split("&") if p))
    header_lines = "".join(f"{h}:{' '.join(request.headers.get(h, '').split())}\n" for h in signed_headers)
    canonical = "\n".join([request.method, canonical_path, query, header_lines, ";".join(signed_headers),
                           hashlib.sha256(body).hexdigest()])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", request.headers.get("x-amz-date", ""), "/".join(scope),
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = _mac(_mac(_mac(_mac(("AWS4" + secret).encode(), date), region), service), "aws4_request")
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def check_signature(request: web.Request, body: bytes) -> tuple[int, str, str] | dict[str, str]:
    """(status, error type, message) when refused, else {access_key, region}."""
    auth = request.headers.get("authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return 403, "MissingAuthenticationTokenException", "Missing Authentication Token"
    fields = dict(part.strip().split("=", 1) for part in auth[len("AWS4-HMAC-SHA256 "):].split(","))
    scope = fields.get("Credential", "").split("/")
    if len(scope) != 5 or scope[3] != "bedrock" or scope[4] != "aws4_request":
        return 403, "IncompleteSignatureException", "Credential should be scoped to a valid region and service"
    access_key, scope = scope[0], scope[1:]
    secret = SECRETS.get(access_key)
    if secret is None:
        return 403, "UnrecognizedClientException", "The security token included in the request is invalid."
    signed_headers = fields.get("SignedHeaders", "").split(";")
    if "host" not in signed_headers or "x-amz-date" not in signed_headers:
        return 403, "IncompleteSignatureException", "host and x-amz-date must be signed"
    amz_date = request.headers.get("x-amz-date", "")
    try:
        skew = abs(time.time() - calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        skew = 1e9
    if skew > 300 or amz_date[:8] != scope[0]:
        return 403, "InvalidSignatureException", "Signature expired or date does not match the scope"
    if not hmac.compare_digest(expected_signature(request, body, secret, signed_headers, scope),
                               fields.get("Signature", "")):
        return 403, "InvalidSignatureException", BAD_SIGNATURE
    return {"access_key": access_key, "region": scope[1], "session_token": request.headers.get("x-amz-security-token")}


# -- event-stream frames (own encoder) ------------------------------------------------------


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    head = b"".join(bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v.encode())) + v.encode()
                    for k, v in headers.items())
    prelude = struct.pack(">II", 16 + len(head) + len(payload), len(head))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + head + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event(kind: str, data: dict[str, Any]) -> bytes:
    return frame({":event-type": kind, ":content-type": "application/json", ":message-type": "event"},
                 orjson.dumps({**data, "p": "abcdef"}))  # Bedrock pads events with a `p` field


def exception(kind: str, message: str) -> bytes:
    return frame({":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"},
                 orjson.dumps({"message": message}))


def chunk(data: bytes) -> bytes:
    """One InvokeModelWithResponseStream `chunk` frame carrying `data` (one event's JSON)."""
    payload = orjson.dumps({"bytes": base64.b64encode(data).decode(), "p": "abcdefgh"})
    return frame({":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}, payload)


def anthropic_event(kind: str, data: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, **data}).encode()  # json.dumps: not orjson's bytes, on purpose


def served_model(model: str) -> str:
    """The model name a Claude answer on Bedrock carries: `us.anthropic.claude-x-v1:0` -> `claude-x`."""
    name = model.rsplit("anthropic.", 1)[-1]
    return re.sub(r"-v\d+(:\d+)?$", "", name)


def invoke_problem(body: Any) -> str | None:
    """What Bedrock would refuse in an InvokeModel body for Claude, as its message."""
    if not isinstance(body, dict):
        return "Malformed input request: body is not a JSON object"
    if body.get("anthropic_version") != BEDROCK_ANTHROPIC_VERSION:
        return f"Malformed input request: anthropic_version must be {BEDROCK_ANTHROPIC_VERSION}"
    for key in ("model", "stream"):
        if key in body:
            return f"Malformed input request: extraneous key [{key}] is not permitted"
    if not isinstance(body.get("max_tokens"), int):
        return "Malformed input request: required key [max_tokens] not found"
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return "Malformed input request: required key [messages] not found"
    betas = body.get("anthropic_beta")
    if betas is not None and (not isinstance(betas, list) or not all(isinstance(b, str) for b in betas)):
        return "Malformed input request: anthropic_beta must be an array of strings"
    return None


class MockBedrock(MockServer):
    client_max_size = 32 * 1024 * 1024

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/model/{model}/converse", self.converse)
        router.add_post("/model/{model}/converse-stream", self.converse)
        router.add_post("/model/{model}/invoke", self.invoke)
        router.add_post("/model/{model}/invoke-with-response-stream", self.invoke)
        router.add_post("/model/{model}/count-tokens", self.count_tokens)

    # -- answers ----------------------------------------------------------------------

    @staticmethod
    def error(status: int, kind: str, message: str) -> web.Response:
        return web.Response(status=status, body=orjson.dumps({"message": message}), content_type="application/json",
                            headers={"x-amzn-errortype": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/",
                                     "x-amzn-requestid": "req-mock-error"})

    @staticmethod
    def stop_reason(model: str) -> str:
        if "stop-" in model:
            return model.rsplit("stop-", 1)[1]
        return "tool_use" if "tools" in model else "end_turn"

    @staticmethod
    def usage(model: str) -> dict[str, int]:
        return dict(CACHE_USAGE if "cache" in model else USAGE)

    async def converse(self, request: web.Request) -> web.StreamResponse:
        model, body, refusal = await self.signed_request(request)
        if refusal is not None:
            return refusal
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return self.error(400, "ValidationException", "messages: at least one message is required")
        if "status-" in model:
            status = int(model.rsplit("status-", 1)[1])
            return self.error(status, ERROR_TYPES.get(status, "InternalServerException"), f"mock error {status}")
        if "thinking" in model:
            thinking = (body.get("additionalModelRequestFields") or {}).get("thinking") or {}
            budget, limit = thinking.get("budget_tokens"), (body.get("inferenceConfig") or {}).get("maxTokens")
            if thinking.get("type") != "enabled" or not isinstance(limit, int) or not budget or budget >= limit:
                return self.error(400, "ValidationException", "thinking needs a budget_tokens below maxTokens")
        if request.path.endswith("/converse-stream"):
            return await self.stream(request, model)
        content: list[dict[str, Any]] = [{"text": "Let me check." if "tools" in model else TEXT}]
        if "thinking" in model:
            content.insert(0, {"reasoningContent": {"reasoningText": {"text": THOUGHT, "signature": SIGNATURE}}})
        if "tools" in model:
            content += [{"toolUse": {"toolUseId": i, "name": n, "input": a}} for i, n, a in TOOLS]
        answer = {"output": {"message": {"role": "assistant", "content": content}},
                  "stopReason": self.stop_reason(model), "usage": self.usage(model), "metrics": {"latencyMs": 42}}
        return web.Response(body=orjson.dumps(answer), content_type="application/json",
                            headers={"x-amzn-requestid": "req-mock-ok"})

    def events(self, model: str) -> list[bytes]:
        out = [event("messageStart", {"role": "assistant"})]
        text_index = 0
        if "thinking" in model:
            text_index = 1
            for piece in (THOUGHT[:8], THOUGHT[8:]):
                out.append(event("contentBlockDelta", {"contentBlockIndex": 0,
                                                       "delta": {"reasoningContent": {"text": piece}}}))
            out.append(event("contentBlockDelta", {"contentBlockIndex": 0,
                                                   "delta": {"reasoningContent": {"signature": SIGNATURE}}}))
            out.append(event("contentBlockStop", {"contentBlockIndex": 0}))
        words = ["Let", " me", " check."] if "tools" in model else WORDS
        for word in words:
            out.append(event("contentBlockDelta", {"contentBlockIndex": text_index, "delta": {"text": word}}))
        if model.endswith("throttled"):
            return out + [exception("throttlingException", "Too many requests, please wait before trying again.")]
        out.append(event("contentBlockStop", {"contentBlockIndex": text_index}))
        if "tools" in model:
            for index, (tool_id, name, args) in enumerate(TOOLS, start=1):
                out.append(event("contentBlockStart", {"contentBlockIndex": index,
                                                       "start": {"toolUse": {"toolUseId": tool_id, "name": name}}}))
                text = orjson.dumps(args).decode()
                for piece in (text[:5], text[5:12], text[12:]):
                    out.append(event("contentBlockDelta", {"contentBlockIndex": index,
                                                           "delta": {"toolUse": {"input": piece}}}))
                out.append(event("contentBlockStop", {"contentBlockIndex": index}))
        out.append(event("messageStop", {"stopReason": self.stop_reason(model)}))
        out.append(event("metadata", {"usage": self.usage(model), "metrics": {"latencyMs": 42}}))
        return out

    async def stream(self, request: web.Request, model: str) -> web.StreamResponse:
        return await self.send_stream(request, self.events(model), "application/vnd.amazon.eventstream",
                                      {"x-amzn-requestid": "req-mock-stream"},
                                      piece=97)  # frames split at arbitrary places

    # -- Bedrock's Anthropic API (InvokeModel, InvokeModelWithResponseStream, CountTokens) --

    async def signed_request(self, request: web.Request) -> tuple[str, Any, web.Response | None]:
        """(model id, JSON body, refusal): records the request; a refused signature answers 403."""
        raw = await request.read()
        model = unquote(request.match_info["model"])
        signer = check_signature(request, raw)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        self.record(request, body, path=request.rel_url.raw_path, model=model,
                    signer=signer if isinstance(signer, dict) else None)
        return model, body, None if isinstance(signer, dict) else self.error(*signer)

    @staticmethod
    def anthropic_content(model: str) -> list[dict[str, Any]]:
        if "tools" in model:
            return [{"type": "text", "text": "Let me check."}] + [
                {"type": "tool_use", "id": i, "name": name, "input": args} for i, name, args in ANTHROPIC_TOOLS]
        return [{"type": "text", "text": TEXT}]

    async def invoke(self, request: web.Request) -> web.StreamResponse:
        model, body, refused = await self.signed_request(request)
        if refused is not None:
            return refused
        problem = invoke_problem(body)
        if problem is not None:
            return self.error(400, "ValidationException", problem)
        if "status-" in model:
            status = int(model.rsplit("status-", 1)[1])
            return self.error(status, ERROR_TYPES.get(status, "InternalServerException"), f"mock error {status}")
        if request.path.endswith("/invoke-with-response-stream"):
            return await self.send_stream(request, self.invoke_frames(model), "application/vnd.amazon.eventstream",
                                          {"x-amzn-requestid": "req-mock-invoke-stream"}, piece=61)
        answer = {"id": "msg_bdrk_01", "type": "message", "role": "assistant", "model": served_model(model),
                  "content": self.anthropic_content(model),
                  "stop_reason": "tool_use" if "tools" in model else "end_turn", "stop_sequence": None,
                  "usage": dict(ANTHROPIC_USAGE)}
        data = json.dumps(answer).encode()
        self.requests[-1]["answer"] = data  # the exact bytes, for a pass-through check
        return web.Response(body=data, content_type="application/json", headers={"x-amzn-requestid": "req-mock-invoke"})

    def anthropic_events(self, model: str) -> list[bytes]:
        """The Anthropic stream events (JSON bytes) the stream of `model` carries, in order."""
        if "throttled-first" in model:
            return []
        out = [anthropic_event("message_start", {"message": {
            "id": "msg_bdrk_01", "type": "message", "role": "assistant", "model": served_model(model), "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**ANTHROPIC_USAGE, "output_tokens": 1}}})]
        out.append(anthropic_event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))
        for word in ["Let", " me", " check."] if "tools" in model else WORDS:
            out.append(anthropic_event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": word}}))
        if any(mode in model for mode in ("throttled", "cut", "garbled")):
            return out
        out.append(anthropic_event("content_block_stop", {"index": 0}))
        if "tools" in model:
            for index, (tool_id, name, args) in enumerate(ANTHROPIC_TOOLS, start=1):
                out.append(anthropic_event("content_block_start", {"index": index, "content_block": {
                    "type": "tool_use", "id": tool_id, "name": name, "input": {}}}))
                text = orjson.dumps(args).decode()
                for piece in ("", text[:5], text[5:12], text[12:]):
                    out.append(anthropic_event("content_block_delta", {"index": index, "delta": {
                        "type": "input_json_delta", "partial_json": piece}}))
                out.append(anthropic_event("content_block_stop", {"index": index}))
        out.append(anthropic_event("message_delta", {
            "delta": {"stop_reason": "tool_use" if "tools" in model else "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": ANTHROPIC_USAGE["output_tokens"]}}))
        out.append(anthropic_event("message_stop", {"amazon-bedrock-invocationMetrics": {
            "inputTokenCount": 12, "outputTokenCount": 6, "invocationLatency": 420, "firstByteLatency": 120}}))
        return out

    def invoke_frames(self, model: str) -> list[bytes]:
        out = [chunk(data) for data in self.anthropic_events(model)]
        if "throttled" in model:
            out.append(exception("throttlingException", "Too many requests, please wait before trying again."))
        elif "garbled" in model:
            broken = bytearray(chunk(anthropic_event("content_block_delta", {
                "index": 0, "delta": {"type": "text_delta", "text": " more"}})))
            broken[-1] ^= 0xFF  # the message CRC no longer matches
            out.append(bytes(broken))
        return out

    async def count_tokens(self, request: web.Request) -> web.Response:
        model, body, refused = await self.signed_request(request)
        if refused is not None:
            return refused
        invoke = body.get("input", {}).get("invokeModel", {}).get("body") if isinstance(body, dict) else None
        try:
            decoded = orjson.loads(base64.b64decode(invoke, validate=True)) if isinstance(invoke, str) else None
        except (ValueError, orjson.JSONDecodeError):
            decoded = None
        self.requests[-1]["invoke_body"] = decoded
        if decoded is None:
            return self.error(400, "ValidationException", "input.invokeModel.body must be a base64 JSON body")
        problem = invoke_problem(decoded)
        if problem is not None:
            return self.error(400, "ValidationException", problem)
        if model.startswith(("us.", "eu.", "global.")):
            return self.error(400, "ValidationException", "The provided model identifier is invalid.")
        size = len(orjson.dumps([decoded.get("system"), decoded["messages"], decoded.get("tools")]))
        return web.json_response({"inputTokens": size // 4}, headers={"x-amzn-requestid": "req-mock-count"})
