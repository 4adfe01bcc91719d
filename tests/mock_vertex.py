"""A mock Google Vertex AI and Google OAuth token endpoint on loopback, for tests.

A tests.mock_server.MockServer (aiohttp on its own event loop in a background thread):

  POST /token     the OAuth 2.0 JWT bearer grant. It verifies what Google verifies: the form's
                  grant_type, the JWT header (alg RS256, typ JWT), the claims (iss a known service
                  account, scope cloud-platform, aud this URL, iat near now, exp = iat + 3600) and
                  the RS256 signature against the account's public key (modulus and exponent given
                  to `add_account`). Refusals are Google's 400 {"error": "invalid_grant", ...}.
                  Answers {"access_token": "ya29.mock-<n>", "expires_in": 3599, "token_type": "Bearer"}.
  POST /v1/projects/{project}/locations/{location}/publishers/google/models/{model}:{method}
                  generateContent / streamGenerateContent?alt=sse: a Gemini text answer (mock_gemini's)
  POST /v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model}:{method}
                  rawPredict / streamRawPredict: a Claude text answer; the body must carry
                  anthropic_version vertex-2023-10-16 and no model. Model `count-tokens`
                  (rawPredict, the model named in the body) answers {"input_tokens": COUNT_TOKENS};
                  a model whose name contains `overloaded` answers 529 overloaded_error.
                  The google publisher also answers countTokens.

The publisher routes answer 401 (Google's UNAUTHENTICATED) unless `Authorization: Bearer <token>`
holds a token this mock issued. Every publisher request is recorded in `requests`, every token
request in `token_requests`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from typing import Any
from urllib.parse import parse_qs

import orjson
from aiohttp import web

from tests import mock_anthropic, mock_gemini
from tests.mock_server import MockServer

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
COUNT_TOKENS = 17  # count-tokens:rawPredict's answer
SHA256_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def rs256_valid(signing_input: bytes, signature: bytes, n: int, e: int) -> bool:
    """RSASSA-PKCS1-v1_5 SHA-256 verification (RFC 8017 8.2.2)."""
    size = (n.bit_length() + 7) // 8
    if len(signature) != size:
        return False
    em = pow(int.from_bytes(signature, "big"), e, n).to_bytes(size, "big")
    digest_info = SHA256_PREFIX + hashlib.sha256(signing_input).digest()
    expected = b"\x00\x01" + b"\xff" * (size - len(digest_info) - 3) + b"\x00" + digest_info
    return em == expected


class MockVertex(MockServer):
    def __init__(self) -> None:
        super().__init__()
        self.accounts: dict[str, tuple[int, int]] = {}  # client_email -> (n, e)
        self.tokens: set[str] = set()
        self.token_requests: list[dict[str, Any]] = []
        self.token_refusals: list[str] = []
        self.token_delay = 0.0

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    def add_account(self, email: str, n: int, e: int) -> None:
        self.accounts[email] = (n, e)

    def reset(self) -> None:
        super().reset()
        self.token_requests.clear()
        self.token_refusals.clear()
        self.token_delay = 0.0

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/token", self.token)
        prefix = "/v1/projects/{project}/locations/{location}/publishers"
        router.add_post(prefix + "/google/models/{name}", self.gemini)
        router.add_post(prefix + "/anthropic/models/{name}", self.anthropic)

    # -- the token endpoint ---------------------------------------------------------------------

    def check_assertion(self, form: dict[str, list[str]]) -> str | None:
        """Why Google would refuse this token request; None when it is valid."""
        if form.get("grant_type") != [GRANT_TYPE]:
            return "Invalid grant_type"
        assertion = (form.get("assertion") or [""])[0]
        pieces = assertion.split(".")
        if len(pieces) != 3:
            return "Invalid JWT: not three segments"
        try:
            header = orjson.loads(_b64url_decode(pieces[0]))
            claims = orjson.loads(_b64url_decode(pieces[1]))
            signature = _b64url_decode(pieces[2])
        except (ValueError, orjson.JSONDecodeError):
            return "Invalid JWT: undecodable segment"
        if header.get("alg") != "RS256" or header.get("typ") != "JWT":
            return f"Invalid JWT header {header}"
        account = self.accounts.get(claims.get("iss"))
        if account is None:
            return "Invalid JWT: unknown issuer"
        if claims.get("scope") != SCOPE:
            return f"Invalid JWT: scope {claims.get('scope')!r}"
        if claims.get("aud") != self.token_uri:
            return f"Invalid JWT: aud {claims.get('aud')!r}"
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int) or abs(iat - time.time()) > 60 or exp - iat != 3600:
            return "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe"
        if not rs256_valid(f"{pieces[0]}.{pieces[1]}".encode(), signature, *account):
            return "Invalid JWT Signature."
        return None

    async def token(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-www-form-urlencoded":
            return web.json_response({"error": "invalid_request", "error_description": "bad content type"}, status=400)
        form = parse_qs((await request.read()).decode())
        self.token_requests.append({"form": form, "headers": dict(request.headers)})
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        problem = self.check_assertion(form)
        if problem is not None:
            self.token_refusals.append(problem)
            return web.json_response({"error": "invalid_grant", "error_description": problem}, status=400)
        token = f"ya29.mock-{len(self.token_requests)}"
        self.tokens.add(token)
        return web.json_response({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    # -- publisher routes -----------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[7:] in self.tokens

    async def _record(self, request: web.Request, publisher: str) -> tuple[str, str, Any]:
        model, _, method = request.match_info["name"].partition(":")
        body = await request.json(loads=orjson.loads)
        self.record(request, body, publisher=publisher, model=model, method=method,
                    project=request.match_info["project"], location=request.match_info["location"],
                    query=dict(request.query))
        return model, method, body

    async def gemini(self, request: web.Request) -> web.StreamResponse:
        model, method, body = await self._record(request, "google")
        if not self._authorized(request):
            return web.json_response(mock_gemini.error_json(401, "Request had invalid authentication credentials."),
                                     status=401)
        if not isinstance(body, dict) or not body.get("contents"):
            return web.json_response(mock_gemini.error_json(400, "contents is required"), status=400)
        if method == "countTokens":
            return web.json_response({"totalTokens": mock_gemini.COUNT_TOKENS, "totalBillableCharacters": 40})
        if method == "generateContent":
            answer = mock_gemini.answer(model, [mock_gemini.candidate([{"text": mock_gemini.ANSWER}], "STOP")],
                                        mock_gemini.USAGE)
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        if method != "streamGenerateContent" or request.query.get("alt") != "sse":
            return web.json_response(mock_gemini.error_json(404, f"unknown method {method}"), status=404)
        last = len(mock_gemini.WORDS) - 1
        return await self.send_stream(request, [mock_gemini.event(mock_gemini.answer(
            model, [mock_gemini.candidate([{"text": word}], "STOP" if i == last else None)],
            mock_gemini.USAGE if i == last else None)) for i, word in enumerate(mock_gemini.WORDS)])

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        model, method, body = await self._record(request, "anthropic")
        if not self._authorized(request):
            return web.json_response(mock_gemini.error_json(401, "Request had invalid authentication credentials."),
                                     status=401)
        if model == "count-tokens":  # one endpoint for every model: the model is in the body
            if method != "rawPredict" or not isinstance(body, dict) or not body.get("model") or not body.get("messages"):
                return web.json_response(mock_anthropic.error_body(
                    "invalid_request_error", "count-tokens takes rawPredict with model and messages"), status=400)
            return web.json_response({"input_tokens": COUNT_TOKENS})
        if "overloaded" in model:
            return web.json_response(mock_anthropic.error_body("overloaded_error", "Overloaded"), status=529)
        problem = None
        if not isinstance(body, dict) or body.get("anthropic_version") != "vertex-2023-10-16":
            problem = "anthropic_version: must be vertex-2023-10-16"
        elif "model" in body:
            problem = "model: Extra inputs are not permitted"
        elif not isinstance(body.get("max_tokens"), int) or not body.get("messages"):
            problem = "max_tokens and messages are required"
        elif bool(body.get("stream")) != (method == "streamRawPredict") or method not in ("rawPredict",
                                                                                         "streamRawPredict"):
            problem = f"method {method} does not match stream={body.get('stream')}"
        if problem is not None:
            return web.json_response(mock_anthropic.error_body("invalid_request_error", problem), status=400)
        usage = dict(mock_anthropic.USAGE)
        if method == "rawPredict":
            data = {"id": "msg_vrtx01", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": mock_anthropic.TEXT}], "stop_reason": "end_turn",
                    "stop_sequence": None, "usage": usage}
            return web.Response(body=orjson.dumps(data), content_type="application/json")
        event = mock_anthropic.event
        events = [event("message_start", {"message": {
            "id": "msg_vrtx01", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 1}}}),
            event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})]
        events += [event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}})
                   for w in mock_anthropic.WORDS]
        events += [event("content_block_stop", {"index": 0}),
                   event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                           "usage": {"output_tokens": usage["output_tokens"]}}),
                   event("message_stop", {})]
        return await self.send_stream(request, events)
