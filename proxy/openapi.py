"""The OpenAPI 3.1 document of every route the gateway serves, served at GET /openapi.json.

Hand-written: each route's request body, parameters and responses are described here, the gateway
params' schema comes from proxy/params.py (msgspec), and tests/test_openapi.py checks that the
document and the app's routes are the same set and that the document is valid OpenAPI 3.1.
"""

from __future__ import annotations

from typing import Any

import msgspec

from proxy.endpoints import anthropic, chat, embeddings, gemini, responses, vertex
from proxy.params import GatewayParams

Schema = dict[str, Any]
ANY_OBJECT: Schema = {"type": "object"}
GATEWAY = [{"bearer": []}, {"apiKey": []}, {"googApiKey": []}]  # a gateway key
ADMIN = [{"bearer": []}, {"apiKey": []}]  # an admin key
PUBLIC: list[dict[str, list[str]]] = []


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _gateway_params_schemas() -> dict[str, Schema]:
    _, components = msgspec.json.schema_components([GatewayParams], ref_template="#/components/schemas/{name}")
    components["GatewayParams"]["properties"].pop("extra", None)  # internal: unknown respan_params keys
    return components


def _json_body(schema: Schema, required: bool = True) -> Schema:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _json(description: str, schema: Schema | None = None) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema or ANY_OBJECT}}}


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path(name: str, description: str = "") -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1},
            "description": description}


PARAMS_HEADERS = [
    {"name": "X-Data-Respan-Params", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "gateway params: base64 of a JSON object, or the raw JSON object"},
    {"name": "X-Respan-Customer-Identifier", "in": "header", "required": False, "schema": {"type": "string"}},
]
ERRORS = {
    "4XX": _json("A gateway error, `{\"detail\": ...}` (422: `errors` names each field)", _ref("Error")),
    "5XX": _json("The provider's error, passed through, or a gateway error `{\"detail\": ...}`"),
}
NATIVE_ERRORS = {"4XX": _json("An error in the provider's own shape"), "5XX": _json("An error in the provider's own shape")}

# request bodies of the unified router (checked as described in proxy/endpoints/*.py read_call)
MESSAGES: Schema = {"type": "array", "items": ANY_OBJECT, "description": "at most MAX_ITEMS (proxy/endpoints/body.py)"}
CHAT_BODY: Schema = {
    "type": "object",
    "description": "OpenAI chat completion request plus any gateway param (top level or in `respan_params`). "
                   "`messages` may be left out only when a `prompt` is given.",
    "properties": {
        "model": {"type": "string"}, "messages": MESSAGES, "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "respan_params": _ref("GatewayParams"), "keywordsai_params": _ref("GatewayParams"),
        "customer_identifier": {"anyOf": [{"type": "string"}, {"type": "integer"}]}, "metadata": ANY_OBJECT,
    },
    "anyOf": [{"required": ["messages"]}, {"required": ["prompt"]}],
}
EMBEDDINGS_BODY: Schema = {
    "type": "object", "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "input": {"anyOf": [
            {"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}},
            {"type": "array", "minItems": 1, "items": {"type": "integer"}},
            {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": {"type": "integer"}}},
        ]},
        "encoding_format": {"enum": ["float", "base64"]}, "dimensions": {"type": "integer", "minimum": 1},
        "respan_params": _ref("GatewayParams"),
    },
}
RESPONSES_BODY: Schema = {
    "type": "object", "required": ["model"],
    "properties": {"model": {"type": "string", "minLength": 1}, "input": {}, "stream": {"type": "boolean"},
                   "respan_params": _ref("GatewayParams")},
}
ANTHROPIC_BODY: Schema = {
    "type": "object", "required": ["model", "messages"],
    "description": "Anthropic Messages request; gateway params in `metadata.respan_params`",
    "properties": {
        "model": {"type": "string", "minLength": 1}, "messages": MESSAGES, "max_tokens": {"type": "integer"},
        "stream": {"type": "boolean"},
        "metadata": {"type": "object", "properties": {
            "user_id": {"type": "string"}, "respan_params": _ref("GatewayParams"),
            "extra_headers": {"type": "object", "additionalProperties": {"type": "string"}}}},
    },
}
PAGING = [_query("page", {"type": "integer", "minimum": 1}), _query("page_size", {"type": "integer", "minimum": 1})]
LOG_QUERY = [
    _query("start_time", {"type": "string"}, "ISO 8601"), _query("end_time", {"type": "string"}, "ISO 8601"),
    *PAGING, _query("sort_by", {"type": "string"}), _query("operator", {"enum": ["AND", "OR"]}),
    _query("environment", {"type": "string"}), _query("is_test", {"type": "string"}),
    _query("include_fields", {"type": "string"}),
]
MODEL_LIST_QUERY = [*PAGING, _query("all", {"type": "string"}), _query("provider_id", {"type": "string"}),
                    _query("source", {"type": "string"})]

# (path, method) -> (summary, security, request body or None, parameters, responses)
Op = tuple[str, list[dict[str, list[str]]], Schema | None, list[Schema], dict[str, Schema]]


def _ok(description: str = "OK", schema: Schema | None = None) -> dict[str, Schema]:
    return {"200": _json(description, schema), **ERRORS}


def _admin_object(summary: str) -> Schema:
    return _json_body({**ANY_OBJECT, "description": summary})


def operations() -> dict[str, dict[str, Op]]:
    ops: dict[str, dict[str, Op]] = {}

    def add(path: str, method: str, summary: str, security: list[dict[str, list[str]]], body: Schema | None = None,
            params: list[Schema] | None = None, resp: dict[str, Schema] | None = None) -> None:
        ops.setdefault(path, {})[method] = (summary, security, body, params or [], resp or _ok())

    stream_ok = {"200": {"description": "The answer: JSON, or an SSE stream with `stream: true`",
                         "content": {"application/json": {"schema": ANY_OBJECT}, "text/event-stream": {"schema": {"type": "string"}}}},
                 **ERRORS}
    for p in chat.PATHS:
        add(p, "post", "Chat completions (unified router)", GATEWAY, _json_body(CHAT_BODY), PARAMS_HEADERS, stream_ok)
    for p in embeddings.PATHS:
        add(p, "post", "Embeddings", GATEWAY, _json_body(EMBEDDINGS_BODY), PARAMS_HEADERS)
    for p in responses.PATHS:
        add(p, "post", "OpenAI Responses API", GATEWAY, _json_body(RESPONSES_BODY), PARAMS_HEADERS, stream_ok)
    native_ok = {"200": stream_ok["200"], **NATIVE_ERRORS}
    add(anthropic.MESSAGES, "post", "Anthropic Messages passthrough", GATEWAY, _json_body(ANTHROPIC_BODY),
        PARAMS_HEADERS, native_ok)
    add(anthropic.COUNT_TOKENS, "post", "Anthropic count_tokens passthrough", GATEWAY, _json_body(ANTHROPIC_BODY),
        PARAMS_HEADERS, {"200": _json("Token count"), **NATIVE_ERRORS})
    for prefix, name in ((gemini.PREFIX, "Gemini API"), (vertex.PREFIX, "Vertex AI")):
        add(prefix + "{rest}", "post", f"{name} passthrough (`.../models/{{model}}:generateContent` and friends)",
            GATEWAY, _json_body(ANY_OBJECT), [_path("rest"), _query("alt", {"type": "string"}), *PARAMS_HEADERS],
            native_ok)

    models = {"type": "object", "properties": {"object": {"const": "list"}, "data": {"type": "array"}}}
    add("/api/models/public", "get", "Public model list (Respan shape)", PUBLIC,
        params=[_query("unnest", {"type": "string"}, "`true`: a bare array")])
    for p in ("/api/models", "/api/v1/models", "/v1/models"):
        add(p, "get", "Model list (OpenAI shape)", PUBLIC, resp=_ok("Models", models))
    for p in ("/api/health-check/", "/api/health-check"):
        add(p, "get", "Liveness", PUBLIC)
    for p in ("/api/ready/", "/api/ready"):
        add(p, "get", "Readiness (503 naming what fails)", PUBLIC,
            resp={"200": _json("Ready"), "503": _json("Not ready, or stopping")})
    add("/metrics", "get", "Prometheus metrics", PUBLIC,
        resp={"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    add("/openapi.json", "get", "This document", PUBLIC)

    # log ingestion and query (proxy/logs/api.py): gateway keys
    for p in ("/api/request-logs/", "/api/request-logs/create/", "/api/request-logs/create"):
        add(p, "post", "Ingest a request log (or an array of them)", GATEWAY,
            _json_body({"anyOf": [ANY_OBJECT, {"type": "array", "items": ANY_OBJECT}]}))
    for p in ("/api/v1/traces/ingest", "/api/v1/traces/ingest/", "/api/traces/ingest/", "/api/traces/ingest"):
        add(p, "post", "Ingest traces / logs (LiteLLM exporters)", GATEWAY,
            _json_body({"anyOf": [ANY_OBJECT, {"type": "array", "items": ANY_OBJECT}]}))
    for p, summary in (("/api/request-logs/list/", "List logs"), ("/api/request-logs/summary/", "Summarize logs"),
                       ("/api/dashboard/stats/", "Dashboard statistics")):
        add(p, "get", summary, GATEWAY, params=LOG_QUERY)
        add(p, "post", summary + " (filters in the body)", GATEWAY, _json_body(ANY_OBJECT, False), LOG_QUERY)
    add("/api/request-logs/batch-update/", "patch", "Update several logs", GATEWAY, _admin_object("{logs: [...]}"))
    add("/api/request-logs/{unique_id}/", "get", "One log", GATEWAY, params=[_path("unique_id")])
    add("/api/request-logs/{unique_id}/", "patch", "Update one log", GATEWAY, _json_body(ANY_OBJECT), [_path("unique_id")])
    add("/api/users/", "get", "List customers", GATEWAY, params=LOG_QUERY)
    add("/api/users/list/", "get", "List customers", GATEWAY, params=LOG_QUERY)
    add("/api/users/list/", "post", "List customers (filters in the body)", GATEWAY, _json_body(ANY_OBJECT, False), LOG_QUERY)
    add("/api/users/{customer_identifier}/", "get", "One customer", GATEWAY, params=[_path("customer_identifier")])
    add("/api/users/{customer_identifier}/", "patch", "Update a customer's budget and limits", ADMIN,
        _json_body(ANY_OBJECT), [_path("customer_identifier")])
    add("/api/users/{customer_identifier}/", "delete", "Delete a customer's settings", ADMIN,
        params=[_path("customer_identifier")])

    # admin API (proxy/admin/, plugins/*/admin.py, plugins/prompts/api.py): admin keys
    def collection(base: str, item: str, name: str, methods: tuple[str, ...] = ("get", "patch", "delete"),
                   item_params: list[Schema] | None = None) -> None:
        params = item_params or [_path(item.strip("{}/").split("/")[-1])]
        add(base, "get", f"List {name}s", ADMIN, params=PAGING)
        add(base, "post", f"Create a {name}", ADMIN, _admin_object(name))
        for m in methods:
            body = _json_body(ANY_OBJECT) if m in ("patch", "put") else None
            add(base + item, m, {"get": "Get", "patch": "Update", "put": "Replace", "delete": "Delete"}[m] + f" a {name}",
                ADMIN, body, params)

    collection("/api/temporary-keys/", "{id}/", "gateway key")
    collection("/api/providers/", "{provider_id}/", "provider", ("get", "patch", "put", "delete"))
    collection("/api/models/", "{model_name}/", "model", ("get", "patch", "put", "delete"))
    ops["/api/models/"]["get"] = ("List models", ADMIN, None, MODEL_LIST_QUERY, _ok())
    add("/api/models/list/", "post", "List models (filters in the body)", ADMIN, _json_body(ANY_OBJECT, False),
        MODEL_LIST_QUERY)
    add("/api/models/summary/", "get", "Models summary", ADMIN)
    add("/api/models/summary/", "post", "Models summary", ADMIN, _json_body(ANY_OBJECT, False))
    collection("/api/prompts/", "{prompt_id}/", "prompt")
    add("/api/prompts/list/", "post", "List prompts (filters in the body)", ADMIN, _json_body(ANY_OBJECT, False), PAGING)
    add("/api/prompts/summary/", "post", "Prompts summary", ADMIN, _json_body(ANY_OBJECT, False))
    pid = [_path("prompt_id")]
    add("/api/prompts/{prompt_id}/versions/", "get", "List a prompt's versions", ADMIN, params=[*pid, *PAGING])
    add("/api/prompts/{prompt_id}/versions/", "post", "Create a prompt version", ADMIN, _json_body(ANY_OBJECT), pid)
    version = [*pid, _path("version", "a version number")]
    add("/api/prompts/{prompt_id}/versions/{version}/", "get", "One prompt version", ADMIN, params=version)
    add("/api/prompts/{prompt_id}/versions/{version}/", "patch", "Update a prompt version", ADMIN,
        _json_body(ANY_OBJECT), version)
    add("/api/prompts/{prompt_id}/versions/{version}/", "delete", "Delete a prompt version", ADMIN, params=version)
    add("/api/prompts/{prompt_id}/commits/", "post", "Commit a prompt's draft", ADMIN, _json_body(ANY_OBJECT, False), pid)
    add("/api/prompts/{prompt_id}/deployments/", "post", "Deploy a prompt version", ADMIN, _json_body(ANY_OBJECT), pid)

    name = [_path("name")]
    add("/api/limits/", "get", "List limit policies", ADMIN)
    add("/api/limits/", "post", "Create a limit policy", ADMIN, _admin_object("limit policy"))
    add("/api/limits/{name}/", "get", "One limit policy", ADMIN, params=name)
    add("/api/limits/{name}/", "patch", "Update a limit policy", ADMIN, _json_body(ANY_OBJECT), name)
    add("/api/limits/{name}/", "delete", "Delete a limit policy", ADMIN, params=name)
    add("/api/limits/{name}/usage/", "get", "A limit policy's usage", ADMIN,
        params=[*name, _query("scope_id", {"type": "string"})])
    add("/api/caches/", "post", "List cache entries", ADMIN, _json_body(ANY_OBJECT, False))
    add("/api/caches/summary/", "get", "Cache summary", ADMIN)
    add("/api/caches/summary/", "post", "Cache summary", ADMIN, _json_body(ANY_OBJECT, False))
    add("/api/cache/{id}/", "get", "One cache entry", ADMIN, params=[_path("id")])
    add("/api/caches/bulk/", "delete", "Delete cache entries", ADMIN, _json_body(ANY_OBJECT, False))
    for p in ("/api/admin/reload", "/api/admin/reload/"):
        add(p, "post", "Check the config file and reload the workers", ADMIN,
            resp={"202": _json("Reloading"), **ERRORS})
    for p in ("/dashboard", "/dashboard/"):
        add(p, "get", "The dashboard page", PUBLIC,
            resp={"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}})
    add("/dashboard/static/{name}", "get", "A dashboard asset", PUBLIC, params=[_path("name")],
        resp={"200": {"description": "The asset"}, **ERRORS})
    return ops


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, methods in operations().items():
        item = paths.setdefault(path, {})
        for method, (summary, security, body, params, resp) in methods.items():
            op: dict[str, Any] = {"summary": summary, "operationId": f"{method}_{path}", "security": security,
                                  "responses": resp}
            if params:
                op["parameters"] = params
            if body is not None:
                op["requestBody"] = body
            item[method] = op
    schemas = _gateway_params_schemas()
    schemas["Error"] = {"type": "object", "required": ["detail"], "properties": {
        "detail": {"type": "string"},
        "errors": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "llmrelay", "version": "0.1.0",
                 "description": "A self-hosted LLM gateway: the Respan-compatible API (see README.md)."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "googApiKey": {"type": "apiKey", "in": "header", "name": "x-goog-api-key"},
            },
        },
    }
