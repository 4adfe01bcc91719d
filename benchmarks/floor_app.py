"""The floor: the least a proxy on the gateway's own stack can cost (``run.py --floor``).

A plain ASGI app under granian (ASGI, uvloop, one worker, the single-threaded runtime, the same
core: served exactly like the gateway) that reads the body, swaps the model, POSTs it to the
mock with the gateway's own upstream client (proxy/upstream.py) and relays the answer, streams
chunk by chunk. No auth, stages, logging, metrics or SSE parsing. The gap between this and the
gateway is what the gateway's own code costs; the gap between this and the mock called
directly is granian, the event loop, the kernel's loopback and one upstream hop.

    BENCH_FLOOR_UPSTREAM=http://127.0.0.1:9000/v1/chat/completions \\
        granian --interface asgi --loop uvloop --runtime-mode st --workers 1 --working-dir benchmarks floor_app:app
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.upstream import UpstreamClient  # noqa: E402

UPSTREAM = os.environ.get("BENCH_FLOOR_UPSTREAM", "http://127.0.0.1:9000/v1/chat/completions")
UPSTREAM_MODEL = "gpt-4o-mini"
HEADERS = {"Content-Type": "application/json"}
client = UpstreamClient()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await client.close()
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["method"] == "GET":  # the health check
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
        return
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    body = orjson.loads(raw)
    body["model"] = UPSTREAM_MODEL
    stream = body.get("stream") is True
    if stream:
        body["stream_options"] = {"include_usage": True}
    response = await client.post("mock", UPSTREAM, HEADERS, orjson.dumps(body), connect_timeout=5, read_timeout=60,
                                 stream=stream)
    if not stream:
        data = await response.read()
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]})
        await send({"type": "http.response.body", "body": data})
        return
    await send({"type": "http.response.start", "status": response.status,
                "headers": [(b"content-type", b"text/event-stream")]})
    async for chunk in response.chunks():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
