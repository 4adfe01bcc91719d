"""Example third-party llmrelay stage `stamp`.

Options: `header` (default "x-stamp") and `value` (required). Every reply that passes
through the stage carries `<header>: <value>`, plus `<header>-seen: <key name>/<model>`
so a test can tell the stage ran after `auth` and saw the Call.
"""

from __future__ import annotations

from typing import Any


class StampStage:
    def __init__(self, header: str, value: str) -> None:
        self.header = header
        self.value = value

    async def __call__(self, call: Any, next: Any) -> Any:
        reply = await next(call)
        key = call.key.name if call.key is not None else "-"
        reply.headers[self.header] = self.value
        reply.headers[f"{self.header}-seen"] = f"{key}/{call.model}"
        call.state["stamp"] = self.value
        return reply


def create_stage(context: Any) -> StampStage:
    options = dict(context.options)
    header = options.pop("header", "x-stamp")
    if "value" not in options:
        raise ValueError("stamp needs a `value` option")
    value = options.pop("value")
    if options:
        raise ValueError(f"stamp got unknown options {sorted(options)}")
    if not isinstance(header, str) or not isinstance(value, str):
        raise TypeError("stamp options `header` and `value` must be strings")
    return StampStage(header.lower(), value)
