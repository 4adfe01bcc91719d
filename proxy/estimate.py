"""Rough token counts where no provider has counted: about 4 characters a token."""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4


def message_chars(body: dict[str, Any]) -> int:
    """Characters of message text in an OpenAI chat body (string contents and text parts)."""
    chars = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    return chars


def prompt_tokens(body: dict[str, Any], *, with_tools: bool = False) -> int:
    chars = message_chars(body)
    if with_tools and body.get("tools"):
        chars += len(str(body["tools"]))
    return -(-chars // CHARS_PER_TOKEN)
