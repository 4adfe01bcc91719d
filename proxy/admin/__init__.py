"""The admin plane's door: admin keys, separate from gateway keys.

Admin endpoints (cache management, limit policies, ...) take an admin key as `Authorization:
Bearer` or `x-api-key`. No key or an unknown one is a 401; a gateway key is a 403, so a leaked
gateway key never reaches the admin plane. Keys are configured as SHA-256 hashes only and
compared in constant time.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy.errors import INVALID_KEY
from proxy.keys import presented_key

Handler = Callable[[Request], Awaitable[Response]]
NOT_ADMIN = "This endpoint needs an admin key; gateway keys are not accepted here"


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers=headers, media_type="application/json")


def error_response(detail: str, status: int, **extra: Any) -> Response:
    return json_response({"detail": detail, **extra}, status)


class AdminGuard:
    def __init__(self, admin_hashes: list[str], gateway_hashes: list[str]) -> None:
        self._admin = [h.removeprefix("sha256:").encode() for h in admin_hashes]
        self._gateway = [h.removeprefix("sha256:").encode() for h in gateway_hashes]

    def set_gateway_hashes(self, hashes: list[str]) -> None:
        """The gateway keys to answer 403 (not 401) for, as keys are created and revoked."""
        self._gateway = [h.removeprefix("sha256:").encode() for h in hashes]

    def is_admin(self, key: str) -> bool:
        digest = hashlib.sha256(key.encode()).hexdigest().encode()
        return any([hmac.compare_digest(digest, h) for h in self._admin])

    def check(self, request: Request) -> Response | None:
        """None when the request carries an admin key, else the 401/403 to answer."""
        key = presented_key(request.headers)
        if key is None:
            return error_response(INVALID_KEY, 401)
        digest = hashlib.sha256(key.encode()).hexdigest().encode()
        # every hash is compared, so the time taken says nothing about which list matched
        is_admin = any([hmac.compare_digest(digest, h) for h in self._admin])
        is_gateway = any([hmac.compare_digest(digest, h) for h in self._gateway])
        if is_admin:
            return None
        if is_gateway:
            return error_response(NOT_ADMIN, 403)
        return error_response(INVALID_KEY, 401)

    def __call__(self, handler: Handler) -> Handler:
        """Wrap an admin endpoint."""

        @functools.wraps(handler)
        async def guarded(request: Request) -> Response:
            refused = self.check(request)
            if refused is not None:
                return refused
            return await handler(request)

        return guarded


async def read_object(request: Request) -> tuple[dict[str, Any], Response | None]:
    """An admin request's JSON object body (empty: {}), or the 400/413 to answer."""
    body, refused = await read_json(request)
    if refused is None and not isinstance(body, dict):
        refused = error_response(f"Expected a JSON object, got {type(body).__name__}", 400)
    return (body if refused is None else {}), refused


async def read_json(request: Request, max_bytes: int = 1024 * 1024) -> tuple[Any, Response | None]:
    """An admin request's JSON body (empty: {}), or the 400/413 to answer. The body is read only
    up to `max_bytes`: a larger one is refused before it is all in memory."""
    too_large = error_response(f"Request body is larger than {max_bytes} bytes", 413)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        return None, too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            return None, too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        return {}, None
    try:
        return orjson.loads(body), None
    except orjson.JSONDecodeError as exc:
        return None, error_response(f"Request body is not valid JSON: {exc}", 400)
