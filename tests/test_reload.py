"""Config reload on real gateway processes (2 workers) under continuous load.

SIGHUP (or POST /api/admin/reload) makes granian replace the workers one at a time; the main
process validates the file first and hands the new workers the checked text, or refuses it with one
line and keeps the old config. The load comes from background threads (whole answers and streams,
some of them slow enough to span a worker's replacement) on kept-alive connections.

How the load client treats errors: any HTTP status but 200, any broken or incomplete stream, any
error after the response began, is a failure. A request is sent again only after a
connection-level error raised before any byte of the response arrived (the connection could not be
opened, or a kept-alive connection was closed under the request): well-behaved HTTP clients do the
same. granian closes an old worker's idle kept-alive connections the moment it stops it, and a
request written on one of them in that instant gets no answer. Every attempt carries a marker, and
the tests check that no attempt sent again ever reached the provider: the gateway never saw them.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.reload import fingerprint, parse_text, worker_config
from proxy.settings import ConfigError, load_settings
from tests.conftest import ADMIN_KEYS, KEY, GatewayProcess, admin_request, base_config, wait_until

RETRIED = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

# granian starts each new worker RESPAWN_INTERVAL (3 s) before it stops the old one, so one reload of
# two workers took 6 s of waiting and this module's five reloads half a minute. Here the gateway runs
# with 1 s: still an overlap (a worker is up in 0.2-0.5 s, the sinks here are local SQLite), and the
# old worker still drains the 1.5 s streams it holds, which is what these tests look at.
RESPAWN_INTERVAL = 1.0
SERVE = (sys.executable, "-c",
         "import sys, proxy.reload\n"
         "assert hasattr(proxy.reload, 'RESPAWN_INTERVAL')\n"
         f"proxy.reload.RESPAWN_INTERVAL = {RESPAWN_INTERVAL}\n"
         "from proxy.cli import main\n"
         "sys.exit(main())")


@pytest.fixture(autouse=True)
def fast_respawn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GatewayProcess, "command", SERVE)


class Load:
    """Chat requests in a loop from background threads; see the module docstring for what counts."""

    def __init__(self, url: str, model: str, plain: int = 3, streams: int = 2, slow: int = 1) -> None:
        self.url = url
        self.model = model
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.ok: list[tuple[float, str]] = []  # (when it ended, the upstream model that answered)
        self.markers: list[str] = []  # of the attempts answered
        self.failures: list[str] = []
        self.retried: list[tuple[str, str]] = []  # (marker, error) of attempts sent again
        kinds = ["plain"] * plain + ["stream"] * streams + ["slow"] * slow
        self.threads = [threading.Thread(target=self._loop, args=(kind,), daemon=True) for kind in kinds]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(60)

    def count(self) -> int:
        with self.lock:
            return len(self.ok)

    def models_since(self, when: float) -> set[str]:
        with self.lock:
            return {model for ended, model in self.ok if ended >= when}

    def _loop(self, kind: str) -> None:
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as client:
            while not self.stop_event.is_set():
                self._request(client, kind)

    def _request(self, client: httpx.Client, kind: str) -> None:
        model = "mock/mock-slow-30" if kind == "slow" else self.model  # 30 chunks, 1.5 s
        for _ in range(5):
            marker = uuid.uuid4().hex
            body = {"model": model, "stream": kind != "plain", "messages": [{"role": "user", "content": marker}]}
            answered = False
            try:
                with client.stream("POST", f"{self.url}/api/chat/completions", json=body) as response:
                    answered = True
                    data = response.read()
                    if response.status_code != 200:
                        raise AssertionError(f"HTTP {response.status_code}: {data[:300]!r}")
                    served = self._served(kind, data)
            except RETRIED as exc:
                if answered:  # the response had begun: never sent again
                    self._fail(f"{kind} {marker}: {exc!r} after the response began")
                    return
                with self.lock:
                    self.retried.append((marker, repr(exc)))
                continue
            except Exception as exc:
                self._fail(f"{kind} {marker}: {exc!r}")
                return
            with self.lock:
                self.ok.append((time.monotonic(), served))
                self.markers.append(marker)
            return
        self._fail(f"{kind}: 5 tries, each closed before an answer")

    @staticmethod
    def _served(kind: str, data: bytes) -> str:
        if kind == "plain":
            return orjson.loads(data)["model"]
        events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
        if events[-1:] != ["[DONE]"] or any('"error"' in e for e in events):
            raise AssertionError(f"incomplete stream: {data[-300:]!r}")
        return orjson.loads(events[0])["model"]

    def _fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)


def config_info(gateway: GatewayProcess) -> dict[str, str]:
    """pid -> the sha256 label of llmrelay_config_info, for every live worker."""
    families = text_string_to_metric_families(httpx.get(f"{gateway.url}/metrics", timeout=5).text)
    return {s.labels["pid"]: s.labels["sha256"] for f in families for s in f.samples
            if s.name == "llmrelay_config_info" and s.value == 1}


def loaded_at(gateway: GatewayProcess) -> dict[str, float]:
    families = text_string_to_metric_families(httpx.get(f"{gateway.url}/metrics", timeout=5).text)
    return {s.labels["pid"]: s.value for f in families for s in f.samples
            if s.name == "llmrelay_config_loaded_timestamp_seconds"}


def replaced(gateway: GatewayProcess, before: dict[str, str], sha: str) -> Callable[[], bool]:
    """True once both workers are new ones (none of `before`) on the config `sha`."""
    def check() -> bool:
        info = config_info(gateway)
        return len(info) == 2 and not set(info) & set(before) and set(info.values()) == {sha}
    return check


def write(gateway: GatewayProcess, config: dict[str, Any] | str) -> str:
    text = config if isinstance(config, str) else yaml.safe_dump(config)
    gateway.config_path.write_text(text)
    return fingerprint(text)


def assert_clean(load: Load, mock: Any) -> None:
    """No failure; every attempt sent again never reached the provider; every answer did, once."""
    assert load.failures == [], load.failures[:5]
    seen: dict[str, int] = {}
    for request in list(mock.requests):
        messages = (request.get("body") or {}).get("messages") or [{}]
        content = messages[0].get("content")
        if isinstance(content, str):
            seen[content] = seen.get(content, 0) + 1
    assert [m for m, _ in load.retried if m in seen] == [], "an attempt sent again had reached the provider"
    assert all(seen.get(m) == 1 for m in load.markers)


@pytest.fixture
def config(mock, tmp_path: Path) -> dict[str, Any]:
    return base_config(mock, tmp_path / "gw0", admin_keys=ADMIN_KEYS, pipeline=["auth", "routing", "fallback"])


def with_changes(config: dict[str, Any]) -> dict[str, Any]:
    """gpt-test served by another upstream model, and a model that did not exist."""
    changed = yaml.safe_load(yaml.safe_dump(config))
    changed["models"][0]["model"] = "mock-v2"
    changed["models"].append({"name": "fresh-model", "provider": "mock", "model": "mock-fresh"})
    return changed


def chat(gateway: GatewayProcess, model: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=10,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def test_sighup_applies_a_changed_config_without_a_failed_request(start_gateway, mock, config):
    gateway = start_gateway(config=config, workers=2)
    assert wait_until(lambda: len(config_info(gateway)) == 2)
    before = config_info(gateway)
    assert set(before.values()) == {fingerprint(gateway.config_path.read_text())}
    assert chat(gateway, "fresh-model").status_code == 404
    with Load(gateway.url, "gpt-test") as load:
        assert wait_until(lambda: load.models_since(0) == {"mock-ok", "mock-slow-30"}, 10)
        sha = write(gateway, with_changes(config))
        served_before = load.count()
        sighup = time.monotonic()
        gateway.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "mock-v2" in load.models_since(sighup), 15), "the new config never answered"
        first_new = time.monotonic() - sighup
        assert wait_until(replaced(gateway, before, sha), 30), config_info(gateway)
        done = time.monotonic()
        duration = done - sighup
        during = load.count() - served_before
        time.sleep(1.0)  # every answer after the reload comes from the new config
        assert load.models_since(done) - {"mock-slow-30"} == {"mock-v2"}
    assert_clean(load, mock)
    assert chat(gateway, "fresh-model").json()["model"] == "mock-fresh"
    assert min(loaded_at(gateway).values()) > time.time() - duration - 5
    output = gateway.output.read_text()
    assert f"llmrelay: config reload accepted: {gateway.config_path} (sha256 {sha})" in output
    assert "needs a restart" not in output
    print(f"\nreload: new config first answered {first_new:.2f} s after SIGHUP, both workers replaced after "
          f"{duration:.2f} s; {during} requests answered meanwhile ({load.count()} in all), "
          f"{len(load.failures)} failed, {len(load.retried)} sent again after a connection closed before an answer: "
          f"{sorted({e for _, e in load.retried})}")


BROKEN = {
    "yaml": "models: [\n  {name: x\n",
    "unknown stage": {"pipeline": ["auth", "no-such-stage"]},
    "bad field": {"server": {"max_body_bytes": "lots"}},
}


def test_a_broken_config_on_sighup_is_refused_and_the_old_one_keeps_serving(start_gateway, mock, config):
    gateway = start_gateway(config=config, workers=2)
    good = gateway.config_path.read_text()
    sha = fingerprint(good)
    assert wait_until(lambda: len(config_info(gateway)) == 2)
    with Load(gateway.url, "gpt-test", plain=2, streams=1, slow=1) as load:
        for n, (what, change) in enumerate(BROKEN.items(), start=1):
            before = config_info(gateway)
            broken = change if isinstance(change, str) else {**with_changes(config), **change}
            write(gateway, broken)
            gateway.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda n=n: gateway.output.read_text().count("config reload refused") == n, 10), what
            # granian still replaces the workers: the new ones come up on the config already served
            assert wait_until(replaced(gateway, before, sha), 30), (what, config_info(gateway))
        time.sleep(0.5)
        assert load.models_since(0) == {"mock-ok", "mock-slow-30"}  # never the broken file's mock-v2
    assert_clean(load, mock)
    assert chat(gateway, "fresh-model").status_code == 404
    refusals = [line for line in gateway.output.read_text().splitlines() if "config reload refused" in line]
    assert len(refusals) == 3
    for line, expected in zip(refusals, ("invalid YAML", "'no-such-stage' is not installed",
                                         "$.server.max_body_bytes: Expected `int`, got `str`"), strict=True):
        assert line.startswith(f"llmrelay: config reload refused: {gateway.config_path}: "), line
        assert expected in line, line
        assert "; still serving the config loaded at 20" in line and f"(sha256 {sha})" in line, line
    print(f"\nrefused reloads: {load.count()} requests answered, {len(load.failures)} failed, {len(load.retried)} "
          "sent again after a connection closed before an answer")


def test_admin_reload_checks_the_file_then_reloads(start_gateway, mock, config):
    gateway = start_gateway(config=config, workers=2)
    assert wait_until(lambda: len(config_info(gateway)) == 2)
    before = config_info(gateway)
    assert admin_request(gateway, "POST", "/api/admin/reload", key=None).status_code == 401
    assert admin_request(gateway, "POST", "/api/admin/reload", key=KEY).status_code == 403

    bad = with_changes(config)
    bad["models"][-1]["provider"] = "nowhere"
    write(gateway, bad)
    response = admin_request(gateway, "POST", "/api/admin/reload")
    assert response.status_code == 422
    assert "$.models[2].provider: no provider with id 'nowhere'" in response.json()["detail"]
    write(gateway, "server: {port: [}\n")
    response = admin_request(gateway, "POST", "/api/admin/reload")
    assert response.status_code == 422 and "invalid YAML" in response.json()["detail"]
    time.sleep(0.5)
    assert config_info(gateway) == before  # nothing changed: no worker was replaced
    assert "config reload" not in gateway.output.read_text()

    good = with_changes(config)
    good["server"] = {**good["server"], "host": "localhost"}  # a listener setting: needs a restart
    sha = write(gateway, good)
    with Load(gateway.url, "gpt-test", plain=2, streams=1, slow=0) as load:
        response = admin_request(gateway, "POST", "/api/admin/reload/")
        assert response.status_code == 202, response.text
        assert response.json() == {"status": "reloading", "config": str(gateway.config_path), "sha256": sha,
                                   "needs_restart": ["server.host (127.0.0.1 -> localhost)"]}
        assert wait_until(replaced(gateway, before, sha), 30), config_info(gateway)
        done = time.monotonic()
        time.sleep(0.5)
        assert load.models_since(done) == {"mock-v2"}
    assert_clean(load, mock)
    assert chat(gateway, "fresh-model").json()["model"] == "mock-fresh"
    assert (f"llmrelay: config reload accepted: {gateway.config_path} (sha256 {sha}); restarting the workers one "
            "at a time; needs a restart, not applied: server.host (127.0.0.1 -> localhost)") in gateway.output.read_text()
    assert httpx.get(f"{gateway.url}/api/health-check/").status_code == 200  # still on 127.0.0.1


# -- loading the checked text, in process ----------------------------------------------------

def test_workers_load_the_checked_text_as_they_would_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "llmrelay.yaml"
    text = ("logs: {spool_dir: ./spool, sinks: [{type: sqlite, path: ./logs.db}]}\n"
            "providers: [{id: p, base_url: 'http://127.0.0.1:9/v1', api_key: '${RELOAD_TEST_KEY}'}]\n"
            "auto_providers: false\n")
    path.write_text(text)
    monkeypatch.setenv("RELOAD_TEST_KEY", "k-1")
    monkeypatch.setenv("LLMRELAY_CONFIG", str(path))
    monkeypatch.setenv("LLMRELAY_CONFIG_TEXT", text)
    path.write_text("not: [valid\n")  # edited after the check: the workers never read it
    loaded = worker_config()
    assert loaded.sha256 == fingerprint(text)
    path.write_text(text)
    assert loaded.settings == load_settings(path)  # same source, same ${VAR}s, same relative paths
    assert loaded.settings.providers[0].api_key == "k-1" and loaded.settings.logs.spool_dir == "./spool"
    monkeypatch.delenv("LLMRELAY_CONFIG_TEXT")
    assert worker_config().settings == load_settings(path)  # without the text: the file
    for broken in ("models: [\n", "server: {port: x}\n", "providers: [{id: p, api_key: '${NOT_SET_ANYWHERE}'}]\n"):
        path.write_text(broken)
        with pytest.raises(ConfigError) as from_file:
            load_settings(path)
        with pytest.raises(ConfigError) as from_text:
            parse_text(broken, str(path))
        assert str(from_text.value) == str(from_file.value)  # the same message, naming the file
