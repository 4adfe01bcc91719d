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
Streams are written a few bytes at a time, so frames arrive split at arbitrary places.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
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
TOOLS = [("tooluse_01", "get_weather", {"city": "Paris"}), ("tooluse_02", "get_time", {"tz": "Europe/Paris"})]
ERROR_TYPES = {400: "ValidationException", 403: "AccessDeniedException", 404: "ResourceNotFoundException",
               429: "ThrottlingException", 500: "InternalServerException", 503: "ServiceUnavailableException"}
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


class MockBedrock(MockServer):
    client_max_size = 32 * 1024 * 1024

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/model/{model}/converse", self.converse)
        router.add_post("/model/{model}/converse-stream", self.converse)

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
        raw = await request.read()
        model = unquote(request.match_info["model"])
        signer = check_signature(request, raw)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        self.record(request, body, path=request.rel_url.raw_path, model=model,
                    signer=signer if isinstance(signer, dict) else None)
        if not isinstance(signer, dict):
            return self.error(*signer)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return self.error(400, "ValidationException", "messages: at least one message is required")
        if "status-" in model:
            status = int(model.rsplit("status-", 1)[1])
            return self.error(status, ERROR_TYPES.get(status, "InternalServerException"), f"mock error {status}")
        if request.path.endswith("/converse-stream"):
            return await self.stream(request, model)
        content: list[dict[str, Any]] = [{"text": "Let me check." if "tools" in model else TEXT}]
        if "tools" in model:
            content += [{"toolUse": {"toolUseId": i, "name": n, "input": a}} for i, n, a in TOOLS]
        answer = {"output": {"message": {"role": "assistant", "content": content}},
                  "stopReason": self.stop_reason(model), "usage": self.usage(model), "metrics": {"latencyMs": 42}}
        return web.Response(body=orjson.dumps(answer), content_type="application/json",
                            headers={"x-amzn-requestid": "req-mock-ok"})

    def events(self, model: str) -> list[bytes]:
        out = [event("messageStart", {"role": "assistant"})]
        words = ["Let", " me", " check."] if "tools" in model else WORDS
        for word in words:
            out.append(event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": word}}))
        if model.endswith("throttled"):
            return out + [exception("throttlingException", "Too many requests, please wait before trying again.")]
        out.append(event("contentBlockStop", {"contentBlockIndex": 0}))
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
