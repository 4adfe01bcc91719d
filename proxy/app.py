"""build_app(settings) -> the Starlette app: routes and lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy import dashboard, reload, scheduling
from proxy.endpoints import anthropic, chat, embeddings, gemini, health, models, responses, vertex
from proxy.gateway import Gateway
from proxy.metrics import Metrics, mark_worker_dead
from proxy.settings import Settings
from proxy.store import StoreUnavailable

CONFIG_ENV = reload.CONFIG_ENV  # the CLI passes the config path (and its checked text) to granian workers
GC_THRESHOLDS = (50_000, 20, 100)
log = logging.getLogger("llmrelay")


class App:
    """The ASGI app: the API's POST routes go straight to their handlers (exact paths first, then
    path prefixes such as the Gemini passthrough's); the rest to Starlette."""

    def __init__(self, gateway: Gateway, starlette: Starlette, fast_routes: dict[str, ASGIApp],
                 prefix_routes: dict[str, ASGIApp] | None = None) -> None:
        self.gateway = gateway
        self.starlette = starlette
        self.fast_routes = fast_routes
        self.prefix_routes = tuple((prefix_routes or {}).items())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            handler = self.fast_routes.get(path)
            if handler is None:
                handler = next((app for prefix, app in self.prefix_routes if path.startswith(prefix)), None)
            if handler is not None:
                await handler(scope, receive, send)
                return
        await self.starlette(scope, receive, send)


def build_app(settings: Settings, *, metrics: Metrics | None = None, loaded: reload.LoadedConfig | None = None,
              started: float | None = None) -> App:
    """`loaded`: the config as the worker loaded it (its hash and time, for /metrics); `started`:
    when the worker began building (time.monotonic()), for the line that says it is up."""
    gateway = Gateway(settings, metrics=metrics)
    if loaded is None:
        loaded = reload.LoadedConfig(settings, reload.fingerprint(msgspec.json.encode(settings).decode()), time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        watch_shutdown_signals(gateway)
        gateway.metrics.set_config(loaded.sha256, loaded.loaded_at)
        if started is not None:
            log.info("worker %d serving %s (sha256 %s), up in %.2f s", os.getpid(), settings.source, loaded.sha256,
                     time.monotonic() - started)
        # Everything built at start-up (modules, config, catalog, clients) lives as long as the
        # process: keep it out of the garbage collector's full passes, which otherwise rescan it
        # every few hundred requests.
        gc.freeze()
        # A request allocates hundreds of objects, nearly all freed by reference counting: at the
        # default threshold (700) the collector ran every request or two, and with many requests
        # in flight each pass walked all of their live objects. Median CPU per request over three
        # alternating runs, full pipeline: c=16 409 -> 353 us, c=64 354 -> 309 us.
        gc.set_threshold(GC_THRESHOLDS[0], GC_THRESHOLDS[1], GC_THRESHOLDS[2])
        try:
            yield
        finally:
            await gateway.stop(settings.server.shutdown_timeout)
            mark_worker_dead(os.getpid())  # its live gauges (in flight, config) leave /metrics with it

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"detail": "Not found."}, 404)

    async def store_unavailable(request: Request, exc: Exception) -> Response:
        return JSONResponse({"detail": f"{exc}; try again"}, 503)

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return JSONResponse({"detail": f'Method "{request.method}" not allowed.'}, 405)

    chat_completions = chat.ChatCompletions(gateway)
    # Declared to Starlette too, so that other methods get a 405; POSTs never get that far.
    embeddings_app = embeddings.Embeddings(gateway)
    fast_routes: dict[str, ASGIApp] = {path: chat_completions for path in chat.PATHS}
    fast_routes.update({path: embeddings_app for path in embeddings.PATHS})
    anthropic_app = anthropic.AnthropicPassthrough(gateway)
    fast_routes.update({path: anthropic_app for path in anthropic.PATHS})
    responses_app = responses.Responses(gateway)
    fast_routes.update({path: responses_app for path in responses.PATHS})
    prefix_routes: dict[str, ASGIApp] = {gemini.PREFIX: gemini.GeminiPassthrough(gateway),
                                         vertex.PREFIX: vertex.VertexPassthrough(gateway)}
    post_routes = [Route(path, handler, methods=["POST"]) for path, handler in fast_routes.items()]
    post_routes += [Route(prefix + "{rest:path}", handler, methods=["POST"]) for prefix, handler in prefix_routes.items()]
    starlette = Starlette(
        routes=[*post_routes, *models.routes(gateway), *health.routes(gateway), *gateway.admin_routes(),
                *reload.routes(gateway), *dashboard.routes()],
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: method_not_allowed, StoreUnavailable: store_unavailable},
    )
    return App(gateway, starlette, fast_routes, prefix_routes)


def watch_shutdown_signals(gateway: Gateway) -> None:
    """Start the stream deadline when the server is told to stop.

    granian handles SIGTERM/SIGINT through the event loop's signal wakeup fd; a Python-level
    handler installed here runs as well, without taking that away from granian.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # in-process test servers: no signals to watch
    loop = asyncio.get_running_loop()

    def on_signal(signum: int, frame: object) -> None:
        loop.call_soon_threadsafe(gateway.begin_shutdown)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def create_app() -> App:
    """Factory for granian workers: the config comes from the environment (reload.worker_config)."""
    started = time.monotonic()
    logging.basicConfig(level=os.environ.get("LLMRELAY_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    loaded = reload.worker_config()
    scheduling.apply(loaded.settings.server.scheduling)  # before granian starts this worker's threads
    return build_app(loaded.settings, loaded=loaded, started=started)
