"""The YAML config, validated into msgspec Structs.

`${VAR}` (or `${VAR:-default}`) in any string is replaced from the environment, so secrets stay
out of the file. Every error names the file, the field path and what was expected.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from proxy.alerts import AlertSettings
from proxy.catalog import load_catalog
from proxy.egress import EgressPolicy
from proxy.forwarded import parse_networks
from proxy.keys import hash_key, is_key_hash

DEMO_KEY = "sk-llmrelay-demo"  # the embedded defaults' gateway key; README examples use it
ADMIN_DEMO_KEY = "sk-llmrelay-admin-demo"  # the embedded defaults' admin key (replace it in a real config)
DATA_DIR = "./llmrelay-data"
# Wire protocols that a provider found through its environment key may use. Grows as
# proxy/providers/ learns more protocols.
ENVIRONMENT_PROTOCOLS = frozenset({"openai", "gemini", "anthropic"})


class ConfigError(Exception):
    """A config that cannot be served. The message names the file and the field path."""


class Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Config structs reject unknown fields, so a typo is an error instead of a silent default."""


class Timeouts(Struct):
    connect: float = 10.0  # seconds to open a connection to a provider
    read: float = 600.0  # seconds to wait for a whole non-stream response
    stream_idle: float = 120.0  # seconds of silence allowed between two stream chunks


class Server(Struct):
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 10 * 1024 * 1024
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)  # provider defaults
    # load balancers whose X-Forwarded-For is believed for the log's ip_address (IPs or CIDRs)
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    tls_cert: str | None = None  # PEM certificate (chain) file: serve HTTPS (with tls_key)
    tls_key: str | None = None  # PEM private key file
    # auto: HTTP/1.1 and HTTP/2 (negotiated by ALPN over TLS; cleartext h2c with prior knowledge); 1: HTTP/1.1 only
    http: Literal["auto", "1"] = "auto"
    # normal: Linux's default; batch: a worker's threads do not preempt each other (nor other
    # processes) on wake-up, for workers on cores of their own. See proxy/scheduling.py.
    scheduling: Literal["batch", "normal"] = "normal"


class Deployment(Struct):
    """One credential (and optionally endpoint) of a provider; traffic splits by weight."""

    name: str
    api_key: str | None = None
    base_url: str | None = None  # the provider's base_url when absent
    weight: float = 1.0
    models: list[str] | None = None  # serves only these upstream models (available_models)
    exclude_models: list[str] = msgspec.field(default_factory=list)


class Provider(Struct):
    id: str
    protocol: str = "openai"
    base_url: str = ""
    api_key: str | None = None  # the provider's single deployment, named after its id
    deployments: list[Deployment] = msgspec.field(default_factory=list)  # several keys, weighted
    api_version: str | None = None  # protocols that version their API in the request (azure, anthropic)
    timeouts: Timeouts | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    max_connections: int = 1000
    # request params sent when the request leaves them out, e.g. {temperature: 0.2} (openai protocol)
    defaults: dict[str, Any] = msgspec.field(default_factory=dict)


class Prices(Struct):
    input: float = 0.0  # USD per 1M input tokens
    output: float = 0.0  # USD per 1M output tokens
    cached_input: float | None = None  # USD per 1M cached input tokens (cache reads); `input` when absent
    cache_write: float | None = None  # USD per 1M cache-creation tokens (cache writes); `input` when absent


class Model(Struct):
    name: str
    provider: str
    model: str | None = None  # the upstream model name; `name` when absent
    prices: Prices | None = None
    context_window: int | None = None  # tokens; the catalog's when absent
    aliases: list[str] = msgspec.field(default_factory=list)


class ApiKey(Struct):
    name: str
    key_hash: str  # "sha256:<hex>" of the key; `llmrelay hash-key` prints one
    environment: Literal["test", "production"] = "production"
    expires_at: datetime | None = None
    # enforced by the limits stage, as block policies on this key
    rate_limit: int | None = None  # requests a minute
    spending_limit: float | None = None  # USD, lifetime
    max_usage: int | None = None  # requests, lifetime; -1: unlimited


class AdminKey(Struct):
    """A key for the admin endpoints (cache, limits, ...); gateway keys get a 403 there."""

    name: str
    key_hash: str  # "sha256:<hex>", as for gateway keys


class StageEntry(Struct):
    name: str
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class LogSink(Struct):
    type: Literal["sqlite", "jsonl", "postgres", "http"]
    path: str | None = None  # sqlite, jsonl: the file
    dsn: str | None = None  # postgres: postgresql://user[:password]@host:port/db (put a password in ${VAR})
    url: str | None = None  # http: the receiving ingestion endpoint, e.g. http://other:8080/api/v1/traces/ingest
    api_key: str | None = None  # http: the receiving end's key, sent as Bearer (a secret: use ${VAR})
    pool_size: int = 4  # postgres: connections
    timeout: float = 10.0  # http: seconds per batch, retries included (the log writer waits this long at most)
    retries: int = 3  # http: tries per batch before it goes to the spool (replayed later)


REQUIRED_SINK_FIELD = {"sqlite": "path", "jsonl": "path", "postgres": "dsn", "http": "url"}


class Retention(Struct):
    """Log retention, applied in the background by the queried store (pinned logs are exempt)."""

    content_days: float | None = None  # after this many days, content fields are cleared (blurred)
    delete_days: float | None = None  # after this many days, log rows are deleted
    interval: float = 600.0  # seconds between retention passes


class Logs(Struct):
    queue_size: int = 10_000
    # small batches, often: one core writing 500 rows at once held up the requests meanwhile (p99 at
    # concurrency 1: 4.3-4.8 ms with 500, 2.9-3.0 ms with 32; no measurable CPU cost at 64)
    batch_size: int = 32
    flush_interval: float = 0.2
    spool_dir: str = f"{DATA_DIR}/spool"
    sinks: list[LogSink] = msgspec.field(default_factory=lambda: [LogSink(type="sqlite", path=f"{DATA_DIR}/logs.db")])
    retention: Retention = msgspec.field(default_factory=Retention)


class StoreSettings(Struct):
    """Where admin-created objects (keys, ...) live; every worker and replica must share it."""

    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: str = f"{DATA_DIR}/admin.db"  # sqlite
    dsn: str | None = None  # postgres: postgresql://user[:password]@host:port/db
    poll_interval: float = 0.5  # seconds between checks of the change counter
    notify_url: str | None = None  # redis://...: changes are also published, for every worker to reload at once


class Backend(Struct):
    backend: Literal["memory", "redis"] = "memory"
    url: str | None = None  # redis://host:port/db when backend is redis


class State(Struct):
    cache: Backend = msgspec.field(default_factory=Backend)
    counters: Backend = msgspec.field(default_factory=Backend)
    cooldowns: Backend = msgspec.field(default_factory=Backend)


class Egress(Struct):
    """Where tenant-supplied base URLs may connect (proxy/egress.py); config-file providers are trusted."""

    allow: list[str] = msgspec.field(default_factory=list)  # CIDRs / addresses / host names let through the default deny
    deny: list[str] = msgspec.field(default_factory=list)  # more to refuse; wins over allow


class Cooldowns(Struct):
    """When a deployment is taken out of rotation."""

    failures: int = 3  # this many failures within `window` seconds...
    window: float = 60.0
    duration: float = 30.0  # ...cool it down this long (a 429's Retry-After, when given, instead)
    max_duration: float = 300.0  # cap on a Retry-After-derived cooldown
    statuses: list[int] = msgspec.field(default_factory=lambda: [401, 404, 408, 429, 500, 502, 503, 504])


class Settings(Struct):
    server: Server = msgspec.field(default_factory=Server)
    providers: list[Provider] = msgspec.field(default_factory=list)
    models: list[Model] = msgspec.field(default_factory=list)
    keys: list[ApiKey] = msgspec.field(default_factory=list)
    admin_keys: list[AdminKey] = msgspec.field(default_factory=list)
    alerts: AlertSettings = msgspec.field(default_factory=AlertSettings)  # how limit alerts are delivered
    pipeline: list[str | StageEntry] = msgspec.field(
        default_factory=lambda: ["auth", "prompts", "limits", "cache", "routing", "credentials", "fallback"]
    )
    logs: Logs = msgspec.field(default_factory=Logs)
    state: State = msgspec.field(default_factory=State)
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    cooldowns: Cooldowns = msgspec.field(default_factory=Cooldowns)
    egress: Egress = msgspec.field(default_factory=Egress)
    # extra model names: alias -> a configured model name, another alias, or a provider/model slug
    aliases: dict[str, str] = msgspec.field(default_factory=dict)
    # enable catalog providers whose API key is in the environment (OPENAI_API_KEY, ...)
    auto_providers: bool = True
    source: str = "<embedded defaults>"  # where this config came from; set by the loader

    def stage_entries(self) -> list[StageEntry]:
        return [StageEntry(name=e) if isinstance(e, str) else e for e in self.pipeline]

    def provider(self, provider_id: str) -> Provider | None:
        for p in self.providers:
            if p.id == provider_id:
                return p
        return None


def embedded_defaults() -> dict[str, Any]:
    """What `llmrelay serve` runs with no config: the demo provider and the demo key."""
    return {
        "providers": [{"id": "demo", "protocol": "demo"}],
        "models": [{"name": "demo", "provider": "demo", "model": "llmrelay-demo-1", "aliases": ["demo-model"],
                    "prices": {"input": 0, "output": 0}}],  # free: a known price of 0
        "keys": [{"name": "demo", "key_hash": hash_key(DEMO_KEY), "environment": "test"}],
        "admin_keys": [{"name": "demo-admin", "key_hash": hash_key(ADMIN_DEMO_KEY)}],
    }


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, path: str, source: str, env: dict[str, str]) -> Any:
    """Replace ${VAR} / ${VAR:-default} in every string of a parsed YAML tree."""
    if isinstance(value, str):
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{source}: {path}: environment variable {name} is not set (write ${{{name}:-default}} for a default)")

        return _ENV_PATTERN.sub(replace, value)
    if isinstance(value, dict):
        return {k: interpolate(v, f"{path}.{k}", source, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{path}[{i}]", source, env) for i, v in enumerate(value)]
    return value


def parse_settings(raw: Any, source: str, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: $: expected a mapping at the top level, got {type(raw).__name__}")
    raw = interpolate(raw, "$", source, env)
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    settings.source = source
    check(settings)
    if settings.auto_providers:
        add_environment_providers(settings, env)
    return settings


def _describe(exc: msgspec.ValidationError) -> str:
    """msgspec says 'Expected `int`, got `str` - at `$.server.port`'; lead with the path."""
    message = str(exc)
    if " - at `" in message:
        what, _, where = message.rpartition(" - at `")
        return f"{where.rstrip('`')}: {what}"
    return f"$: {message}"


def check_base_url(url: str | None, where: str) -> None:
    if not url:
        return
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: expected an http:// or https:// URL")
    if "@" in url.partition("://")[2].partition("/")[0]:
        raise ConfigError(f"{where}: credentials in the URL are not supported; use api_key or headers")


def check_server_edge(server: Server, src: str) -> None:
    """Trusted proxies parse; TLS has both files, readable."""
    try:
        parse_networks(server.trusted_proxies)
    except ValueError as exc:
        raise ConfigError(f"{src}: $.server.trusted_proxies: {exc}") from None
    if (server.tls_cert is None) != (server.tls_key is None):
        missing = "tls_key" if server.tls_key is None else "tls_cert"
        raise ConfigError(f"{src}: $.server.{missing}: HTTPS needs both tls_cert and tls_key")
    for name in ("tls_cert", "tls_key"):
        path = getattr(server, name)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"{src}: $.server.{name}: cannot read {path!r}")


def check(settings: Settings) -> None:
    """Cross-field rules that types alone cannot say."""
    src = settings.source
    if not 0 < settings.server.port < 65536 and settings.server.port != 0:
        raise ConfigError(f"{src}: $.server.port: expected 0-65535, got {settings.server.port}")
    if settings.server.workers < 1:
        raise ConfigError(f"{src}: $.server.workers: expected at least 1, got {settings.server.workers}")
    if settings.server.max_body_bytes < 1024:
        raise ConfigError(f"{src}: $.server.max_body_bytes: expected at least 1024, got {settings.server.max_body_bytes}")
    check_server_edge(settings.server, src)
    try:
        EgressPolicy(settings.egress.allow, settings.egress.deny, where="$.egress")
    except ValueError as exc:
        raise ConfigError(f"{src}: {exc}") from None
    seen: set[str] = set()
    for i, p in enumerate(settings.providers):
        where = f"{src}: $.providers[{i}]"
        if p.id in seen:
            raise ConfigError(f"{where}.id: duplicate provider id {p.id!r}")
        seen.add(p.id)
        check_base_url(p.base_url, f"{where}.base_url")
    names: set[str] = set()
    for i, m in enumerate(settings.models):
        where = f"{src}: $.models[{i}]"
        if m.provider not in seen:
            raise ConfigError(f"{where}.provider: no provider with id {m.provider!r} (declared: {sorted(seen)})")
        for n in (m.name, *m.aliases):
            if n in names:
                raise ConfigError(f"{where}: model name or alias {n!r} is declared twice")
            names.add(n)
    for i, p in enumerate(settings.providers):
        names_seen: set[str] = set()
        for j, d in enumerate(p.deployments):
            where = f"{src}: $.providers[{i}].deployments[{j}]"
            if d.name in names_seen:
                raise ConfigError(f"{where}.name: duplicate deployment name {d.name!r}")
            names_seen.add(d.name)
            if not d.weight > 0:
                raise ConfigError(f"{where}.weight: expected a number > 0, got {d.weight}")
            check_base_url(d.base_url, f"{where}.base_url")
    for alias, points_to in settings.aliases.items():
        if alias in names:
            raise ConfigError(f"{src}: $.aliases.{alias}: {alias!r} is already a model name or alias")
        if not points_to:
            raise ConfigError(f"{src}: $.aliases.{alias}: expected a model name or provider/model slug")
    for field in ("keys", "admin_keys"):
        for i, k in enumerate(getattr(settings, field)):
            if not is_key_hash(k.key_hash):
                raise ConfigError(f"{src}: $.{field}[{i}].key_hash: expected 'sha256:' followed by 64 hex digits "
                                  "(run `llmrelay hash-key`)")
    gateway_hashes = {k.key_hash for k in settings.keys}
    for i, k in enumerate(settings.admin_keys):
        if k.key_hash in gateway_hashes:
            raise ConfigError(f"{src}: $.admin_keys[{i}].key_hash: the same key is a gateway key; admin keys must differ")
    types = [s.type for s in settings.logs.sinks]
    for i, t in enumerate(types):
        if t in types[:i]:
            raise ConfigError(f"{src}: $.logs.sinks[{i}].type: a {t} sink is already declared; one sink per type")
    for i, sink in enumerate(settings.logs.sinks):
        required = REQUIRED_SINK_FIELD[sink.type]
        if not getattr(sink, required):
            raise ConfigError(f"{src}: $.logs.sinks[{i}].{required}: required for a {sink.type} sink")
        if sink.type == "postgres" and not sink.dsn.startswith(("postgresql://", "postgres://")):  # type: ignore[union-attr]
            raise ConfigError(f"{src}: $.logs.sinks[{i}].dsn: expected a postgresql:// URL")
        if sink.type == "http" and not sink.url.startswith(("http://", "https://")):  # type: ignore[union-attr]
            raise ConfigError(f"{src}: $.logs.sinks[{i}].url: expected an http:// or https:// URL")
    if settings.store.backend == "postgres" and not (settings.store.dsn or "").startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{src}: $.store.dsn: expected a postgresql:// URL for the postgres backend")
    if settings.store.notify_url and not settings.store.notify_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{src}: $.store.notify_url: expected a redis:// URL")
    if settings.store.poll_interval <= 0:
        raise ConfigError(f"{src}: $.store.poll_interval: expected seconds > 0")
    retention = settings.logs.retention
    for name in ("content_days", "delete_days"):
        value = getattr(retention, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{src}: $.logs.retention.{name}: expected a number of days > 0")
    if retention.interval <= 0:
        raise ConfigError(f"{src}: $.logs.retention.interval: expected seconds > 0")
    if settings.cooldowns.failures < 1:
        raise ConfigError(f"{src}: $.cooldowns.failures: expected at least 1")
    for name in ("cache", "counters", "cooldowns"):
        backend = getattr(settings.state, name)
        if backend.backend == "redis" and not (backend.url or "").startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"{src}: $.state.{name}.url: expected a redis:// URL for the redis backend")
    for i, e in enumerate(settings.stage_entries()):
        if not e.name:
            raise ConfigError(f"{src}: $.pipeline[{i}]: empty stage name")


def add_environment_providers(settings: Settings, env: dict[str, str]) -> None:
    """Catalog providers whose key is in the environment join, unless the config declares them."""
    for spec in load_catalog().providers.values():
        if not spec.api_key_env or settings.provider(spec.id) is not None:
            continue
        key = env.get(spec.api_key_env)
        if key and spec.protocol in ENVIRONMENT_PROTOCOLS:
            settings.providers.append(Provider(id=spec.id, protocol=spec.protocol, base_url=spec.base_url, api_key=key))


def load_settings(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read a config file, or the embedded defaults when `path` is None."""
    if path is None:
        return parse_settings(embedded_defaults(), "<embedded defaults>", env)
    return parse_text(read_text(path), str(path), env)


def read_text(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def parse_text(text: str, source: str, env: dict[str, str] | None = None) -> Settings:
    """A config file's text, as `load_settings` reads it from the file `source` (errors name it;
    ${VAR}s come from the environment, relative paths stay relative to the working directory)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{source}: {where}invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_settings(raw, source, env)
