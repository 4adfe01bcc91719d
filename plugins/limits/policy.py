"""Limit policies (spec 5.2): what is counted, over which window, and where it warns or blocks.

Policies come from three places and are all the same thing once built: the stage's options
(config), API keys' `rate_limit` / `spending_limit` / `max_usage`, and the budgets a request's
`customer_params` carries (spec 3.7).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import msgspec

from plugins.limits.windows import WINDOWS, Window
from proxy.alerts import Notify
from proxy.settings import ApiKey

Scope = Literal["api_key", "customer", "model", "organization"]
Metric = Literal["requests", "tokens", "cost"]
ORGANIZATION = "organization"  # the organization scope has one counter: this is its scope value
BUDGET_WINDOWS = {"daily": "day", "weekly": "week", "monthly": "month", "yearly": "year"}


class Policy(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    name: str
    scope: Scope
    scope_id: str | None = None  # one api key / customer / model; None: each one separately
    metric: Metric
    window: Window
    warn_threshold: float | None = None
    block_threshold: float | None = None
    notify: Notify = msgspec.field(default_factory=Notify)
    on_backend_error: Literal["open", "closed"] = "open"  # Redis unreachable: admit (and log) or 503
    enabled: bool = True
    markup: float = 1.0  # cost counted x markup (a customer's markup_percentage)

    def check(self) -> None:
        """Rules types cannot say; raises ValueError naming the field."""
        if not self.name or ":" in self.name:
            raise ValueError("name: expected a non-empty name without ':'")
        if self.warn_threshold is None and self.block_threshold is None:
            raise ValueError(f"policy {self.name!r}: set warn_threshold, block_threshold or both")
        for field in ("warn_threshold", "block_threshold"):
            value = getattr(self, field)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"policy {self.name!r}: {field}: expected a number > 0, got {value}")
        if (self.warn_threshold is not None and self.block_threshold is not None
                and self.warn_threshold >= self.block_threshold):
            raise ValueError(f"policy {self.name!r}: warn_threshold must be below block_threshold")
        if self.scope == "organization" and self.scope_id is not None:
            raise ValueError(f"policy {self.name!r}: scope_id: the organization scope takes none")


def counter_key(policy: Policy, scope_value: str, window_start: int) -> str:
    """The counter of one policy, for one scope value, in one window."""
    return f"{policy.name}:{policy.scope}:{scope_value}:{policy.window}:{window_start}"


def parse_policies(raw: Any, where: str = "policies") -> list[Policy]:
    if not isinstance(raw, list):
        raise ValueError(f"{where}: expected a list of policies")
    policies = [parse_policy(item, f"{where}[{i}]") for i, item in enumerate(raw)]
    names = [p.name for p in policies]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"{where}[{i}].name: duplicate policy name {name!r}")
    return policies


def parse_policy(raw: Any, where: str = "policy") -> Policy:
    try:
        policy = msgspec.convert(raw, Policy, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if " - at `$" in message:
            message, _, at = message.rpartition(" - at `$")
            raise ValueError(f"{where}{at.rstrip('`')}: {message}") from None
        raise ValueError(f"{where}: {message}") from None
    try:
        policy.check()
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return policy


def key_policies(keys: list[ApiKey]) -> list[Policy]:
    """An API key's rate_limit (requests a minute), spending_limit (lifetime USD) and max_usage
    (lifetime requests) as block policies on that key."""
    policies = []
    for k in keys:
        for suffix, metric, window, threshold in (("rate_limit", "requests", "minute", k.rate_limit),
                                                  ("spending_limit", "cost", "lifetime", k.spending_limit),
                                                  ("max_usage", "requests", "lifetime", k.max_usage)):
            if threshold is not None and threshold >= 0:
                policies.append(Policy(name=f"key.{k.name}.{suffix}", scope="api_key", scope_id=k.name, metric=metric,
                                       window=window, block_threshold=float(threshold)))
    return policies


def customer_policies(customer: str, params: dict[str, Any]) -> list[Policy]:
    """A customer's period_budget / total_budget (USD, markup included) and rate_limit (requests a
    minute), from `customer_params` (spec 3.7). Malformed values raise ValueError naming the field."""
    markup = 1.0
    if params.get("markup_percentage") is not None:
        markup = 1.0 + _number(params, "markup_percentage", minimum=0.0) / 100.0
    policies = []
    if params.get("period_budget") is not None:
        duration = params.get("budget_duration") or "monthly"
        window = BUDGET_WINDOWS.get(duration) if isinstance(duration, str) else None
        if window is None:
            raise ValueError(f"customer_params.budget_duration: expected one of {', '.join(BUDGET_WINDOWS)}, "
                             f"got {duration!r}")
        policies.append(Policy(name="customer.period_budget", scope="customer", scope_id=customer, metric="cost",
                               window=window, block_threshold=_number(params, "period_budget"), markup=markup))
    if params.get("total_budget") is not None:
        policies.append(Policy(name="customer.total_budget", scope="customer", scope_id=customer, metric="cost",
                               window="lifetime", block_threshold=_number(params, "total_budget"), markup=markup))
    if params.get("rate_limit") is not None:
        policies.append(Policy(name="customer.rate_limit", scope="customer", scope_id=customer, metric="requests",
                               window="minute", block_threshold=_number(params, "rate_limit")))
    return policies


def _number(params: dict[str, Any], field: str, minimum: float = 0.0) -> float:
    value = params[field]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"customer_params.{field}: expected a number >= {minimum:g}, got {value!r}")
    return float(value)


__all__ = ["WINDOWS", "Policy", "counter_key", "customer_policies", "key_policies", "parse_policies", "parse_policy"]
