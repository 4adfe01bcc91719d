"""HTTP exporter sink: ships batches of LogRecords to another llmrelay's `/api/v1/traces/ingest`
(or a hosted ingestion endpoint that takes the same span arrays).

Each batch goes as one POST of a JSON array of LogRecord-shaped objects (split into requests of
at most MAX_REQUEST_BYTES). The receiver keeps `unique_id`, so a batch that is sent again after
an unknown outcome is stored once. Transient failures (connection errors, timeouts, 408, 429,
5xx) are retried with exponential backoff and jitter; when the tries run out, or on 401, 403,
404 (a configuration to fix), `write` raises and the LogQueue spools the batch and replays it
later. A body refused as invalid (400, 413, 422) is halved until the records the receiver will
never take are found; the rest are delivered and those are raised as RejectedRecords (the queue
keeps them in a dead-letter file), so one bad record cannot hold up the spool forever.

The api_key is a secret: it is sent only in the Authorization header and never appears in an
error message (the LogQueue logs those).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence

import httpx
import msgspec

from proxy.logs.record import CONTENT_FIELDS, LogRecord, encoder
from proxy.logs.sinks import RejectedRecords
from proxy.retry import backoff, retry_after_seconds

log = logging.getLogger("llmrelay.logs")

MAX_REQUEST_BYTES = 5 * 1024 * 1024  # JSON per request; the receiver takes up to 20 MB
MAX_RECORD_BYTES = 19 * 1024 * 1024  # a record larger than this is sent without its content
BACKOFF_BASE = 0.25  # seconds before the second try; doubles per try
BACKOFF_CAP = 5.0
RETRY_AFTER_CAP = 10.0  # the writer waits on this sink: never honour a longer Retry-After
EXPORTER_HEADER = "X-LLMRelay-Exporter"


class HTTPSinkError(RuntimeError):
    """A batch the receiver did not take; the message names the endpoint (never the key)."""


class _Invalid(HTTPSinkError):
    """The receiver refused the body as invalid (400, 413, 422): some record in it will never pass."""


INVALID = frozenset({400, 413, 422})


class HTTPSink:
    name = "http"

    def __init__(self, url: str, *, api_key: str | None, timeout: float, retries: int) -> None:
        self.url = url
        self._api_key = api_key
        self.timeout = timeout
        self.tries = max(1, retries)
        self._where = _safe_url(url)
        self._client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        if self._client is not None:
            return
        try:
            target = httpx.URL(self.url)
        except Exception:  # its message would quote the URL, which may hold a token
            raise HTTPSinkError(f"http log sink: url is not a valid URL ({self._where})") from None
        if target.scheme not in ("http", "https") or not target.host:
            raise HTTPSinkError(f"http log sink: url must be an http(s) URL, got {self._where!r}")
        headers = {"Content-Type": "application/json", EXPORTER_HEADER: "1", "User-Agent": "llmrelay-http-sink"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        self._client = httpx.AsyncClient(timeout=self.timeout, headers=headers, follow_redirects=False)

    async def write(self, records: list[LogRecord]) -> None:
        if not records:
            return
        if self._client is None:
            raise HTTPSinkError(f"http log sink {self._where} is not open")
        refused: list[LogRecord] = []
        reasons: list[str] = []
        for group, body in _bodies(records):
            refused += await self._send(self._client, group, body, reasons)
        if refused:
            raise RejectedRecords(refused, reasons[0])

    async def _send(self, client: httpx.AsyncClient, records: list[LogRecord], body: bytes,
                    reasons: list[str]) -> list[LogRecord]:
        """Post one body; when the receiver calls it invalid, halve it until the records it
        refuses are found (about log2(n) more requests per bad record). Returns those."""
        try:
            await self._post(client, body)
            return []
        except _Invalid as exc:
            if len(records) == 1:
                reasons.append(str(exc))
                return records
        middle = len(records) // 2
        refused = []
        for half in (records[:middle], records[middle:]):
            refused += await self._send(client, half, b"[" + b",".join(map(_encoded, half)) + b"]", reasons)
        return refused

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _post(self, client: httpx.AsyncClient, body: bytes) -> None:
        """One request body, with retries, all within `timeout` seconds (the log writer waits on
        this); raises HTTPSinkError when the receiver did not take it."""
        problem = ""
        give_up_at = time.monotonic() + self.timeout
        for attempt in range(1, self.tries + 1):
            wait: float | None = None
            try:
                response = await client.post(self.url, content=body, timeout=max(give_up_at - time.monotonic(), 0.1))
            except httpx.TransportError as exc:  # refused, reset, timed out, bad protocol
                problem = self._scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            else:
                status = response.status_code
                if status < 300:
                    return
                problem = f"HTTP {status}: {self._excerpt(response)}"
                if status in INVALID:
                    raise _Invalid(f"POST {self._where} was refused ({problem})")
                if not _retryable(status):  # 401, 403, 404: a configuration to fix; the spool waits
                    raise HTTPSinkError(f"POST {self._where} was refused ({problem})")
                if status == 429:
                    wait = _capped(retry_after_seconds(response.headers))
            if attempt < self.tries:
                pause = wait if wait is not None else backoff(attempt, BACKOFF_BASE, BACKOFF_CAP)
                if time.monotonic() + pause >= give_up_at:
                    raise HTTPSinkError(f"POST {self._where} failed within {self.timeout:g}s after {attempt} "
                                        f"tries ({problem})")
                await asyncio.sleep(pause)
        raise HTTPSinkError(f"POST {self._where} failed after {self.tries} tries ({problem})")

    def _excerpt(self, response: httpx.Response) -> str:
        return self._scrub(response.text[:200].replace("\n", " "))

    def _scrub(self, text: str) -> str:
        """The key out of a message: a receiver may echo the header, and h11 quotes an invalid
        header value (a key with a stray newline) in its error."""
        if self._api_key:
            for form in {self._api_key, self._api_key.strip(), repr(self._api_key.encode())[2:-1]}:
                if form:
                    text = text.replace(form, "***")
        return text


def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _safe_url(url: str) -> str:
    """The URL without credentials or query (a hosted endpoint may carry a token there)."""
    try:
        parsed = httpx.URL(url)
    except Exception:
        return "<invalid url>"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}"


def _encoded(record: LogRecord) -> bytes:
    data = encoder.encode(record)
    if len(data) <= MAX_RECORD_BYTES:
        return data
    # The receiver would refuse it (413) on every replay, holding up the spool behind it: keep
    # the metrics and identifiers, drop the content.
    log.warning("log record %s is %d bytes of JSON; exporting it without its content", record.unique_id, len(data))
    return encoder.encode(msgspec.structs.replace(record, **dict.fromkeys(CONTENT_FIELDS)))


def _bodies(records: Sequence[LogRecord]) -> Iterator[tuple[list[LogRecord], bytes]]:
    """(records, their JSON array), each array at most MAX_REQUEST_BYTES (or one record, if it
    alone is larger)."""
    group: list[LogRecord] = []
    parts: list[bytes] = []
    size = 2
    for record in records:
        data = _encoded(record)
        if parts and size + len(data) + 1 > MAX_REQUEST_BYTES:
            yield group, b"[" + b",".join(parts) + b"]"
            group, parts, size = [], [], 2
        group.append(record)
        parts.append(data)
        size += len(data) + 1
    if parts:
        yield group, b"[" + b",".join(parts) + b"]"


def _capped(seconds: float | None) -> float | None:
    """A Retry-After, at most RETRY_AFTER_CAP: the sender waits on it."""
    return None if seconds is None else min(seconds, RETRY_AFTER_CAP)
