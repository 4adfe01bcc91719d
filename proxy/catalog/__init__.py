"""Built-in catalog of providers and models, loaded from the YAML files next to this module."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any, Literal

import msgspec
import yaml

__all__ = ["Catalog", "ModelSpec", "ProviderSpec", "load_catalog"]

Protocol = Literal["openai", "anthropic", "gemini", "azure", "vertex_ai", "bedrock"]


class ProviderSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    protocol: Protocol
    base_url: str  # `/chat/completions` etc. is appended to this
    api_key_env: str | None  # None: no single key in the environment (e.g. Bedrock's AWS key pair)
    aliases: list[str] = []
    name: str = ""


class ModelSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str  # the provider's model id
    provider: str  # a ProviderSpec.id
    input: float  # USD per 1M uncached prompt tokens
    output: float  # USD per 1M completion tokens
    cached_input: float | None = None  # USD per 1M prompt-cache hits (reads), where published
    cache_write: float | None = None  # USD per 1M prompt-cache writes (creation), where billed apart
    context_window: int | None = None

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.name}"


class Catalog(msgspec.Struct, frozen=True):
    providers: dict[str, ProviderSpec]  # by id
    models: dict[str, ModelSpec]  # by "provider/name"
    by_name: dict[str, list[ModelSpec]]  # by bare model name (several providers may serve one name)

    def provider(self, id_or_alias: str) -> ProviderSpec | None:
        """Resolve a provider id or alias (case-insensitive)."""
        key = id_or_alias.strip().lower()
        if spec := self.providers.get(key):
            return spec
        return next((p for p in self.providers.values() if key in p.aliases), None)


def _read(filename: str, section: str) -> Any:
    text = resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")
    return (yaml.safe_load(text) or {}).get(section) or []


@functools.cache
def load_catalog() -> Catalog:
    """Load and validate the built-in catalog (cached; treat the result as read-only)."""
    providers: dict[str, ProviderSpec] = {}
    for p in msgspec.convert(_read("providers.yaml", "providers"), list[ProviderSpec]):
        if p.id in providers:
            raise ValueError(f"catalog: duplicate provider id {p.id!r}")
        providers[p.id] = p

    models: dict[str, ModelSpec] = {}
    by_name: dict[str, list[ModelSpec]] = {}
    for m in msgspec.convert(_read("models.yaml", "models"), list[ModelSpec]):
        if m.provider not in providers:
            raise ValueError(f"catalog: model {m.name!r} names unknown provider {m.provider!r}")
        if m.key in models:
            raise ValueError(f"catalog: duplicate model {m.key!r}")
        models[m.key] = m
        by_name.setdefault(m.name, []).append(m)
    return Catalog(providers=providers, models=models, by_name=by_name)
