"""/api/temporary-keys/: keys created, used, changed and revoked while gateways run, kept in the
admin store (SQLite, or the real PostgreSQL) and spread to every worker and replica."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from proxy.keys import hash_key
from tests.conftest import ADMIN_KEY as ADMIN
from tests.conftest import ADMIN_KEYS, KEY, REDIS_URL, GatewayProcess, base_config, module_gateway, wait_until
from tests.conftest import admin_request as admin
from tests.mock_upstream import MockUpstream, free_port


def config(mock: MockUpstream, workdir: Path, **overrides: Any) -> dict[str, Any]:
    return base_config(mock, workdir, admin_keys=ADMIN_KEYS, **overrides)




def chat_status(gw: GatewayProcess, key: str) -> int:
    response = httpx.post(f"{gw.url}/api/chat/completions", headers={"authorization": f"Bearer {key}",
                                                                     "connection": "close"},
                          json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    return response.status_code


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    yield from module_gateway(tmp_path_factory, "keys", config=lambda workdir: config(mock_upstream, workdir))


def test_a_key_is_created_used_and_revoked(gw: GatewayProcess) -> None:
    r = admin(gw, "POST", "/api/temporary-keys/", {"name": f"bot-{uuid.uuid4().hex[:6]}", "is_test": True})
    assert r.status_code == 201, r.text
    created = r.json()
    secret, key_id = created["api_key"], created["id"]
    assert secret.startswith("sk-llmrelay-") and created["environment"] == "test" and created["max_usage"] == -1
    client = OpenAI(api_key=secret, base_url=f"{gw.url}/api", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["key_name"] == created["name"] and record["environment"] == "test"

    shown = admin(gw, "GET", f"/api/temporary-keys/{key_id}/").json()
    listed = admin(gw, "GET", "/api/temporary-keys/").json()["results"]
    for view in (shown, *listed):  # the secret is shown once, on create; never its hash either
        assert "api_key" not in view and "key_hash" not in view and secret not in str(view)
    assert any(v["id"] == key_id for v in listed)

    assert admin(gw, "DELETE", f"/api/temporary-keys/{key_id}/").status_code == 204
    with pytest.raises(openai.AuthenticationError):  # right after: this worker applied it before answering
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert admin(gw, "GET", f"/api/temporary-keys/{key_id}/").status_code == 404
    assert admin(gw, "DELETE", f"/api/temporary-keys/{key_id}/").status_code == 404


def test_only_the_hash_is_stored(gw: GatewayProcess) -> None:
    secret = admin(gw, "POST", "/api/temporary-keys/", {"name": f"hashed-{uuid.uuid4().hex[:6]}"}).json()["api_key"]
    conn = sqlite3.connect(gw.workdir / "llmrelay-data" / "admin.db")
    try:
        stored = " ".join(row[0] for row in conn.execute("SELECT data FROM admin_objects"))
    finally:
        conn.close()
    assert secret not in stored and hash_key(secret) in stored


def test_patch_and_expiry(gw: GatewayProcess) -> None:
    created = admin(gw, "POST", "/api/temporary-keys/", {"name": f"exp-{uuid.uuid4().hex[:6]}"}).json()
    assert chat_status(gw, created["api_key"]) == 200
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    r = admin(gw, "PATCH", f"/api/temporary-keys/{created['id']}/", {"expiry_date": past, "spending_limit": 5})
    assert r.status_code == 200 and r.json()["spending_limit"] == 5 and r.json()["expiry_date"].startswith(past[:16])
    assert chat_status(gw, created["api_key"]) == 401  # expired
    r = admin(gw, "PATCH", f"/api/temporary-keys/{created['id']}/", {"expiry_date": None})
    assert r.json()["expiry_date"] is None and chat_status(gw, created["api_key"]) == 200


@pytest.mark.parametrize(("body", "message"), [
    ({}, "name: required"),
    ({"name": ""}, "name: required"),
    ({"name": "x", "max_usage": "lots"}, "max_usage"),
    ({"name": "x", "max_usage": -2}, "max_usage"),
    ({"name": "x", "rate_limit": 0}, "rate_limit"),
    ({"name": "x", "spending_limit": -1}, "spending_limit"),
    ({"name": "x", "expiry_date": "next week"}, "expiry_date"),
    ({"name": "x", "is_test": "yes"}, "is_test"),
    ({"name": "x", "colour": "red"}, "colour: unknown field"),
    ({"name": "tests"}, "name: a key named 'tests' exists"),  # the config file's key
])
def test_bad_input_is_a_400_naming_the_field_and_creates_nothing(gw: GatewayProcess, body: dict[str, Any],
                                                                 message: str) -> None:
    before = admin(gw, "GET", "/api/temporary-keys/").json()["count"]
    r = admin(gw, "POST", "/api/temporary-keys/", body)
    assert r.status_code == 400 and message in r.json()["detail"], r.text
    assert admin(gw, "GET", "/api/temporary-keys/").json()["count"] == before


def test_names_are_unique_and_ids_must_exist(gw: GatewayProcess) -> None:
    name = f"dup-{uuid.uuid4().hex[:6]}"
    first = admin(gw, "POST", "/api/temporary-keys/", {"name": name}).json()
    assert admin(gw, "POST", "/api/temporary-keys/", {"name": name}).status_code == 400
    other = admin(gw, "POST", "/api/temporary-keys/", {"name": name + "-2"}).json()
    r = admin(gw, "PATCH", f"/api/temporary-keys/{other['id']}/", {"name": name})
    assert r.status_code == 400 and "exists" in r.json()["detail"]
    assert admin(gw, "PATCH", f"/api/temporary-keys/{first['id']}/", {"name": name}).status_code == 200  # its own
    assert admin(gw, "GET", "/api/temporary-keys/nope/").json() == {"detail": "Not found."}
    assert admin(gw, "PATCH", "/api/temporary-keys/nope/", {"name": "y"}).status_code == 404


def test_gateway_keys_get_403_and_no_key_401(gw: GatewayProcess) -> None:
    created = admin(gw, "POST", "/api/temporary-keys/", {"name": f"g-{uuid.uuid4().hex[:6]}"}).json()
    assert admin(gw, "GET", "/api/temporary-keys/", key=KEY).status_code == 403
    assert admin(gw, "GET", "/api/temporary-keys/", key=created["api_key"]).status_code == 403  # an API-made key too
    assert httpx.get(f"{gw.url}/api/temporary-keys/").status_code == 401


def test_an_api_made_key_can_ingest_logs(gw: GatewayProcess) -> None:
    created = admin(gw, "POST", "/api/temporary-keys/", {"name": f"ingest-{uuid.uuid4().hex[:6]}"}).json()
    r = httpx.post(f"{gw.url}/api/request-logs/", json={"model": "gpt-test"},
                   headers={"authorization": f"Bearer {created['api_key']}"})
    assert r.status_code == 201


def test_a_keys_rate_limit_is_enforced(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    workdir = tmp_path / "gw"
    gw = GatewayProcess(config(mock_upstream, workdir, pipeline=["auth", "limits", "routing"]), workdir).start()
    try:
        created = admin(gw, "POST", "/api/temporary-keys/", {"name": "limited", "rate_limit": 2}).json()
        assert [chat_status(gw, created["api_key"]) for _ in range(3)] == [200, 200, 429]
        assert chat_status(gw, KEY) == 200  # the config file's key has no such limit
    finally:
        gw.stop()


# -- change propagation -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "postgres+redis"])
def test_changes_reach_every_worker_and_replica(backend: str, start_gateway: Any, tmp_path: Path,
                                                request: pytest.FixtureRequest) -> None:
    """Two gateway processes with two workers each, sharing one store: a key made through one is
    served by every worker of both, and refused by all of them once revoked through the other.
    With Redis notices the poll is an hour apart: only the notices can carry the change."""
    if backend == "sqlite":
        store = {"backend": "sqlite", "path": str(tmp_path / "admin.db"), "poll_interval": 0.2}
    else:
        store = {"backend": "postgres", "dsn": request.getfixturevalue("pg_store"), "poll_interval": 0.2}
    if backend == "postgres+redis":
        store.update(poll_interval=3600, notify_url=REDIS_URL)
    a, b = (start_gateway(workers=2, admin_keys=ADMIN_KEYS, store=store) for _ in range(2))
    created = admin(a, "POST", "/api/temporary-keys/", {"name": "shared"}).json()
    secret = created["api_key"]
    # fresh connections, so that both workers of each process answer some of them
    assert wait_until(lambda: all(chat_status(g, secret) == 200 for g in (a, b) for _ in range(6)), timeout=10)
    assert admin(b, "DELETE", f"/api/temporary-keys/{created['id']}/").status_code == 204
    assert wait_until(lambda: all(chat_status(g, secret) == 401 for g in (a, b) for _ in range(6)), timeout=10)


def test_an_unreachable_store_does_not_stop_the_gateway(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    store = {"backend": "postgres", "dsn": f"postgresql://postgres:s3cret-pw@127.0.0.1:{free_port()}/none"}
    workdir = tmp_path / "gw"
    gw = GatewayProcess(config(mock_upstream, workdir, store=store), workdir).start()
    try:
        assert chat_status(gw, KEY) == 200  # the config file's keys still work
        assert "s3cret-pw" not in gw.output.read_text()
    finally:
        gw.stop()


def llmrelay(gw: GatewayProcess, *args: str, admin_key: str | None = ADMIN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLMRELAY_URL": gw.url}
    env.pop("LLMRELAY_ADMIN_KEY", None)
    if admin_key is not None:
        env["LLMRELAY_ADMIN_KEY"] = admin_key
    return subprocess.run([sys.executable, "-m", "proxy.cli", "keys", *args], capture_output=True, text=True,
                          env=env, timeout=30)


def test_the_keys_cli(gw: GatewayProcess) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    made = llmrelay(gw, "create", name, "--rate-limit", "60", "--test")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("sk-llmrelay-") and "shown once" in made.stderr
    assert chat_status(gw, secret) == 200
    listed = llmrelay(gw, "list")
    line = next(row for row in listed.stdout.splitlines() if name in row)
    key_id = line.split()[0]
    assert "test" in line and "60" in line and secret not in listed.stdout
    assert llmrelay(gw, "revoke", key_id).returncode == 0
    assert chat_status(gw, secret) == 401
    failed = llmrelay(gw, "revoke", key_id)
    assert failed.returncode == 1 and "404" in failed.stderr
    refused = llmrelay(gw, "list", admin_key=KEY)
    assert refused.returncode == 1 and "403" in refused.stderr and KEY not in refused.stderr
    missing = llmrelay(gw, "list", admin_key=None)
    assert missing.returncode == 1 and "LLMRELAY_ADMIN_KEY" in missing.stderr


def test_a_write_while_the_postgres_admin_store_is_down_is_a_503(start_gateway, mock):
    """The data plane keeps serving its snapshot; an admin write says the store is unavailable
    (not a 500 with a traceback)."""
    down = f"postgresql://postgres:s3cret-store-pw@127.0.0.1:{free_port()}/test"
    gw = start_gateway(admin_keys=ADMIN_KEYS, store={"backend": "postgres", "dsn": down})
    created = admin(gw, "POST", "/api/temporary-keys/", {"name": "while-down"})
    assert created.status_code == 503, created.text
    assert "admin store" in created.json()["detail"] and "s3cret-store-pw" not in created.text
    reply = httpx.post(f"{gw.url}/api/chat/completions", json={"model": "gpt-test", "messages": [
        {"role": "user", "content": "hi"}]}, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert reply.status_code == 200
