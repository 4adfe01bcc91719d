"""One module per wire protocol. `build_adapter` is the only place that maps a protocol name to code."""

from __future__ import annotations

import msgspec

from proxy.catalog import load_catalog
from proxy.providers.base import ProviderAdapter
from proxy.providers.demo import DemoProvider
from proxy.providers.openai_compatible import OpenAICompatible
from proxy.settings import ConfigError, Provider, Settings
from proxy.upstream import UpstreamClient

PROTOCOLS = ("openai", "demo")

__all__ = ["PROTOCOLS", "ProviderAdapter", "build_adapter", "build_adapters", "with_catalog_defaults"]


def with_catalog_defaults(config: Provider) -> Provider:
    """A configured provider with a catalog id (groq, mistral, ...) may leave out its base_url."""
    spec = load_catalog().providers.get(config.id)
    if spec is not None and not config.base_url:
        return msgspec.structs.replace(config, base_url=spec.base_url)
    return config


def build_adapter(config: Provider, settings: Settings, upstream: UpstreamClient, where: str) -> ProviderAdapter:
    if config.protocol == "demo":
        return DemoProvider()
    if config.protocol == "openai":
        if not config.base_url:
            raise ConfigError(f"{where}.base_url: provider {config.id!r} needs a base_url (an http:// or https:// URL)")
        return OpenAICompatible(config, settings.server.timeouts, upstream)
    raise ConfigError(f"{where}.protocol: expected one of {list(PROTOCOLS)}, got {config.protocol!r}")


def build_adapters(settings: Settings, upstream: UpstreamClient) -> dict[str, ProviderAdapter]:
    """One adapter per configured provider id."""
    adapters: dict[str, ProviderAdapter] = {}
    for i, config in enumerate(settings.providers):
        config = with_catalog_defaults(config)
        settings.providers[i] = config
        adapters[config.id] = build_adapter(config, settings, upstream, f"{settings.source}: $.providers[{i}]")
    return adapters
