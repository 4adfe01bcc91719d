"""A fault-injecting OpenAI-compatible upstream: a raw asyncio server where each test scripts the answers.

Each request is keyed by the `model` of its JSON body (tests use a unique name per scenario, so modules running
at once never share a script). `script(model, *answers)` queues answers taken one per request; `default(model,
fn)` answers the n-th request (0-based) once the queue is empty. An answer is a list of steps run in order:

  ("sleep", seconds)      wait (before headers, between chunks, ...)
  ("send", bytes)         write raw bytes (a status line and headers, an HTTP chunk, garbage)
  ("reset",)              abort the connection with a TCP RST (SO_LINGER 0)
  ("close",)              close the connection cleanly (FIN)
  ("hang",)               send nothing more until the client closes

Builders make the usual answers: `reply(status, body, headers)`, `stream(events, done=True, ...)`. Every request
is recorded with its headers and body (`requests(model)`), and `closed(model)` gives when the gateway closed each
connection (to check it lets go of an abandoned stream promptly).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import orjson

Step = tuple[Any, ...]
Answer = list[Step]

USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def completion(model: str, content: str = "ok", finish: str = "stop", usage: dict[str, int] | None = None) -> dict:
    return {"id": "chatcmpl-fault", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": usage or USAGE}


def error_body(status: int, message: str, code: str | None = None, type_: str = "fault_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code or f"fault_{status}"}}


def head(status: int, headers: dict[str, str] | None = None, *, chunked: bool = False, length: int | None = None,
         content_type: str = "application/json") -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-type: {content_type}", "connection: close"]
    if chunked:
        lines.append("transfer-encoding: chunked")
    if length is not None:
        lines.append(f"content-length: {length}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def reply(status: int = 200, body: Any = None, headers: dict[str, str] | None = None, delay: float = 0) -> Answer:
    """A whole answer (JSON body, content-length), its headers after `delay` seconds."""
    data = body if isinstance(body, bytes) else orjson.dumps(body if body is not None else {})
    steps: Answer = [("sleep", delay)] if delay else []
    return [*steps, ("send", head(status, headers, length=len(data)) + data), ("close",)]


def ok(model: str, content: str = "ok", **kwargs: Any) -> Answer:
    return reply(200, completion(model, content, **kwargs))


def fail(status: int, message: str | None = None, headers: dict[str, str] | None = None,
         code: str | None = None) -> Answer:
    return reply(status, error_body(status, message or f"fault upstream error {status}", code), headers)


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def chunk_event(model: str, content: str | None = None, finish: str | None = None,
                usage: dict[str, int] | None = None, role: bool = False) -> bytes:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    data: dict[str, Any] = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": 1, "model": model,
                            "choices": [] if usage and content is None and finish is None else
                            [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        data["usage"] = usage
    return b"data: " + orjson.dumps(data) + b"\n\n"


def words_events(model: str, words: list[str], finish: str | None = "stop",
                 usage: dict[str, int] | None = None) -> list[bytes]:
    """The SSE events of a chat stream: a role chunk, one chunk per word, the finish chunk, the usage chunk."""
    events = [chunk_event(model, "", role=True)] + [chunk_event(model, w) for w in words]
    if finish:
        events.append(chunk_event(model, None, finish))
    if usage:
        events.append(chunk_event(model, usage=usage))
    return events


def stream(events: list[bytes], *, done: bool = True, gap: float = 0, first_delay: float = 0,
           cut_after: int | None = None, stall_after: int | None = None, end: bool = True) -> Answer:
    """A 200 SSE answer in HTTP chunks. `cut_after` N: N events then a TCP reset (no terminating chunk);
    `stall_after` N: N events then silence until the client leaves; `end` False: no terminating chunk but a FIN."""
    steps: Answer = [("send", head(200, chunked=True, content_type="text/event-stream"))]
    if first_delay:
        steps.append(("sleep", first_delay))
    body = [*events, b"data: [DONE]\n\n"] if done else list(events)
    for i, event in enumerate(body):
        if cut_after is not None and i == cut_after:
            return [*steps, ("reset",)]
        if stall_after is not None and i == stall_after:
            return [*steps, ("hang",)]
        if gap and i:
            steps.append(("sleep", gap))
        steps.append(("send", http_chunk(event)))
    if end:
        steps.append(("send", b"0\r\n\r\n"))
    return [*steps, ("close",)]


class FaultUpstream:
    """The server, on its own event loop in a background thread."""

    def __init__(self) -> None:
        self.port = 0
        self._scripts: dict[str, deque[Answer]] = defaultdict(deque)
        self._defaults: dict[str, Callable[[int], Answer]] = {}
        self._requests: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._closed: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self.active = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FaultUpstream:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self._defaults.clear()
            self._requests.clear()
            self._closed.clear()

    def script(self, model: str, *answers: Answer) -> None:
        with self._lock:
            self._scripts[model].extend(answers)

    def default(self, model: str, answer: Callable[[int], Answer]) -> None:
        with self._lock:
            self._defaults[model] = answer

    def requests(self, model: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._requests[model])

    def count(self, model: str) -> int:
        return len(self.requests(model))

    def closed(self, model: str) -> list[float]:
        """Monotonic times at which the gateway closed its connections for `model` while the answer was still
        going out (a write failed) or hanging."""
        with self._lock:
            return list(self._closed[model])

    def _next(self, model: str) -> Answer:
        with self._lock:
            n = len(self._requests[model]) - 1
            if self._scripts[model]:
                return self._scripts[model].popleft()
            if model in self._defaults:
                return self._defaults[model](n)
        return fail(500, f"fault upstream: nothing scripted for {model!r}")

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes] | None:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += data[:-2]
        return lines[0], headers, body

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        model = ""
        try:
            request = await self._read_request(reader)
            if request is None:
                return
            line, headers, body = request
            try:
                parsed = orjson.loads(body) if body else {}
            except orjson.JSONDecodeError:
                parsed = {}
            model = str(parsed.get("model", ""))
            with self._lock:
                self._requests[model].append({"line": line, "headers": headers, "body": parsed,
                                              "time": time.monotonic()})
            for step in self._next(model):
                kind = step[0]
                if kind == "sleep":
                    await asyncio.sleep(step[1])
                elif kind == "send":
                    writer.write(step[1])
                    await writer.drain()
                elif kind == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                elif kind == "close":
                    break
                elif kind == "hang":
                    while await reader.read(1024):
                        pass
                    with self._lock:
                        self._closed[model].append(time.monotonic())
                    return
        except (ConnectionError, OSError):  # the gateway closed the connection while this answer was going out
            with self._lock:
                self._closed[model].append(time.monotonic())
        finally:
            self.active -= 1
            writer.close()
