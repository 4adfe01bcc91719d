"""The watch for a client that leaves (proxy/endpoints/base.py): it starts WATCH_AFTER into a request,
so a fast answer never waits on granian's receive(), while a slow one is still cancelled when its
client goes. Driven in process through ASGI, against the mock upstream."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import yaml

from proxy.app import App, build_app
from proxy.endpoints.base import WATCH_AFTER
from proxy.logs.sinks.sqlite import read_records
from proxy.settings import load_settings
from tests.conftest import KEY, MockUpstream, app_lifespan, base_config

HI = [{"role": "user", "content": "hi"}]


def make_app(mock: MockUpstream, tmp_path: Path) -> App:
    config = tmp_path / "llmrelay.yaml"
    config.write_text(yaml.safe_dump(base_config(mock, tmp_path)))
    return build_app(load_settings(str(config)))


class Client:
    """One request's ASGI receive and send. `leaves`: the disconnect comes as soon as it is waited for."""

    def __init__(self, body: dict[str, Any], leaves: bool = False) -> None:
        self.messages = [{"type": "http.request", "body": orjson.dumps(body), "more_body": False}]
        self.leaves = leaves
        self.receives = 0
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.receives += 1
        if self.messages:
            return self.messages.pop()
        if not self.leaves:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


def serve(app: App, *clients: Client) -> None:
    scope = {"type": "http", "method": "POST", "path": "/api/chat/completions", "query_string": b"",
             "client": ("127.0.0.1", 5000),
             "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")]}

    async def scenario() -> None:
        async with app_lifespan(app):
            for client in clients:
                await app(dict(scope), client.receive, client.send)
            await asyncio.sleep(2 * WATCH_AFTER)  # a watch left behind would call receive() again by now

    asyncio.run(scenario())


def test_a_fast_answer_never_waits_for_the_client_to_leave(mock, tmp_path):
    app = make_app(mock, tmp_path)
    whole, stream = Client({"model": "gpt-test", "messages": HI}), Client({"model": "gpt-test", "messages": HI,
                                                                            "stream": True})
    serve(app, whole, stream)
    for client in (whole, stream):
        assert client.sent[0]["status"] == 200
        assert client.receives == 1  # the body only: no watch was started, none was left running
    assert [r["status_code"] for r in read_records(tmp_path / "logs.db")] == [200, 200]


def test_a_slow_answer_is_watched_and_stays_whole_while_the_client_stays(mock, tmp_path):
    app = make_app(mock, tmp_path)
    client = Client({"model": "mock/mock-slow-4", "messages": HI, "stream": True})  # 4 chunks 50 ms apart
    serve(app, client)
    assert client.receives == 2  # the body, then the watch
    assert client.sent[-1]["more_body"] is False and b"[DONE]" in client.sent[-1]["body"]
    assert [r["status_code"] for r in read_records(tmp_path / "logs.db")] == [200]


def test_a_client_that_leaves_a_slow_answer_cancels_it_once_the_watch_starts(mock, tmp_path):
    app = make_app(mock, tmp_path)
    client = Client({"model": "mock/mock-slow-40", "messages": HI, "stream": True}, leaves=True)  # 2 s of chunks
    serve(app, client)
    [record] = read_records(tmp_path / "logs.db")
    assert record["status_code"] == 499
    assert app.gateway.metrics.in_flight_now == 0
    bodies = [m for m in client.sent if m["type"] == "http.response.body"]
    assert len(bodies) < 5  # cut about WATCH_AFTER in, not after the 40 chunks
