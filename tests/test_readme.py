"""The README's example requests work against a gateway on its embedded defaults."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, GatewayProcess

README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"```(bash|python) example\n(.*?)```", README, re.S)
CHECKS = re.findall(r"```bash check\n(.*?)```", README, re.S)  # scripts that check their own output


@pytest.fixture(scope="module")
def defaults_gateway(tmp_path_factory: pytest.TempPathFactory):
    """`llmrelay serve` with no config, as the README's first command runs it."""
    workdir = tmp_path_factory.mktemp("readme")
    process = GatewayProcess(None, workdir, env={"OPENAI_API_KEY": ""}).start()
    yield process
    process.stop()


def test_readme_has_both_examples():
    kinds = [kind for kind, _ in EXAMPLES]
    assert kinds.count("bash") >= 1 and kinds.count("python") >= 1


@pytest.mark.parametrize("kind,code", EXAMPLES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(EXAMPLES)])
def test_readme_example_runs(defaults_gateway, kind, code):
    code = code.replace("http://127.0.0.1:8080", defaults_gateway.url)
    if kind == "bash":
        result = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["choices"][0]["message"]["content"].startswith("Hello from the llmrelay demo provider")
    else:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                                env={**os.environ})
        assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()
        assert lines[0] == "Hello from the llmrelay demo provider. You said: Hello!"
        assert lines[1] == "Hello from the llmrelay demo provider. You said: Stream, please"


@pytest.mark.parametrize("code", CHECKS, ids=[f"check-{i}" for i in range(len(CHECKS))])
def test_readme_check_runs(defaults_gateway, code):
    code = code.replace("http://127.0.0.1:8080", defaults_gateway.url)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


def test_readme_has_checks():
    assert len(CHECKS) >= 3


def test_readme_requests_are_logged(defaults_gateway):
    from proxy.logs.sinks.sqlite import read_records

    db = Path(defaults_gateway.workdir) / "llmrelay-data" / "logs.db"
    deadline = time.monotonic() + 5
    rows: list = []
    while not rows and time.monotonic() < deadline:
        rows = read_records(str(db), "customer_identifier = ?", ("user-123",)) if db.exists() else []
        time.sleep(0.05)
    assert rows and all(r["key_name"] == "demo" and r["environment"] == "test" for r in rows)


def test_ci_runs_the_readme_test_command():
    assert "bash tests/run" in README
    assert "bash tests/run" in (ROOT / ".ci" / "run").read_text()
