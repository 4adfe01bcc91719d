"""The `credentials` stage: which credential (deployment) each planned Target is sent with.

Spec section 3.2. For every entry of the plan (routing's `call.plan`, else `[call.target]`, else
the requested model resolved), the first of these that applies wins:

1. `credential_override[<slug>]`, the slug being the name the client asked for
   (`target.requested`), else `<provider>/<model>`, else the upstream model name;
   deployment `credential_override`.
2. `customer_credentials`, in any of its three shapes: `{provider: {fields}}` (deployment
   `customer_credentials`); a weighted list of `{credentials: {provider: {fields}}, weight,
   available_models, exclude_models}` (deployment `customer_credentials[i]`); or
   `{provider: [{weight, credentials: {fields}}]}` (deployment `customer_credentials.<provider>[i]`).
   Where several entries serve the model, one is picked at random in proportion to its weight.
3. the Target's own `credentials` (a load-balance entry's, set by routing); deployment `load_balance`.
4. the deprecated `customer_api_keys: {model: api_key}`; deployment `customer_api_keys`.
5. the provider's configured deployments that serve the model, all of them: a weighted random
   order of those in rotation, then those in cooldown (never dropped: the only deployment of a
   model is still tried). A provider with no credential at all passes through unchanged.

Levels 1 to 4 are the caller's own credentials (`custom_credential=True`). Such a credential is
self-contained: its `api_key` (or none) goes with it, never the gateway's configured key, even
when it names its own base URL. The fallback stage walks the resulting plan in order.

Every base URL here is the caller's, never the operator's: it must pass the egress policy
(proxy/egress.py) when the request arrives (a 422 naming e.g. `customer_credentials.openai.api_base`)
and again when its connection opens (Target.egress names the field).

Secrets go only into `Target.api_key` (and `Target.credentials`, the credential's provider
fields for adapters that need e.g. `api_version`); deployment names and errors never hold one.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable
from typing import Any

import msgspec

from proxy.call import Call, Reply, Target
from proxy.egress import EgressPolicy
from proxy.errors import NotFound, ValidationFailed
from proxy.params import GatewayParams
from proxy.pipeline import Next, StageContext
from proxy.settings import Provider
from proxy.weighted import weighted_choice

_replace = msgspec.structs.replace

URL_FIELDS = ("api_base", "base_url", "endpoint")  # spec: api_base, a.k.a. base_url / endpoint
# The provider credential fields of spec 3.2; a dict holding one of them is a flat credential.
FLAT_FIELDS = frozenset({
    "api_key", *URL_FIELDS, "api_version", "azure_ad_token",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_region_name",
    "vertex_ai_project", "vertex_ai_location", "vertex_ai_credentials",
})
_HEADER_UNSAFE = ("\r", "\n", "\0")
_URL_UNSAFE = (" ", "\t", "\r", "\n", "\0", "\\")

OVERRIDE = "credential_override"
CUSTOMER = "customer_credentials"
LOAD_BALANCE = "load_balance"
API_KEYS = "customer_api_keys"


class Credential:
    """One credential from the request (or a load-balance entry), validated."""

    __slots__ = ("name", "api_key", "base_url", "fields", "weight", "available", "exclude", "url_field")

    def __init__(self, name: str, api_key: str | None, base_url: str | None, fields: dict[str, Any],
                 weight: float = 1.0, available: frozenset[str] | None = None,
                 exclude: frozenset[str] = frozenset(), url_field: str | None = None) -> None:
        self.name = name  # the deployment name: never holds a secret
        self.url_field = url_field  # the field base_url came from, e.g. customer_credentials.openai.api_base
        self.api_key = api_key
        self.base_url = base_url
        self.fields = fields
        self.weight = weight
        self.available = available  # None: every model
        self.exclude = exclude

    def serves(self, names: tuple[str, ...]) -> bool:
        if self.available is not None and self.available.isdisjoint(names):
            return False
        return self.exclude.isdisjoint(names)


class Deployment:
    """One configured deployment of a provider, precomputed at start-up."""

    __slots__ = ("name", "api_key", "base_url", "weight", "models", "exclude", "key")

    def __init__(self, provider: str, name: str, api_key: str | None, base_url: str, weight: float,
                 models: list[str] | None, exclude: list[str]) -> None:
        self.name = name
        self.api_key = api_key
        self.base_url = base_url
        self.weight = weight
        self.models = frozenset(models) if models else None
        self.exclude = frozenset(exclude)
        self.key = f"{provider}/{name}"  # = Target.deployment_key, the cooldown key

    def serves(self, model: str) -> bool:
        return (self.models is None or model in self.models) and model not in self.exclude


class ProviderDeployments:
    """A provider's configured deployments, with the eligible ones per upstream model cached."""

    __slots__ = ("id", "deployments", "_by_model")

    def __init__(self, provider: Provider) -> None:
        self.id = provider.id
        if provider.deployments:  # the provider's api_key and base_url are its deployments' defaults
            self.deployments = tuple(
                Deployment(provider.id, d.name, d.api_key if d.api_key is not None else provider.api_key,
                           d.base_url or provider.base_url, d.weight, d.models, d.exclude_models)
                for d in provider.deployments
            )
        else:  # a provider with only `api_key`: one deployment named after its id
            self.deployments = (Deployment(provider.id, provider.id, provider.api_key, provider.base_url, 1.0, None, []),)
        self._by_model: dict[str, tuple[Deployment, ...]] = {}

    def eligible(self, model: str) -> tuple[Deployment, ...]:
        found = self._by_model.get(model)
        if found is None:
            found = tuple(d for d in self.deployments if d.serves(model))
            if len(self._by_model) > 10_000:
                self._by_model.clear()
            self._by_model[model] = found
        return found


class RequestCredentials:
    """The credential params of one request, validated once (so nothing is half-applied)."""

    __slots__ = ("overrides", "customer", "api_keys")

    def __init__(self, overrides: dict[str, Credential], customer: dict[str, list[Credential]],
                 api_keys: dict[str, Credential]) -> None:
        self.overrides = overrides  # slug -> credential (provider prefixes normalised too)
        self.customer = customer  # configured provider id -> its candidate credentials
        self.api_keys = api_keys  # model name -> credential


# -- validation ----------------------------------------------------------------------------


def _is_url(value: Any) -> bool:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        return False
    if any(c in value for c in _URL_UNSAFE):
        return False
    host = value.partition("://")[2].partition("/")[0]
    return bool(host) and "@" not in host


def parse_credential(value: Any, path: str, name: str, weight: float = 1.0,
                     available: frozenset[str] | None = None, exclude: frozenset[str] = frozenset()) -> Credential:
    """Provider credential fields -> Credential. Errors name the field, never its value."""
    if not isinstance(value, dict):
        raise ValidationFailed(path, "expected an object of provider credential fields (api_key, api_base, ...)")
    if not value:
        raise ValidationFailed(path, "expected at least one provider credential field (api_key, api_base, ...)")
    api_key = value.get("api_key")
    if api_key is not None and (
        not isinstance(api_key, str) or not api_key.strip() or any(c in api_key for c in _HEADER_UNSAFE)
    ):
        raise ValidationFailed(f"{path}.api_key", "expected a non-empty string without line breaks")
    for field, field_value in value.items():  # all of them end up in headers, query strings or URLs
        if (isinstance(field_value, str) and field != "vertex_ai_credentials"  # JSON text: line breaks are fine
                and any(c < " " or c == "\x7f" for c in field_value)):
            raise ValidationFailed(f"{path}.{field}", "may not contain CR, LF, NUL or other control characters")
    base_url = url_field = None
    for field in URL_FIELDS:
        url = value.get(field)
        if url is None:
            continue
        if not _is_url(url):
            raise ValidationFailed(f"{path}.{field}", "expected an http:// or https:// URL without user info")
        if base_url is None:
            base_url, url_field = url, f"{path}.{field}"
    return Credential(name, api_key, base_url, value, weight, available, exclude, url_field)


def _weight(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or not math.isfinite(value):
        raise ValidationFailed(path, "expected a number > 0")
    return float(value)


def _model_names(value: Any, path: str) -> frozenset[str] | None:
    """A list of model names; absent or empty: no restriction."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationFailed(path, "expected a list of model names")
    return frozenset(value) or None


def _flat(credentials: dict[str, Any], provider: str, provider_id: Any) -> dict[str, Any]:
    """A load-balance entry's credentials: flat provider fields, or `{provider_id: {fields}}`."""
    if not FLAT_FIELDS.isdisjoint(credentials):
        return credentials
    for name, value in credentials.items():
        if isinstance(value, dict) and provider_id(name) == provider:
            return value
    return credentials


# -- the stage -----------------------------------------------------------------------------


class CredentialsStage:
    def __init__(self, context: StageContext) -> None:
        self.models = context.models
        self.cooldowns = context.services.get("cooldowns")
        self.random = random.random
        egress = context.settings.egress
        self.egress = EgressPolicy(egress.allow, egress.deny)
        self.base_urls: dict[str, str] = {p.id: p.base_url for p in context.settings.providers}
        self.providers: dict[str, ProviderDeployments] = {
            p.id: ProviderDeployments(p)
            for p in context.settings.providers
            if p.deployments or p.api_key is not None
        }
        self._provider_ids: dict[str, str | None] = {}
        self.models.on_change(self._provider_ids.clear)  # a provider created through the admin API

    # -- provider ids given by the client (ids or catalog aliases) -------------------------

    def provider_id(self, name: Any) -> str | None:
        if not isinstance(name, str):
            return None
        found = self._provider_ids.get(name, "")
        if found == "":
            found = self.models.provider_id(name)
            if len(self._provider_ids) < 10_000:
                self._provider_ids[name] = found
        return found

    # -- the request's params -----------------------------------------------------------------

    def parse(self, params: GatewayParams) -> RequestCredentials:
        overrides: dict[str, Credential] = {}
        if params.credential_override:
            aliased: dict[str, Credential] = {}
            for slug, fields in params.credential_override.items():
                credential = parse_credential(fields, f"{OVERRIDE}.{slug}", OVERRIDE)
                overrides[slug] = credential
                prefix, slash, rest = slug.partition("/")
                if slash and rest:  # `together/x` also matches provider together_ai's `together_ai/x`
                    provider = self.provider_id(prefix)
                    if provider is not None and provider != prefix:
                        aliased.setdefault(f"{provider}/{rest}", credential)
            for slug, credential in aliased.items():
                overrides.setdefault(slug, credential)
        customer = self.parse_customer(params.customer_credentials) if params.customer_credentials else {}
        api_keys: dict[str, Credential] = {}
        if params.customer_api_keys:
            for model, key in params.customer_api_keys.items():
                if not isinstance(key, str) or not key.strip() or any(c in key for c in _HEADER_UNSAFE):
                    raise ValidationFailed(f"{API_KEYS}.{model}", "expected a non-empty string without line breaks")
                api_keys[model] = Credential(API_KEYS, key, None, {"api_key": key})
        for credential in (*overrides.values(), *(c for cs in customer.values() for c in cs)):
            self.check_url(credential)
        return RequestCredentials(overrides, customer, api_keys)

    def check_url(self, credential: Credential) -> None:
        """The egress policy on the caller's base URL, before any connection (a 422 naming the field)."""
        if credential.base_url is not None and credential.url_field is not None:
            self.egress.check_url(credential.base_url, credential.url_field)

    def parse_customer(self, value: Any) -> dict[str, list[Credential]]:
        out: dict[str, list[Credential]] = {}
        if isinstance(value, list):  # shape B: weighted deployments, each with credentials per provider
            for i, item in enumerate(value):
                path = f"{CUSTOMER}[{i}]"
                if not isinstance(item, dict):
                    raise ValidationFailed(path, "expected an object with `credentials` and `weight`")
                credentials = item.get("credentials")
                if not isinstance(credentials, dict) or not credentials:
                    raise ValidationFailed(f"{path}.credentials", "expected an object {provider_id: {api_key, ...}}")
                weight = _weight(item.get("weight", 1.0), f"{path}.weight")
                available = _model_names(item.get("available_models"), f"{path}.available_models")
                exclude = _model_names(item.get("exclude_models"), f"{path}.exclude_models") or frozenset()
                for name, fields in credentials.items():
                    credential = parse_credential(fields, f"{path}.credentials.{name}", path, weight, available, exclude)
                    provider = self.provider_id(name)
                    if provider is not None:
                        out.setdefault(provider, []).append(credential)
            return out
        if not isinstance(value, dict):
            raise ValidationFailed(CUSTOMER, "expected an object {provider_id: credentials} or a list of weighted deployments")
        exact: set[str] = set()
        for name, entry in value.items():
            path = f"{CUSTOMER}.{name}"
            provider = self.provider_id(name)
            if isinstance(entry, list):  # shape C: a weighted list per provider
                candidates = []
                for i, item in enumerate(entry):
                    item_path = f"{path}[{i}]"
                    if not isinstance(item, dict):
                        raise ValidationFailed(item_path, "expected an object with `credentials` and `weight`")
                    if item.get("credentials") is None:
                        raise ValidationFailed(f"{item_path}.credentials", "required: an object of provider credential fields")
                    candidates.append(parse_credential(
                        item["credentials"], f"{item_path}.credentials", f"{CUSTOMER}.{provider or name}[{i}]",
                        _weight(item.get("weight", 1.0), f"{item_path}.weight"),
                        _model_names(item.get("available_models"), f"{item_path}.available_models"),
                        _model_names(item.get("exclude_models"), f"{item_path}.exclude_models") or frozenset(),
                    ))
            elif isinstance(entry, dict):  # shape A: the provider's fields
                candidates = [parse_credential(entry, path, CUSTOMER)]
            else:
                raise ValidationFailed(path, "expected an object of provider credential fields or a list of weighted credentials")
            if provider is None or not candidates or (provider in exact and name != provider):
                continue  # not a configured provider; or an alias of one the client also named by id
            out[provider] = candidates
            if name == provider:
                exact.add(provider)
        return out

    # -- choosing -----------------------------------------------------------------------------

    def pick(self, candidates: list[Credential], names: tuple[str, ...]) -> Credential | None:
        """Among the candidates that serve the model, one at random in proportion to weight."""
        eligible = [c for c in candidates if c.serves(names)]
        if not eligible:
            return None
        return weighted_choice(eligible, [c.weight for c in eligible], self.random)

    def custom(self, target: Target, credential: Credential) -> Target:
        """The target with the caller's credential: its key (or none) and its base URL (or the provider's)."""
        if credential.base_url:
            return _replace(target, api_key=credential.api_key, base_url=credential.base_url, deployment=credential.name,
                            custom_credential=True, credentials=credential.fields, egress=credential.url_field)
        base_url = self.base_urls.get(target.provider) or target.base_url
        return _replace(target, api_key=credential.api_key, base_url=base_url, deployment=credential.name,
                        custom_credential=True, credentials=credential.fields)

    def configured(self, target: Target) -> list[Target]:
        """Every deployment of the provider that serves the model: healthy ones in weighted random
        order, then cooling ones (soonest back first). Empty: none serves it."""
        provider = self.providers.get(target.provider)
        if provider is None:
            return [target]  # no credential configured (e.g. demo): unchanged
        deployments = provider.eligible(target.model)
        if len(deployments) > 1:
            deployments = self.order(deployments)
        return [self.deployed(target, d) for d in deployments]

    def order(self, deployments: tuple[Deployment, ...]) -> list[Deployment]:
        healthy: list[tuple[float, Deployment]] = []
        cooling: list[tuple[float, Deployment]] = []
        cooldowns = self.cooldowns
        rand = self.random
        for d in deployments:
            until = cooldowns.until(d.key) if cooldowns is not None else 0.0
            if until > 0.0:
                cooling.append((until, d))
            else:  # exponential race: the first to finish is drawn in proportion to its weight
                healthy.append((-math.log(1.0 - rand()) / d.weight, d))
        healthy.sort(key=_first)
        cooling.sort(key=_first)
        return [d for _, d in healthy] + [d for _, d in cooling]

    @staticmethod
    def deployed(target: Target, d: Deployment) -> Target:
        if (target.deployment == d.name and target.api_key == d.api_key and target.base_url == d.base_url
                and not target.custom_credential and target.credentials is None):
            return target  # the model table's target already is this deployment
        return _replace(target, api_key=d.api_key, base_url=d.base_url, deployment=d.name,
                        custom_credential=False, credentials=None)

    def expand(self, target: Target, request: RequestCredentials | None) -> list[Target]:
        """One plan entry -> the entries that carry its credential (several for deployments)."""
        if request is not None:
            requested, model = target.requested, target.model
            slug = f"{target.provider}/{model}"
            if request.overrides:
                credential = (request.overrides.get(requested) or request.overrides.get(slug)
                              or request.overrides.get(model))
                if credential is not None:
                    return [self.custom(target, credential)]
            candidates = request.customer.get(target.provider)
            if candidates:
                credential = self.pick(candidates, (requested, model, slug))
                if credential is not None:
                    return [self.custom(target, credential)]
        if target.credentials:
            fields = _flat(target.credentials, target.provider, self.provider_id)
            credential = parse_credential(fields, f"{LOAD_BALANCE}.credentials", LOAD_BALANCE)
            self.check_url(credential)
            return [self.custom(target, credential)]
        if request is not None and request.api_keys:
            credential = request.api_keys.get(target.requested) or request.api_keys.get(target.model)
            if credential is not None:
                return [self.custom(target, credential)]
        return self.configured(target)

    def plan(self, call: Call) -> None:
        """Set call.plan (every entry with its credential) and call.target = call.plan[0]."""
        started = time.perf_counter()
        plan = call.plan
        if not plan:
            plan = [call.target if call.target is not None else self.models.resolve(call.model)]
        params = call.params
        request = None
        if params.credential_override or params.customer_credentials or params.customer_api_keys:
            request = self.parse(params)
        if len(plan) == 1:
            out = self.expand(plan[0], request)
        else:
            out = []
            for target in plan:
                out.extend(self.expand(target, request))
        if not out:
            first = plan[0]
            raise NotFound(
                f"Requested model {call.model or first.requested or first.model} is not available in the model "
                f"list: no deployment of provider '{first.provider}' serves '{first.model}'"
            )
        call.plan = out
        call.target = out[0]
        call.routing_time += time.perf_counter() - started

    def __call__(self, call: Call, next: Next) -> Awaitable[Reply]:
        self.plan(call)
        return next(call)


def _first(pair: tuple[float, Deployment]) -> float:
    return pair[0]


def create_stage(context: StageContext) -> CredentialsStage:
    if context.options:
        raise ValueError(f"credentials takes no options, got {sorted(context.options)}")
    return CredentialsStage(context)
