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
        # a client that leaves while the pipeline waits (upstream, back-off, fallbacks) cancels it at once: the
        # provider request is closed and the Call logged as 499, not held until the read timeout
        watch = _ClientWatch(receive, asyncio.current_task())
        try:
            reply = await gateway.handle(call)
        except asyncio.CancelledError:
            if not watch.disconnected:
                watch.stop()
                raise
            watch.task.uncancel()  # type: ignore[union-attr]
            if not call.finished:  # handle() was cancelled inside the pipeline: it neither counted nor logged
                call.status_code, call.error = 499, CLIENT_GONE
                gateway.metrics.in_flight_now -= 1
                gateway.finish(call)
            return
        if reply.stream is None:
            watch.stop()
            try:
                await self.send_whole(call, reply, send)
            except asyncio.CancelledError:  # the client left as the answer was ready: it was logged already
                if not watch.disconnected:
                    raise
                watch.task.uncancel()  # type: ignore[union-attr]
        else:
            await self.send_stream(call, reply, watch, send)

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

    async def send_stream(self, call: Call, reply: Reply, watch: _ClientWatch, send: Send) -> None:
        """Relay chunk by chunk. A client that leaves cancels the relay at once, wherever it waits."""
        relay, media_type = self.relay(call, reply)
        raw = self.gateway.response_headers(call, reply, media_type)
        raw.extend(STREAM_HEADERS)
        task = watch.task
        if watch.disconnected:  # gone just as the pipeline returned: the relay never starts
            watch.stop()
            await _close(relay)
            self.gateway.relay_abandoned(call)
            await _close(reply.stream)
            return
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
                    watch.stop()
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError as exc:
            if task is not None and (watch.disconnected or SHUTDOWN in exc.args):
                task.uncancel()
            else:
                raise
            if not watch.disconnected:  # the shutdown deadline passed: say so, then end the stream
                event = self.shutdown_event()
                with contextlib.suppress(OSError):
                    await send({"type": "http.response.body", "body": event, "more_body": False})
        except OSError:  # the server could not write: the client is gone
            pass
        finally:
            streams.discard(task)  # type: ignore[arg-type]
            watch.stop()
            await _close(relay)
            # a relay that never started has not run its cleanup: the Call is still unlogged
            self.gateway.relay_abandoned(call)
            await _close(reply.stream)


CLIENT_GONE = "client disconnected before the answer"
WATCH_AFTER = 0.05  # seconds into a request before its client is watched


class _ClientWatch:
    """Waits for the client's http.disconnect for the whole request and cancels `task` when it comes (once the
    body is read, the only message left to receive).

    The watch starts WATCH_AFTER seconds into the request: an answer ready sooner (a cache hit, a fast
    provider) never pays for the task and granian's disconnect waiter, and a client that leaves sooner is
    noticed WATCH_AFTER late at most.
    """

    __slots__ = ("disconnected", "task", "_watcher", "_timer")

    def __init__(self, receive: Receive, task: asyncio.Task[Any] | None) -> None:
        self.disconnected = False
        self.task = task
        self._watcher: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(WATCH_AFTER, self._start,
                                                                                        receive)

    def _start(self, receive: Receive) -> None:
        self._timer = None
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                if self.task is not None:
                    self.task.cancel()
                return

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        elif self._watcher is not None:
            self._watcher.cancel()


async def _close(relay: Any) -> None:
    """Close the relay generator; its cleanup closes the upstream request and logs the Call."""
    aclose = getattr(relay, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        logger.exception("closing a stream relay failed")
