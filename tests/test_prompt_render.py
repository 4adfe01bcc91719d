"""The prompts stage's pure parts: rendering (placeholders, child prompts, images), version choice,
the merge rules of schema versions 1 and 2, and the index."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from plugins.prompts import PromptIndex, PromptsStage, with_prompt_message
from plugins.prompts.merge import merge
from plugins.prompts.render import PromptEntry, flatten, pick_version, render
from plugins.prompts.request import PromptRequest, parse
from proxy.call import Call, Reply
from proxy.errors import BadRequest, NotFound, ValidationFailed
from proxy.params import EMPTY
from proxy.store import StoredObject


def entry(prompt_id: str, *versions: dict[str, Any], deployed: int | None = 1) -> PromptEntry:
    data = {"prompt_id": prompt_id, "name": prompt_id.title(), "deployed_version": deployed,
            "versions": {str(i + 1): {"version": i + 1, **v} for i, v in enumerate(versions)}}
    return PromptEntry.of(data)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def lookup(*entries: PromptEntry) -> Any:
    return {e.prompt_id: e for e in entries}.get


def test_placeholders_with_and_without_spaces_and_json_values() -> None:
    p = entry("p", {"messages": [user("{{a}} {{ b }} {{c}} {{  d  }} {% raw %}")], "variables": {"a": "A"}})
    out = render(lookup(p), "p", None, [("variables", {"b": 2, "c": None}), ("prompt.variables", {"d": {"k": "v"}})])
    assert out.messages == [user('A 2 null {"k":"v"} {% raw %}')]
    assert (out.prompt_id, out.prompt_name, out.version_number) == ("p", "P", 1)


def test_later_layers_win() -> None:
    p = entry("p", {"messages": [user("{{x}}")], "variables": {"x": "default"}})
    assert render(lookup(p), "p", None, []).messages == [user("default")]
    out = render(lookup(p), "p", None, [("variables", {"x": "top"}), ("prompt.variables", {"x": "prompt"})])
    assert out.messages == [user("prompt")] and out.variables == {"x": "prompt"}


def test_a_missing_value_names_the_variable_prompt_and_version() -> None:
    p = entry("p", {"messages": [user("ok")]}, {"messages": [user("{{who}}")]})
    with pytest.raises(BadRequest, match=r"^prompt.variables.who: required by prompt p version 2$"):
        render(lookup(p), "p", 2, [])


def test_text_parts_are_rendered_and_other_parts_kept() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    p = entry("p", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi {{n}}"}, image]}]})
    out = render(lookup(p), "p", None, [("prompt.variables", {"n": "Ada"})])
    assert out.messages[0]["content"] == [{"type": "text", "text": "hi Ada"}, image]


def test_image_variables_split_content_into_parts() -> None:
    pic = {"_type": "image_url", "value": "data:image/png;base64,AAAA"}
    part = {"type": "text", "text": "see {{pic}}", "cache_control": {"type": "ephemeral"}}
    p = entry("p", {"messages": [user("{{pic}}"), {"role": "user", "content": [part]}]})
    out = render(lookup(p), "p", None, [("prompt.variables", {"pic": pic})])
    image = {"type": "image_url", "image_url": {"url": pic["value"]}}
    assert out.messages[0]["content"] == [image]
    assert out.messages[1]["content"] == [{"type": "text", "text": "see "}, {**image, "cache_control": {"type": "ephemeral"}}]
    with pytest.raises(BadRequest, match=r"prompt.variables.pic.value"):
        render(lookup(p), "p", None, [("prompt.variables", {"pic": {"_type": "image_url"}})])


def test_child_prompts_are_flattened_and_logged() -> None:
    child = entry("child", {"messages": [{"role": "system", "content": "A {{x}}"}, user("B")],
                            "variables": {"x": "1"}}, {"messages": [user("v2 {{x}}")]}, deployed=None)
    parent = entry("parent", {"messages": [user("<{{c}}>")]})
    ref = {"_type": "prompt", "prompt_id": "child", "version": "latest", "variables": {"x": "2"}}
    out = render(lookup(child, parent), "parent", None, [("prompt.variables", {"c": ref})])
    assert out.messages == [user("<v2 2>")]
    assert out.variables["c"] == {**ref, "variables": {"x": "2"}, "_rendered_result": "v2 2"}
    with pytest.raises(BadRequest, match=r"^prompt child has no deployed version; pass prompt.variables.c.version$"):
        render(lookup(child, parent), "parent", None, [("prompt.variables", {"c": {"_type": "prompt", "prompt_id": "child"}})])
    assert flatten(render(lookup(child), "child", 1, []).messages) == "A 1\n\nB"


def test_child_depth_and_cycles() -> None:
    def chain(*ids: str) -> list[PromptEntry]:
        made = []
        for here, below in zip(ids, [*ids[1:], None], strict=True):
            variables = {"v": {"_type": "prompt", "prompt_id": below}} if below else {}
            made.append(entry(here, {"messages": [user("{{v}}" if below else here)], "variables": variables}))
        return made

    assert render(lookup(*chain("a", "b", "c")), "a", None, []).messages == [user("c")]  # depth 2
    with pytest.raises(BadRequest, match=r"nest at most 2 deep: a -> b -> c -> d"):
        render(lookup(*chain("a", "b", "c", "d")), "a", None, [])
    cycle = entry("a", {"messages": [user("{{v}}")], "variables": {"v": {"_type": "prompt", "prompt_id": "b"}}})
    back = entry("b", {"messages": [user("{{v}}")], "variables": {"v": {"_type": "prompt", "prompt_id": "a"}}})
    with pytest.raises(BadRequest, match=r"circular prompt reference: a -> b -> a"):
        render(lookup(cycle, back), "a", None, [])
    itself = entry("s", {"messages": [user("{{v}}")], "variables": {"v": {"_type": "prompt", "prompt_id": "s"}}})
    with pytest.raises(BadRequest, match=r"circular prompt reference: s -> s"):
        render(lookup(itself), "s", None, [])


def test_version_choice() -> None:
    p = entry("p", {"messages": []}, {"messages": []}, {"messages": []}, deployed=2)
    assert pick_version(p, None, "prompt")[0] == 2
    assert pick_version(p, 1, "prompt")[0] == 1
    assert pick_version(p, "latest", "prompt")[0] == 3
    with pytest.raises(NotFound, match="Prompt p has no version 7"):
        pick_version(p, 7, "prompt")
    with pytest.raises(NotFound, match="Prompt q not found"):
        render(lookup(p), "q", None, [])


def test_the_prompt_param_is_checked() -> None:
    assert parse({"prompt_id": "p"}) == PromptRequest(prompt_id="p")
    for prompt, field in (({}, "prompt.prompt_id"), ({"prompt_id": "p", "version": 0}, "prompt.version"),
                          ({"prompt_id": "p", "override": "yes"}, "prompt.override"),
                          ({"prompt_id": "p", "override_config": {"messages_override_mode": "merge"}},
                           "prompt.override_config.messages_override_mode"),
                          ({"prompt_id": "p", "override_params": {"messages": "x"}}, "prompt.override_params.messages")):
        with pytest.raises(ValidationFailed) as failed:
            parse(prompt)
        assert failed.value.field == field
    for prompt, start in (({"prompt_id": "p", "schema_version": 3}, "prompt.schema_version"),
                          ({"prompt_id": "p", "schema_version": 2, "patch": {"messages": []}}, "prompt.patch.messages"),
                          ({"prompt_id": "p", "patch": {"seed": 1}}, "prompt.patch"),
                          ({"prompt_id": "p", "override_params": {"fallback_models": []}},
                           "prompt.override_params.fallback_models")):
        with pytest.raises(BadRequest) as refused:
            parse(prompt)
        assert refused.value.detail.startswith(start)


VERSION = {"model": "v-model", "temperature": 0.1, "max_tokens": 9, "stream": True, "tools": [{"t": 1}],
           "json_schema": {"name": "s"}}
RENDERED = [user("rendered")]


def test_schema_1_without_override_the_request_wins() -> None:
    body = {"model": "r-model", "temperature": 0.9, "messages": [user("mine")]}
    out = merge(body, VERSION, RENDERED, PromptRequest("p"))
    assert out.body == {"model": "r-model", "temperature": 0.9, "max_tokens": 9, "stream": True, "tools": [{"t": 1}],
                        "response_format": {"type": "json_schema", "json_schema": {"name": "s"}},
                        "messages": [user("rendered"), user("mine")]}
    assert merge({}, VERSION, RENDERED, PromptRequest("p")).body["model"] == "v-model"
    assert body == {"model": "r-model", "temperature": 0.9, "messages": [user("mine")]}  # not mutated


def test_schema_1_with_override() -> None:
    body = {"model": "r-model", "temperature": 0.9, "stream": False, "tools": [{"mine": 1}]}
    request = PromptRequest("p", override=True, override_params={"seed": 3, "messages": [user("op")]})
    out = merge(body, VERSION, RENDERED, request)
    assert out.body["model"] == "v-model" and out.body["temperature"] == 0.1 and out.body["seed"] == 3
    assert out.body["stream"] is False and out.body["tools"] == [{"mine": 1}]  # only where the request said nothing
    assert out.body["messages"] == [user("op")] and out.prompt_messages == [user("op")]
    appended = merge(body, VERSION, RENDERED, PromptRequest("p", override=True, messages_override_mode="append",
                                                            override_params={"messages": [user("op")]}))
    assert appended.body["messages"] == [user("rendered"), user("op")]
    ignored = merge(body, VERSION, RENDERED, PromptRequest("p", override_params={"seed": 3}))
    assert "seed" not in ignored.body


def test_schema_2_the_prompt_wins_then_patch() -> None:
    body = {"model": "r-model", "temperature": 0.9, "max_tokens": 1, "messages": [user("mine")]}
    out = merge(body, VERSION, RENDERED, PromptRequest("p", schema_version=2, patch={"max_tokens": 5}))
    assert out.body["model"] == "v-model" and out.body["temperature"] == 0.1 and out.body["max_tokens"] == 5
    assert out.body["messages"] == [user("rendered"), user("mine")]


def test_load_balanced_versions_leave_the_model_to_routing() -> None:
    version = {"load_balance_models": [{"model": "a", "weight": 1}]}
    assert "model" not in merge({"model": "r"}, version, RENDERED, PromptRequest("p", schema_version=2)).body
    assert merge({"model": "r"}, version, RENDERED, PromptRequest("p")).body["model"] == "r"
    assert "model" not in merge({}, version, RENDERED, PromptRequest("p")).body


def test_the_index_keeps_unchanged_entries() -> None:
    def obj(prompt_id: str, updated: float) -> StoredObject:
        return StoredObject("prompt", prompt_id, {"prompt_id": prompt_id, "name": "n", "deployed_version": None,
                                                  "versions": {}}, 1.0, updated)

    index = PromptIndex()
    index.load({"a": obj("a", 1.0), "b": obj("b", 1.0)})
    a, b = index.by_id["a"], index.by_id["b"]
    index.load({"a": obj("a", 1.0), "b": obj("b", 2.0)})
    assert index.by_id["a"] is a and index.by_id["b"] is not b
    index.load({"b": obj("b", 2.0)})
    assert set(index.by_id) == {"b"}


def test_a_request_without_a_prompt_passes_straight_through() -> None:
    stage = PromptsStage()
    call = Call(endpoint="chat", path="/api/chat/completions", body={"model": "m"}, params=EMPTY, headers={})
    reply = Reply(200, body=b'{"x": 1}')

    async def next_stage(seen: Call) -> Reply:
        assert seen is call and seen.params is EMPTY
        return reply

    assert asyncio.run(stage(call, next_stage)) is reply and reply.body == b'{"x": 1}' and call.state == {}


def test_echo_adds_prompt_message() -> None:
    assert orjson.loads(with_prompt_message(b'{"id": "x"}', RENDERED)) == {"id": "x", "prompt_message": RENDERED}
    assert with_prompt_message(b"not json", RENDERED) == b"not json"
