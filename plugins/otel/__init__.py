"""The `otel` stage: OpenTelemetry traces of the requests, exported over OTLP/HTTP (protobuf).

Optional: it needs the `otel` extra (`pip install 'llmrelay[otel]'`). Configured as

    {name: otel, options: {endpoint: "http://collector:4318/v1/traces", service_name: llmrelay,
                           headers: {...}, sample_ratio: 1.0, capture_content: false}}

Nothing is traced while a request runs: the stage adds a finish hook, which notes the end time
and schedules the spans' building for right after the current step of the event loop (so the
answer goes out first). They are built from what the Call recorded, with explicit times: one
SERVER span per request, named `{gen_ai.operation.name} {gen_ai.request.model}` (GenAI semantic
conventions), and one CLIENT child span per upstream attempt (`call.attempts`; without them, the
one dispatch to `call.target`). An incoming W3C `traceparent` puts them in the client's trace,
and its sampled flag wins over `sample_ratio`. A BatchSpanProcessor exports them on its own
thread; the TracerProvider is the stage's own (never the global one) and is flushed at shutdown.
Attributes: plugins/otel/attributes.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated
from urllib.parse import urlsplit

import msgspec

from plugins.otel.attributes import (
    Hosts,
    attempt_attributes,
    describe,
    failed,
    operation_of,
    server_attributes,
    targets_of,
)
from proxy.call import Attempt, Call, Reply
from proxy.pipeline import Next, StageContext
from proxy.settings import ConfigError

try:
    from opentelemetry.context import Context
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Tracer, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # the optional extra is not installed: create_stage says so
    _MISSING: ImportError | None = exc
else:
    _MISSING = None

log = logging.getLogger("llmrelay.otel")

INSTRUMENTATION = "llmrelay.otel"


class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    endpoint: str | None = None  # OTLP/HTTP traces URL; None: the exporter's (OTEL_EXPORTER_OTLP_* env)
    service_name: str = "llmrelay"
    headers: dict[str, str] = msgspec.field(default_factory=dict)  # sent with each export (may be secret)
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0  # of new traces; a parent's flag wins
    capture_content: bool = False  # request messages and the answer as gen_ai.input/output.messages
    resource_attributes: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)
    schedule_delay_ms: Annotated[float, msgspec.Meta(gt=0)] = 5000.0
    max_queue_size: Annotated[int, msgspec.Meta(ge=1)] = 2048  # spans waiting; more are dropped
    max_export_batch_size: Annotated[int, msgspec.Meta(ge=1)] = 512
    export_timeout_ms: Annotated[float, msgspec.Meta(gt=0)] = 10000.0


class OtelStage:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.capture_content = options.capture_content
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._propagator = TraceContextTextMapPropagator()
        self._root = Context()  # no parent: never whatever context happens to be current
        self._hosts = Hosts()

    # -- lifecycle ---------------------------------------------------------------------

    async def startup(self) -> None:
        """Built here, in the serving process, so that the export thread is never forked."""
        opts = self.options
        resource = Resource.create({**opts.resource_attributes, "service.name": opts.service_name})
        provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(opts.sample_ratio)),
                                  shutdown_on_exit=False)
        exporter = OTLPSpanExporter(endpoint=opts.endpoint, headers=opts.headers or None,
                                    timeout=opts.export_timeout_ms / 1000)
        provider.add_span_processor(BatchSpanProcessor(
            exporter, max_queue_size=opts.max_queue_size, schedule_delay_millis=opts.schedule_delay_ms,
            max_export_batch_size=opts.max_export_batch_size, export_timeout_millis=opts.export_timeout_ms))
        self._provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION)
        self._loop = asyncio.get_running_loop()

    async def shutdown(self) -> None:
        """Export what is queued (on a thread: the export is a blocking HTTP call)."""
        await asyncio.sleep(0)  # spans whose building is scheduled: built first
        provider, self._provider, self._tracer = self._provider, None, None
        if provider is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(provider.shutdown), self.options.export_timeout_ms / 1000 + 1)
        except TimeoutError:
            log.warning("otel: spans not exported before shutdown (collector slow or unreachable)")

    # -- the request path --------------------------------------------------------------

    async def __call__(self, call: Call, next: Next) -> Reply:
        call.finish_hooks.append(self.record)
        return await next(call)

    def record(self, call: Call) -> None:
        """Finish hook: note the end time; build the spans once the current loop step is over."""
        loop = self._loop
        if loop is not None and self._tracer is not None:
            loop.call_soon(self.build, call, time.time_ns())

    def build(self, call: Call, end: int) -> None:
        """The request's spans. Attributes are set only once the sampler has kept the server span:
        a request sampled out costs a few microseconds."""
        tracer = self._tracer
        if tracer is None:
            return
        parent = self._root
        if "traceparent" in call.headers:
            parent = self._propagator.extract(call.headers, context=self._root)
        operation = operation_of(call)
        target = call.target
        model = call.model or (target.model if target is not None else "")
        server = tracer.start_span(f"{operation} {model}" if model else operation, context=parent,
                                   kind=SpanKind.SERVER, start_time=int(call.started_at * 1e9))
        if not server.is_recording():
            return
        attempts = call.attempts
        if not attempts and call.dispatched and target is not None:  # no fallback stage: the one dispatch
            attempts = [Attempt(model=target.model, provider=target.provider, deployment=target.deployment,
                                status=call.status_code, error=call.error, latency=call.upstream_time)]
        server.set_attributes(server_attributes(call, operation, model, len(attempts), self.capture_content))
        status = call.status_code
        if status >= 500 or (status == 0 and call.error is not None):  # a 4xx is the client's (HTTP semconv)
            server.set_status(Status(StatusCode.ERROR, describe(call.error)))
        if attempts:
            self.attempt_spans(tracer, call, operation, attempts, set_span_in_context(server, self._root), end)
        server.end(end)

    def attempt_spans(self, tracer: Tracer, call: Call, operation: str, attempts: list[Attempt],
                      parent: Context, end: int) -> None:
        """One CLIENT span per upstream attempt. An attempt without a start time (0.0) starts where
        the one before it ended; the first one when the request was dispatched."""
        if call.dispatched:
            cursor = call.started_at + (call.dispatched - call.started)
        else:
            cursor = call.started_at + call.routing_time
        last = len(attempts) - 1
        targets = targets_of(call)
        for index, attempt in enumerate(attempts):
            started = attempt.started_at or cursor
            finished = started + attempt.latency
            cursor = finished
            served = index == last and attempt.status < 400 and call.status_code < 400
            start_ns = int(started * 1e9)
            # a stream's upstream response lasts until the relay's end, not just until it opened
            end_ns = end if served and call.stream else min(int(finished * 1e9), end)
            span = tracer.start_span(f"{operation} {attempt.model}", context=parent, kind=SpanKind.CLIENT,
                                     start_time=start_ns)
            target = targets.get((attempt.provider, attempt.model, attempt.deployment))
            span.set_attributes(attempt_attributes(call, operation, attempt, target, self._hosts, served))
            if failed(attempt):
                span.set_status(Status(StatusCode.ERROR, describe(attempt.error)))
            span.end(max(end_ns, start_ns))


def create_stage(context: StageContext) -> OtelStage:
    if _MISSING is not None:
        raise ConfigError(
            f"stage {context.name!r} needs the OpenTelemetry packages, which are not installed "
            f"({_MISSING}): pip install 'llmrelay[otel]'"
        )
    try:
        options = msgspec.convert(context.options, Options)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    if options.endpoint is not None and urlsplit(options.endpoint).scheme not in ("http", "https"):
        raise ValueError("endpoint: expected an http:// or https:// URL of the OTLP/HTTP traces endpoint")
    if options.max_export_batch_size > options.max_queue_size:
        raise ValueError("max_export_batch_size: must not exceed max_queue_size")
    return OtelStage(options)
