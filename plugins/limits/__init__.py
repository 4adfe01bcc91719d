"""The `limits` stage: warn and block thresholds on requests, tokens and cost (spec 3.7 and 5).

Before the upstream call, every policy that applies to the request (its API key, customer,
model, the organization) reserves its amount in one atomic step: one request, and an estimate
of tokens (the prompt's) and cost (the prompt at the model's input price). A counter that would
pass its block threshold refuses, and nothing is reserved anywhere: the client gets a 429 with
`retry_after`, the seconds until that window resets. When the answer finishes (complete, failed,
cut or abandoned) a finish hook replaces the estimates with what was used.

A warn threshold crossed lets the request through and fires an alert once per (policy, scope
value, threshold, window); a block fires one too. Alerts go through the gateway's notifier, in
the background.

Counters live in memory (one process) or Redis (`state.counters`), shared by every worker and
replica. When Redis cannot be reached, each policy decides: `on_backend_error: open` (the
default: admit, log, count) or `closed` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from plugins.limits.admin import admin_routes
from plugins.limits.counters import Charge, Counters, Decision, MemoryCounters, RedisCounters
from plugins.limits.policy import (
    ORGANIZATION,
    Policy,
    counter_key,
    customer_policies,
    key_policies,
    parse_policies,
)
from plugins.limits.store import PolicyStore
from plugins.limits.windows import bounds, seconds_left
from proxy import estimate
from proxy.admin.keys import stored_keys
from proxy.alerts import Alert
from proxy.call import Call, Reply
from proxy.egress import EgressPolicy
from proxy.errors import GatewayError, ModelNotFound, ValidationFailed
from proxy.metrics import Metrics
from proxy.model_table import ModelTable
from proxy.pipeline import Next, StageContext, redis_client

log = logging.getLogger("llmrelay.limits")

BACKEND_DOWN = "limits not checked: the counter backend is unreachable"
WINDOW_MARGIN = 60  # seconds a counter outlives its window, for late reconciliations
REMEMBERED_CUSTOMERS = 100_000  # customers whose budgets this process remembers
RETRY_BACKEND = 1.0  # seconds a failed backend is not asked again
MAX_PLANS = 10_000  # (key, customer, model) combinations whose rules are remembered


class LimitExceeded(GatewayError):
    status = 429


async def _refusal(gate: asyncio.Future[Any]) -> BaseException | None:
    """The gate's refusal, once it is decided (None: admitted)."""
    try:
        await gate
    except Exception as exc:
        return exc
    return None


def _retrieve(gate: asyncio.Future[Any]) -> None:
    """Nobody will await `gate`: its refusal is not an error "never retrieved"."""
    if gate.done():
        if not gate.cancelled():
            gate.exception()
    else:
        gate.add_done_callback(_retrieve)


class Applied:
    """One policy as it applies to one request: its counter, in the window the request arrived
    in, and what was reserved."""

    __slots__ = ("rule", "policy", "scope_value", "charge", "window_start", "window_end", "value")

    def __init__(self, rule: Rule, charge: Charge) -> None:
        self.rule = rule
        self.policy = rule.policy
        self.scope_value = rule.scope_value
        self.charge = charge
        self.window_start = rule.window_start
        self.window_end = rule.window_end
        self.value = 0.0  # the counter after the reservation


class Rule:
    """One policy as it applies to one scope value, with its counter in the current window (worked
    out again when a request arrives after that window's end)."""

    __slots__ = ("policy", "scope_value", "window_start", "window_end", "until", "key", "limit_text", "policy_text",
                 "threshold")

    def __init__(self, policy: Policy, scope_value: str) -> None:
        self.policy = policy
        self.scope_value = scope_value
        # what every request's log and headers say of this policy
        self.threshold = policy.block_threshold if policy.block_threshold is not None else policy.warn_threshold
        self.limit_text = _number(policy.block_threshold or 0.0)
        self.policy_text = f"{policy.name};metric={policy.metric};window={policy.window}"
        self.window_start = 0
        self.window_end: float | None = None
        self.until = -1.0  # the current window is [window_start, until); none yet
        self.key = ""

    def roll(self, now: float) -> None:
        start, end = bounds(self.policy.window, now)
        self.window_start, self.window_end = start, end
        self.until = float("inf") if end is None else end
        self.key = counter_key(self.policy, self.scope_value, start)


class LimitsStage:
    def __init__(self, policies: list[Policy], counters: Counters, models: ModelTable, metrics: Metrics,
                 notifier: Any = None, *, clock: Callable[[], float] = time.time, redis_url: str | None = None,
                 admin: Any = None) -> None:
        self.counters = counters
        self.models = models
        self.metrics = metrics
        self.notifier = notifier
        self.clock = clock
        self._customers: dict[str, list[Policy]] = {}  # budgets from customer_params, newest last
        self._stored_customers: dict[str, dict[str, Any]] = {}  # customer settings from /api/users/
        self._stored_policies: dict[str, list[Policy]] = {}
        # the rules that apply to a (key name, customer, model), worked out on its first request
        # and forgotten whenever a policy or a customer's budget changes
        self._plans: dict[tuple[str | None, str | None, str | None], list[Rule]] = {}
        self._alerted: dict[str, float] = {}  # alert key -> its window's end (dedupe within this process)
        self._down_until = 0.0
        self._last_down_log = 0.0
        self._tasks: set[asyncio.Future[Any]] = set()  # writes and alerts still on their way
        self._fixes: dict[str, Charge] = {}  # reconciliations of this loop turn, merged by counter
        self._fixed: list[tuple[Applied, Charge]] = []  # ... and each request's own, for the warn thresholds
        self.admin = admin
        self.egress = EgressPolicy()  # create_stage sets the config's
        self.configured = policies  # from the config file and its API keys: read-only
        self._created: list[Policy] = []  # created through /api/limits/
        self._managed_keys: list[Policy] = []  # from keys created through /api/temporary-keys/
        self.store = PolicyStore(redis_url, self._on_created)
        self.set_policies(policies)
        metrics.track_sizes("limits", self.sizes)

    def sizes(self) -> dict[str, int]:
        sizes = {"customers": len(self._customers), "alerted": len(self._alerted), "pending": len(self._tasks)}
        if isinstance(self.counters, MemoryCounters):
            sizes["counters"] = len(self.counters)
        return sizes

    def _on_created(self, created: list[Policy]) -> None:
        self._created = created
        self.set_policies([*self.configured, *self._managed_keys, *created])

    def set_key_policies(self, policies: list[Policy]) -> None:
        """The limits of the keys in the admin store (called again on every change there)."""
        self._managed_keys = policies
        self.set_policies([*self.configured, *policies, *self._created])

    def set_stored_customers(self, settings: dict[str, dict[str, Any]]) -> None:
        """Customers' budgets and rate limits set through /api/users/ (called again on every change)."""
        policies: dict[str, list[Policy]] = {}
        for customer, data in settings.items():
            try:
                found = customer_policies(customer, data)
            except ValueError as exc:
                log.warning("customer %s: stored settings not applied: %s", customer, exc)
                continue
            if found:
                policies[customer] = found
        for customer in set(self._stored_customers) | set(settings):  # re-merge with their next request
            if self._stored_customers.get(customer) != settings.get(customer):
                self._customers.pop(customer, None)
        self._stored_customers = settings
        self._stored_policies = policies
        self._plans = {}

    def set_policies(self, policies: list[Policy]) -> None:
        """Index the policies by scope: exact (scope, id) matches, and those for every id."""
        self.policies = [p for p in policies if p.enabled]
        self._exact: dict[tuple[str, str], list[Policy]] = {}
        self._each: dict[str, list[Policy]] = {}
        for p in self.policies:
            if p.scope == "organization" or p.scope_id is None:
                self._each.setdefault(p.scope, []).append(p)
            else:
                self._exact.setdefault((p.scope, p.scope_id), []).append(p)
        self._plans = {}

    # -- the request path --------------------------------------------------------------

    def __call__(self, call: Call, next: Next) -> Awaitable[Reply]:
        if not (self.policies or self._customers or self._stored_policies or call.params.customer_params):
            return next(call)  # nothing to count: the common case costs one test
        matched = self.applicable(call)
        if not matched:
            return next(call)
        return self.counted(call, next, matched)

    async def counted(self, call: Call, next: Next, matched: list[Rule]) -> Reply:
        now = self.clock()
        applied = self.charges(call, matched, now)
        gate = self._reserve(call, applied, now)
        # The stages after this one go on while Redis decides (the cache's lookup shares the write);
        # the first upstream attempt and a cache hit wait for the decision (Call.ready).
        call.hold(gate)
        try:
            reply = await next(call)
        except Exception:
            refusal = await _refusal(gate)  # a refusal answers before any later stage's error
            if refusal is not None:
                raise refusal from None
            raise
        except BaseException:  # cancelled: the client left
            _retrieve(gate)
            raise
        headers = gate.result() if gate.done() else await gate  # decided unless nobody after this asked
        if headers:
            reply.headers.update(headers)
        return reply

    def _decide(self, call: Call, applied: list[Applied], decision: Decision | None,
                now: float) -> dict[str, str] | None:
        """Apply the backend's decision to the request: the log's limit_info, warnings, the
        reconciliation at the finish; returns the x-ratelimit-* headers, raises the refusal."""
        if decision is None:
            return self._unchecked(call, applied)
        call.state["limit_info"] = limit_info(applied, decision)  # the log detail's limit_info
        if not decision.admitted:
            raise self._refuse(call, applied, decision)
        reconciled = False
        for a, value in zip(applied, decision.values, strict=True):
            a.value = value
            policy = a.policy
            warn = policy.warn_threshold
            if warn is not None and value >= warn:
                self.metrics.limit_warnings.labels(policy.scope, policy.metric).inc()
                self._alert("limit.warn", a, warn, value)
            if policy.metric != "requests":
                reconciled = True
        if reconciled:
            call.finish_hooks.append(lambda finished: self._reconcile(finished, applied))
        return rate_limit_headers(applied, now)

    def applicable(self, call: Call) -> list[Rule]:
        params = call.params
        customer = params.customer()
        if customer is not None and params.customer_params:
            self._remember_customer(customer, params.customer_params)
        scope_values = (call.key.name if call.key else None, customer, call.model or None)
        plan = self._plans.get(scope_values)
        if plan is None:
            plan = [Rule(policy, value) for policy, value in self._matching(*scope_values)]
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[scope_values] = plan
        return plan

    def _matching(self, key_name: str | None, customer: str | None, model: str | None) -> list[tuple[Policy, str]]:
        found: list[tuple[Policy, str]] = [(p, ORGANIZATION) for p in self._each.get("organization", ())]
        for scope, value in (("api_key", key_name), ("customer", customer), ("model", model)):
            if value is None:
                continue
            found += [(p, value) for p in self._each.get(scope, ())]
            found += [(p, value) for p in self._exact.get((scope, value), ())]
            if scope == "customer":
                own = self._customers.get(value) or self._stored_policies.get(value) or ()
                found += [(p, value) for p in own]
        return found

    def _remember_customer(self, customer: str, params: dict[str, Any]) -> None:
        stored = self._stored_customers.get(customer)
        if stored:  # what an admin set wins over what the request says
            params = {**params, **stored}
        try:
            policies = customer_policies(customer, params)
        except ValueError as exc:
            field, _, message = str(exc).partition(": ")
            raise ValidationFailed(field, message) from None
        if not policies:
            return
        if self._customers.pop(customer, None) != policies:
            self._plans = {}  # a new budget, or a new customer (which may push the oldest out below)
        self._customers[customer] = policies  # (the newest last)
        if len(self._customers) > REMEMBERED_CUSTOMERS:
            del self._customers[next(iter(self._customers))]

    def charges(self, call: Call, plan: list[Rule], now: float) -> list[Applied]:
        tokens: int | None = None
        cost: float | None = None
        applied = []
        for rule in plan:
            policy = rule.policy
            metric = policy.metric
            if metric == "requests":
                amount = 1.0
            else:
                if tokens is None:
                    tokens = estimate.prompt_tokens(call.body)
                if metric == "tokens":
                    amount = float(tokens)
                else:
                    if cost is None:
                        cost = tokens * self.input_price(call) / 1e6
                    amount = cost * policy.markup
            if not rule.window_start <= now < rule.until:
                rule.roll(now)
            end = rule.window_end
            ttl = int(end - now) + WINDOW_MARGIN if end is not None else 0
            applied.append(Applied(rule, Charge(rule.key, amount, policy.block_threshold, ttl)))
        return applied

    def input_price(self, call: Call) -> float:
        """USD per 1M input tokens of the requested model (0 when unknown: the estimate is then 0)."""
        try:
            target = self.models.resolve(call.model)
        except (ModelNotFound, GatewayError):
            return 0.0
        return target.prices.input if target.prices is not None else 0.0

    def _reserve(self, call: Call, applied: list[Applied], now: float) -> asyncio.Future[dict[str, str] | None]:
        """The reservation, sent now; the gate it returns is decided when the backend answers (at
        once in memory), with the refusal as its exception."""
        gate: asyncio.Future[dict[str, str] | None] = asyncio.get_running_loop().create_future()
        if time.monotonic() < self._down_until:
            self._settle(gate, call, applied, now, None)
            return gate
        answer = self.counters.submit_reserve([a.charge for a in applied])
        if answer.done():
            self._answered(gate, call, applied, now, answer)
        else:
            answer.add_done_callback(functools.partial(self._answered, gate, call, applied, now))
        return gate

    def _answered(self, gate: asyncio.Future[dict[str, str] | None], call: Call, applied: list[Applied], now: float,
                  answer: asyncio.Future[Any]) -> None:
        try:
            decision: Decision | None = self.counters.decision(answer.result())
        except (Exception, asyncio.CancelledError) as exc:  # Redis down or timing out: each policy decides
            self._down_until = time.monotonic() + RETRY_BACKEND
            self._log_down(exc)
            decision = None
        self._settle(gate, call, applied, now, decision)

    def _settle(self, gate: asyncio.Future[dict[str, str] | None], call: Call, applied: list[Applied], now: float,
                decision: Decision | None) -> None:
        try:
            gate.set_result(self._decide(call, applied, decision, now))
        except GatewayError as refusal:
            gate.set_exception(refusal)

    def _unchecked(self, call: Call, applied: list[Applied]) -> None:
        """The backend is unreachable: a policy with on_backend_error closed refuses (503); otherwise
        the request goes through, unchecked, and its log says so."""
        closed = next((a.policy for a in applied if a.policy.on_backend_error == "closed"), None)
        if closed is not None:
            self.metrics.limit_backend_errors.labels("closed").inc()
            raise GatewayError(f"Limits cannot be checked right now (the counter backend is unreachable), and "
                               f"limit '{closed.name}' does not admit unchecked requests", 503)
        self.metrics.limit_backend_errors.labels("open").inc()
        call.warnings.append(BACKEND_DOWN)
        return None

    def _log_down(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_down_log >= 10.0:
            self._last_down_log = now
            log.warning("limit counters unreachable (%s: %s); policies apply on_backend_error",
                        type(exc).__name__, exc)

    def _refuse(self, call: Call, applied: list[Applied], decision: Decision) -> LimitExceeded:
        a = applied[decision.refused_by]
        policy = a.policy
        current = decision.values[decision.refused_by]
        self.metrics.limit_blocks.labels(policy.scope, policy.metric).inc()
        assert policy.block_threshold is not None
        self._alert("limit.block", a, policy.block_threshold, current)
        retry_after = seconds_left(a.window_end, self.clock())
        per = "in total" if policy.window == "lifetime" else f"per {policy.window}"
        scope = "organization" if policy.scope == "organization" else f"{policy.scope.replace('_', ' ')} '{a.scope_value}'"
        error = LimitExceeded(
            f"Limit exceeded: limit '{policy.name}' allows {scope} {_number(policy.block_threshold)} "
            f"{_unit(policy.metric)} {per}; {_number(current)} used",
            retry_after=retry_after,
        )
        if retry_after is not None:
            error.headers["retry-after"] = str(retry_after)
        error.headers.update(rate_limit_headers(applied, self.clock(), values=decision.values))
        return error

    def _reconcile(self, call: Call, applied: list[Applied]) -> None:
        """Replace the token and cost estimates with what the answer used (in the background)."""
        fixes = []
        for a in applied:
            metric = a.policy.metric
            if metric == "requests":
                continue
            used = float(call.usage.total_tokens) if metric == "tokens" else call.cost * a.policy.markup
            charge = a.charge
            delta = used - charge.amount
            if delta:
                fixes.append((a, Charge(charge.key, delta, charge.limit, charge.ttl)))
        if not fixes:
            return
        if isinstance(self.counters, MemoryCounters):  # no I/O: settle it now
            self.counters.add_now([charge for _, charge in fixes])
            self._warn_after(fixes)
            return
        # Sent at the end of this loop turn, merged with the other requests finishing in it: one
        # script call adds each counter's total (requests on one key share their counters).
        merged = self._fixes
        for _, charge in fixes:
            pending = merged.get(charge.key)
            merged[charge.key] = charge if pending is None else Charge(charge.key, pending.amount + charge.amount,
                                                                        charge.limit, pending.ttl)
        if not self._fixed:
            asyncio.get_running_loop().call_soon(self._send_fixes)
        self._fixed += fixes

    def _send_fixes(self) -> None:
        """Send the merged reconciliations; settled when Redis answers, no task, nothing waits on it."""
        charges, fixes = list(self._fixes.values()), self._fixed
        self._fixes, self._fixed = {}, []
        if charges:
            self._track(self.counters.add(charges), functools.partial(self._adjusted, fixes))

    def _adjusted(self, fixes: list[tuple[Applied, Charge]], error: BaseException | None) -> None:
        if error is not None:
            self._log_down(error)
        else:
            self._warn_after(fixes)

    def _warn_after(self, fixes: list[tuple[Applied, Charge]]) -> None:
        for a, charge in fixes:
            warn = a.policy.warn_threshold
            value = a.value + charge.amount  # at least this much: others may have added too
            if warn is not None and a.value < warn <= value:
                self.metrics.limit_warnings.labels(a.policy.scope, a.policy.metric).inc()
                self._alert("limit.warn", a, warn, value)

    # -- alerts ------------------------------------------------------------------------

    def _alert(self, event: str, a: Applied, threshold: float, value: float) -> None:
        policy = a.policy
        if self.notifier is None or policy.notify.empty():
            return
        key = f"{a.charge.key}:{event}:{threshold!r}"
        if key in self._alerted:
            return
        now = self.clock()
        if len(self._alerted) >= 10_000:
            for k in [k for k, end in self._alerted.items() if end <= now]:
                del self._alerted[k]
        self._alerted[key] = a.window_end if a.window_end is not None else float("inf")
        alert = Alert(event=event, policy=policy.name, scope=policy.scope, scope_id=a.scope_value,
                      metric=policy.metric, window=policy.window, threshold=threshold, value=value,
                      window_start=float(a.window_start), window_end=a.window_end, timestamp=now)
        claim = getattr(self.counters, "claim", None)
        if claim is None:
            self.notifier.send(alert, policy.notify)
        else:  # one alert across every process sharing the counters
            self._spawn(self._claim_and_send(claim, key, a.charge.ttl, alert, policy))

    async def _claim_and_send(self, claim: Any, key: str, ttl: int, alert: Alert, policy: Policy) -> None:
        try:
            if not await claim(key, ttl):
                return
        except Exception as exc:  # cannot dedupe across processes: better one alert too many than none
            self._log_down(exc)
        self.notifier.send(alert, policy.notify)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _track(self, pending: Awaitable[Any], then: Callable[[BaseException | None], None]) -> None:
        """Follow a write that is already on its way (shutdown waits for it), then call `then`
        with its error or None."""
        future = asyncio.ensure_future(pending)
        self._tasks.add(future)

        def done(finished: asyncio.Future[Any]) -> None:
            self._tasks.discard(finished)
            then(asyncio.CancelledError() if finished.cancelled() else finished.exception())

        future.add_done_callback(done)

    def routes(self) -> list[Any]:
        return admin_routes(self, self.admin) if self.admin is not None else []

    async def startup(self) -> None:
        await self.store.start()

    async def shutdown(self) -> None:
        await self.store.stop()
        self._send_fixes()
        if self._tasks:  # let reconciliations land before the counters close
            await asyncio.wait(list(self._tasks), timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.counters.close()


def limit_info(applied: list[Applied], decision: Decision) -> dict[str, Any]:
    """What the log detail shows (spec 2.4): each policy's counter before and after this request."""
    limits = []
    admitted = decision.admitted
    for a, value in zip(applied, decision.values, strict=True):
        amount = a.charge.amount
        before, after = (value - amount, value) if admitted else (value, value + amount)
        if a.policy.metric == "cost":  # sums of prices: no float noise (0.30000000000000004) in the log
            before, after = round(before, 10), round(after, 10)
        threshold = a.rule.threshold
        limits.append({"name": a.policy.name, "current_value": before, "new_value": after,
                       "limit_value": threshold, "is_within_limit": threshold is None or after <= threshold})
    return {"is_allowed": admitted, "limits": limits}


def rate_limit_headers(applied: list[Applied], now: float, values: list[float] | None = None) -> dict[str, str]:
    """x-ratelimit-* for the tightest policy with a block threshold: the least budget left, relatively."""
    tightest: Applied | None = None
    least = math.inf
    at = 0.0
    for i, a in enumerate(applied):
        limit = a.policy.block_threshold
        if limit is None:
            continue
        value = values[i] if values is not None else a.value
        share = max(limit - value, 0.0) / limit if limit else 0.0
        if share < least:
            tightest, least, at = a, share, value
    return _headers(tightest, at, now) if tightest is not None else {}


def _headers(a: Applied, value: float, now: float) -> dict[str, str]:
    """x-ratelimit-* for policy `a` (one with a block threshold) at counter value `value`."""
    rule = a.rule
    limit = a.policy.block_threshold or 0.0
    headers = {
        "x-ratelimit-limit": rule.limit_text,
        "x-ratelimit-remaining": _number(max(limit - value, 0.0)),
        "x-ratelimit-policy": rule.policy_text,
    }
    reset = seconds_left(a.window_end, now)
    if reset is not None:
        headers["x-ratelimit-reset"] = str(reset)
    return headers


def _number(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") or "0"


def _unit(metric: str) -> str:
    return {"requests": "requests", "tokens": "tokens", "cost": "USD"}[metric]


def create_stage(context: StageContext) -> LimitsStage:
    options = dict(context.options)
    policies = parse_policies(options.pop("policies", []), "policies")
    if options:
        raise ValueError(f"unknown options {sorted(options)} (limits takes: policies)")
    policies += key_policies(context.settings.keys)
    backend = context.settings.state.counters
    redis_url = backend.url if backend.backend == "redis" else None
    counters: Counters = RedisCounters(redis_client(context, redis_url)) if redis_url else MemoryCounters()
    metrics = context.services.get("metrics") or Metrics()
    stage = LimitsStage(policies, counters, context.models, metrics, context.services.get("notifier"),
                        redis_url=redis_url, admin=context.services.get("admin"))
    # alert URLs set through the admin API are checked like tenant base URLs (proxy/egress.py)
    stage.egress = EgressPolicy(context.settings.egress.allow, context.settings.egress.deny)
    snapshot = context.services.get("snapshot")
    if snapshot is not None:
        snapshot.subscribe("key", lambda objects: stage.set_key_policies(key_policies(stored_keys(objects))))
        snapshot.subscribe("customer", lambda objects: stage.set_stored_customers({o.id: o.data for o in objects.values()}))
    return stage
