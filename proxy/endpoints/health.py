"""GET /api/health-check/ (no auth) and GET /metrics (Prometheus)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.gateway import Gateway


def routes(gateway: Gateway) -> list[Route]:
    async def health(request: Request) -> Response:
        return JSONResponse({"message": "ok"})

    async def metrics(request: Request) -> Response:
        gateway.metrics.log_queue_depth.set(gateway.logs.depth)
        body, content_type = gateway.metrics.render()
        return Response(body, media_type=content_type)

    return [
        Route("/api/health-check/", health, methods=["GET"]),
        Route("/api/health-check", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
