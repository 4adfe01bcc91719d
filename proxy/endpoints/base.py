"""The ASGI plumbing every API endpoint shares: plain ASGI apps on the hot path, with no
Request/Response objects and no middleware between granian and the Gateway (about 40 us of CPU
per request less than a Starlette endpoint)."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Receive, Scope, Send

from proxy.call import Call, Reply
from proxy.endpoints.body import read_body, request_headers, send_whole
from proxy.errors import GatewayError, InternalError
from proxy.forwarded import ClientAddress, request_id
from proxy.gateway import DONE_EVENT, SHUTDOWN, STREAM_CUT_AT_SHUTDOWN, Gateway
from proxy.params import EMPTY
from proxy.sse import error_event

STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]

logger = logging.getLogger("llmrelay")


class Endpoint(abc.ABC):
    """One API's ASGI app: read the body, build the Call, run the Gateway, send the reply.

    Subclasses say which Call they make (`endpoint`, `client_format`) and how the body is read
    (`read_call`); streamed replies are relayed chunk by chunk, and a client that leaves cancels
    the relay at once, wherever it waits.
    """

    endpoint = "chat"
    client_format = "openai"

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.limit = gateway.settings.server.max_body_bytes
        self.client_address = ClientAddress(gateway.settings.server.trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        headers = request_headers(scope)
        client = scope.get("client")
        path = scope["path"]
        query = scope.get("query_string")
        call = Call(endpoint=self.endpoint_for(path), path=path, body={}, params=EMPTY, headers=headers,
                    client_ip=self.client_address.of(client[0] if client else None, headers),
                    client_format=self.client_format, query=query.decode("latin-1") if query else "")
        if "x-request-id" in headers:
            call.request_id = request_id(headers) or call.request_id
        try:
            self.read_call(call, await read_body(headers, receive, self.limit))
        except GatewayError as exc:
            await self.send_whole(call, gateway.reject(call, exc), send)
            return
        except Exception:
            logger.exception("unhandled error reading request %s", call.id)
            await self.send_whole(call, gateway.reject(call, InternalError()), send)
            return
        reply = await gateway.handle(call)
        if reply.stream is None:
            await self.send_whole(call, reply, send)
        else:
            await self.send_stream(call, reply, receive, send)

    def endpoint_for(self, path: str) -> str:
        return self.endpoint

    @abc.abstractmethod
    def read_call(self, call: Call, raw: bytes) -> None:
        """Fill the Call from the raw body (parse once, split off gateway params, check the basics)."""

    async def send_whole(self, call: Call, reply: Reply, send: Send) -> None:
        await send_whole(self.gateway, call, reply, send)

    @staticmethod
    def is_last(call: Call, data: bytes) -> bool:
        """Whether this piece of the stream ends it (for OpenAI chat: `data: [DONE]`)."""
        return data.endswith(DONE_EVENT)

    @staticmethod
    def shutdown_event() -> bytes:
        return error_event(STREAM_CUT_AT_SHUTDOWN, type="shutdown", code=503)

    def relay(self, call: Call, reply: Reply) -> tuple[AsyncIterator[bytes], str]:
        """The bytes of a streamed reply and their content type (a hook: the Gemini passthrough
        turns SSE into a streamed JSON array for clients that did not ask for SSE)."""
        assert reply.stream is not None
        return self.gateway.relay(call, reply.stream), "text/event-stream"

    async def send_stream(self, call: Call, reply: Reply, receive: Receive, send: Send) -> None:
        """Relay chunk by chunk. A client that leaves cancels the relay at once, wherever it waits."""
        relay, media_type = self.relay(call, reply)
        raw = self.gateway.response_headers(call, reply, media_type)
        raw.extend(STREAM_HEADERS)
        task = asyncio.current_task()
        disconnected = False

        async def watch_disconnect() -> None:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True
                    if task is not None:
                        task.cancel()
                    return

        watcher = asyncio.ensure_future(watch_disconnect())
        streams = self.gateway.streams
        if task is not None:
            streams.add(task)
        try:
            await send({"type": "http.response.start", "status": reply.status, "headers": raw})
            ended = False
            async for data in relay:  # run the relay to its end, so it accounts the whole stream
                if ended:
                    continue
                # nothing follows the last event: end the response with it, saving one send
                ended = self.is_last(call, data)
                await send({"type": "http.response.body", "body": data, "more_body": not ended})
                if ended:  # the client has its whole answer: its leaving now is no disconnect
                    watcher.cancel()
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError as exc:
            if task is not None and (disconnected or SHUTDOWN in exc.args):
                task.uncancel()
            else:
                raise
            if not disconnected:  # the shutdown deadline passed: say so, then end the stream
                event = self.shutdown_event()
                with contextlib.suppress(OSError):
                    await send({"type": "http.response.body", "body": event, "more_body": False})
        except OSError:  # the server could not write: the client is gone
            pass
        finally:
            streams.discard(task)  # type: ignore[arg-type]
            watcher.cancel()
            await _close(relay)
            # a relay that never started has not run its cleanup: the Call is still unlogged
            self.gateway.relay_abandoned(call)
            await _close(reply.stream)


async def _close(relay: Any) -> None:
    """Close the relay generator; its cleanup closes the upstream request and logs the Call."""
    aclose = getattr(relay, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        logger.exception("closing a stream relay failed")
