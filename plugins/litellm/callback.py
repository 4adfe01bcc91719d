"""LLMRelayCallback: a LiteLLM CustomLogger that logs every completion to llmrelay (or any endpoint
that takes `/api/v1/traces/ingest` span arrays), for teams that call providers with LiteLLM directly.

    import litellm
    from plugins.litellm import LLMRelayCallback

    litellm.callbacks = [LLMRelayCallback(api_key="sk-...", base_url="http://llmrelay:8080")]
    litellm.completion(model="openai/gpt-4o-mini", messages=[...],
                       metadata={"respan_params": {"customer_identifier": "acme", "trace_id": "t-1"}})

The LiteLLM call never waits for the log: the event is turned into a span and encoded on the
caller's thread (a snapshot: messages changed later are not what was sent), then queued; one
background thread sends the queue in batches (see plugins.litellm.shipper).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson
from litellm.integrations.custom_logger import CustomLogger

from plugins.litellm.payload import span_of
from plugins.litellm.shipper import Shipper

log = logging.getLogger("llmrelay.litellm")

INGEST_PATH = "/api/v1/traces/ingest"
DEFAULT_BASE_URL = "http://127.0.0.1:8080"  # a gateway on this machine, on llmrelay's default port
SEEN_MAX = 10_000  # call ids remembered to log each event once


class LLMRelayCallback(CustomLogger):
    def __init__(self, api_key: str | None = None, base_url: str | None = None, endpoint: str | None = None,
                 batch_size: int = 50, flush_interval: float = 1.0, max_queue: int = 10_000,
                 timeout: float = 10.0) -> None:
        super().__init__()
        self._api_key = api_key or os.environ.get("LLMRELAY_API_KEY") or os.environ.get("RESPAN_API_KEY")
        base = base_url or os.environ.get("LLMRELAY_BASE_URL") or os.environ.get("RESPAN_BASE_URL") or DEFAULT_BASE_URL
        self.endpoint = endpoint or ingest_url(base)
        self._seen: OrderedDict[tuple[str, bool], None] = OrderedDict()
        self._seen_lock = threading.Lock()
        self._errors = 0
        if not self._api_key:
            log.warning("llmrelay: no api_key (nor LLMRELAY_API_KEY / RESPAN_API_KEY): LiteLLM calls are not logged")
            self._shipper: Shipper | None = None
            return
        self._shipper = Shipper(self.endpoint, self._api_key, batch_size=batch_size, flush_interval=flush_interval,
                                max_queue=max_queue, timeout=timeout)
        atexit.register(self.close)

    def __repr__(self) -> str:  # never the key
        return f"LLMRelayCallback(endpoint={self.endpoint!r})"

    # -- counters ------------------------------------------------------------------------------

    @property
    def sent(self) -> int:
        """Spans the endpoint took."""
        return self._shipper.sent if self._shipper else 0

    @property
    def failed(self) -> int:
        """Spans given up on: refused, out of retries, unsendable, or still queued at close()."""
        return (self._shipper.failed if self._shipper else 0) + self._errors

    @property
    def dropped(self) -> int:
        """Spans dropped because the queue was full (the oldest go first)."""
        return self._shipper.dropped if self._shipper else 0

    @property
    def pending(self) -> int:
        """Spans queued or being sent."""
        return self._shipper.pending if self._shipper else 0

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until everything logged so far was sent (or given up on); False on timeout."""
        return self._shipper.flush(timeout) if self._shipper else True

    def close(self, timeout: float = 5.0) -> bool:
        """Flush for up to `timeout` seconds and stop the sender thread (also run at exit)."""
        if self._shipper is None:
            return True
        atexit.unregister(self.close)
        return self._shipper.close(timeout)

    # -- LiteLLM's hooks (the parameter names are LiteLLM's: it passes them by keyword) --------

    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._log(kwargs, response_obj, start_time, end_time, failed=False)

    def log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._log(kwargs, response_obj, start_time, end_time, failed=True)

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._log(kwargs, response_obj, start_time, end_time, failed=False)

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._log(kwargs, response_obj, start_time, end_time, failed=True)

    def _log(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any, *, failed: bool) -> None:
        """Build, encode and queue the span. Never raises into LiteLLM and never waits on the network."""
        if self._shipper is None or not isinstance(kwargs, Mapping):
            return
        try:
            span = span_of(kwargs, response_obj, start_time, end_time, failed=failed, cost_of=_completion_cost)
            if span is None or not self._first(span["unique_id"], failed):
                return
            data = orjson.dumps(span, default=str, option=orjson.OPT_NON_STR_KEYS)
        except Exception:
            with self._seen_lock:
                self._errors += 1
            log.exception("llmrelay: could not build the log span of a LiteLLM call")
            return
        self._shipper.put(data)

    def _first(self, call_id: str, failed: bool) -> bool:
        """True the first time an outcome of this call is seen (LiteLLM may run both the sync and
        the async hook of one call)."""
        key = (call_id, failed)
        with self._seen_lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > SEEN_MAX:
                self._seen.popitem(last=False)
        return True


def ingest_url(base_url: str) -> str:
    """base_url + /api/v1/traces/ingest; a base_url that already ends in /api (as RESPAN_BASE_URL
    usually does) is taken as the API root."""
    base = base_url.rstrip("/")
    if base.endswith("/api"):
        base = base[: -len("/api")]
    return base + INGEST_PATH


def _completion_cost(response: Any) -> float | None:
    import litellm

    return litellm.completion_cost(completion_response=response)
