"""build_app(settings) -> the Starlette app: routes and lifespan."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.endpoints import chat, health, models
from proxy.gateway import Gateway
from proxy.metrics import Metrics
from proxy.settings import Settings, load_settings

CONFIG_ENV = "LLMRELAY_CONFIG"  # the CLI passes the config path to granian workers through this


def build_app(settings: Settings, *, metrics: Metrics | None = None) -> Starlette:
    gateway = Gateway(settings, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop(settings.server.shutdown_timeout)

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"detail": "Not found."}, 404)

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return JSONResponse({"detail": f'Method "{request.method}" not allowed.'}, 405)

    app = Starlette(
        routes=[*chat.routes(gateway), *models.routes(gateway), *health.routes(gateway)],
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: method_not_allowed},
    )
    app.state.gateway = gateway
    return app


def create_app() -> Starlette:
    """Factory for granian workers: the config path comes from the environment."""
    logging.basicConfig(level=os.environ.get("LLMRELAY_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    return build_app(load_settings(os.environ.get(CONFIG_ENV) or None))
