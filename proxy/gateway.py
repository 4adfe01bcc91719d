"""The Gateway: everything one app instance owns, and the request path through it.

Endpoint handlers build a Call and hand it to `Gateway.handle`; the stages run; `dispatch`
(the terminal handler) sends the Call to its Target; `finish` accounts, logs and measures
exactly once per Call, whether it ended in an answer, an error or a client that left.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy import breakdown, estimate
from proxy.admin import AdminGuard
from proxy.admin.customers import CustomersAPI
from proxy.admin.keys import KeysAPI, stored_keys
from proxy.admin.models import ModelsAPI, stored_models
from proxy.admin.providers import ProvidersAPI, stored_providers
from proxy.alerts import Notifier
from proxy.call import Call, Reply, Usage
from proxy.catalog import load_catalog
from proxy.egress import EgressPolicy
from proxy.errors import BadRequest, GatewayError, InternalError
from proxy.keys import KeyRing
from proxy.logs.api import LogsAPI
from proxy.logs.from_call import record_for
from proxy.logs.queue import LogQueue
from proxy.logs.retention import run_retention
from proxy.logs.sinks import make_sink
from proxy.logs.stores import make_store
from proxy.metrics import CHUNK_GAP_BUCKETS, Metrics
from proxy.model_table import ModelTable
from proxy.pipeline import Stage, compose, load_stages
from proxy.providers import build_adapter, build_adapters
from proxy.redact import scrub_reply, secrets_of
from proxy.settings import Settings
from proxy.sse import ChatStreamTap, NativeStreamTap
from proxy.sse_anthropic import AnthropicStreamTap, anthropic_usage, completion_message
from proxy.sse_gemini import GeminiStreamTap, gemini_usage
from proxy.sse_gemini import completion_messages as gemini_completion
from proxy.sse_responses import ResponsesStreamTap, output_message, responses_usage
from proxy.state.cooldowns import Cooldowns
from proxy.state.redis import RedisClients
from proxy.store import make_admin_store
from proxy.store.snapshot import Snapshot
from proxy.upstream import UpstreamClient, UpstreamStreamError

logger = logging.getLogger("llmrelay")
SHUTDOWN = "llmrelay: shutdown deadline"  # the cancel message that ends a stream at shutdown
STREAM_CUT_AT_SHUTDOWN = "the gateway shut down before the stream finished"
CHAT_ONLY = frozenset({"chat"})
STREAM_DONE = "stream_done"  # call.state key: the relayed piece just yielded completes the answer
USAGE_ESTIMATED = "usage estimated: the stream ended before the provider reported usage"
USAGE_ESTIMATED_INPUT = "usage estimated from the input: the provider reported none"
PROMPTS_NOT_SERVED = "prompt: this gateway does not render prompts (the `prompts` stage is not in its pipeline)"
MALFORMED_EVENTS = "stream event(s) were not valid JSON (forwarded unchanged)"
NOT_JSON = "the provider's answer is not a JSON object (passed through unchanged; no usage read)"
OWN_HEADERS = frozenset({"content-type", "x-respan-log-id", "x-respan-gateway-request-id", "x-llmrelay-model",
                         "x-llmrelay-provider", "x-llmrelay-deployment", "x-llmrelay-attempts", "x-llmrelay-cost",
                         "x-llmrelay-overhead-ms"})
COUNT_TOKENS = frozenset({"anthropic.count_tokens", "gemini.countTokens"})  # endpoints that cost nothing


class Gateway:
    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.catalog = load_catalog()
        self.upstream = UpstreamClient(EgressPolicy(settings.egress.allow, settings.egress.deny))
        self.adapters = build_adapters(settings, self.upstream)
        self.models = ModelTable(settings, self.catalog)
        self.metrics = metrics if metrics is not None else Metrics()
        cooldown_backend = settings.state.cooldowns
        self.cooldowns = Cooldowns(
            settings.cooldowns, self.metrics, cooldown_backend.url if cooldown_backend.backend == "redis" else None
        )
        self.notifier = Notifier(settings.alerts, self.metrics)
        self.admin = AdminGuard([k.key_hash for k in settings.admin_keys], [k.key_hash for k in settings.keys])
        self.snapshot = Snapshot(make_admin_store(settings.store), settings.store.poll_interval,
                                 settings.store.notify_url)
        # what stages may use besides the settings and the model table
        self.redis = RedisClients()
        services = {"metrics": self.metrics, "cooldowns": self.cooldowns, "notifier": self.notifier,
                    "admin": self.admin, "snapshot": self.snapshot, "redis": self.redis}
        self.stages: list[tuple[str, Stage]] = load_stages(settings, self.models, services)
        self.handler = compose([stage for _, stage in self.stages], self.dispatch)
        logs = settings.logs
        self.logs = LogQueue(
            [make_sink(s) for s in logs.sinks],
            logs.spool_dir,
            self.metrics,
            maxsize=logs.queue_size,
            batch_size=logs.batch_size,
            flush_interval=logs.flush_interval,
        )
        self.log_store = make_store(logs.sinks)
        self.customers_api = CustomersAPI(self.snapshot, self.admin)
        self.logs_api = LogsAPI(self.logs, self.log_store, self.admin, KeyRing(settings.keys),
                                self.models.prices_for, self.metrics, self.customers_api.settings_of)
        self._retention: asyncio.Task[None] | None = None
        self._metrics_flusher: asyncio.Task[None] | None = None
        self.keys_api = KeysAPI(self.snapshot, self.admin, {k.name for k in settings.keys})
        self.snapshot.subscribe("key", self._apply_managed_keys)
        self.providers_api = ProvidersAPI(self.snapshot, self.admin, settings)
        self.models_api = ModelsAPI(self.snapshot, self.admin, self.models)
        self._custom_providers: dict[str, Any] = {}  # provider id -> the Provider its adapter was built from
        self.snapshot.subscribe("provider", self._apply_custom_models)
        self.snapshot.subscribe("model", self._apply_custom_models)
        self._track_sizes()

    def _track_sizes(self) -> None:
        """The core's in-memory maps, for llmrelay_internal_entries (stages add their own)."""
        track = self.metrics.track_sizes
        track("upstream", self.upstream.sizes)
        track("models", self.models.sizes)
        track("cooldowns", self.cooldowns.sizes)
        track("redis", self.redis.sizes)
        track("metrics", self.metrics.sizes)

    def _apply_custom_models(self, _: Any) -> None:
        """Providers and models created through the admin API: adapters for the providers, and
        the model table rebuilt, so they are routable at once."""
        providers = []
        for provider in stored_providers(self.snapshot.of("provider")):
            if self.settings.provider(provider.id) is not None:
                continue  # the config file's provider of that id wins
            if self._custom_providers.get(provider.id) != provider:
                try:
                    self.adapters[provider.id] = build_adapter(provider, self.settings, self.upstream,
                                                               f"admin store: provider {provider.id}")
                except Exception:
                    logger.exception("custom provider %s cannot be served", provider.id)
                    continue
                self._custom_providers[provider.id] = provider
                self.upstream.set_tenant_provider(provider.id, f"providers.{provider.id}.extra_kwargs.base_url")
            providers.append(provider)
        for gone in set(self._custom_providers) - {p.id for p in providers}:
            del self._custom_providers[gone]
            self.upstream.set_tenant_provider(gone, None)
            self.adapters.pop(gone, None)
        self.models.update(providers, stored_models(self.snapshot.of("model")))

    def _apply_managed_keys(self, objects: dict[str, Any]) -> None:
        """Keys created through the admin API: the ingestion API takes them, and the admin
        endpoints tell them apart from wrong keys (403, not 401)."""
        keys = [*self.settings.keys, *stored_keys(objects)]
        self.logs_api.keys = KeyRing(keys)
        self.admin.set_gateway_hashes([k.key_hash for k in keys])

    async def start(self) -> None:
        self.streams: set[asyncio.Task[None]] = set()  # tasks relaying a stream right now
        self.draining = False
        self.streams_ended = False  # the shutdown deadline passed and open streams were ended
        await self.snapshot.start()
        await self.logs.start()
        if self.log_store is not None:
            await self.log_store.open()
            retention = self.settings.logs.retention
            if retention.content_days is not None or retention.delete_days is not None:
                self._retention = asyncio.create_task(run_retention(self.log_store, retention, self.metrics),
                                                      name="llmrelay-log-retention")
        await self.cooldowns.start()
        await self.notifier.start()
        self._metrics_flusher = asyncio.create_task(self.metrics.run_flusher(), name="llmrelay-metrics-flush")
        for _, stage in self.stages:
            startup = getattr(stage, "startup", None)
            if startup is not None:
                await startup()

    def begin_shutdown(self) -> None:
        """SIGTERM: in-flight streams get `server.shutdown_timeout` seconds, then are ended."""
        if self.draining:
            return
        self.draining = True
        asyncio.get_running_loop().call_later(self.settings.server.shutdown_timeout, self._end_streams)

    def _end_streams(self) -> None:
        self.streams_ended = True
        for task in list(self.streams):
            task.cancel(SHUTDOWN)

    async def stop(self, deadline: float = 10.0) -> None:
        for _, stage in reversed(self.stages):
            shutdown = getattr(stage, "shutdown", None)
            if shutdown is not None:
                try:
                    await shutdown()
                except Exception:
                    logger.exception("stage shutdown failed")
        await self.upstream.close()
        await self.redis.close()
        if self._metrics_flusher is not None:
            self._metrics_flusher.cancel()
            await asyncio.wait({self._metrics_flusher})
        await self.snapshot.stop()
        await self.cooldowns.stop()
        await self.notifier.stop()
        await self.logs.stop(deadline)
        if self._retention is not None:
            self._retention.cancel()
            await asyncio.wait({self._retention})
        if self.log_store is not None:
            await self.log_store.close()

    def admin_routes(self) -> list[Any]:
        """The log plane's routes, and the routes the stages add (cache and limit management, ...)."""
        routes: list[Any] = [*self.logs_api.routes(), *self.keys_api.routes(), *self.providers_api.routes(),
                             *self.models_api.routes(), *self.customers_api.routes()]
        for _, stage in self.stages:
            stage_routes = getattr(stage, "routes", None)
            if stage_routes is not None:
                routes += stage_routes()
        return routes

    # -- the request path -------------------------------------------------------------

    async def dispatch(self, call: Call) -> Reply:
        """Terminal handler: send the Call to its Target (resolving the model when no stage did)."""
        if not call.dispatched:
            if call.gates:
                await call.ready()  # no upstream call before every held check has passed
            call.dispatched = time.perf_counter()
            if call.params.prompt is not None and "prompt" not in call.state:
                raise BadRequest(PROMPTS_NOT_SERVED)
        target = call.target
        if target is None:
            started = time.perf_counter()
            target = self.models.resolve(call.model)
            call.routing_time += time.perf_counter() - started
            call.target = target
        adapter = self.adapters.get(target.provider)
        if adapter is None:
            raise GatewayError(f"Provider {target.provider!r} is not configured on this gateway", 502)
        # An adapter lists the Call.endpoint values it serves in `endpoints`; without it, chat only.
        if call.endpoint != "chat" and call.endpoint not in getattr(adapter, "endpoints", CHAT_ONLY):
            raise BadRequest(f"Provider {target.provider!r} does not serve {call.endpoint}")
        reply = await adapter.send(call, target)
        # an upstream that echoes the key it was sent gives it to no one (client, log, fallback)
        configured = getattr(getattr(adapter, "config", None), "api_key", None)
        return scrub_reply(reply, secrets_of(target.api_key, configured))

    async def handle(self, call: Call) -> Reply:
        """Run the pipeline. Always returns a Reply; gateway errors become their JSON bodies."""
        self.metrics.in_flight_now += 1
        try:
            reply = await self.handler(call)
        except GatewayError as exc:
            reply = self.error_reply(call, exc)
        except Exception:
            logger.exception("unhandled error on request %s", call.id)
            reply = self.error_reply(call, InternalError())
        if reply.stream is None:
            self.metrics.in_flight_now -= 1
            self.account_body(call, reply)
            if call.params.request_breakdown and reply.status < 400 and reply.body:
                self.account_cost(call)
                reply.body = breakdown.add_to_body(call, reply.body)
            self.finish(call)
        return reply  # a stream stays in flight until relay() ends it

    def reject(self, call: Call, exc: GatewayError) -> Reply:
        """Answer a request that never reached the pipeline (unreadable body, bad params)."""
        reply = self.error_reply(call, exc)
        self.finish(call)
        return reply

    def error_reply(self, call: Call, exc: GatewayError) -> Reply:
        call.error = exc.detail
        call.status_code = exc.status
        return Reply(exc.status, body=exc.body(), headers=dict(exc.headers))

    def account_body(self, call: Call, reply: Reply) -> None:
        """Usage, served model and content from a whole (non-stream) OpenAI-format answer."""
        call.status_code = reply.status
        if call.error is not None or not reply.body:
            return
        try:
            data: Any = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            if reply.status >= 400:
                call.error = reply.body[:500].decode(errors="replace")
            else:
                call.warnings.append(NOT_JSON)
            return
        if not isinstance(data, dict):
            if reply.status < 400:
                call.warnings.append(NOT_JSON)
            return
        if reply.status >= 400:
            call.error = upstream_error_message(data, reply.status)
            return
        if call.client_format == "anthropic":
            self._account_anthropic(call, data)
            return
        if call.client_format == "responses":
            self._account_responses(call, data)
            return
        if call.client_format == "gemini":
            self._account_gemini(call, data)
            return
        call.usage = Usage.from_openai(data.get("usage"))
        if isinstance(data.get("model"), str):
            call.response_model = data["model"]
        if call.endpoint == "embeddings":  # usage only: the vectors are never kept for the log
            return
        choices = data.get("choices")
        if isinstance(choices, list) and not call.params.disable_log:
            call.completion = [c.get("message") for c in choices if isinstance(c, dict)]

    def _account_anthropic(self, call: Call, data: dict[str, Any]) -> None:
        """A native Anthropic answer: a Message, or count_tokens' {"input_tokens": N}."""
        if call.endpoint == "anthropic.count_tokens":
            tokens = data.get("input_tokens")
            call.usage = Usage(prompt_tokens=tokens if isinstance(tokens, int) and tokens > 0 else 0)
            return
        call.usage = anthropic_usage(data.get("usage"))
        if isinstance(data.get("model"), str):
            call.response_model = data["model"]
        if not call.params.disable_log:
            call.completion = [completion_message(data.get("content"), data.get("stop_reason"))]

    def _account_responses(self, call: Call, data: dict[str, Any]) -> None:
        """A native Responses API answer: a Response object."""
        call.usage = responses_usage(data.get("usage"))
        if isinstance(data.get("model"), str):
            call.response_model = data["model"]
        if not call.params.disable_log:
            call.completion = [output_message(data.get("output"))]

    def _account_gemini(self, call: Call, data: dict[str, Any]) -> None:
        """A native Gemini answer: a GenerateContentResponse, countTokens' {"totalTokens": N}, or
        embeddings (whose usage, when the answer has none, is estimated from the input)."""
        if call.endpoint == "gemini.countTokens":
            tokens = data.get("totalTokens")
            call.usage = Usage(prompt_tokens=tokens if isinstance(tokens, int) and tokens > 0 else 0)
            return
        call.usage = gemini_usage(data.get("usageMetadata"))
        if call.endpoint in ("gemini.embedContent", "gemini.batchEmbedContents"):
            if not call.usage.prompt_tokens:
                call.usage = Usage(prompt_tokens=estimate.prompt_tokens(call.body))
                call.warnings.append(USAGE_ESTIMATED_INPUT)
            return
        if isinstance(data.get("modelVersion"), str):
            call.response_model = data["modelVersion"]
        if not call.params.disable_log:
            call.completion = gemini_completion(data)

    def account_cost(self, call: Call) -> None:
        if call.endpoint in COUNT_TOKENS:
            return  # counting tokens costs nothing
        target = call.target
        if target is None:
            return
        if target.prices is not None:
            call.cost = target.prices.cost(call.usage)
        elif call.usage.total_tokens:  # tokens no price is known for: say so, never a silent 0
            warning = f"no price known for {target.provider}/{target.model}: cost not computed"
            if warning not in call.warnings:
                call.warnings.append(warning)

    def finish(self, call: Call) -> None:
        """Once per Call: cost, finish hooks, the log record, metrics. No I/O waits here."""
        if call.finished:
            return
        call.finished = True
        self.account_cost(call)
        for hook in call.finish_hooks:
            try:
                hook(call)
            except Exception:
                logger.exception("finish hook failed on request %s", call.id)
        self.metrics.observe(call)
        if not call.omit_log:
            self.logs.put(record_for(call))

    def response_headers(self, call: Call, reply: Reply, media_type: str) -> list[tuple[bytes, bytes]]:
        """The reply's headers and the gateway's own, as ASGI wants them (the gateway's win)."""
        raw = [(b"content-type", media_type.encode("latin-1"))]
        raw += [(name.encode("latin-1"), value.encode("latin-1"))
                for name, value in reply.headers.items() if name not in OWN_HEADERS]
        raw.append((b"x-respan-log-id", call.id.encode()))
        raw.append((b"x-respan-gateway-request-id", call.request_id.encode()))
        target = call.target
        if target is not None:
            raw.append((b"x-llmrelay-model", (call.response_model or target.model).encode("latin-1", "replace")))
            raw.append((b"x-llmrelay-provider", target.provider.encode("latin-1", "replace")))
            raw.append((b"x-llmrelay-deployment", (target.deployment or target.provider).encode("latin-1", "replace")))
            raw.append((b"x-llmrelay-attempts", b"%d" % (len(call.attempts) or 1)))
        if reply.stream is None and call.status_code < 400:  # a stream's cost is known only at its end
            raw.append((b"x-llmrelay-cost", (b"%.10f" % call.cost).rstrip(b"0").rstrip(b".") or b"0"))
        overhead = max(call.elapsed() - call.upstream_time, 0.0)
        raw.append((b"x-llmrelay-overhead-ms", b"%.3f" % (overhead * 1000)))
        return raw

    def _settle(self, call: Call, tap: ChatStreamTap | NativeStreamTap) -> None:
        """Usage, served model and content of a stream, from what its tap saw (idempotent)."""
        if isinstance(tap, NativeStreamTap):
            call.usage = tap.final_usage()
        elif tap.usage is not None:
            call.usage = Usage.from_openai(tap.usage)
        elif tap.events and not call.warnings.count(USAGE_ESTIMATED):
            call.usage = estimate_usage(call.body, tap.content_deltas)
            call.warnings.append(USAGE_ESTIMATED)
        call.response_model = tap.model
        if not call.params.disable_log:
            call.completion = tap.messages()
        malformed = getattr(tap, "malformed", 0)
        if malformed:  # forwarded unchanged, as a proxy must; the log says so
            call.warnings = [w for w in call.warnings if not w.endswith(MALFORMED_EVENTS)]
            call.warnings.append(f"{malformed} {MALFORMED_EVENTS}")

    def relay(self, call: Call, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The relay for the Call's client format: OpenAI chat SSE (ChatStreamTap), or a native
        stream passed through byte for byte: Anthropic (AnthropicStreamTap), Responses API
        (ResponsesStreamTap), Gemini (GeminiStreamTap)."""
        keep_content = not call.params.disable_log
        if call.client_format == "anthropic":
            return self._relay(call, stream, AnthropicStreamTap(keep_content=keep_content))
        if call.client_format == "responses":
            return self._relay(call, stream, ResponsesStreamTap(keep_content=keep_content))
        if call.client_format == "gemini":
            return self._relay(call, stream, GeminiStreamTap(keep_content=keep_content))
        return self._relay(call, stream, ChatStreamTap(hide_usage_chunk=not call.client_wants_usage,
                                                       keep_content=keep_content))

    def relay_abandoned(self, call: Call) -> None:
        """A stream whose relay never started (the client left before its first byte could be
        sent): account and log it as the relay's own cleanup would have."""
        if call.finished:
            return
        if self.streams_ended:
            call.status_code, call.error = 503, STREAM_CUT_AT_SHUTDOWN
        else:
            call.status_code, call.error = 499, "client disconnected before the stream started"
        self.metrics.in_flight_now -= 1
        self.finish(call)

    async def _relay(self, call: Call, stream: AsyncIterator[bytes],
                     tap: ChatStreamTap | NativeStreamTap) -> AsyncIterator[bytes]:
        """Relay a stream to the client as it arrives, and account it from what the tap reads.

        OpenAI chat SSE goes through a ChatStreamTap (which may hide the usage chunk; with a
        request breakdown, the breakdown chunk goes before [DONE]). A native (passthrough) stream
        goes unchanged; complete means the format's closing event seen (Anthropic message_stop;
        Responses response.completed / incomplete / failed; Gemini: a finishReason), and nothing
        else is ever added.

        A provider that breaks after the first byte ends the client's stream with an `error`
        event in the client's format, never a clean close. A client that leaves closes the
        upstream request at once (the provider iterator's own cleanup), and the Call is still
        logged with the usage seen.
        """
        native = isinstance(tap, NativeStreamTap)
        call.status_code = 200
        with_breakdown = not native and call.params.request_breakdown
        watch_done = native or with_breakdown  # the chat hot path without a breakdown: one local test a chunk
        upstream_wait = time.perf_counter()
        completed = False
        gaps = [0] * (len(CHUNK_GAP_BUCKETS) + 1)  # inter-chunk latency, counted per histogram bucket
        gap_total = 0.0
        last_chunk = 0.0
        try:
            async for chunk in stream:
                now = time.perf_counter()
                call.upstream_time += now - upstream_wait
                if last_chunk:
                    gap = now - last_chunk
                    gaps[bisect.bisect_left(CHUNK_GAP_BUCKETS, gap)] += 1
                    gap_total += gap
                last_chunk = now
                out = tap.feed(chunk)
                if call.ttft is None and tap.saw_content:
                    call.ttft = now - call.started
                if watch_done and tap.done:
                    if native:
                        if out:  # this piece ends the answer (it holds the whole closing event)
                            call.state[STREAM_DONE] = True
                    elif out.endswith(DONE_EVENT):
                        out = out[: -len(DONE_EVENT)]  # the breakdown chunk goes before [DONE]
                if out:
                    yield out
                upstream_wait = time.perf_counter()
            call.upstream_time += time.perf_counter() - upstream_wait
            tail = tap.flush()
            if tail:
                yield tail
            if tap.error is not None:
                call.status_code = tap.error_status()
                call.error = upstream_error_message({"error": tap.error}, call.status_code)
            elif tap.done:
                if with_breakdown:
                    self._settle(call, tap)
                    self.account_cost(call)
                    yield breakdown.stream_chunk(call) + DONE_EVENT
            elif not native and tap.finish_reasons:  # complete but the provider left out the terminator
                if with_breakdown:
                    self._settle(call, tap)
                    self.account_cost(call)
                    yield breakdown.stream_chunk(call)
                yield DONE_EVENT
            else:
                call.status_code = 502
                call.error = f"provider '{call.target.provider if call.target else '?'}' ended the stream early"
                yield tap.error_event(call.error)
            completed = True
        except UpstreamStreamError as exc:
            if not tap.done:  # after the closing event the answer is complete: a late break changes nothing
                call.status_code = 502
                call.error = str(exc)
                yield tap.error_event(call.error)
            completed = True
        finally:
            if not completed and self.streams_ended:
                call.status_code = 503
                call.error = STREAM_CUT_AT_SHUTDOWN
            elif not completed:  # the client went away (cancelled, or the generator was closed)
                call.status_code = 499
                call.error = f"client disconnected after {tap.events} events"
            self._settle(call, tap)
            self.metrics.in_flight_now -= 1
            if gap_total:
                self.metrics.observe_chunk_gaps(call.target.provider if call.target else "none", gaps, gap_total)
            self.finish(call)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None and not completed:  # the provider iterator closes its connection
                await aclose()

DONE_EVENT = b"data: [DONE]\n\n"


def estimate_usage(body: dict[str, Any], content_deltas: int) -> Usage:
    """Usage for a stream cut before the provider's usage chunk: about 4 characters a prompt
    token, one token per content delta (how OpenAI-compatible providers stream)."""
    return Usage(prompt_tokens=estimate.prompt_tokens(body), completion_tokens=content_deltas)


def upstream_error_message(data: dict[str, Any], status: int) -> str:
    """A one-line message from a provider's error body (OpenAI, Anthropic or DRF shape)."""
    error = data.get("error")
    if isinstance(error, dict):
        message = error.get("message") or error.get("type") or ""
        return f"{status}: {message}"[:1000]
    if isinstance(error, str):
        return f"{status}: {error}"[:1000]
    if isinstance(data.get("detail"), str):
        return f"{status}: {data['detail']}"[:1000]
    return f"{status}: upstream error"
