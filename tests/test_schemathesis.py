"""schemathesis against a real gateway process (mock upstream behind it), driven by /openapi.json:
no generated input may get a 5xx from the gateway, and every 4xx the gateway answers itself is
`{"detail": ...}` (the native passthroughs: their provider's error shape) naming the field when it
is a field error. Bounded (few examples per operation, deterministic) so CI is repeatable and quick."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from proxy import openapi
from tests.conftest import ADMIN_KEY, ADMIN_KEYS, KEY, GatewayProcess, base_config, module_gateway
from tests.mock_upstream import MockUpstream

PIPELINE = ["auth", "prompts", "limits", "cache", "routing", "credentials", "fallback"]
MODELS = ["gpt-test", "gpt-test-alias", "demo"]
NATIVE = ("/api/anthropic/", "/api/google/")
# POST /api/admin/reload restarts the workers under the run (tests/test_reload.py covers it)
SKIPPED = ("/api/admin/reload",)


def fuzzed_document() -> dict[str, Any]:
    """The served document, with `model` steered towards models the test gateway serves (any string still
    possible) and the reload operations left out."""
    doc = copy.deepcopy(openapi.document())
    for path in list(doc["paths"]):
        if path.startswith(SKIPPED):
            del doc["paths"][path]
            continue
        for op in doc["paths"][path].values():
            schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            model = schema.get("properties", {}).get("model")
            if model is not None:
                schema["properties"]["model"] = {"anyOf": [{"enum": MODELS}, model]}
    return doc


@pytest.fixture(scope="module")
def gateway(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    def config(workdir: Any) -> dict[str, Any]:
        cfg = base_config(mock_upstream, workdir, pipeline=PIPELINE, admin_keys=ADMIN_KEYS)
        cfg["server"]["timeouts"] = {"connect": 1, "read": 5, "stream_idle": 5}
        return cfg

    yield from module_gateway(tmp_path_factory, "schemathesis", config=config)


schema = schemathesis.openapi.from_dict(fuzzed_document())
OPERATIONS = [result.ok() for result in schema.get_all_operations()]
EXAMPLES = int(os.environ.get("LLMRELAY_FUZZ_EXAMPLES", "4"))  # per operation and generation mode
FAST = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))


def is_gateway_error(case: Any, response: Any) -> bool:
    """A 4xx the gateway answered itself (not the provider's, passed through)."""
    return 400 <= response.status_code < 500 and "x-llmrelay-provider" not in response.headers


@schemathesis.check
def error_shape(ctx: Any, response: Any, case: Any) -> None:
    if not is_gateway_error(case, response):
        return
    data = response.json()
    where = f"{case.method} {case.path} -> {response.status_code} {response.text[:300]}"
    assert isinstance(data, dict), where
    if case.path.startswith(NATIVE) and "error" in data:  # the provider's own error shape
        error = data["error"]
        assert isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"], where
        return
    assert isinstance(data.get("detail"), str) and data["detail"], where
    if response.status_code == 422:  # a field error: `errors` names each field
        errors = data.get("errors")
        assert isinstance(errors, dict) and errors, where
        assert all(isinstance(k, str) and k and isinstance(v, list) and v for k, v in errors.items()), where


def can_be_wrong(operation: Any) -> bool:
    """Whether negative mode can make this operation's input invalid: a body, or a parameter that is
    not just any string (a GET without parameters, or with only a path segment, has none)."""
    raw = operation.definition.raw
    return "requestBody" in raw or any(_can_be_wrong(p) for p in raw.get("parameters", []))


def _can_be_wrong(parameter: dict[str, Any]) -> bool:
    schema = parameter.get("schema", {})
    if parameter.get("in") == "path":  # a non-empty string: an empty one cannot be put in a path
        return schema.get("type") != "string"
    return schema != {"type": "string"}


CASES = [pytest.param(op, mode, id=f"{op.label}-{mode.value}") for op in OPERATIONS for mode in GenerationMode
         if mode is GenerationMode.POSITIVE or can_be_wrong(op)]


@pytest.mark.parametrize("operation,mode", CASES)
def test_no_server_error_and_errors_name_the_field(operation: Any, mode: GenerationMode,
                                                  gateway: GatewayProcess) -> None:
    raw = operation.definition.raw
    security = raw.get("security") or []
    headers = {}
    if security == openapi.ADMIN:
        headers["authorization"] = f"Bearer {ADMIN_KEY}"
    elif security:
        headers["authorization"] = f"Bearer {KEY}"

    @FAST
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        case.call_and_validate(base_url=gateway.url, headers=headers, checks=[not_a_server_error, error_shape])

    run()
