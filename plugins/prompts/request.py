"""The request's `prompt` param (spec 3.5), checked: a wrong type is a 422 naming the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plugins.prompts.render import check_version_ref
from proxy.errors import BadRequest, ValidationFailed
from proxy.params import GATEWAY_KEYS

FIELDS = frozenset({"prompt_id", "version", "variables", "echo", "schema_version", "override", "override_params",
                    "override_config", "patch", "is_custom_prompt"})
MODES = ("override", "append")


@dataclass(frozen=True)
class PromptRequest:
    prompt_id: str
    version: int | str | None = None
    variables: dict[str, Any] | None = None
    echo: bool = True
    schema_version: int = 1
    override: bool = False  # spec conflict: we follow the prompt docs and the SDK (default false)
    override_params: dict[str, Any] | None = None
    messages_override_mode: str = "override"
    patch: dict[str, Any] | None = None


def _typed(prompt: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = prompt.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValidationFailed(f"prompt.{name}", f"expected {what}, got {type(value).__name__}")
    return value


def _params(value: dict[str, Any] | None, where: str) -> None:
    """override_params and patch hold provider params only: gateway params go beside `prompt`."""
    for key in value or ():
        if key in GATEWAY_KEYS:
            raise BadRequest(f"{where}.{key}: a gateway param; send it beside `prompt`, not inside {where}")


def parse(prompt: dict[str, Any]) -> PromptRequest:
    unknown = set(prompt) - FIELDS
    if unknown:
        raise ValidationFailed(f"prompt.{sorted(unknown)[0]}", f"unknown field; expected some of {', '.join(sorted(FIELDS))}")
    prompt_id = prompt.get("prompt_id")
    if not isinstance(prompt_id, str) or not prompt_id:
        raise ValidationFailed("prompt.prompt_id", "required: the id of the prompt to render, as a string")
    schema_version = prompt.get("schema_version", 1)
    if schema_version not in (1, 2) or not isinstance(schema_version, int) or isinstance(schema_version, bool):
        raise BadRequest(f"prompt.schema_version: expected 1 or 2, got {schema_version!r}")
    config = _typed(prompt, "override_config", dict, "an object") or {}
    mode = config.get("messages_override_mode", "override")
    if mode not in MODES or set(config) - {"messages_override_mode"}:
        bad = next(iter(set(config) - {"messages_override_mode"}), "messages_override_mode")
        raise ValidationFailed(f"prompt.override_config.{bad}", "expected messages_override_mode: \"override\" or \"append\"")
    override_params = _typed(prompt, "override_params", dict, "an object")
    if override_params is not None and not isinstance(override_params.get("messages", []), list):
        raise ValidationFailed("prompt.override_params.messages", "expected an array of messages")
    _params(override_params, "prompt.override_params")
    patch = _typed(prompt, "patch", dict, "an object")
    if patch is not None:
        if schema_version != 2:
            raise BadRequest("prompt.patch: only with schema_version 2; version 1 uses override and override_params")
        for key in ("messages", "input"):
            if key in patch:
                raise BadRequest(f"prompt.patch.{key}: patch may not contain {key}; send them as the request's "
                                 "messages, which are appended after the prompt's")
        _params(patch, "prompt.patch")
    _typed(prompt, "is_custom_prompt", bool, "true or false")
    echo = _typed(prompt, "echo", bool, "true or false")
    override = _typed(prompt, "override", bool, "true or false")
    try:
        version = check_version_ref(prompt.get("version"), "prompt")
    except BadRequest as exc:
        raise ValidationFailed("prompt.version", exc.detail.partition(": ")[2]) from None
    return PromptRequest(prompt_id=prompt_id, version=version,
                         variables=_typed(prompt, "variables", dict, "an object"),
                         echo=True if echo is None else echo, schema_version=schema_version,
                         override=bool(override), override_params=override_params, messages_override_mode=mode,
                         patch=patch)
