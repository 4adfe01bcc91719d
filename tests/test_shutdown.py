"""SIGTERM: stop accepting, let in-flight streams finish up to server.shutdown_timeout, flush logs."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import KEY


def read_stream(url: str, model: str, out: dict[str, Any]) -> None:
    events: list[str] = []
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", f"{url}/api/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        out["log_id"] = response.headers["x-respan-log-id"]
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    out["events"] = events


@pytest.mark.parametrize("model,deadline", [("mock/mock-slow-20", 5), ("mock/mock-slow", 1)])
def test_sigterm_drains_streams_up_to_the_deadline(start_gateway, mock, model, deadline):
    gateway = start_gateway(server={"shutdown_timeout": deadline})
    out: dict[str, Any] = {}
    reader = threading.Thread(target=read_stream, args=(gateway.url, model, out))
    reader.start()
    time.sleep(0.5)  # the stream is under way
    gateway.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):  # no new connections once stopping
        httpx.get(f"{gateway.url}/api/health-check/", timeout=1)
    reader.join(30)
    assert gateway.proc.wait(30) == 0
    events = out["events"]
    record = gateway.record(out["log_id"])
    if model.endswith("-20"):  # finishes within the deadline: complete, logged as a success
        assert events[-1] == "[DONE]" and len(events) == 21
        assert record["status_code"] == 200 and record["completion_tokens"] == 7
    else:  # cut at the deadline: an error event, never a clean end, and the log says so
        assert '"type":"shutdown"' in events[-2] and events[-1] == "[DONE]"
        assert 5 < len(events) < 100
        assert record["status_code"] == 503
        assert record["error_message"] == "the gateway shut down before the stream finished"
        assert record["completion_tokens"] > 0
