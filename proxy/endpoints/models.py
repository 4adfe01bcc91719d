"""Model lists: GET /api/models/public (Respan shape, no auth) and /v1/models (OpenAI list shape)."""

from __future__ import annotations

import time

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.gateway import Gateway


def routes(gateway: Gateway) -> list[Route]:
    created = int(time.time())

    async def public_models(request: Request) -> Response:
        models = gateway.models.public_models()
        if request.query_params.get("unnest") == "true":
            return Response(orjson.dumps(models), media_type="application/json")
        return Response(orjson.dumps({"models": models}), media_type="application/json")

    async def openai_models(request: Request) -> Response:
        data = [
            {"id": m["model_name"], "object": "model", "created": created, "owned_by": m["provider"]["provider_id"]}
            for m in gateway.models.public_models()
        ]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    return [
        Route("/api/models/public", public_models, methods=["GET"]),
        Route("/api/models", openai_models, methods=["GET"]),  # the OpenAI SDK with base_url .../api
        Route("/api/v1/models", openai_models, methods=["GET"]),
        Route("/v1/models", openai_models, methods=["GET"]),
    ]
