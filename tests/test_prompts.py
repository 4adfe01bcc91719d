"""Prompt templates end to end: /api/prompts/ (spec 2.6) on real gateway processes, and rendering at
inference (spec 3.5) asserted on what the mock provider received and on the log detail, with the
official openai SDK as the client."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai import NOT_GIVEN, OpenAI

from tests.conftest import ADMIN_KEY as ADMIN
from tests.conftest import ADMIN_KEYS, KEY, GatewayProcess, base_config, wait_until
from tests.conftest import admin_request as admin
from tests.mock_upstream import MockUpstream

PIPELINE = ["auth", "prompts", "routing", "credentials", {"name": "fallback", "options": {"retry": {"enabled": False}}}]
USER = [{"role": "user", "content": "Tell me about {{ topic }}."}]


def config(mock: MockUpstream, workdir: Path, store: Path) -> dict[str, Any]:
    return base_config(
        mock, workdir, admin_keys=ADMIN_KEYS, pipeline=PIPELINE,
        store={"backend": "sqlite", "path": str(store), "poll_interval": 0.2},
        extra_models=[{"name": "broken", "provider": "mock", "model": "mock-status-503"},
                      {"name": "other", "provider": "mock", "model": "mock-other"}],
    )


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("prompts")
    process = GatewayProcess(config(mock_upstream, workdir, workdir / "admin.db"), workdir).start()
    yield process
    process.stop()


@pytest.fixture
def client(gw: GatewayProcess) -> OpenAI:
    return OpenAI(base_url=f"{gw.url}/api", api_key=KEY, max_retries=0)




def new_prompt(gw: GatewayProcess, messages: list[dict[str, Any]] | None = None, *, deploy: bool = True,
               name: str = "Test prompt", **version: Any) -> str:
    """A prompt with one version (deployed unless deploy=False); its id."""
    prompt_id = f"p-{uuid.uuid4().hex[:10]}"
    r = admin(gw, "POST", "/api/prompts/", {"prompt_id": prompt_id, "name": name})
    assert r.status_code == 201, r.text
    add_version(gw, prompt_id, messages or USER, deploy=deploy, **version)
    return prompt_id


def add_version(gw: GatewayProcess, prompt_id: str, messages: list[dict[str, Any]], *, deploy: bool = False,
                **version: Any) -> dict[str, Any]:
    body = {"messages": messages, "deploy": deploy, **version}
    body.setdefault("model", "gpt-test")
    if body["model"] is None:
        del body["model"]
    r = admin(gw, "POST", f"/api/prompts/{prompt_id}/versions/", body)
    assert r.status_code == 201, r.text
    return r.json()


def ask(client: OpenAI, prompt: dict[str, Any], **kwargs: Any) -> tuple[Any, str]:
    """A chat completion that names only the prompt (no model, no messages): the answer, its log id."""
    kwargs.setdefault("model", NOT_GIVEN)
    kwargs.setdefault("messages", NOT_GIVEN)
    extra = {"prompt": prompt, **kwargs.pop("extra_body", {})}
    raw = client.chat.completions.with_raw_response.create(extra_body=extra, **kwargs)
    return raw.parse(), raw.headers["x-respan-log-id"]


def raw_chat(gw: GatewayProcess, body: dict[str, Any], path: str = "/api/chat/completions") -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=10)


def log_detail(gw: GatewayProcess, log_id: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def fetched() -> bool:
        r = admin(gw, "GET", f"/api/request-logs/{log_id}/")
        if r.status_code == 200:
            found.update(r.json())
        return r.status_code == 200

    assert wait_until(fetched, timeout=5), f"no log {log_id}"
    return found


def sent(mock: MockUpstream) -> dict[str, Any]:
    """The body the mock provider received last."""
    return mock.last()["body"]


# -- the admin API: prompts ---------------------------------------------------------------------


def test_prompts_are_created_read_changed_and_deleted(gw: GatewayProcess) -> None:
    r = admin(gw, "POST", "/api/prompts/", {"name": "Generated id", "tags": ["a"], "description": "d"})
    assert r.status_code == 201, r.text
    made = r.json()
    assert len(made["prompt_id"]) == 32 and int(made["prompt_id"], 16) >= 0
    assert made | {"created_at": None, "updated_at": None} == {
        "prompt_id": made["prompt_id"], "name": "Generated id", "description": "d", "tags": ["a"], "starred": False,
        "deployed_version": None, "live_version": None, "latest_version": None, "version_count": 0,
        "created_at": None, "updated_at": None}
    assert made["created_at"].endswith("+00:00")

    prompt_id = f"crud-{uuid.uuid4().hex[:8]}"
    assert admin(gw, "POST", "/api/prompts/", {"prompt_id": prompt_id, "name": "Mine"}).status_code == 201
    again = admin(gw, "POST", "/api/prompts/", {"prompt_id": prompt_id, "name": "Mine again"})
    assert again.status_code == 409 and prompt_id in again.json()["detail"]
    assert admin(gw, "GET", f"/api/prompts/{prompt_id}/").json()["name"] == "Mine"

    r = admin(gw, "PATCH", f"/api/prompts/{prompt_id}/", {"name": "Renamed", "starred": True, "tags": ["x", "y"]})
    assert r.status_code == 200 and r.json()["name"] == "Renamed" and r.json()["starred"] is True
    assert r.json()["tags"] == ["x", "y"] and r.json()["updated_at"] >= r.json()["created_at"]
    for body, field in (({"prompt_id": "other"}, "prompt_id"), ({"colour": "red"}, "colour: unknown field"),
                        ({"starred": "yes"}, "starred"), ({"name": ""}, "name"), ({"tags": "x"}, "tags")):
        r = admin(gw, "PATCH", f"/api/prompts/{prompt_id}/", body)
        assert r.status_code == 400 and r.json()["detail"].startswith(field), r.text

    assert admin(gw, "DELETE", f"/api/prompts/{prompt_id}/").status_code == 204
    assert admin(gw, "GET", f"/api/prompts/{prompt_id}/").json() == {"detail": f"Prompt {prompt_id} not found"}
    for method, body in (("GET", None), ("PATCH", {"name": "n"}), ("DELETE", None)):
        assert admin(gw, method, f"/api/prompts/{prompt_id}/", body).status_code == 404


@pytest.mark.parametrize(("body", "message"), [
    ({}, "name: required"),
    ({"name": "   "}, "name: required"),
    ({"name": "x", "prompt_id": "has space"}, "prompt_id: expected"),
    ({"name": "x", "prompt_id": 7}, "prompt_id: expected"),
    ({"name": "x", "tags": [1]}, "tags: expected"),
    ({"name": "x", "starred": 1}, "starred: expected"),
    ({"name": "x", "slug": "s"}, "slug: unknown field"),
])
def test_a_bad_prompt_is_a_400_naming_the_field(gw: GatewayProcess, body: dict[str, Any], message: str) -> None:
    before = admin(gw, "POST", "/api/prompts/summary/").json()["total"]
    r = admin(gw, "POST", "/api/prompts/", body)
    assert r.status_code == 400 and r.json()["detail"].startswith(message), r.text
    assert admin(gw, "POST", "/api/prompts/summary/").json()["total"] == before


def test_lists_filter_and_page(gw: GatewayProcess) -> None:
    tag = f"t{uuid.uuid4().hex[:8]}"
    ids = []
    for i, name in enumerate(("Alpha Greeting", "beta greeting", "Gamma")):
        r = admin(gw, "POST", "/api/prompts/", {"name": name, "tags": [tag, f"n{i}"], "starred": i == 2})
        ids.append(r.json()["prompt_id"])
    listed = admin(gw, "GET", f"/api/prompts/?tags={tag}").json()
    assert listed["count"] == 3 and [p["prompt_id"] for p in listed["results"]] == ids[::-1]  # newest first
    assert listed["next"] is None and listed["previous"] is None
    assert admin(gw, "GET", f"/api/prompts/?tags={tag}&name=GREETING").json()["count"] == 2
    assert [p["prompt_id"] for p in admin(gw, "GET", f"/api/prompts/?tags={tag}&starred=true").json()["results"]] == [
        ids[2]]

    body = {"filters": {"tags": {"operator": "", "value": [tag]}, "name": {"operator": "icontains", "value": ["alpha"]}}}
    r = admin(gw, "POST", "/api/prompts/list/", body)
    assert r.status_code == 200 and [p["prompt_id"] for p in r.json()["results"]] == [ids[0]]
    r = admin(gw, "POST", "/api/prompts/list/", {"tags": ["n0", "n1", "absent"], "prompt_id": ids[:2]})
    assert r.json()["count"] == 2  # tags: any of

    first = admin(gw, "POST", "/api/prompts/list/", {"tags": [tag], "page_size": 2}).json()
    assert first["count"] == 3 and len(first["results"]) == 2 and "page=2" in first["next"]
    second = admin(gw, "POST", "/api/prompts/list/", {"tags": [tag], "page_size": 2, "page": 2}).json()
    assert [p["prompt_id"] for p in second["results"]] == [ids[0]] and second["next"] is None
    assert "page=1" in second["previous"]

    for body, field in (({"page_size": 101}, "page_size"), ({"page": 0}, "page"),
                        ({"filters": {"model": {"value": ["x"]}}}, "filters.model"),
                        ({"filters": {"name": {"operator": "gt", "value": ["x"]}}}, "filters.name.operator"),
                        ({"starred": "maybe"}, "starred"), ({"colour": "red"}, "colour: unknown field")):
        r = admin(gw, "POST", "/api/prompts/list/", body)
        assert r.status_code == 400 and r.json()["detail"].startswith(field), r.text
    assert admin(gw, "GET", "/api/prompts/?page_size=500").status_code == 400


def test_summary_counts(gw: GatewayProcess) -> None:
    before = admin(gw, "POST", "/api/prompts/summary/").json()
    new_prompt(gw)  # deployed
    drafted = new_prompt(gw, deploy=False)  # a draft only
    add_version(gw, new_prompt(gw), USER)  # deployed, and a draft
    assert admin(gw, "GET", f"/api/prompts/{drafted}/").json()["deployed_version"] is None
    after = admin(gw, "POST", "/api/prompts/summary/").json()
    assert after == {"total": before["total"] + 3, "deployed": before["deployed"] + 2,
                     "with_draft": before["with_draft"] + 2}


def test_admin_key_required(gw: GatewayProcess) -> None:
    prompt_id = new_prompt(gw)
    routes = [("GET", "/api/prompts/"), ("POST", "/api/prompts/"), ("POST", "/api/prompts/list/"),
              ("POST", "/api/prompts/summary/"), ("GET", f"/api/prompts/{prompt_id}/"),
              ("PATCH", f"/api/prompts/{prompt_id}/"), ("DELETE", f"/api/prompts/{prompt_id}/"),
              ("GET", f"/api/prompts/{prompt_id}/versions/"), ("POST", f"/api/prompts/{prompt_id}/versions/"),
              ("GET", f"/api/prompts/{prompt_id}/versions/1/"), ("PATCH", f"/api/prompts/{prompt_id}/versions/1/"),
              ("DELETE", f"/api/prompts/{prompt_id}/versions/1/"), ("POST", f"/api/prompts/{prompt_id}/commits/"),
              ("POST", f"/api/prompts/{prompt_id}/deployments/")]
    for method, path in routes:
        assert admin(gw, method, path, {}, key=KEY).status_code == 403, (method, path)
        assert admin(gw, method, path, {}, key=None).status_code == 401, (method, path)
        assert admin(gw, method, path, {}, key="sk-nobody").status_code == 401, (method, path)
    assert admin(gw, "GET", f"/api/prompts/{prompt_id}/").json()["version_count"] == 1  # nothing changed


# -- the admin API: versions, commits, deployments ---------------------------------------------


def test_versions_commits_and_deployments(gw: GatewayProcess) -> None:
    prompt_id = new_prompt(gw, deploy=False)
    base = f"/api/prompts/{prompt_id}"
    v1 = admin(gw, "GET", f"{base}/versions/1/").json()
    assert v1["version"] == 1 and v1["is_draft"] is True and v1["is_deployed"] is False
    assert v1["messages"] == USER and v1["model"] == "gpt-test" and v1["temperature"] is None
    assert v1["committed_at"] is None and v1["created_at"]

    r = admin(gw, "PATCH", f"{base}/versions/1/", {"temperature": 0.3, "variables": {"topic": "owls"}})
    assert r.status_code == 200 and r.json()["temperature"] == 0.3 and r.json()["variables"] == {"topic": "owls"}
    r = admin(gw, "PATCH", f"{base}/versions/1/", {"temperature": None})
    assert r.json()["temperature"] is None and r.json()["variables"] == {"topic": "owls"}

    r = admin(gw, "POST", f"{base}/commits/", {"commit_message": "first"})
    assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["is_draft"] is False
    assert r.json()["commit_message"] == "first" and r.json()["committed_at"]
    r = admin(gw, "PATCH", f"{base}/versions/1/", {"temperature": 1})
    assert r.status_code == 400 and r.json()["detail"] == "version 1 is committed and read-only; create a new version"
    r = admin(gw, "POST", f"{base}/commits/", {})
    assert r.status_code == 400 and "no draft" in r.json()["detail"]

    v2 = add_version(gw, prompt_id, [{"role": "system", "content": "v2"}])
    v3 = add_version(gw, prompt_id, [{"role": "system", "content": "v3"}])
    assert (v2["version"], v3["version"]) == (2, 3) and v3["is_draft"]
    r = admin(gw, "POST", f"{base}/commits/", {"version": 2})
    assert r.json()["version"] == 2 and not r.json()["is_draft"]
    r = admin(gw, "POST", f"{base}/commits/", {"version": 2})
    assert r.status_code == 400 and "already committed" in r.json()["detail"]
    listed = admin(gw, "GET", f"{base}/versions/").json()
    assert [v["version"] for v in listed["results"]] == [3, 2, 1] and listed["count"] == 3  # newest first
    assert admin(gw, "GET", f"{base}/versions/?page_size=500").status_code == 200
    assert admin(gw, "GET", f"{base}/versions/?page_size=501").status_code == 400

    r = admin(gw, "POST", f"{base}/deployments/", {"version": 3})  # a draft: committed first
    assert r.status_code == 200 and r.json()["deployed_version"] == 3
    live = r.json()["live_version"]
    assert live["version"] == 3 and live["is_draft"] is False and live["is_deployed"] and live["committed_at"]
    shown = admin(gw, "GET", f"{base}/").json()
    assert (shown["latest_version"], shown["version_count"], shown["deployed_version"]) == (3, 3, 3)

    r = admin(gw, "DELETE", f"{base}/versions/3/")
    assert r.status_code == 400 and "deployed" in r.json()["detail"]
    assert admin(gw, "DELETE", f"{base}/versions/2/").status_code == 204
    assert admin(gw, "GET", f"{base}/versions/2/").json() == {"detail": f"Prompt {prompt_id} has no version 2"}
    assert admin(gw, "DELETE", f"{base}/versions/2/").status_code == 404
    assert admin(gw, "GET", f"{base}/versions/two/").status_code == 404
    assert admin(gw, "POST", f"{base}/deployments/", {"version": 2}).status_code == 404
    r = admin(gw, "POST", f"{base}/deployments/", {})
    assert r.status_code == 400 and r.json()["detail"].startswith("version: required")
    # the deleted highest number is never given again
    assert admin(gw, "DELETE", f"{base}/versions/1/").status_code == 204
    assert add_version(gw, prompt_id, USER)["version"] == 4

    missing = "/api/prompts/no-such-prompt"
    assert admin(gw, "GET", f"{missing}/versions/").json() == {"detail": "Prompt no-such-prompt not found"}
    assert admin(gw, "POST", f"{missing}/versions/", {"messages": USER, "model": "gpt-test"}).status_code == 404
    assert admin(gw, "POST", f"{missing}/commits/", {}).status_code == 404
    assert admin(gw, "POST", f"{missing}/deployments/", {"version": 1}).status_code == 404


@pytest.mark.parametrize(("body", "message"), [
    ({"model": "gpt-test"}, "messages: required"),
    ({"model": "gpt-test", "messages": []}, "messages: required"),
    ({"model": "gpt-test", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                        {"role": "robot", "content": "c"}]}, "messages[2].role: expected one of"),
    ({"model": "gpt-test", "messages": [{"role": "user", "content": 5}]}, "messages[0].content: expected"),
    ({"model": "gpt-test", "messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0]"),
    ({"messages": USER}, "model: required"),
    ({"messages": USER, "model": "no-such-model"},
     "model: Requested model no-such-model is not available in the model list"),
    ({"messages": USER, "model": "gpt-test", "temperature": 3}, "temperature: expected a number from 0 to 2"),
    ({"messages": USER, "model": "gpt-test", "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "model": "gpt-test", "stream": "yes"}, "stream"),
    ({"messages": USER, "model": "gpt-test", "tools": {"x": 1}}, "tools"),
    ({"messages": USER, "model": "gpt-test", "variables": ["x"]}, "variables"),
    ({"messages": USER, "model": "gpt-test", "fallback_models": ["gpt-test", "nope"]}, "fallback_models[1]: Requested"),
    ({"messages": USER, "load_balance_models": [{"model": "gpt-test", "weight": 0}]}, "load_balance_models[0].weight"),
    ({"messages": USER, "load_balance_models": [{"model": "nope", "weight": 1}]}, "load_balance_models[0].model"),
    ({"messages": USER, "model": "gpt-test", "deploy": "yes"}, "deploy"),
    ({"messages": USER, "model": "gpt-test", "top_k": 3}, "top_k: unknown field"),
])
def test_a_bad_version_is_a_400_naming_the_field(gw: GatewayProcess, body: dict[str, Any], message: str) -> None:
    prompt_id = admin(gw, "POST", "/api/prompts/", {"name": "bad versions"}).json()["prompt_id"]
    r = admin(gw, "POST", f"/api/prompts/{prompt_id}/versions/", body)
    assert r.status_code == 400 and r.json()["detail"].startswith(message), r.text
    assert admin(gw, "GET", f"/api/prompts/{prompt_id}/").json()["version_count"] == 0


# -- rendering at inference ---------------------------------------------------------------------


def test_a_deployed_prompt_is_rendered_echoed_and_logged(gw: GatewayProcess, client: OpenAI,
                                                          mock: MockUpstream) -> None:
    messages = [{"role": "system", "content": "You are {{role}}."}, *USER]
    prompt_id = new_prompt(gw, messages, name="Explainer", variables={"role": "a teacher"}, temperature=0.4)
    answer, log_id = ask(client, {"prompt_id": prompt_id, "variables": {"topic": "cats"}})
    rendered = [{"role": "system", "content": "You are a teacher."},
                {"role": "user", "content": "Tell me about cats."}]
    assert sent(mock)["messages"] == rendered
    assert sent(mock)["model"] == "mock-ok" and sent(mock)["temperature"] == 0.4
    assert "prompt" not in sent(mock) and "variables" not in sent(mock)
    assert answer.choices[0].message.content and answer.model_extra["prompt_message"] == rendered

    log = log_detail(gw, log_id)
    assert (log["prompt_id"], log["prompt_name"], log["prompt_version_number"]) == (prompt_id, "Explainer", 1)
    assert log["variables"] == {"role": "a teacher", "topic": "cats"}
    assert log["prompt_messages"] == rendered and log["model_requested"] == "gpt-test"


def test_version_omitted_pinned_or_latest(gw: GatewayProcess, client: OpenAI, mock: MockUpstream) -> None:
    prompt_id = new_prompt(gw, [{"role": "user", "content": "one"}])
    add_version(gw, prompt_id, [{"role": "user", "content": "two"}])
    admin(gw, "POST", f"/api/prompts/{prompt_id}/commits/", {})
    add_version(gw, prompt_id, [{"role": "user", "content": "three (draft)"}])
    for version, text, number in ((None, "one", 1), (2, "two", 2), ("latest", "three (draft)", 3)):
        prompt = {"prompt_id": prompt_id} if version is None else {"prompt_id": prompt_id, "version": version}
        _, log_id = ask(client, prompt)
        assert sent(mock)["messages"] == [{"role": "user", "content": text}]
        assert log_detail(gw, log_id)["prompt_version_number"] == number

    with pytest.raises(openai.NotFoundError) as missing:
        ask(client, {"prompt_id": prompt_id, "version": 9})
    assert missing.value.body == {"detail": f"Prompt {prompt_id} has no version 9"}
    with pytest.raises(openai.NotFoundError) as unknown:
        ask(client, {"prompt_id": "no-such-prompt"})
    assert unknown.value.body == {"detail": "Prompt no-such-prompt not found"}
    undeployed = new_prompt(gw, deploy=False)
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, {"prompt_id": undeployed})
    assert refused.value.body == {"detail": f"prompt {undeployed} has no deployed version; pass prompt.version"}


def test_variables_precedence_and_missing_values(gw: GatewayProcess, client: OpenAI, mock: MockUpstream) -> None:
    text = "{{a}}|{{ b }}|{{c}}|{{d}}"
    prompt_id = new_prompt(gw, [{"role": "user", "content": text}], variables={"a": "A0", "b": "B0", "c": "C0"})
    _, log_id = ask(client, {"prompt_id": prompt_id, "variables": {"c": "C2", "d": {"n": [1, True]}}},
                    extra_body={"variables": {"b": "B1", "c": "C1"}})
    assert sent(mock)["messages"][0]["content"] == 'A0|B1|C2|{"n":[1,true]}'
    assert log_detail(gw, log_id)["variables"] == {"a": "A0", "b": "B1", "c": "C2", "d": {"n": [1, True]}}

    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, {"prompt_id": prompt_id})
    assert refused.value.body == {"detail": f"prompt.variables.d: required by prompt {prompt_id} version 1"}


def test_child_prompts_two_deep_cycles_and_depth(gw: GatewayProcess, client: OpenAI, mock: MockUpstream) -> None:
    grandchild = new_prompt(gw, [{"role": "user", "content": "be {{tone}}"}])
    child = new_prompt(gw, [{"role": "system", "content": "Style:"}, {"role": "user", "content": "{{inner}}!"}])
    parent = new_prompt(gw, [{"role": "system", "content": "{{style}}"}, *USER])
    style = {"_type": "prompt", "prompt_id": child, "variables": {
        "inner": {"_type": "prompt", "prompt_id": grandchild, "version": 1, "variables": {"tone": "brief"}}}}
    _, log_id = ask(client, {"prompt_id": parent, "variables": {"topic": "owls", "style": style}})
    assert sent(mock)["messages"] == [{"role": "system", "content": "Style:\n\nbe brief!"},
                                      {"role": "user", "content": "Tell me about owls."}]
    logged = log_detail(gw, log_id)["variables"]["style"]
    assert logged["_rendered_result"] == "Style:\n\nbe brief!" and logged["prompt_id"] == child
    assert logged["variables"]["inner"]["_rendered_result"] == "be brief"

    great = new_prompt(gw, [{"role": "user", "content": "{{deeper}}"}])
    too_deep = {"_type": "prompt", "prompt_id": child, "variables": {"inner": {
        "_type": "prompt", "prompt_id": great, "variables": {"deeper": {"_type": "prompt", "prompt_id": grandchild}}}}}
    with pytest.raises(openai.BadRequestError) as deep:
        ask(client, {"prompt_id": parent, "variables": {"topic": "x", "style": too_deep}})
    assert "nest at most 2 deep" in deep.value.body["detail"]
    assert deep.value.body["detail"].startswith("prompt.variables.style.variables.inner.variables.deeper:")

    loop_a = admin(gw, "POST", "/api/prompts/", {"name": "loop a"}).json()["prompt_id"]
    loop_b = new_prompt(gw, [{"role": "user", "content": "{{back}}"}],
                        variables={"back": {"_type": "prompt", "prompt_id": loop_a}})
    add_version(gw, loop_a, [{"role": "user", "content": "{{next}}"}], deploy=True,
                variables={"next": {"_type": "prompt", "prompt_id": loop_b}})
    with pytest.raises(openai.BadRequestError) as cycle:
        ask(client, {"prompt_id": loop_a})
    assert f"circular prompt reference: {loop_a} -> {loop_b} -> {loop_a}" in cycle.value.body["detail"]


def test_image_variables_become_content_parts(gw: GatewayProcess, client: OpenAI, mock: MockUpstream) -> None:
    prompt_id = new_prompt(gw, [{"role": "user", "content": "Describe {{picture}} briefly."}])
    url = "https://example.com/cat.png"
    ask(client, {"prompt_id": prompt_id, "variables": {"picture": {"_type": "image_url", "value": url}}})
    assert sent(mock)["messages"][0]["content"] == [
        {"type": "text", "text": "Describe "}, {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": " briefly."}]


def test_echo_off_and_streams(gw: GatewayProcess, client: OpenAI, mock: MockUpstream) -> None:
    prompt_id = new_prompt(gw)
    answer, _ = ask(client, {"prompt_id": prompt_id, "echo": False, "variables": {"topic": "x"}})
    assert "prompt_message" not in (answer.model_extra or {})
    stream = client.chat.completions.create(model=NOT_GIVEN, messages=NOT_GIVEN, stream=True,
                                            extra_body={"prompt": {"prompt_id": prompt_id, "variables": {"topic": "y"}}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text and sent(mock)["stream"] is True
    assert sent(mock)["messages"] == [{"role": "user", "content": "Tell me about y."}]


def test_v1_request_params_win_by_default(gw: GatewayProcess, client: OpenAI, mock: MockUpstream) -> None:
    prompt_id = new_prompt(gw, temperature=0.1, max_tokens=50, top_p=0.5)
    ask(client, {"prompt_id": prompt_id, "variables": {"topic": "x"}}, model="other", temperature=0.9,
        messages=[{"role": "user", "content": "and more"}])
    body = sent(mock)
    assert body["model"] == "mock-other" and body["temperature"] == 0.9  # the request's
    assert body["max_tokens"] == 50 and body["top_p"] == 0.5  # the version's, where the request said nothing
    assert body["messages"] == [{"role": "user", "content": "Tell me about x."}, {"role": "user", "content": "and more"}]


def test_v1_override_and_override_params(gw: GatewayProcess, client: OpenAI, mock: MockUpstream) -> None:
    prompt_id = new_prompt(gw, [{"role": "system", "content": "sys {{topic}}"}, *USER], temperature=0.1,
                           max_tokens=50)
    own = [{"role": "user", "content": "placeholder"}]
    ask(client, {"prompt_id": prompt_id, "variables": {"topic": "x"}, "override": True}, model="other",
        temperature=0.9, messages=own)
    body = sent(mock)
    assert body["model"] == "mock-ok" and body["temperature"] == 0.1  # the version's win
    assert [m["content"] for m in body["messages"]] == ["sys x", "Tell me about x.", "placeholder"]

    extra = [{"role": "user", "content": "from override_params"}]
    answer, _ = ask(client, {"prompt_id": prompt_id, "variables": {"topic": "x"}, "override": True,
                             "override_params": {"temperature": 0.7, "messages": extra}})
    assert sent(mock)["temperature"] == 0.7 and sent(mock)["max_tokens"] == 50
    assert sent(mock)["messages"] == extra and answer.model_extra["prompt_message"] == extra  # "override": replaced
    ask(client, {"prompt_id": prompt_id, "variables": {"topic": "x"}, "override": True,
                 "override_params": {"messages": extra}, "override_config": {"messages_override_mode": "append"}})
    assert [m["content"] for m in sent(mock)["messages"]] == ["sys x", "Tell me about x.", "from override_params"]

    ask(client, {"prompt_id": prompt_id, "variables": {"topic": "x"}, "override_params": {"temperature": 0.7}},
        temperature=0.2)
    assert sent(mock)["temperature"] == 0.2  # override_params apply only with override: true


def test_v2_prompt_config_wins_and_patch(gw: GatewayProcess, mock: MockUpstream) -> None:
    prompt_id = new_prompt(gw, temperature=0.1, max_tokens=50)
    prompt = {"prompt_id": prompt_id, "variables": {"topic": "x"}, "schema_version": 2,
              "patch": {"max_tokens": 20, "seed": 7}}
    r = raw_chat(gw, {"model": "other", "temperature": 0.9, "messages": [{"role": "user", "content": "more"}],
                      "prompt": prompt})
    assert r.status_code == 200, r.text
    body = sent(mock)
    assert body["model"] == "mock-ok" and body["temperature"] == 0.1
    assert body["max_tokens"] == 20 and body["seed"] == 7
    assert [m["content"] for m in body["messages"]] == ["Tell me about x.", "more"]

    for patch, field in (({"messages": []}, "prompt.patch.messages"), ({"input": "x"}, "prompt.patch.input")):
        r = raw_chat(gw, {"prompt": {**prompt, "patch": patch}})
        assert r.status_code == 400 and r.json()["detail"].startswith(field), r.text
    r = raw_chat(gw, {"prompt": {**prompt, "schema_version": 3}})
    assert r.status_code == 400 and r.json()["detail"].startswith("prompt.schema_version")


def test_bad_prompt_params(gw: GatewayProcess) -> None:
    prompt_id = new_prompt(gw)
    for prompt, field in (({}, "prompt.prompt_id"), ({"prompt_id": 5}, "prompt.prompt_id"),
                          ({"prompt_id": prompt_id, "version": "newest"}, "prompt.version"),
                          ({"prompt_id": prompt_id, "echo": "no"}, "prompt.echo"),
                          ({"prompt_id": prompt_id, "colour": 1}, "prompt.colour")):
        r = raw_chat(gw, {"prompt": prompt})
        assert r.status_code == 422 and field in r.json()["errors"], r.text
    r = raw_chat(gw, {"prompt": "not an object"})
    assert r.status_code == 422 and "prompt" in r.json()["errors"]
    r = raw_chat(gw, {"prompt": {"prompt_id": prompt_id, "variables": {"topic": "x"}},
                      "input": "hi", "model": "gpt-test"}, path="/api/embeddings")
    assert r.status_code == 400 and "chat completions" in r.json()["detail"]
    r = raw_chat(gw, {"prompt": {"prompt_id": prompt_id, "variables": {"topic": {"_type": "video"}}}})
    assert r.status_code == 400 and r.json()["detail"].startswith("prompt.variables.topic._type")


def test_a_versions_fallback_models_serve_when_its_model_fails(gw: GatewayProcess, client: OpenAI,
                                                                mock: MockUpstream) -> None:
    prompt_id = new_prompt(gw, model="broken", fallback_models=["gpt-test"])
    answer, log_id = ask(client, {"prompt_id": prompt_id, "variables": {"topic": "x"}})
    assert answer.choices[0].message.content
    assert mock.count("mock-status-503") == 1 and mock.count("mock-ok") == 1
    log = log_detail(gw, log_id)
    assert log["fallback"] is True and log["model_requested"] == "broken"
    # the request's own (empty) list wins over the version's
    with pytest.raises(openai.InternalServerError):
        ask(client, {"prompt_id": prompt_id, "variables": {"topic": "x"}}, extra_body={"fallback_models": []})


def test_a_versions_load_balance_models(gw: GatewayProcess, client: OpenAI, mock: MockUpstream) -> None:
    prompt_id = new_prompt(gw, model=None, load_balance_models=[{"model": "gpt-test", "weight": 1},
                                                                 {"model": "other", "weight": 1}])
    served = set()
    for _ in range(20):  # both are picked (all 20 the same: p = 2e-6)
        _, log_id = ask(client, {"prompt_id": prompt_id, "variables": {"topic": "x"}})
        served.add(sent(mock)["model"])
    assert served == {"mock-ok", "mock-other"}
    assert log_detail(gw, log_id)["model_requested"] in ("gpt-test", "other")
    # the request's model wins (schema 1, no override) over the version's list
    ask(client, {"prompt_id": prompt_id, "variables": {"topic": "x"}}, model="gpt-test")
    assert sent(mock)["model"] == "mock-ok"


def test_version_stream_tools_and_response_format_apply_when_the_request_has_none(gw: GatewayProcess,
                                                                                   mock: MockUpstream) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    schema = {"name": "answer", "schema": {"type": "object"}}
    prompt_id = new_prompt(gw, stream=True, tools=tools, tool_choice="auto", json_schema=schema)
    r = raw_chat(gw, {"prompt": {"prompt_id": prompt_id, "variables": {"topic": "x"}}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.rstrip().endswith("data: [DONE]") and "prompt_message" not in r.text  # streams are not echoed
    body = sent(mock)
    assert body["stream"] is True and body["tools"] == tools and body["tool_choice"] == "auto"
    assert body["response_format"] == {"type": "json_schema", "json_schema": schema}

    own = [{"type": "function", "function": {"name": "mine", "parameters": {"type": "object"}}}]
    r = raw_chat(gw, {"prompt": {"prompt_id": prompt_id, "variables": {"topic": "x"}, "schema_version": 2},
                      "stream": False, "tools": own})
    assert r.status_code == 200 and r.json()["prompt_message"]
    assert sent(mock)["tools"] == own and sent(mock)["stream"] is False


def test_disable_log_keeps_the_prompt_but_not_the_variables(gw: GatewayProcess, client: OpenAI) -> None:
    prompt_id = new_prompt(gw)
    _, log_id = ask(client, {"prompt_id": prompt_id, "variables": {"topic": "secret"}},
                    extra_body={"disable_log": True})
    log = log_detail(gw, log_id)
    assert log["prompt_id"] == prompt_id and log["prompt_version_number"] == 1
    assert log["variables"] is None and log["prompt_messages"] is None


def test_requests_without_a_prompt_are_untouched(gw: GatewayProcess, client: OpenAI, mock: MockUpstream) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "{{not_a_template}}"}],
        extra_body={"variables": {"not_a_template": "x"}})
    assert "prompt_message" not in (raw.parse().model_extra or {})
    assert sent(mock)["messages"] == [{"role": "user", "content": "{{not_a_template}}"}]
    assert log_detail(gw, raw.headers["x-respan-log-id"])["prompt_id"] is None


# -- two gateway processes sharing the admin store ------------------------------------------------


def test_a_second_process_serves_a_prompt_made_through_the_first(gw: GatewayProcess, mock_upstream: MockUpstream,
                                                                  tmp_path: Path) -> None:
    workdir = tmp_path / "second"
    second = GatewayProcess(config(mock_upstream, workdir, gw.workdir / "admin.db"), workdir).start()
    try:
        prompt_id = new_prompt(gw, [{"role": "user", "content": "shared {{topic}}"}])
        client = OpenAI(base_url=f"{second.url}/api", api_key=KEY, max_retries=0)

        def served() -> bool:
            try:
                ask(client, {"prompt_id": prompt_id, "variables": {"topic": "store"}})
            except (openai.NotFoundError, openai.BadRequestError):  # not there yet, or not deployed yet
                return False
            return True

        assert wait_until(served, timeout=5)
        assert mock_upstream.last()["body"]["messages"] == [{"role": "user", "content": "shared store"}]

        # versions made at once through both processes get distinct numbers
        numbers: list[int] = []

        def make(process: GatewayProcess) -> None:
            numbers.append(add_version(process, prompt_id, USER)["version"])

        threads = [threading.Thread(target=make, args=(p,)) for p in (gw, second) * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(numbers) == list(range(2, 10))
        assert wait_until(lambda: admin(second, "GET", f"/api/prompts/{prompt_id}/").json()["version_count"] == 9,
                          timeout=5)
    finally:
        second.stop()


# -- llmrelay prompts push -----------------------------------------------------------------------


def push(gw: GatewayProcess, path: Path, admin_key: str = ADMIN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLMRELAY_URL": gw.url, "LLMRELAY_ADMIN_KEY": admin_key}
    return subprocess.run([sys.executable, "-m", "proxy.cli", "prompts", "push", str(path)], capture_output=True,
                          text=True, env=env, timeout=30)


def test_prompts_push(gw: GatewayProcess, client: OpenAI, mock: MockUpstream, tmp_path: Path) -> None:
    prompt_id = f"pushed-{uuid.uuid4().hex[:8]}"
    spec = {"prompt_id": prompt_id, "name": "Pushed", "tags": ["cli"], "model": "gpt-test", "temperature": 0.2,
            "messages": [{"role": "user", "content": "Hi {{who}}"}], "variables": {"who": "there"}, "deploy": True}
    path = tmp_path / "prompt.yaml"
    path.write_text(yaml.safe_dump(spec))
    first = push(gw, path)
    assert first.returncode == 0, first.stderr
    assert f"created prompt {prompt_id}" in first.stdout and "created version 1 (deployed)" in first.stdout
    ask(client, {"prompt_id": prompt_id})
    assert sent(mock)["messages"] == [{"role": "user", "content": "Hi there"}]

    again = push(gw, path)
    assert again.returncode == 0 and f"prompt {prompt_id}: unchanged (version 1)" in again.stdout

    spec.update(temperature=0.5, name="Pushed again", commit_message="warmer")
    path.write_text(yaml.safe_dump(spec))
    changed = push(gw, path)
    assert changed.returncode == 0, changed.stderr
    assert "updated name" in changed.stdout and "created version 2 (deployed)" in changed.stdout
    shown = admin(gw, "GET", f"/api/prompts/{prompt_id}/").json()
    assert shown["name"] == "Pushed again" and shown["deployed_version"] == 2
    assert shown["live_version"]["temperature"] == 0.5 and shown["live_version"]["commit_message"] == "warmer"

    path.write_text(yaml.safe_dump({**spec, "messages": [{"role": "robot", "content": "x"}]}))
    refused = push(gw, path)
    assert refused.returncode == 1 and "400: messages[0].role" in refused.stderr
    assert push(gw, path, admin_key=KEY).returncode == 1
    path.write_text("name: no id\n")
    missing = push(gw, path)
    assert missing.returncode == 1 and "prompt_id: required" in missing.stderr


def test_a_gateway_without_the_stage_refuses_a_prompt(gateway: GatewayProcess) -> None:
    """pipeline [auth]: a `prompt` is a clear 400, never a body without messages sent upstream."""
    r = httpx.post(f"{gateway.url}/api/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                   json={"prompt": {"prompt_id": "anything"}})
    assert r.status_code == 400 and "`prompts` stage is not in its pipeline" in r.json()["detail"]
