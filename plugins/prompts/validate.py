"""Checks of /api/prompts/ bodies: every error names its field (`messages[2].role: ...`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

from plugins.prompts.render import ROLES
from proxy.params import LoadBalanceModel

PROMPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
PROMPT_FIELDS = ("prompt_id", "name", "description", "tags", "starred")
# version fields stored as given (null when not given), in the order they are shown
VERSION_FIELDS = ("messages", "model", "description", "thinking", "stream", "temperature", "max_tokens", "top_p",
                  "frequency_penalty", "presence_penalty", "reasoning_effort", "verbosity", "seed", "tools",
                  "tool_choice", "response_format", "json_schema", "is_enforcing_response_format", "variables",
                  "fallback_models", "load_balance_models", "commit_message")
Resolve = Callable[[str], Any]  # raises for a model this gateway cannot route


class Invalid(ValueError):
    """A bad field; the message names it."""


def _number(low: float, high: float) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
            raise Invalid(f"{name}: expected a number from {low:g} to {high:g}")
        return value

    return check


def _int(low: int) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise Invalid(f"{name}: expected a whole number of at least {low}")
        return value

    return check


def _of(kind: type | tuple[type, ...], what: str) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise Invalid(f"{name}: expected {what}")
        return value

    return check


def _objects(name: str, value: Any) -> Any:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise Invalid(f"{name}: expected an array of objects")
    return value


def _strings(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise Invalid(f"{name}: expected an array of non-empty strings")
    return value


def _variables(name: str, value: Any) -> Any:
    if not isinstance(value, dict):
        raise Invalid(f"{name}: expected an object of default values")
    return value


def _text(limit: int) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if not isinstance(value, str) or len(value) > limit:
            raise Invalid(f"{name}: expected a string of at most {limit} characters")
        return value

    return check


CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "description": _text(10_000),
    "commit_message": _text(10_000),
    "thinking": _of(dict, "an object, e.g. {\"type\": \"enabled\", \"budget_tokens\": 2048}"),
    "stream": _of(bool, "true or false"),
    "temperature": _number(0, 2),
    "max_tokens": _int(1),
    "top_p": _number(0, 1),
    "frequency_penalty": _number(-2, 2),
    "presence_penalty": _number(-2, 2),
    "reasoning_effort": _of(str, "a string, e.g. \"low\""),
    "verbosity": _of(str, "a string, e.g. \"low\""),
    "seed": _int(-(2**63)),
    "tools": _objects,
    "tool_choice": _of((str, dict), "a string or an object"),
    "response_format": _of(dict, "an object"),
    "json_schema": _of(dict, "an object"),
    "is_enforcing_response_format": _of(bool, "true or false"),
    "variables": _variables,
    "fallback_models": _strings,
}


def check_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise Invalid("messages: required, a non-empty array of {role, content} objects")
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise Invalid(f"{where}: expected an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise Invalid(f"{where}.role: expected one of {', '.join(ROLES)}; got {role!r}")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            continue
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise Invalid(f"{where}.content[{j}]: expected a content part, an object with a `type`")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise Invalid(f"{where}.content[{j}].text: expected a string")
        elif not isinstance(content, str):
            raise Invalid(f"{where}.content: expected a string or an array of content parts")
    return value


def _routable(name: str, model: str, resolve: Resolve) -> None:
    try:
        resolve(model)
    except Exception as exc:  # ModelNotFound, or any other reason this gateway cannot route it
        detail = getattr(exc, "detail", None) or str(exc)
        raise Invalid(f"{name}: {detail}") from None


def check_version(body: dict[str, Any], resolve: Resolve, *, current: dict[str, Any] | None = None,
                  allowed: frozenset[str] = frozenset(VERSION_FIELDS)) -> dict[str, Any]:
    """The version fields of a create (current None) or PATCH body, checked, in stored form. A
    null removes an optional field; the result still needs messages and a model (or
    load_balance_models)."""
    unknown = set(body) - allowed
    if unknown:
        raise Invalid(f"{sorted(unknown)[0]}: unknown field; expected some of {', '.join(sorted(allowed))}")
    fields: dict[str, Any] = {}
    for name, value in body.items():
        if value is None:
            if name == "messages":
                raise Invalid("messages: required, a non-empty array of {role, content} objects")
            fields[name] = None
        elif name == "messages":
            fields[name] = check_messages(value)
        elif name == "model":
            if not isinstance(value, str) or not value:
                raise Invalid("model: expected a model name")
            _routable("model", value, resolve)
            fields[name] = value
        elif name == "load_balance_models":
            fields[name] = _balanced(value, resolve)
        elif name == "fallback_models":
            for i, model in enumerate(_strings(name, value)):
                _routable(f"fallback_models[{i}]", model, resolve)
            fields[name] = value
        elif name in CHECKS:
            fields[name] = CHECKS[name](name, value)
    result = {**(current or {}), **fields}
    if current is None and "messages" not in fields:
        raise Invalid("messages: required, a non-empty array of {role, content} objects")
    if not result.get("model") and not result.get("load_balance_models"):
        raise Invalid("model: required (unless load_balance_models is given)")
    return fields


def _balanced(value: Any, resolve: Resolve) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise Invalid("load_balance_models: expected a non-empty array of {model, weight} objects")
    for i, entry in enumerate(value):
        try:
            msgspec.convert(entry, LoadBalanceModel)
        except msgspec.ValidationError as exc:
            message, _, where = str(exc).rpartition(" - at `$")
            path = f"load_balance_models[{i}]{where.rstrip('`')}" if message else f"load_balance_models[{i}]"
            raise Invalid(f"{path}: {message or exc}") from None
        _routable(f"load_balance_models[{i}].model", entry["model"], resolve)
    return value


def check_prompt(body: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    """The prompt fields of a create or PATCH body, checked."""
    allowed = set(PROMPT_FIELDS) if creating else set(PROMPT_FIELDS) - {"prompt_id"}
    unknown = set(body) - allowed
    if unknown:
        name = sorted(unknown)[0]
        if name == "prompt_id":
            raise Invalid("prompt_id: a prompt's id cannot change; create a new prompt")
        raise Invalid(f"{name}: unknown field; expected some of {', '.join(sorted(allowed))}")
    out: dict[str, Any] = {}
    if "prompt_id" in body and body["prompt_id"] is not None:
        value = body["prompt_id"]
        if not isinstance(value, str) or not PROMPT_ID.fullmatch(value):
            raise Invalid("prompt_id: expected 1 to 128 letters, digits, '_', '-' or '.', starting with a letter "
                          "or digit")
        out["prompt_id"] = value
    if creating or "name" in body:
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise Invalid("name: required, a string of 1 to 255 characters")
        out["name"] = name.strip()
    if "description" in body:
        out["description"] = "" if body["description"] is None else _text(10_000)("description", body["description"])
    if "tags" in body:
        out["tags"] = [] if body["tags"] is None else _strings("tags", body["tags"])
    if "starred" in body:
        out["starred"] = _of(bool, "true or false")("starred", body["starred"])
    return out
