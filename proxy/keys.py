"""Gateway API keys: only their SHA-256 hashes are stored or configured."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from proxy.call import KeyInfo

_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def is_key_hash(value: str) -> bool:
    return bool(_HASH.match(value))


def new_key(prefix: str = "sk-llmrelay-") -> str:
    return prefix + secrets.token_urlsafe(32)


def presented_key(headers: Any) -> str | None:
    """The key a request carries: `Authorization: Bearer`, `x-api-key` or `x-goog-api-key`."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return headers.get("x-api-key") or headers.get("x-goog-api-key") or None


def _expiry(expires_at: datetime | None) -> float:
    """Unix seconds after which a key is refused (a naive datetime is UTC)."""
    if expires_at is None:
        return math.inf
    expires = expires_at if expires_at.tzinfo else expires_at.replace(tzinfo=UTC)
    return expires.timestamp()


class KeyRing:
    """Gateway keys by hash: who a presented key is, compared in constant time, expiry checked."""

    def __init__(self, keys: Iterable[Any]) -> None:
        # digest -> (digest bytes for the constant-time compare, expiry, who); keys are ApiKey-like
        self._keys: dict[str, tuple[bytes, float, KeyInfo]] = {}
        for k in keys:
            digest = k.key_hash.removeprefix("sha256:")
            self._keys[digest] = (digest.encode(), _expiry(k.expires_at), KeyInfo(name=k.name, environment=k.environment))

    def identify(self, key: str) -> KeyInfo | None:
        """The key's owner, or None for an unknown or expired key."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        found = self._keys.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest.encode()):
            return None
        _, expires, info = found
        if time.time() >= expires:
            return None
        return info
