"""Gateway API keys: only their SHA-256 hashes are stored or configured."""

from __future__ import annotations

import hashlib
import re
import secrets

_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def is_key_hash(value: str) -> bool:
    return bool(_HASH.match(value))


def new_key(prefix: str = "sk-llmrelay-") -> str:
    return prefix + secrets.token_urlsafe(32)
