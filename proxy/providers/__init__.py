"""One module per wire protocol. PROTOCOLS is the only place that maps a protocol name to code.

Every adapter is built as `Adapter(config, timeouts, upstream)` and answers the unified router in
OpenAI chat format (proxy.providers.base.ProviderAdapter). Modules are imported only when a
configured provider uses them.
"""

from __future__ import annotations

import importlib

import msgspec

from proxy.catalog import load_catalog
from proxy.providers.base import ProviderAdapter
from proxy.settings import ConfigError, Provider, Settings
from proxy.upstream import UpstreamClient

# protocol -> "module:class"
PROTOCOLS: dict[str, str] = {
    "openai": "proxy.providers.openai_compatible:OpenAICompatible",
    "demo": "proxy.providers.demo:DemoProvider",
    "anthropic": "proxy.providers.anthropic:AnthropicMessages",
    "gemini": "proxy.providers.gemini:GeminiGenerateContent",
    "azure": "proxy.providers.azure:AzureOpenAI",
    "bedrock": "proxy.providers.bedrock:BedrockConverse",
    "vertex_ai": "proxy.providers.vertex:VertexAI",
}
NO_BASE_URL = frozenset({"demo"})  # protocols that need no base_url

__all__ = ["PROTOCOLS", "ProviderAdapter", "build_adapter", "build_adapters", "with_catalog_defaults"]


def with_catalog_defaults(config: Provider) -> Provider:
    """A configured provider with a catalog id (groq, mistral, ...) may leave out its base_url."""
    spec = load_catalog().providers.get(config.id)
    if spec is not None and not config.base_url:
        return msgspec.structs.replace(config, base_url=spec.base_url)
    return config


def adapter_class(protocol: str, where: str) -> type:
    path = PROTOCOLS.get(protocol)
    if path is None:
        raise ConfigError(f"{where}.protocol: expected one of {sorted(PROTOCOLS)}, got {protocol!r}")
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{where}.protocol: protocol {protocol!r} is not available in this build ({exc})") from None


def build_adapter(config: Provider, settings: Settings, upstream: UpstreamClient, where: str) -> ProviderAdapter:
    cls = adapter_class(config.protocol, where)
    if config.protocol == "demo":
        return cls()
    if not config.base_url and config.protocol not in NO_BASE_URL:
        raise ConfigError(f"{where}.base_url: provider {config.id!r} needs a base_url (an http:// or https:// URL)")
    return cls(config, settings.server.timeouts, upstream)


def build_adapters(settings: Settings, upstream: UpstreamClient) -> dict[str, ProviderAdapter]:
    """One adapter per configured provider id."""
    adapters: dict[str, ProviderAdapter] = {}
    for i, config in enumerate(settings.providers):
        config = with_catalog_defaults(config)
        settings.providers[i] = config
        adapters[config.id] = build_adapter(config, settings, upstream, f"{settings.source}: $.providers[{i}]")
    return adapters
