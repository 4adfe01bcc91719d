"""The floor: the least a Starlette + aiohttp proxy can cost under granian (``run.py --floor``).

Reads the body, swaps the model, POSTs it to the mock with aiohttp, relays the answer (streams
chunk by chunk with StreamingResponse). No auth, logging, metrics or SSE parsing. Served exactly
like the gateway (granian, ASGI, uvloop, one worker, same core), the gap between this and the
gateway is what the gateway's own code costs.

    BENCH_FLOOR_UPSTREAM=http://127.0.0.1:9000/v1/chat/completions \\
        granian --interface asgi --loop uvloop --workers 1 --working-dir benchmarks floor_app:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aiohttp
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM = os.environ.get("BENCH_FLOOR_UPSTREAM", "http://127.0.0.1:9000/v1/chat/completions")
UPSTREAM_MODEL = "gpt-4o-mini"
_session: aiohttp.ClientSession | None = None


def session() -> aiohttp.ClientSession:
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(skip_auto_headers=("Accept-Encoding", "User-Agent"))
    return _session


async def chat_completions(request: Request) -> Response:
    body = orjson.loads(await request.body())
    body["model"] = UPSTREAM_MODEL
    stream = body.get("stream") is True
    if stream:
        body["stream_options"] = {"include_usage": True}
    upstream = await session().post(
        UPSTREAM, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
    )
    if not stream:
        data = await upstream.read()
        upstream.release()
        return Response(data, upstream.status, media_type="application/json")

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
        finally:
            upstream.release()

    return StreamingResponse(relay(), upstream.status, media_type="text/event-stream")


async def health(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


app = Starlette(
    routes=[
        Route("/api/chat/completions", chat_completions, methods=["POST"]),
        Route("/api/health-check/", health, methods=["GET"]),
    ]
)
