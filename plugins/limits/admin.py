"""Limit policies over the admin API (behind the admin key).

- `GET /api/limits/`: every policy in force, each with its `source`: `config` (the stage's
  options), `key` (an API key's rate_limit / spending_limit / max_usage) or `admin`.
- `POST /api/limits/`: create a policy (the fields of spec 5.2); 400 naming the field when
  invalid, 409 when the name is taken.
- `GET /api/limits/{name}/`, `PATCH /api/limits/{name}/` (fields to change), `DELETE
  /api/limits/{name}/` (204). Policies from the config file or keys are read-only: 403.
- `GET /api/limits/{name}/usage/?scope_id=...`: the counter of the current window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plugins.limits.policy import ORGANIZATION, counter_key, parse_policy
from plugins.limits.windows import bounds
from proxy.admin import AdminGuard, error_response, json_response, read_json, read_object
from proxy.alerts import _origin
from proxy.egress import EgressPolicy

if TYPE_CHECKING:
    from plugins.limits import LimitsStage


def check_alert_urls(policy: Any, egress: EgressPolicy) -> None:
    """Alert URLs set through the admin API get the egress policy of tenant base URLs (a ValueError
    naming the field; the config file's policies are the operator's and not checked)."""
    urls = [(f"notify.slack_webhook_urls[{i}]", u) for i, u in enumerate(policy.notify.slack_webhook_urls)]
    urls += [(f"notify.webhooks[{i}].url", w.url) for i, w in enumerate(policy.notify.webhooks)]
    for field, url in urls:
        reason = egress.url_reason(url)
        if reason is not None:
            raise ValueError(f"{field}: {reason}")


def admin_routes(stage: LimitsStage, guard: AdminGuard) -> list[Route]:
    def find(name: str) -> tuple[Any, str] | None:
        if name in stage.store.policies:
            return stage.store.policies[name], "admin"
        for policy in stage.configured:
            if policy.name == name:
                return policy, "key" if policy.name.startswith("key.") else "config"
        return None

    def shown(policy: Any, source: str) -> dict[str, Any]:
        data = {**msgspec.to_builtins(policy), "source": source}
        # Slack URLs, webhook URLs and signing secrets are credentials: shown as origins and <hidden>
        notify = data.get("notify") or {}
        notify["slack_webhook_urls"] = [f"{_origin(u)}/<hidden>" for u in notify.get("slack_webhook_urls", [])]
        notify["webhooks"] = [{"url": f"{_origin(w['url'])}/<hidden>", "secret": "<hidden>"}
                              for w in notify.get("webhooks", [])]
        return data

    async def list_policies(request: Request) -> Response:
        rows = [shown(p, "key" if p.name.startswith("key.") else "config") for p in stage.configured]
        rows += [shown(p, "admin") for p in stage.store.policies.values()]
        return json_response({"count": len(rows), "results": rows})

    async def create(request: Request) -> Response:
        body, refused = await read_json(request)
        if refused is not None:
            return refused
        try:
            policy = parse_policy(body)
            check_alert_urls(policy, stage.egress)
        except ValueError as exc:
            return error_response(str(exc), 400)
        if find(policy.name) is not None:
            return error_response(f"A limit policy named {policy.name!r} already exists", 409)
        await stage.store.put(policy)
        return json_response(shown(policy, "admin"), 201)

    async def detail(request: Request) -> Response:
        found = find(request.path_params["name"])
        if found is None:
            return error_response(f"No limit policy named {request.path_params['name']!r}", 404)
        return json_response(shown(*found))

    def editable(name: str, verb: str) -> tuple[Any, Response | None]:
        """An admin-created policy, or the 404/403 to answer."""
        found = find(name)
        if found is None:
            return None, error_response(f"No limit policy named {name!r}", 404)
        if found[1] != "admin":
            return None, error_response(f"Limit policy {name!r} comes from the config file and cannot be {verb} here",
                                        403)
        return found[0], None

    async def update(request: Request) -> Response:
        name = request.path_params["name"]
        current, refused = editable(name, "changed")
        if refused is None:
            body, refused = await read_object(request)
        if refused is not None:
            return refused
        if body.get("name", name) != name:
            return error_response("name: a policy cannot be renamed; create a new one", 400)
        try:
            policy = parse_policy({**msgspec.to_builtins(current), **body})
            check_alert_urls(policy, stage.egress)
        except ValueError as exc:
            return error_response(str(exc), 400)
        await stage.store.put(policy)
        return json_response(shown(policy, "admin"))

    async def delete(request: Request) -> Response:
        name = request.path_params["name"]
        _, refused = editable(name, "deleted")
        if refused is not None:
            return refused
        await stage.store.delete(name)
        return Response(status_code=204)

    async def usage(request: Request) -> Response:
        name = request.path_params["name"]
        found = find(name)
        if found is None:
            return error_response(f"No limit policy named {name!r}", 404)
        policy = found[0]
        scope_id = policy.scope_id or request.query_params.get("scope_id")
        if policy.scope == "organization":
            scope_id = ORGANIZATION
        if not scope_id:
            return error_response(f"scope_id: policy {name!r} applies to each {policy.scope} separately; "
                                  "say which one", 400)
        start, end = bounds(policy.window, stage.clock())
        value = await stage.counters.value(counter_key(policy, scope_id, start))
        limit = policy.block_threshold
        return json_response({"policy": name, "scope": policy.scope, "scope_id": scope_id, "metric": policy.metric,
                              "window": policy.window, "window_start": start, "window_end": end, "value": value,
                              "warn_threshold": policy.warn_threshold, "block_threshold": limit,
                              "remaining": None if limit is None else max(limit - value, 0.0)})

    return [
        Route("/api/limits/", guard(list_policies), methods=["GET"]),
        Route("/api/limits/", guard(create), methods=["POST"]),
        Route("/api/limits/{name}/", guard(detail), methods=["GET"]),
        Route("/api/limits/{name}/", guard(update), methods=["PATCH"]),
        Route("/api/limits/{name}/", guard(delete), methods=["DELETE"]),
        Route("/api/limits/{name}/usage/", guard(usage), methods=["GET"]),
    ]
