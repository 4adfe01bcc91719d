"""The `prompts` stage: prompt templates rendered at inference (spec 3.5), and /api/prompts/ (spec 2.6).

A chat completion that sends `prompt: {"prompt_id", "version"?, "variables"?, ...}` gets the
version's messages rendered (placeholders, child prompts, images) and merged with its own body
(plugins/prompts/merge.py) before the later stages see it; the version's `fallback_models` and
`load_balance_models` become the request's unless it sent its own. Prompts live in the admin store
(kind "prompt"); the stage keeps them indexed by id in memory, reindexed on every snapshot change,
so a request never reads the store. A request without `prompt` costs one attribute test.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

import msgspec
import orjson

from plugins.prompts.api import KIND, PromptsAPI
from plugins.prompts.merge import merge
from plugins.prompts.render import PromptEntry, render
from plugins.prompts.request import parse
from proxy.call import Call, Reply
from proxy.errors import BadRequest
from proxy.params import LoadBalanceModel
from proxy.pipeline import Next, StageContext
from proxy.store import StoredObject

log = logging.getLogger("llmrelay.prompts")


class PromptIndex:
    """Prompts by id, rebuilt from the snapshot; an unchanged prompt keeps its entry."""

    def __init__(self) -> None:
        self.by_id: dict[str, PromptEntry] = {}

    def load(self, objects: dict[str, StoredObject]) -> None:
        current = self.by_id
        index: dict[str, PromptEntry] = {}
        for prompt_id, obj in objects.items():
            entry = current.get(prompt_id)
            if entry is not None and entry.updated_at == obj.updated_at:
                index[prompt_id] = entry
                continue
            try:
                index[prompt_id] = PromptEntry.of(obj.data, obj.updated_at)
            except (KeyError, TypeError, ValueError, AttributeError):  # written by hand? skip it, keep the rest
                log.error("admin store: prompt %r is malformed and is not served", prompt_id)
        self.by_id = index


class PromptsStage:
    def __init__(self, api: PromptsAPI | None = None) -> None:
        self.index = PromptIndex()
        self.api = api

    def __call__(self, call: Call, next: Next) -> Awaitable[Reply]:
        if call.params.prompt is None:
            return next(call)
        return self.rendered(call, next)

    async def rendered(self, call: Call, next: Next) -> Reply:
        echo = self.apply(call)
        reply = await next(call)
        if echo is not None and reply.stream is None and reply.status < 400 and reply.body:
            reply.body = with_prompt_message(reply.body, echo)
        return reply

    def apply(self, call: Call) -> list[dict[str, Any]] | None:
        """Render the prompt into the Call; the messages to echo (None: echo off)."""
        params = call.params
        assert params.prompt is not None
        prompt_id = params.prompt.get("prompt_id")
        call.state["prompt"] = {"prompt_id": prompt_id if isinstance(prompt_id, str) else None}
        if call.endpoint != "chat":
            raise BadRequest("prompt: prompts are supported on chat completions (/api/chat/completions) only")
        request = parse(params.prompt)
        messages = call.body.get("messages")
        if messages is not None and not isinstance(messages, list):
            raise BadRequest("Invalid request format: `messages` must be an array")
        rendered = render(self.index.by_id.get, request.prompt_id, request.version,
                          [("variables", params.variables), ("prompt.variables", request.variables)])
        version = rendered.version
        merged = merge(call.body, version, rendered.messages, request)
        call.body = merged.body
        call.model = merged.body.get("model") or ""
        call.stream = merged.body.get("stream") is True
        changes: dict[str, Any] = {}
        if version.get("fallback_models") is not None and params.fallback_models is None:
            changes["fallback_models"] = list(version["fallback_models"])
        balanced = version.get("load_balance_models")
        if balanced and not (params.load_balance_models or params.loadbalance_models):
            changes["load_balance_models"] = msgspec.convert(balanced, list[LoadBalanceModel])
        if changes:  # params may be shared: replace, never mutate
            call.params = msgspec.structs.replace(params, **changes)
        call.state["prompt"] = {"prompt_id": rendered.prompt_id, "prompt_name": rendered.prompt_name,
                                "prompt_version_number": rendered.version_number, "variables": rendered.variables}
        return merged.prompt_messages if request.echo else None

    def routes(self) -> list[Any]:
        return self.api.routes() if self.api is not None else []


def with_prompt_message(body: bytes, messages: list[dict[str, Any]]) -> bytes:
    """A chat completion's JSON with the rendered prompt messages added as `prompt_message`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(data, dict):
        return body
    data["prompt_message"] = messages
    return orjson.dumps(data)


def create_stage(context: StageContext) -> PromptsStage:
    if context.options:
        raise ValueError(f"prompts takes no options, got {sorted(context.options)}")
    snapshot = context.services.get("snapshot")
    admin = context.services.get("admin")
    api = PromptsAPI(snapshot, admin, context.models) if snapshot is not None and admin is not None else None
    stage = PromptsStage(api)
    if snapshot is not None:
        snapshot.subscribe(KIND, stage.index.load)
    return stage
