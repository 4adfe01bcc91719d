"""Built-in catalog of providers and models, loaded from the YAML files next to this module."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
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


# Claude is named three ways: Anthropic `claude-sonnet-4-5-20250929` (or the undated alias
# `claude-sonnet-4-5`), Vertex AI `claude-sonnet-4-5@20250929`, Bedrock
# `anthropic.claude-sonnet-4-5-20250929-v1:0` (with a region prefix `us.`, `eu.`, ... for an
# inference profile). A name of any of these shapes is (base, date).
CLAUDE_NAME = re.compile(
    r"^(?:[a-z]{2,6}\.)?(?:anthropic\.)?(?P<base>claude-[a-z0-9.-]+?)(?:[-@](?P<date>\d{8}))?(?:-v\d+(?::\d+)?)?$")
CLAUDE_NAMING: dict[str, Callable[[str, str | None], str]] = {  # catalog provider -> its name for (base, date)
    "anthropic": lambda base, date: f"{base}-{date}" if date else base,
    "vertex_ai": lambda base, date: f"{base}@{date}" if date else base,
    "bedrock": lambda base, date: f"anthropic.{base}-{date}-v1:0" if date else f"anthropic.{base}-v1:0",
}


def claude_name(name: str) -> tuple[str, str | None] | None:
    """(base, date) of a Claude model name in any provider's spelling; None for other models."""
    match = CLAUDE_NAME.match(name)
    return (match["base"], match["date"]) if match else None


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

    def _claude_specs(self, provider: str, base: str) -> list[ModelSpec]:
        return [spec for spec in self.models.values()
                if spec.provider == provider and (claude_name(spec.name) or ("",))[0] == base]

    def spec(self, provider: str, name: str) -> ModelSpec | None:
        """A provider's model: by its exact name, else (Claude) the same model in another spelling
        or version of the provider's, so that a dated or re-spelled Claude name keeps its prices."""
        found = self.models.get(f"{provider}/{name}")
        if found is not None:
            return found
        parts = claude_name(name)
        if parts is None:
            return None
        same = self._claude_specs(provider, parts[0])
        return next((s for s in same if claude_name(s.name) == parts), same[0] if same else None)

    def model_on(self, provider: str, name: str) -> str:
        """The name a provider (a catalog id) knows model `name` by: a Claude name in another
        provider's spelling is re-spelled (the catalog's own entry first; an undated name takes
        the provider's listed version, if any); any other name is kept as it is."""
        parts = claude_name(name)
        naming = CLAUDE_NAMING.get(provider)
        if parts is None or naming is None or f"{provider}/{name}" in self.models:
            return name
        same = self._claude_specs(provider, parts[0])
        exact = next((s.name for s in same if claude_name(s.name) == parts), None)
        if exact is not None:
            return exact
        if parts[1] is None:  # undated: the provider's listed version, if it lists one
            return same[0].name if same else name
        return naming(*parts)


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
