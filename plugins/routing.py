"""The `routing` stage: turn the model request into an ordered plan of Targets (spec 3.1, 4 step 7).

Primary selection, first rule that applies wins:
  a. `model` (also when `load_balance_group` is given); `models` become extra candidates;
  b. `load_balance_group` {group_id, models?}: a group from the options `load_balance_groups`,
     whose list the inline `models` replace; one entry picked at random in proportion to weight;
  c. `load_balance_models`, else the deprecated `loadbalance_models`: the same weighted pick;
  d. the router list `models`: one entry acts as `model`; with several, entries excluded by
     `exclude_models` / `exclude_providers` are dropped and the first remaining one is the primary,
     the rest are extras (the order given is the order of preference);
  e. none of these: 400.
Then `X-Respan-Route-Provider` moves the primary to another configured provider (same slug), and
unless `disable_fallback` the fallbacks follow: `fallback_models`, else the options'
`default_fallback_models`. A candidate whose provider and upstream model are already in the plan
is dropped. An extra or fallback name that does not resolve is skipped with a warning.

Result: `call.plan` (primary, extras, fallbacks) and `call.target = call.plan[0]`.
"""

from __future__ import annotations

import random
import time
from bisect import bisect_right
from collections.abc import Awaitable, Iterable, Sequence
from itertools import accumulate
from typing import Annotated, Any

import msgspec

from proxy import estimate
from proxy.call import Call, Reply, Target
from proxy.errors import BadRequest, ModelNotFound
from proxy.model_table import ModelTable
from proxy.params import LoadBalanceGroup, LoadBalanceModel
from proxy.pipeline import Next, StageContext
from proxy.weighted import weighted_choice

HEADER = "x-respan-route-provider"
NO_MODEL = "Invalid request format: `model` is required (or `models`, `load_balance_group`, `load_balance_models`)"

# X-Respan-Route-Provider values known without any config: provider id -> the names that mean it.
# A name maps to the first configured provider among its group's names (the id first).
BUILTIN_ROUTE_PROVIDERS: dict[str, tuple[str, ...]] = {
    "vertex_ai": ("vertex_ai", "google_vertex_ai", "vertex"),
    "azure": ("azure", "azure_openai"),
    "bedrock": ("bedrock", "aws_bedrock"),
    "openai": ("openai",),
    "anthropic": ("anthropic",),
    "gemini": ("gemini", "google"),
    "groq": ("groq",),
    "together_ai": ("together_ai", "togetherai", "together"),
    "fireworks": ("fireworks", "fireworks_ai"),
    "deepseek": ("deepseek",),
    "xai": ("xai",),
    "mistral": ("mistral",),
    "openrouter": ("openrouter",),
    "perplexity": ("perplexity", "perplexityai"),
    "cerebras": ("cerebras",),
}

Weight = Annotated[float, msgspec.Meta(gt=0)]


class GroupEntry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    weight: Weight
    credentials: dict[str, Any] | None = None


class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # group id -> weighted entries (what Respan's UI calls a load-balance group); each list is
    # converted to list[GroupEntry] on its own, so that an error names the group
    load_balance_groups: dict[str, list[Any]] = msgspec.field(default_factory=dict)
    # the "org default" fallback list, used when a request sends no `fallback_models`
    default_fallback_models: list[str] = msgspec.field(default_factory=list)
    # extra X-Respan-Route-Provider values: alias -> configured provider id (or a built-in name)
    route_provider_aliases: dict[str, str] = msgspec.field(default_factory=dict)


class Weighted:
    """Targets with weights; `pick` chooses one at random in proportion to its weight."""

    __slots__ = ("targets", "cumulative", "total")

    def __init__(self, targets: list[Target], weights: list[float]) -> None:
        self.targets = targets
        self.cumulative = list(accumulate(weights))
        self.total = self.cumulative[-1]

    def pick(self) -> Target:
        i = bisect_right(self.cumulative, random.random() * self.total)
        return self.targets[min(i, len(self.targets) - 1)]


def pick_weighted(entries: Sequence[LoadBalanceModel]) -> LoadBalanceModel:
    """One entry of a request's inline list, at random in proportion to weight (all weights > 0)."""
    return weighted_choice(entries, [e.weight for e in entries])


def fitting(call: Call, plan: list[Target]) -> list[Target]:
    """The plan without the candidates whose context window the prompt is estimated to exceed.
    When none fits, the plan stays as it is: the estimate is rough, and the provider decides."""
    needed = estimate.prompt_tokens(call.body, with_tools=True)
    kept = [t for t in plan if not t.context_window or needed <= t.context_window]
    if len(kept) == len(plan) or not kept:
        return plan
    for t in plan:
        if t not in kept:
            call.warnings.append(
                f"{t.provider}/{t.model} skipped: a prompt of about {needed} tokens exceeds its context window "
                f"of {t.context_window}"
            )
    return kept


class RoutingStage:
    def __init__(self, models: ModelTable, options: Options) -> None:
        self.models = models
        self.resolve = models.resolve
        self.route_provider_aliases = options.route_provider_aliases
        self._providers_changed()
        models.on_change(self._providers_changed)  # providers and models created through the admin API
        self.groups: dict[str, Weighted] = {}
        for group_id, entries in options.load_balance_groups.items():
            if not group_id:
                raise ValueError("load_balance_groups: a group id may not be empty")
            if not entries:
                raise ValueError(f"load_balance_groups.{group_id}: expected at least one entry")
            entries = convert(entries, list[GroupEntry], f"load_balance_groups.{group_id}")
            targets = []
            for i, entry in enumerate(entries):
                target = self._resolve_option(entry.model, f"load_balance_groups.{group_id}[{i}].model")
                targets.append(msgspec.structs.replace(target, credentials=entry.credentials, group_id=group_id))
            self.groups[group_id] = Weighted(targets, [e.weight for e in entries])
        self.group_names = ", ".join(sorted(self.groups)) or "none"
        self.default_fallbacks: tuple[Target, ...] = tuple(
            self._resolve_option(name, f"default_fallback_models[{i}]")
            for i, name in enumerate(options.default_fallback_models)
        )

    def _providers_changed(self) -> None:
        self.route_values = self._route_values(self.models, self.route_provider_aliases)
        self.configured_providers = ", ".join(sorted(self.models.providers))
        self.accepted_values = ", ".join(sorted(self.route_values))
        self._pinned: dict[tuple[str, str, str, str], Target] = {}  # (requested, provider, model, to) -> Target

    def _resolve_option(self, name: str, where: str) -> Target:
        try:
            return self.resolve(name)
        except ModelNotFound as exc:
            raise ValueError(f"{where}: {exc.detail}") from None

    @staticmethod
    def _route_values(models: ModelTable, aliases: dict[str, str]) -> dict[str, str | None]:
        """Lower-case header value -> configured provider id, or None for a known provider that is not
        configured here. Precedence: option aliases > configured ids > built-in names."""
        configured = {p.lower(): p for p in models.providers}
        values: dict[str, str | None] = {}
        for names in BUILTIN_ROUTE_PROVIDERS.values():
            served_by = next((configured[n] for n in names if n in configured), None)
            for name in names:
                values[name] = served_by
        values.update(configured)
        for alias, provider in aliases.items():
            key = alias.strip().lower()
            if not key:
                raise ValueError("route_provider_aliases: an alias may not be empty")
            target = values.get(provider.strip().lower())
            if target is None:
                raise ValueError(
                    f"route_provider_aliases.{alias}: provider {provider!r} is not configured on this gateway "
                    f"(configured: {', '.join(sorted(models.providers))})"
                )
            values[key] = target
        return values

    # -- the request path -------------------------------------------------------------

    def __call__(self, call: Call, next: Next) -> Awaitable[Reply]:
        started = time.perf_counter()
        try:
            self.route(call)
        finally:
            call.routing_time += time.perf_counter() - started
        return next(call)

    def route(self, call: Call) -> None:
        params = call.params
        extras: Iterable[str] | Iterable[Target] | None = params.models
        if call.model:  # a: `model` wins over everything
            primary = self.resolve(call.model)
        elif (group := params.load_balance_group) is not None:  # b
            primary = self._from_group(group)
        elif lb := params.load_balance_models or params.loadbalance_models:  # c
            primary = self._from_entries(lb, None)
        elif params.models:  # d: the router
            if len(params.models) == 1:
                primary, extras = self.resolve(params.models[0]), None
            else:
                primary, extras = self._router(call)
        else:  # e
            raise BadRequest(NO_MODEL)
        if not call.model:
            call.model = primary.requested  # the chosen model stands for `model` (the log's model_requested)

        route_to = call.headers.get(HEADER)
        if route_to:
            primary = self._pin(call, primary, route_to)

        if params.disable_fallback:
            call.plan = [primary]
        else:
            fallbacks: Iterable[str] | Iterable[Target] | None = params.fallback_models
            if fallbacks is None:
                fallbacks = self.default_fallbacks
            if not extras and not fallbacks:  # the common case
                call.plan = [primary]
            else:
                call.plan = self._plan(call, primary, extras or (), fallbacks)
        if any(t.context_window for t in call.plan):
            call.plan = fitting(call, call.plan)
        call.target = call.plan[0]

    def _from_group(self, group: LoadBalanceGroup) -> Target:
        if group.models:  # inline entries replace the configured group's list
            return self._from_entries(group.models, group.group_id)
        weighted = self.groups.get(group.group_id)
        if weighted is None:
            raise BadRequest(
                f"Invalid request format: load_balance_group {group.group_id!r} is not configured "
                f"(configured groups: {self.group_names})"
            )
        return weighted.pick()

    def _from_entries(self, entries: Sequence[LoadBalanceModel], group_id: str | None) -> Target:
        entry = pick_weighted(entries)
        target = self.resolve(entry.model)
        if entry.credentials is None and group_id is None:
            return target
        return msgspec.structs.replace(target, credentials=entry.credentials, group_id=group_id)

    def _provider_key(self, name: str) -> str:
        """A provider name as given in `exclude_providers`, as the configured id it means."""
        key = name.strip().lower()
        return self.route_values.get(key) or key

    def _router(self, call: Call) -> tuple[Target, list[Target]]:
        """Several `models`, no `model`: the first entry left after the exclusions is the primary."""
        params = call.params
        assert params.models is not None
        excluded_models = set(params.exclude_models or ())
        excluded_providers = {self._provider_key(p) for p in params.exclude_providers or ()}
        chosen: list[Target] = []
        unknown: list[str] = []
        for name in params.models:
            if name in excluded_models:
                continue
            try:
                target = self.resolve(name)
            except ModelNotFound:
                unknown.append(name)
                continue
            if (
                target.provider in excluded_providers
                or target.model in excluded_models
                or f"{target.provider}/{target.model}" in excluded_models
            ):
                continue
            chosen.append(target)
        if not chosen:
            if unknown:
                raise ModelNotFound(unknown[0])
            raise BadRequest(
                "Invalid request format: every entry of `models` is excluded by `exclude_models` / `exclude_providers`"
            )
        for name in unknown:
            call.warnings.append(f"models entry {name!r} skipped: not available in the model list")
        return chosen[0], chosen[1:]

    def _pin(self, call: Call, primary: Target, value: str) -> Target:
        """X-Respan-Route-Provider: the same upstream model on another configured provider."""
        key = value.strip().lower()
        if not key:
            return primary
        if key not in self.route_values:
            raise BadRequest(
                f"Invalid request format: X-Respan-Route-Provider {value.strip()!r} is not a known provider; "
                f"accepted values: {self.accepted_values}"
            )
        provider = self.route_values[key]
        if provider is None:
            raise BadRequest(
                f"Invalid request format: X-Respan-Route-Provider {value.strip()!r} names a provider that is not "
                f"configured on this gateway; configured providers: {self.configured_providers}"
            )
        if provider == primary.provider:
            return primary
        key = (primary.requested, primary.provider, primary.model, provider)
        pinned = self._pinned.get(key)
        if pinned is None:
            pinned = self.models.on_provider(primary, provider)
            if len(self._pinned) > 10_000:
                self._pinned.clear()
            self._pinned[key] = pinned
        if primary.credentials is not None:
            call.warnings.append(
                f"load-balance credentials for {primary.provider!r} not used: "
                f"X-Respan-Route-Provider moved the request to {provider!r}"
            )
        if primary.group_id is not None:
            pinned = msgspec.structs.replace(pinned, group_id=primary.group_id)
        return pinned

    def _plan(
        self,
        call: Call,
        primary: Target,
        extras: Iterable[str] | Iterable[Target],
        fallbacks: Iterable[str] | Iterable[Target],
    ) -> list[Target]:
        plan = [primary]
        seen = {(primary.provider, primary.model)}
        for kind, candidates in (("models entry", extras), ("fallback model", fallbacks)):
            for candidate in candidates:
                if isinstance(candidate, str):
                    try:
                        target = self.resolve(candidate)
                    except ModelNotFound:
                        call.warnings.append(f"{kind} {candidate!r} skipped: not available in the model list")
                        continue
                else:
                    target = candidate
                key = (target.provider, target.model)
                if key not in seen:
                    seen.add(key)
                    plan.append(target)
        return plan


def convert(value: Any, type_: Any, path: str = "") -> Any:
    """msgspec.convert whose error leads with the field path: `load_balance_groups.g[0].weight: ...`."""
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if " - at `" in message:
            what, _, where = message.rpartition(" - at `")
            where = path + where.rstrip("`").removeprefix("$").removeprefix("." if not path else "")
            message = f"{where}: {what}"
        elif path:
            message = f"{path}: {message}"
        raise ValueError(message) from None


def create_stage(context: StageContext) -> RoutingStage:
    return RoutingStage(context.models, convert(context.options, Options))
