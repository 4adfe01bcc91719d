"""The `auth` stage: gateway API keys from `Authorization: Bearer`, `x-api-key` or `x-goog-api-key`.

Keys are configured as SHA-256 hashes only. The presented key is hashed and the digests are
compared in constant time; a missing, unknown or expired key is a 401 with the spec's body.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from datetime import UTC
from typing import Any

from proxy.call import Call, KeyInfo, Reply
from proxy.errors import Unauthorized
from proxy.pipeline import Next, StageContext
from proxy.settings import ApiKey


def presented_key(headers: Any) -> str | None:
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return headers.get("x-api-key") or headers.get("x-goog-api-key") or None


def _expiry(key: ApiKey) -> float:
    """Unix seconds after which the key is refused (a naive datetime is UTC)."""
    if key.expires_at is None:
        return math.inf
    expires = key.expires_at if key.expires_at.tzinfo else key.expires_at.replace(tzinfo=UTC)
    return expires.timestamp()


class AuthStage:
    def __init__(self, keys: list[ApiKey]) -> None:
        # digest -> (digest bytes for the constant-time compare, expiry, who)
        self._keys: dict[str, tuple[bytes, float, KeyInfo]] = {}
        for k in keys:
            digest = k.key_hash.removeprefix("sha256:")
            self._keys[digest] = (digest.encode(), _expiry(k), KeyInfo(name=k.name, environment=k.environment))

    def identify(self, key: str) -> KeyInfo:
        digest = hashlib.sha256(key.encode()).hexdigest()
        found = self._keys.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest.encode()):
            raise Unauthorized()
        _, expires, info = found
        if time.time() >= expires:
            raise Unauthorized()
        return info

    async def __call__(self, call: Call, next: Next) -> Reply:
        key = presented_key(call.headers)
        if key is None:
            raise Unauthorized()
        call.key = self.identify(key)
        return await next(call)


def create_stage(context: StageContext) -> AuthStage:
    if context.options:
        raise ValueError(f"auth takes no options, got {sorted(context.options)}")
    return AuthStage(context.settings.keys)
