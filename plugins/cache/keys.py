"""The cache key: a hash of what determines the answer.

That is the provider params (messages, tools, response_format, sampling params, ...) in the
client's format, never gateway params or headers. `stream` and `stream_options` are left out,
so a stream and a whole answer share one entry; the model is left out unless
`is_cached_by_model` (spec 3.4: without it, the same prompt gets the cached answer whatever the
model); the customer is put in with `cache_by_customer`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from proxy.call import Call

NOT_IN_KEY = frozenset({"model", "stream", "stream_options"})
# Call.endpoint values whose two methods (stream and whole) answer the same request.
SAME_ANSWER = {"gemini.streamGenerateContent": "gemini.generateContent"}


def cache_key(call: Call, *, by_model: bool, by_customer: bool) -> str:
    body = {k: v for k, v in call.body.items() if k not in NOT_IN_KEY}
    endpoint = SAME_ANSWER.get(call.endpoint, call.endpoint)
    parts: list[Any] = [call.client_format, endpoint, body]
    if by_model:
        parts.append(["model", call.model])
    if by_customer:
        parts.append(["customer", call.params.customer()])
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()
