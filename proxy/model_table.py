"""Which provider and upstream model serve a requested model name.

Resolution order for a requested `model`:
1. a configured model name or alias (config `models`), or an entry of config `aliases`
   (which names a model, another alias, or a provider/model slug);
2. a `provider/model` slug whose provider is configured (id or catalog alias);
3. a bare catalog model name served by a configured provider (catalog order); a Claude name in
   any provider's spelling (claude-sonnet-4-5-20250929, claude-sonnet-4-5@20250929,
   us.anthropic.claude-sonnet-4-5-20250929-v1:0) is served by the first configured provider of
   Claude (anthropic, vertex_ai or bedrock protocol, in config order), re-spelled for it;
4. a bare upstream model name that a configured model points at.
Anything else is 404 "Requested model X is not available in the model list".

A configured provider finds its catalog entries (prices, context windows, model names) by its id,
or, for a provider of a native protocol with another id (say `id: vertex, protocol: vertex_ai`),
by its protocol.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import msgspec

from proxy.call import Prices, Target
from proxy.catalog import CLAUDE_NAMING, Catalog, ModelSpec, claude_name
from proxy.errors import ModelNotFound
from proxy.settings import ConfigError, Provider, Settings
from proxy.settings import Prices as PriceConfig

MAX_ALIAS_DEPTH = 8
CREDENTIAL_FIELDS = {  # by protocol (spec 3.2); others: api_key
    "demo": [],
    "azure": ["api_key", "api_base", "api_version"],
    "vertex_ai": ["vertex_ai_project", "vertex_ai_location", "vertex_ai_credentials"],
    "bedrock": ["aws_access_key_id", "aws_secret_access_key", "aws_region_name"],
}


def spec_prices(spec: ModelSpec) -> Prices:
    """A catalog model's prices."""
    return Prices(spec.input, spec.output, spec.cached_input, spec.cache_write)


def config_prices(prices: PriceConfig) -> Prices:
    """A configured model's prices (they replace the catalog's whole; absent cache prices mean `input`)."""
    return Prices(prices.input, prices.output, prices.cached_input, prices.cache_write)


class CustomModel(msgspec.Struct, kw_only=True, frozen=True):
    """A model created through /api/models/ (spec 2.5): a new model on a provider, or an alias of
    another model (`base_model_name`) that is billed and tracked under its own name."""

    model_name: str
    base_model_name: str | None = None
    provider_id: str | None = None  # a configured or custom provider; the base model's when absent
    called_by_custom_name: bool = False  # the upstream gets model_name, not the base model's name
    input_cost: float | None = None  # USD per 1M tokens; the base model's when absent
    output_cost: float | None = None
    cache_hit_input_cost: float | None = None
    cache_creation_input_cost: float | None = None
    max_context_window: int | None = None


class ModelTable:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self._listeners: list[Callable[[], None]] = []
        self.broken: dict[str, str] = {}  # custom model name -> why it cannot be served
        self._build([], [])
        self._resolved: dict[str, Target] = {}
        for alias in self.aliases:  # a dangling or circular alias is a config error, not a 404 later
            try:
                self._follow(alias)
            except ModelNotFound as exc:
                raise ConfigError(f"{settings.source}: $.aliases.{alias}: {exc.detail}") from None

    def update(self, providers: list[Provider], models: list[CustomModel]) -> None:
        """Serve the admin store's providers and models beside the config file's (which they may
        not redefine), then tell the listeners. A custom model that cannot be resolved is left out
        and named in `broken`."""
        self._build(providers, models)
        self._resolved = {}
        for listener in self._listeners:
            listener()

    def why_unservable(self, model: CustomModel) -> str | None:
        """Why `model` could not be served beside the current custom models (None: it could).
        Nothing changes either way."""
        trial = copy.copy(self)
        trial._build([self.providers[p] for p in self.custom_providers],
                     [*(m for name, m in self.custom.items() if name != model.model_name), model])
        return trial.broken.get(model.model_name)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every update (stages that derive state from the providers)."""
        self._listeners.append(listener)

    def _build(self, custom_providers: list[Provider], custom_models: list[CustomModel]) -> None:
        settings = self.settings
        all_providers = [*settings.providers, *(p for p in custom_providers if settings.provider(p.id) is None)]
        self.providers: dict[str, Provider] = {p.id: p for p in all_providers}
        self.custom_providers = frozenset(self.providers) - {p.id for p in settings.providers}
        self.catalog_ids = {p.id: self._catalog_id(p) for p in all_providers}
        # catalog provider id -> the configured provider that serves its models (by id, else by protocol)
        self.serving: dict[str, Provider] = {}
        for p in sorted(all_providers, key=lambda p: p.id != self.catalog_ids[p.id]):
            if self.catalog_ids[p.id] is not None:
                self.serving.setdefault(self.catalog_ids[p.id], p)  # type: ignore[arg-type]
        self.claude_providers = [p for p in all_providers if self.catalog_ids[p.id] in CLAUDE_NAMING]
        self.named: dict[str, Target] = {}  # configured names and aliases, then custom models
        self.context_windows = {(m.provider, m.model or m.name): m.context_window for m in settings.models if m.context_window}
        self.upstream_names: dict[str, Target] = {}
        for m in settings.models:
            provider = self.providers[m.provider]
            upstream_model = m.model or m.name
            prices = config_prices(m.prices) if m.prices else self._catalog_prices(provider.id, upstream_model)
            target = self._target(provider, upstream_model, prices)
            for name in (m.name, *m.aliases):
                self.named[name] = target
            self.upstream_names.setdefault(upstream_model, target)
        self.config_names = frozenset(self.named)
        self.aliases = dict(settings.aliases)
        self.custom = {m.model_name: m for m in custom_models if m.model_name not in self.config_names}
        self.broken = {}
        for name in self.custom:
            try:
                self._custom_target(name, ())
            except ModelNotFound as exc:
                self.broken[name] = exc.detail

    def _custom_target(self, name: str, chain: tuple[str, ...]) -> Target:
        """A custom model's Target (its base resolved first, custom or not)."""
        if name in self.named:
            return self.named[name]
        if name in chain:
            raise ModelNotFound(f"{chain[0]} (base model cycle: {' -> '.join([*chain, name])})")
        m = self.custom[name]
        provider = self.providers.get(m.provider_id) if m.provider_id else None
        if m.provider_id and provider is None:
            raise ModelNotFound(f"{name} (provider {m.provider_id!r} does not exist)")
        base: Target | None = None
        if m.base_model_name:
            base_name = m.base_model_name
            if base_name in self.custom and base_name != name:  # (a custom gpt-4o may re-price gpt-4o)
                base = self._custom_target(base_name, (*chain, name))
            else:
                base = self._resolve(self._follow(base_name) if base_name in self.aliases else base_name)
            if provider is not None:
                base = self.on_provider(base, provider.id)
        if base is None:
            assert provider is not None  # the admin API requires a provider or a base model
            base = self._target(provider, name, self._catalog_prices(provider.id, name))
        elif m.called_by_custom_name:
            base = msgspec.structs.replace(base, model=name)
        old = base.prices or Prices()
        given = (m.input_cost, m.output_cost, m.cache_hit_input_cost, m.cache_creation_input_cost)
        prices = base.prices
        if any(v is not None for v in given):
            prices = Prices(
                m.input_cost if m.input_cost is not None else old.input,
                m.output_cost if m.output_cost is not None else old.output,
                m.cache_hit_input_cost if m.cache_hit_input_cost is not None else old.cached_input,
                m.cache_creation_input_cost if m.cache_creation_input_cost is not None else old.cache_write,
            )
        target = msgspec.structs.replace(base, prices=prices, requested=name,
                                         context_window=m.max_context_window or base.context_window)
        self.named[name] = target
        return target

    def _follow(self, name: str) -> str:
        """The model name an alias chain ends at."""
        seen = [name]
        while name in self.aliases:
            name = self.aliases[name]
            if name in seen or len(seen) > MAX_ALIAS_DEPTH:
                raise ModelNotFound(f"{seen[0]} (alias cycle: {' -> '.join([*seen, name])})")
            seen.append(name)
        self._resolve(name)
        return name

    def _catalog_id(self, provider: Provider) -> str | None:
        if provider.id in self.catalog.providers:
            return provider.id
        native = provider.protocol != "openai" and provider.protocol in self.catalog.providers
        return provider.protocol if native else None

    def _catalog_spec(self, provider: str, model: str) -> ModelSpec | None:
        catalog_id = self.catalog_ids.get(provider)
        return self.catalog.spec(catalog_id, model) if catalog_id is not None else None

    def _catalog_prices(self, provider: str, model: str) -> Prices | None:
        spec = self._catalog_spec(provider, model)
        return spec_prices(spec) if spec else None

    def _target(self, provider: Provider, model: str, prices: Prices | None) -> Target:
        """The provider's own key (a deployment named after the provider), else its first deployment.
        The credentials stage, when configured, chooses among all deployments by weight."""
        api_key, base_url, deployment = provider.api_key, provider.base_url, provider.id
        if api_key is None and provider.deployments:
            first = provider.deployments[0]
            api_key, base_url, deployment = first.api_key, first.base_url or provider.base_url, first.name
        return Target(
            provider=provider.id,
            protocol=provider.protocol,
            model=model,
            base_url=base_url,
            api_key=api_key,
            deployment=deployment,
            prices=prices,
            context_window=self.context_windows.get((provider.id, model)) or self._catalog_window(provider.id, model),
        )

    def _catalog_window(self, provider: str, model: str) -> int | None:
        spec = self._catalog_spec(provider, model)
        return spec.context_window if spec else None

    def provider_id(self, name: str) -> str | None:
        """A configured provider's id from its id, or a catalog id or alias it serves."""
        if name in self.providers:
            return name
        spec = self.catalog.provider(name)
        return self.serving[spec.id].id if spec is not None and spec.id in self.serving else None

    def sizes(self) -> dict[str, int]:
        return {"resolved": len(self._resolved)}

    def resolve(self, requested: str) -> Target:
        """The Target for a requested model. Targets are shared: copy with msgspec.structs.replace to change one."""
        target = self._resolved.get(requested)
        if target is None:
            name = self._follow(requested) if requested in self.aliases else requested
            target = msgspec.structs.replace(self._resolve(name), requested=requested)
            if len(self._resolved) > 50_000:
                self._resolved.clear()
            self._resolved[requested] = target
        return target

    def prices_for(self, name: str) -> Prices | None:
        """Prices of a model by any name a log may carry: a configured name or alias, a
        provider/model slug, or a bare catalog name (the first provider that lists it)."""
        try:
            prices = self.resolve(name).prices
        except ModelNotFound:
            prices = None
        if prices is not None:
            return prices
        prefix, slash, rest = name.partition("/")
        provider = self.catalog.provider(prefix) if slash else None
        spec = self.catalog.spec(provider.id, rest) if provider is not None else None
        if spec is None and self.catalog.by_name.get(name):
            spec = self.catalog.by_name[name][0]
        return spec_prices(spec) if spec is not None else None

    def on_provider(self, target: Target, provider_id: str) -> Target:
        """The same upstream model served by another configured provider (X-Respan-Route-Provider)."""
        if provider_id == target.provider:
            return target
        provider = self.providers[provider_id]
        catalog_id = self.catalog_ids[provider_id]
        model = self.catalog.model_on(catalog_id, target.model) if catalog_id is not None else target.model
        pinned = self._target(provider, model, self._catalog_prices(provider_id, model) or target.prices)
        return msgspec.structs.replace(pinned, requested=target.requested)

    def _resolve(self, requested: str) -> Target:
        if not requested:
            raise ModelNotFound(requested)
        if target := self.named.get(requested):
            return target
        prefix, slash, rest = requested.partition("/")
        if slash and rest:
            provider_id = self.provider_id(prefix)
            if provider_id is not None:
                provider = self.providers[provider_id]
                configured = self.upstream_names.get(rest)
                prices = configured.prices if configured is not None and configured.provider == provider_id else None
                return self._target(provider, rest, prices or self._catalog_prices(provider_id, rest))
        for spec in self.catalog.by_name.get(requested, ()):
            if spec.provider in self.serving:
                return self._target(self.serving[spec.provider], requested, spec_prices(spec))
        if target := self.upstream_names.get(requested):
            return target
        if self.claude_providers and claude_name(requested) is not None:
            provider = self.claude_providers[0]
            model = self.catalog.model_on(self.catalog_ids[provider.id], requested)  # type: ignore[arg-type]
            if self._catalog_spec(provider.id, model) is not None:  # a Claude model the catalog knows
                return self._target(provider, model, self._catalog_prices(provider.id, model))
        raise ModelNotFound(requested)

    def public_models(self) -> list[dict[str, Any]]:
        """Every model this gateway can route, for /api/models/public and /v1/models."""
        out: dict[str, dict[str, Any]] = {}
        for name, target in self.named.items():
            out[name] = self._describe(name, target)
        for alias in self.aliases:
            out[alias] = self._describe(alias, self.resolve(alias))
        for key, spec in self.catalog.models.items():
            if spec.provider in self.serving and key not in out:
                out[key] = self._describe(key, self._target(
                    self.serving[spec.provider], spec.name, spec_prices(spec)
                ))
        return list(out.values())

    def _describe(self, name: str, target: Target) -> dict[str, Any]:
        prices = target.prices or Prices()
        spec = self.catalog.providers.get(self.catalog_ids.get(target.provider) or target.provider)
        return {
            "model_name": name,
            "max_context_window": target.context_window,
            "input_cost": prices.input,
            "output_cost": prices.output,
            "prompt_cost": prices.input,
            "completion_cost": prices.output,
            "rate_limit": None,
            "provider": {
                "provider_name": spec.name if spec else target.provider,
                "provider_id": target.provider,
                "moderation": "Unfiltered",
                "credential_fields": CREDENTIAL_FIELDS.get(target.protocol, ["api_key"]),
            },
        }
