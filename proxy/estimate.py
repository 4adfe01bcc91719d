"""Rough token counts where no provider has counted: about 4 characters a token."""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4


def _text_chars(content: Any) -> int:
    """Characters of a message content: a string, or a list of parts / blocks with `text`."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _gemini_chars(content: Any) -> int:
    """Characters of a Gemini Content ({"role", "parts": [{"text"}, ...]})."""
    return _text_chars(content.get("parts")) if isinstance(content, dict) else 0


def message_chars(body: dict[str, Any]) -> int:
    """Characters of prompt text in a request body: OpenAI chat `messages`, Anthropic `system` +
    `messages`, Gemini `systemInstruction` + `contents` (and embeddings' `content` / `requests`)."""
    chars = 0
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            chars += _text_chars(message.get("content"))
    if "system" in body:
        chars += _text_chars(body["system"])
    if "contents" in body or "systemInstruction" in body:
        contents = body.get("contents")
        chars += sum(_gemini_chars(c) for c in contents) if isinstance(contents, list) else 0
        chars += _gemini_chars(body.get("systemInstruction"))
    if "content" in body:
        chars += _gemini_chars(body["content"])
    requests = body.get("requests")
    if isinstance(requests, list):
        chars += sum(_gemini_chars(r.get("content")) for r in requests if isinstance(r, dict))
    return chars


def prompt_tokens(body: dict[str, Any], *, with_tools: bool = False) -> int:
    chars = message_chars(body)
    if with_tools and body.get("tools"):
        chars += len(str(body["tools"]))
    return -(-chars // CHARS_PER_TOKEN)
