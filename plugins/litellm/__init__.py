"""LiteLLM integration: `LLMRelayCallback` logs LiteLLM calls to an llmrelay gateway's
`/api/v1/traces/ingest` (spec section 8). It needs LiteLLM: `pip install llmrelay[litellm]`.

It is a client-side library, not a gateway stage: nothing in the gateway loads it.
"""

from __future__ import annotations

try:
    import litellm.integrations.custom_logger  # noqa: F401
except ImportError as exc:
    if exc.name is not None and exc.name.split(".")[0] != "litellm":
        raise  # LiteLLM is there but something it needs is broken: show that, not our hint
    raise ImportError(
        "plugins.litellm needs the LiteLLM package, which is not installed: pip install llmrelay[litellm]"
    ) from exc

from plugins.litellm.callback import LLMRelayCallback

__all__ = ["LLMRelayCallback"]
