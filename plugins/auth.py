"""The `auth` stage: gateway API keys from `Authorization: Bearer`, `x-api-key` or `x-goog-api-key`.

Keys are configured as SHA-256 hashes only. The presented key is hashed and the digests are
compared in constant time; a missing, unknown or expired key is a 401 with the spec's body.
"""

from __future__ import annotations

from collections.abc import Awaitable

from proxy.admin.keys import stored_keys
from proxy.call import Call, KeyInfo, Reply
from proxy.errors import Unauthorized
from proxy.keys import KeyRing, presented_key
from proxy.pipeline import Next, StageContext
from proxy.settings import ApiKey


class AuthStage:
    def __init__(self, keys: list[ApiKey]) -> None:
        self._configured = keys
        self._ring = KeyRing(keys)

    def set_managed_keys(self, keys: list[ApiKey]) -> None:
        """The keys of the admin store, beside the config file's (called again on every change)."""
        self._ring = KeyRing([*self._configured, *keys])

    def identify(self, key: str) -> KeyInfo:
        info = self._ring.identify(key)
        if info is None:
            raise Unauthorized()
        return info

    def __call__(self, call: Call, next: Next) -> Awaitable[Reply]:
        key = presented_key(call.headers)
        if key is None:
            raise Unauthorized()
        call.key = self.identify(key)
        return next(call)


def create_stage(context: StageContext) -> AuthStage:
    if context.options:
        raise ValueError(f"auth takes no options, got {sorted(context.options)}")
    stage = AuthStage(context.settings.keys)
    snapshot = context.services.get("snapshot")
    if snapshot is not None:
        snapshot.subscribe("key", lambda objects: stage.set_managed_keys(stored_keys(objects)))
    return stage
