"""GET /api/health-check/ (liveness, no auth), GET /api/ready/ (readiness, no auth), GET /metrics
(Prometheus) and GET /openapi.json (the OpenAPI document, no auth)."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import openapi
from proxy.gateway import Gateway
from proxy.readiness import Readiness


def routes(gateway: Gateway) -> list[Route]:
    readiness = Readiness(gateway)

    async def health(request: Request) -> Response:
        return JSONResponse({"message": "ok"})

    async def ready(request: Request) -> Response:
        status, body = await readiness.result()
        return JSONResponse(body, status, headers={"Cache-Control": "no-store"})

    async def metrics(request: Request) -> Response:
        gateway.metrics.log_queue_depth.set(gateway.logs.depth)
        body, content_type = gateway.metrics.render()
        return Response(body, media_type=content_type)

    spec = orjson.dumps(openapi.document())

    async def openapi_json(request: Request) -> Response:
        return Response(spec, media_type="application/json")

    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/api/health-check/", health, methods=["GET"]),
        Route("/api/health-check", health, methods=["GET"]),
        Route("/api/ready/", ready, methods=["GET"]),
        Route("/api/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
