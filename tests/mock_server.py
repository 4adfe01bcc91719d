"""The plumbing the loopback mock servers of the tests share (tests/mock_upstream.py, mock_anthropic.py,
mock_gemini.py, mock_bedrock.py, mock_vertex.py).

`MockServer` runs an aiohttp application on its own event loop in a background thread, on a free
loopback port. A subclass adds its routes in `routes` and answers in its handlers; the base keeps
the request log (`requests`, filled with `record`), the streams whose client went away before the
end (`stream_closed_early`), `reset`, `last` and `wait_for_closed_stream`, and writes streamed
responses (`open_stream`, `send_stream`).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any, Self

from aiohttp import web


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MockServer:
    client_max_size = 1024 ** 2  # aiohttp's default request body limit
    cleanup_on_stop = True  # close open (kept-alive) connections on stop, so no handler task is left pending

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[dict[str, Any]] = []
        self.stream_closed_early: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, router: web.UrlDispatcher) -> None:
        """Add the server's routes."""
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self.cleanup_on_stop:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def reset(self) -> None:
        self.requests.clear()
        self.stream_closed_early.clear()

    def last(self) -> dict[str, Any]:
        return self.requests[-1]

    def wait_for_closed_stream(self, timeout: float = 5.0) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stream_closed_early:
                return self.stream_closed_early[-1]
            time.sleep(0.02)
        return None

    def record(self, request: web.Request, body: Any, **extra: Any) -> dict[str, Any]:
        """Log a request: its path, headers and JSON body, and `extra`."""
        entry = {"path": request.path, "headers": dict(request.headers), "body": body, **extra}
        self.requests.append(entry)
        return entry

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=self.client_max_size)
        self.routes(app.router)
        runner = self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    @staticmethod
    async def open_stream(request: web.Request, content_type: str = "text/event-stream",
                          headers: dict[str, str] | None = None) -> web.StreamResponse:
        """A prepared streamed response, ready for `write`."""
        response = web.StreamResponse(headers={"Content-Type": content_type, **(headers or {})})
        await response.prepare(request)
        return response

    async def send_stream(self, request: web.Request, chunks: Iterable[bytes], content_type: str = "text/event-stream",
                          headers: dict[str, str] | None = None, piece: int | None = None) -> web.StreamResponse:
        """Stream `chunks` whole, or their concatenation `piece` bytes at a time; a client gone is no error."""
        response = await self.open_stream(request, content_type, headers)
        if piece is not None:
            whole = b"".join(chunks)
            chunks = [whole[i:i + piece] for i in range(0, len(whole), piece)]
        try:
            for data in chunks:
                await response.write(data)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response
