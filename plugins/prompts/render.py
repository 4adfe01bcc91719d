"""Rendering a prompt version's messages (spec 3.5): `{{name}}` placeholders, typed child prompts,
image variables. Pure functions: the prompts come from a lookup, never from a store.

Values, lowest precedence first: the version's `variables` (defaults), then each layer the caller
gives (for the root prompt: the request's top-level `variables`, then `prompt.variables`).
- a string goes in as it is; any other JSON value as its JSON text;
- `{"_type": "prompt", "prompt_id", "version"?, "variables"?}` is rendered first (same version
  rules), flattened to text (its messages' text joined by a blank line) and injected; child
  prompts nest at most MAX_DEPTH deep, and a cycle is refused;
- `{"_type": "image_url", "value": url}` turns the message's content into parts: the text around
  it, and an `image_url` part.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from proxy.errors import BadRequest, NotFound

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.\-]*)\s*\}\}")
MAX_DEPTH = 2  # parent -> child -> grandchild
ROLES = ("system", "developer", "user", "assistant", "tool")


class Image(NamedTuple):
    url: str


@dataclass(frozen=True)
class PromptEntry:
    """One stored prompt as the data plane indexes it."""

    prompt_id: str
    name: str
    deployed_version: int | None
    versions: Mapping[int, dict[str, Any]]
    updated_at: float = 0.0

    @classmethod
    def of(cls, data: dict[str, Any], updated_at: float = 0.0) -> PromptEntry:
        versions = {int(n): v for n, v in (data.get("versions") or {}).items()}
        return cls(data["prompt_id"], data.get("name") or "", data.get("deployed_version"), versions, updated_at)


@dataclass
class Rendered:
    prompt_id: str
    prompt_name: str
    version_number: int
    version: dict[str, Any]
    messages: list[dict[str, Any]]
    variables: dict[str, Any]  # the values used, child prompts with their `_rendered_result` (for the log)


Lookup = Callable[[str], PromptEntry | None]
Layer = tuple[str, Mapping[str, Any] | None]  # (the field path values come from, the values)


def pick_version(entry: PromptEntry, requested: int | str | None, where: str) -> tuple[int, dict[str, Any]]:
    """Omitted: the deployed version; an int: that one; "latest": the newest, draft or not."""
    if requested is None:
        number = entry.deployed_version
        if number is None or number not in entry.versions:
            raise BadRequest(f"prompt {entry.prompt_id} has no deployed version; pass {where}.version")
    elif requested == "latest":
        if not entry.versions:
            raise BadRequest(f"prompt {entry.prompt_id} has no versions yet")
        number = max(entry.versions)
    else:
        number = int(requested)
        if number not in entry.versions:
            raise NotFound(f"Prompt {entry.prompt_id} has no version {number}")
    return number, entry.versions[number]


def check_version_ref(value: Any, where: str) -> int | str | None:
    if value is None or value == "latest" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise BadRequest(f"{where}.version: expected a version number or \"latest\", got {value!r}")


def render(lookup: Lookup, prompt_id: str, requested: int | str | None, layers: list[Layer], *,
           where: str = "prompt", chain: tuple[str, ...] = (), images: bool = True) -> Rendered:
    """Render one prompt version. `where` names the field the prompt came from, for errors."""
    entry = lookup(prompt_id)
    if entry is None:
        raise NotFound(f"Prompt {prompt_id} not found")
    number, version = pick_version(entry, requested, where)
    chain = (*chain, prompt_id)
    sources: dict[str, tuple[str, Any]] = {}
    defaults = version.get("variables") or {}
    for name, value in defaults.items():
        sources[name] = (f"prompt {prompt_id} version {number}: variables.{name}", value)
    for path, values in layers:
        for name, value in (values or {}).items():
            sources[name] = (f"{path}.{name}", value)
    resolved: dict[str, str | Image] = {}
    logged: dict[str, Any] = {}
    for name, (path, value) in sources.items():
        resolved[name], logged[name] = _resolve(lookup, value, path, chain)
    messages = [
        _render_message(m, resolved, lambda name: _missing(where, name, prompt_id, number), images, where)
        for m in version.get("messages") or []
    ]
    return Rendered(prompt_id, entry.name, number, version, messages, logged)


def _missing(where: str, name: str, prompt_id: str, number: int) -> BadRequest:
    return BadRequest(f"{where}.variables.{name}: required by prompt {prompt_id} version {number}")


def _resolve(lookup: Lookup, value: Any, path: str, chain: tuple[str, ...]) -> tuple[str | Image, Any]:
    """A variable's value as injected, and as logged."""
    if isinstance(value, str):
        return value, value
    if isinstance(value, dict) and "_type" in value:
        kind = value["_type"]
        if kind == "image_url":
            url = value.get("value")
            if not isinstance(url, str) or not url:
                raise BadRequest(f"{path}.value: expected the image's URL (or data URL) as a string")
            return Image(url), value
        if kind == "prompt":
            child = _child(lookup, value, path, chain)
            text = flatten(child.messages)
            shown = {**value, "_rendered_result": text}
            if child.variables:
                shown["variables"] = child.variables
            return text, shown
        raise BadRequest(f"{path}._type: expected \"prompt\" or \"image_url\", got {kind!r}")
    return orjson.dumps(value).decode(), value


def _child(lookup: Lookup, value: dict[str, Any], path: str, chain: tuple[str, ...]) -> Rendered:
    child_id = value.get("prompt_id")
    if not isinstance(child_id, str) or not child_id:
        raise BadRequest(f"{path}.prompt_id: expected a string")
    if child_id in chain:
        raise BadRequest(f"{path}: circular prompt reference: {' -> '.join((*chain, child_id))}")
    if len(chain) > MAX_DEPTH:
        raise BadRequest(f"{path}: child prompts nest at most {MAX_DEPTH} deep: {' -> '.join((*chain, child_id))}")
    unknown = set(value) - {"_type", "prompt_id", "version", "variables"}
    if unknown:
        raise BadRequest(f"{path}.{sorted(unknown)[0]}: unknown field of a child prompt")
    variables = value.get("variables")
    if variables is not None and not isinstance(variables, dict):
        raise BadRequest(f"{path}.variables: expected an object")
    requested = check_version_ref(value.get("version"), path)
    return render(lookup, child_id, requested, [(f"{path}.variables", variables)], where=path, chain=chain,
                  images=False)


def flatten(messages: list[dict[str, Any]]) -> str:
    """A rendered prompt as text: every message's text, joined by a blank line."""
    texts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n\n".join(texts)


def _render_message(message: dict[str, Any], values: Mapping[str, str | Image],
                    missing: Callable[[str], BadRequest], images: bool, where: str) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, str):
        pieces = _pieces(content, values, missing, images, where)
        if all(isinstance(p, str) for p in pieces):
            return {**message, "content": "".join(pieces)}  # type: ignore[arg-type]
        return {**message, "content": _parts(pieces, {})}
    if isinstance(content, list):
        parts: list[Any] = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                pieces = _pieces(part["text"], values, missing, images, where)
                if all(isinstance(p, str) for p in pieces):
                    parts.append({**part, "text": "".join(pieces)})  # type: ignore[arg-type]
                else:
                    parts.extend(_parts(pieces, {k: v for k, v in part.items() if k not in ("type", "text")}))
            else:
                parts.append(part)
        return {**message, "content": parts}
    return dict(message)


def _pieces(text: str, values: Mapping[str, str | Image], missing: Callable[[str], BadRequest], images: bool,
            where: str) -> list[str | Image]:
    """The text with its placeholders replaced: strings, and Images where image variables go."""
    split = PLACEHOLDER.split(text)
    if len(split) == 1:
        return [text]
    out: list[str | Image] = []
    for i, piece in enumerate(split):
        if i % 2 == 0:
            value: str | Image = piece
        elif piece in values:
            value = values[piece]
            if isinstance(value, Image) and not images:
                raise BadRequest(f"{where}.variables.{piece}: an image variable cannot go into a child prompt, "
                                 "which is flattened to text")
        else:
            raise missing(piece)
        if isinstance(value, str) and out and isinstance(out[-1], str):
            out[-1] += value
        elif value != "":
            out.append(value)
    return out or [""]


def _parts(pieces: list[str | Image], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Content parts for text with images in it; `extra` (e.g. cache_control) goes on the last one."""
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": p.url}} if isinstance(p, Image) else {"type": "text", "text": p}
        for p in pieces
        if isinstance(p, Image) or p
    ]
    if extra and parts:
        parts[-1] = {**parts[-1], **extra}
    return parts
