"""Third-party stages: a separate distribution's `llmrelay.stages` entry point joins the pipeline
by config alone; a pipeline naming a stage that is not installed fails start-up clearly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI

from proxy.keys import hash_key
from tests.conftest import KEY, ROOT
from tests.mock_upstream import free_port

DISTRIBUTION = ROOT / "tests" / "thirdparty_stage"


@pytest.fixture(scope="module")
def stage_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install` the example distribution into a private folder (offline, no deps)."""
    work = tmp_path_factory.mktemp("thirdparty")
    source = work / "src"  # build from a copy: the build must not write into the repo
    shutil.copytree(DISTRIBUTION, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    target = work / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (target / "llmrelay_header_stage.py").exists()
    return target


def with_path(site: Path) -> dict[str, str]:
    existing = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{site}{os.pathsep}{existing}" if existing else str(site)}


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def demo_config(tmp_path: Path, pipeline: list[Any]) -> Path:
    config = {
        "providers": [{"id": "demo", "protocol": "demo"}],
        "models": [{"name": "demo", "provider": "demo"}],
        "keys": [{"name": "tests", "key_hash": hash_key(KEY)}],
        "pipeline": pipeline,
        "logs": {"spool_dir": str(tmp_path / "spool"), "sinks": [{"type": "sqlite", "path": str(tmp_path / "logs.db")}]},
        "auto_providers": False,
    }
    path = tmp_path / "llmrelay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_installed_stage_joins_pipeline_by_config(stage_site, start_gateway, mock):
    pipeline = ["auth", {"name": "stamp", "options": {"header": "X-Stamp", "value": "stamped-by-plugin"}}]
    gw = start_gateway(env=with_path(stage_site), pipeline=pipeline)
    client = OpenAI(base_url=f"{gw.url}/api", api_key=KEY, max_retries=0)

    raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content == "The quick brown fox jumps over the lazy dog."
    assert raw.headers["x-stamp"] == "stamped-by-plugin"
    assert raw.headers["x-stamp-seen"] == "tests/gpt-test"  # it ran after auth, on the Call

    # streams pass through it too
    with client.chat.completions.with_streaming_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
    ) as response:
        assert response.headers["x-stamp"] == "stamped-by-plugin"
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    assert text == "The quick brown fox jumps over the lazy dog."

    # order follows the config: auth rejects before the stamp stage sees the request
    denied = httpx.post(f"{gw.url}/api/chat/completions", headers={"Authorization": "Bearer wrong"},
                        json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
    assert denied.status_code == 401
    assert "x-stamp" not in denied.headers


def test_check_lists_the_third_party_stage(stage_site, tmp_path):
    config = demo_config(tmp_path, ["auth", {"name": "stamp", "options": {"value": "v"}}])
    result = cli("check", str(config), env=with_path(stage_site))
    assert result.returncode == 0, result.stderr
    assert "pipeline: auth, stamp" in result.stdout

    # without the distribution on the path, the same config does not start
    result = cli("check", str(config))
    assert result.returncode == 2
    assert "'stamp'" in result.stderr


def test_stage_options_are_validated_at_startup(stage_site, tmp_path):
    config = demo_config(tmp_path, ["auth", {"name": "stamp", "options": {"header": "x-stamp"}}])
    result = cli("check", str(config), env=with_path(stage_site))
    assert result.returncode == 2
    assert str(config) in result.stderr
    assert "$.pipeline[1].options" in result.stderr
    assert "stamp needs a `value` option" in result.stderr


def test_missing_stage_fails_startup(tmp_path):
    config = demo_config(tmp_path, ["auth", "no-such-stage"])
    result = cli("check", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    message = result.stderr
    assert "no-such-stage" in message
    assert "llmrelay.stages" in message  # the entry-point group
    assert str(config) in message and "$.pipeline[1]" in message
    assert "Traceback" not in message

    # `serve` refuses to start on it too, before binding anything
    port = free_port()
    result = cli("serve", "--config", str(config), "--port", str(port), timeout=30)
    assert result.returncode == 2
    assert "no-such-stage" in result.stderr and "llmrelay.stages" in result.stderr
