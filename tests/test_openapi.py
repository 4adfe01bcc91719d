"""GET /openapi.json: valid OpenAPI 3.1, and the same set of (method, path) as the routes the app serves."""

from __future__ import annotations

import re

import httpx
from openapi_spec_validator import validate
from starlette.routing import Mount, Route

from proxy import openapi
from proxy.app import build_app
from proxy.settings import embedded_defaults, parse_settings
from tests.conftest import GatewayProcess

METHODS = {"get", "post", "put", "patch", "delete"}


def served() -> set[tuple[str, str]]:
    """Every (method, path template) the app serves: the Starlette routes (HEAD left out: GET's twin) and
    the fast POST routes, exact and by prefix."""
    app = build_app(parse_settings(embedded_defaults(), "test"))
    found: set[tuple[str, str]] = set()

    def walk(routes: list, prefix: str = "") -> None:
        for route in routes:
            if isinstance(route, Mount):
                walk(route.routes, prefix + route.path)
            elif isinstance(route, Route):
                path = re.sub(r"\{(\w+):\w+\}", r"{\1}", prefix + route.path)
                found.update((m.lower(), path) for m in route.methods or () if m.lower() in METHODS)

    walk(app.starlette.routes)
    found.update(("post", path) for path in app.fast_routes)
    found.update(("post", prefix + "{rest}") for prefix, _ in app.prefix_routes)
    return found


def documented(doc: dict) -> set[tuple[str, str]]:
    return {(m, path) for path, item in doc["paths"].items() for m in item if m in METHODS}


def test_every_route_is_documented_and_nothing_else() -> None:
    routes, doc = served(), documented(openapi.document())
    assert routes - doc == set(), "served but not in the OpenAPI document"
    assert doc - routes == set(), "in the OpenAPI document but not served"
    assert len(routes) > 90


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_served_without_a_key(gateway: GatewayProcess) -> None:
    r = httpx.get(f"{gateway.url}/openapi.json", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == openapi.document()
    validate(r.json())
