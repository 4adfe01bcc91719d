"""Stages: the Stage protocol, loading stages by name from entry points, composing them.

A stage wraps the rest of the pipeline, onion style. It may act before `next`, after it,
short-circuit (return a Reply without calling `next`) or call `next` several times.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

from proxy.call import Call, Reply
from proxy.model_table import ModelTable
from proxy.settings import ConfigError, Settings
from proxy.state.redis import RedisClient

ENTRY_POINT_GROUP = "llmrelay.stages"

Next = Callable[[Call], Awaitable[Reply]]


class Stage(Protocol):
    """`async def __call__` is the plain way to write one. A stage with nothing to do after
    `next` may instead be a plain method that returns `next(call)` itself: the request then
    carries one coroutine frame less through every wait, which the built-in stages do."""

    def __call__(self, call: Call, next: Next) -> Awaitable[Reply]: ...


@dataclass(frozen=True)
class StageContext:
    """What a stage factory gets: its own options and the gateway's shared, read-only parts."""

    name: str
    options: dict[str, Any]
    settings: Settings
    models: ModelTable
    services: dict[str, Any] = field(default_factory=dict)  # shared backends (later: redis, store)


StageFactory = Callable[[StageContext], Stage]


def redis_client(context: StageContext, url: str) -> RedisClient:
    """The gateway's request-path client for `url` (shared by every stage using that Redis);
    a stage built without a gateway gets its own."""
    clients = context.services.get("redis")
    return clients.get(url) if clients is not None else RedisClient(url)


def installed_stages() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_stages(settings: Settings, models: ModelTable, services: dict[str, Any] | None = None) -> list[tuple[str, Stage]]:
    """Build the configured stages in order. A name with no entry point fails start-up."""
    available = installed_stages()
    stages: list[tuple[str, Stage]] = []
    for i, entry in enumerate(settings.stage_entries()):
        where = f"{settings.source}: $.pipeline[{i}]"
        ep = available.get(entry.name)
        if ep is None:
            raise ConfigError(
                f"{where}: stage {entry.name!r} is not installed (no entry point {entry.name!r} in group "
                f"{ENTRY_POINT_GROUP!r}; installed: {sorted(available) or 'none'})"
            )
        try:
            factory: StageFactory = ep.load()
        except Exception as exc:  # a broken plugin must say which one it is
            raise ConfigError(f"{where}: stage {entry.name!r} failed to import from {ep.value}: {exc}") from exc
        context = StageContext(entry.name, dict(entry.options), settings, models, services or {})
        try:
            stage = factory(context)
        except ConfigError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"{where}.options: stage {entry.name!r} rejected its options: {exc}") from exc
        stages.append((entry.name, stage))
    return stages


def compose(stages: list[Stage], terminal: Next) -> Next:
    """One handler: stages[0] wraps stages[1] ... wraps `terminal`."""
    handler = terminal
    for stage in reversed(stages):
        handler = functools.partial(stage, next=handler)
    return handler
