"""The `llmrelay` CLI: check, hash-key, and serve on embedded defaults (the README's first promise)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

from proxy.keys import hash_key
from proxy.settings import DEMO_KEY
from tests.mock_upstream import free_port

# Provider keys in the developer's environment would add providers; the CLI must not need them.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "LLMRELAY_CONFIG"}


def cli(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True,
                          env=CLEAN_ENV, cwd=cwd, timeout=timeout)


def test_check_good_config(tmp_path):
    config = {
        "providers": [{"id": "demo", "protocol": "demo"}, {"id": "up", "base_url": "http://127.0.0.1:9/v1", "api_key": "${UP_KEY:-x}"}],
        "models": [{"name": "demo", "provider": "demo"}, {"name": "m", "provider": "up"}],
        "keys": [{"name": "k", "key_hash": hash_key("sk-1")}],
        "pipeline": ["auth"],
        "auto_providers": False,
    }
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(config))
    result = cli("check", str(path))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert str(path) in result.stdout
    assert "2 providers, 2 models, 1 keys; pipeline: auth" in result.stdout


def test_check_bad_config_exits_2_naming_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"server": {"port": "abc"}}))
    result = cli("check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert str(path) in result.stderr
    assert "$.server.port" in result.stderr
    assert "Traceback" not in result.stderr

    path.write_text(yaml.safe_dump({"providers": [{"id": "p", "base_url": "http://x/v1", "api_key": "${NO_SUCH_VAR}"}]}))
    result = cli("check", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr and "$.providers[0].api_key" in result.stderr and "NO_SUCH_VAR" in result.stderr

    result = cli("check", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "absent.yaml" in result.stderr


def test_hash_key():
    result = cli("hash-key", "abc")
    assert result.returncode == 0
    assert result.stdout.strip() == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert result.stdout.strip() == hash_key("abc")


@pytest.fixture
def serve_defaults(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    """`llmrelay serve` with no config, in an empty working directory."""
    port = free_port()
    out = (tmp_path / "serve.out").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--port", str(port)],
                            cwd=tmp_path, env={**CLEAN_ENV, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "serve.out").read_text()
            try:
                if httpx.get(f"{url}/api/health-check/", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway did not come up:\n" + (tmp_path / "serve.out").read_text()
            time.sleep(0.05)
        yield url, tmp_path, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        out.close()


def test_serve_with_no_config_answers_with_the_demo_provider(serve_defaults):
    url, cwd, proc = serve_defaults
    client = OpenAI(base_url=f"{url}/api", api_key=DEMO_KEY, max_retries=0)

    raw = client.chat.completions.with_raw_response.create(model="demo", messages=[{"role": "user", "content": "hello there"}])
    completion = raw.parse()
    answer = completion.choices[0].message.content
    assert answer == "Hello from the llmrelay demo provider. You said: hello there"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    log_id = raw.headers["x-respan-log-id"]

    # the same through /v1, streaming
    v1 = OpenAI(base_url=f"{url}/v1", api_key=DEMO_KEY, max_retries=0)
    stream = v1.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hello there"}], stream=True)
    chunks = list(stream)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # word by word
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason == "stop"

    # a wrong key is refused: the defaults are not an open proxy
    denied = httpx.post(f"{url}/api/chat/completions", headers={"Authorization": "Bearer nope"},
                        json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
    assert denied.status_code == 401

    # the log goes under ./llmrelay-data/ in the working directory
    from proxy.logs.sinks.sqlite import read_records

    db = cwd / "llmrelay-data" / "logs.db"
    rows: list = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if db.exists():
            try:
                rows = read_records(db)
            except Exception:
                rows = []
            if len(rows) >= 3:
                break
        time.sleep(0.05)
    assert len(rows) == 3, rows
    by_id = {r["unique_id"]: r for r in rows}
    assert by_id[log_id]["model_requested"] == "demo"
    assert by_id[log_id]["provider_id"] == "demo"
    assert by_id[log_id]["key_name"] == "demo" and by_id[log_id]["environment"] == "test"
    assert sorted(r["status_code"] for r in rows) == [200, 200, 401]
    assert sum(bool(r["stream"]) for r in rows) == 1

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
