"""How a rendered prompt version and the request's body combine (spec 3.5). Pure functions.

schema_version 1, `override` false (the default): the request's params win over the version's;
`override` true: the version's win, then `override_params` apply on top (their `messages` replace
the prompt's, or follow them with `override_config.messages_override_mode: "append"`).
schema_version 2: the version's params always win, then `patch` applies on top.
Either way the request's own `messages` follow the prompt's, and the version's `stream`, `tools`,
`tool_choice` and `response_format` apply only where the request did not send them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plugins.prompts.request import PromptRequest

# version fields that are provider params: the side that wins sets them
PARAMS = ("temperature", "max_tokens", "top_p", "frequency_penalty", "presence_penalty", "reasoning_effort",
          "verbosity", "seed", "thinking")
# version fields used only where the request has none (they go with the request's own messages)
REQUEST_FIRST = ("stream", "tools", "tool_choice", "response_format")


@dataclass
class Merged:
    body: dict[str, Any]  # the provider params to send: the request's, merged with the version's
    prompt_messages: list[dict[str, Any]]  # the prompt's messages as rendered (what `echo` returns)


def version_wins(request: PromptRequest) -> bool:
    return request.schema_version == 2 or request.override


def merge(body: dict[str, Any], version: dict[str, Any], rendered: list[dict[str, Any]],
          request: PromptRequest) -> Merged:
    out = dict(body)
    request_messages = out.pop("messages", None) or []
    wins = version_wins(request)
    for key in PARAMS:
        value = version.get(key)
        if value is not None and (wins or key not in out):
            out[key] = value
    for key in REQUEST_FIRST:
        value = version.get(key)
        if key == "response_format" and value is None and version.get("json_schema"):
            value = {"type": "json_schema", "json_schema": version["json_schema"]}
        if value is not None and key not in out:
            out[key] = value
    model = version.get("model")
    if model and (wins or not out.get("model")):
        out["model"] = model
    elif not model and version.get("load_balance_models") and wins:
        out.pop("model", None)  # the version's weighted list picks the model
    prompt_messages = list(rendered)
    if request.schema_version == 1 and request.override and request.override_params:
        extra = dict(request.override_params)
        messages = extra.pop("messages", None)
        if messages is not None:
            prompt_messages = [*prompt_messages, *messages] if request.messages_override_mode == "append" else list(messages)
        out.update(extra)
    if request.schema_version == 2 and request.patch:
        out.update(request.patch)
    out["messages"] = [*prompt_messages, *request_messages]
    return Merged(out, prompt_messages)
