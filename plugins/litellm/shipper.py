"""Shipper: a bounded in-memory queue of encoded spans and ONE daemon thread that POSTs them in
batches (JSON arrays) to the ingestion endpoint.

The caller's side (`put`) only takes a lock and appends to a deque: it never waits on the network.
A full queue drops its oldest span (counted in `dropped`). The thread sends a batch when
`batch_size` spans wait or `flush_interval` has passed; a batch that still fails after `retries`
tries (connection errors, timeouts, 408, 429, 5xx; exponential backoff with jitter, Retry-After
honoured up to a cap) or that the receiver refuses (another 4xx) is counted in `failed`. A 400,
413 or 422 on a batch of several spans is retried in halves, so one bad span does not take the
others with it. The receiver keeps each span's unique_id, so a batch sent twice is stored once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator

import httpx

from proxy.retry import backoff, retry_after_seconds

log = logging.getLogger("llmrelay.litellm")

MAX_REQUEST_BYTES = 5 * 1024 * 1024  # JSON per request; the receiver takes up to 20 MB
BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 30.0
SPLIT_STATUSES = (400, 413, 422)  # the receiver refused the content: find the span it refused


class Shipper:
    def __init__(self, endpoint: str, api_key: str, *, batch_size: int, flush_interval: float, max_queue: int,
                 timeout: float, retries: int = 3) -> None:
        self.endpoint = endpoint
        self._api_key = api_key
        self.batch_size = max(1, batch_size)
        self.flush_interval = max(0.01, flush_interval)
        self.max_queue = max(1, max_queue)
        self.timeout = timeout
        self.tries = max(1, retries)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._items: deque[bytes] = deque()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when nothing is queued or in flight
        self._wake = threading.Event()
        self._stop = threading.Event()  # close(): no more waiting between tries
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._healthy = True  # last delivery worked: log a failure once, then its recovery

    @property
    def pending(self) -> int:
        """Spans queued or being sent."""
        with self._lock:
            return len(self._items) + self._in_flight

    def put(self, span: bytes) -> None:
        """Queue one encoded span. Never blocks on the network, never raises."""
        with self._lock:
            if self._closed:
                self.dropped += 1
                return
            if len(self._items) >= self.max_queue:
                self._items.popleft()
                self.dropped += 1
            self._items.append(span)
            ready = len(self._items) >= self.batch_size
            self._ensure_thread()
        if ready:
            self._wake.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued now; True when all of it was sent or given up on in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            if not self._items and not self._in_flight:
                return True
            self._ensure_thread()
            self._wake.set()
            while self._items or self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Flush for up to `timeout` seconds, then stop the thread; spans still queued count as failed."""
        if self._closed:
            return True
        drained = self.flush(timeout)
        with self._lock:
            self._closed = True
            left = len(self._items)
            self._items.clear()
            self.failed += left
            thread = self._thread
        self._stop.set()
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(min(timeout, 1.0))
        if left:
            log.warning("llmrelay: %d log span(s) were not sent before close", left)
        return drained and not left

    # -- the thread ---------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        """Start the sender (under the lock). After a fork the parent's thread is gone: start anew."""
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._in_flight = 0
        thread = threading.Thread(target=self._run, name="llmrelay-litellm-shipper", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # the interpreter is shutting down: close() counts what stays queued
            self._thread = None
            return
        self._thread = thread

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json",
                   "User-Agent": "llmrelay-litellm"}
        with httpx.Client(timeout=self.timeout, headers=headers) as client:
            while True:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                while True:
                    with self._lock:
                        batch = [self._items.popleft() for _ in range(min(self.batch_size, len(self._items)))]
                        self._in_flight = len(batch)
                        if not batch:
                            self._idle.notify_all()
                            if self._closed:
                                return
                            break
                    for part in _parts(batch):
                        try:
                            self._deliver(client, part)
                        except Exception as exc:  # e.g. an invalid endpoint URL; the thread must go on
                            self._count(failed=len(part), problem=self._scrub(f"{type(exc).__name__}: {exc}"))
                    with self._lock:
                        self._in_flight = 0

    def _deliver(self, client: httpx.Client, spans: list[bytes]) -> None:
        body = b"[" + b",".join(spans) + b"]"
        problem = ""
        for attempt in range(1, self.tries + 1):
            wait: float | None = None
            try:
                response = client.post(self.endpoint, content=body)
            except httpx.TransportError as exc:
                problem = self._scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            else:
                status = response.status_code
                if status < 300:
                    self._count(sent=len(spans))
                    return
                problem = f"HTTP {status}: {self._excerpt(response)}"
                if status in SPLIT_STATUSES and len(spans) > 1:
                    half = len(spans) // 2
                    self._deliver(client, spans[:half])
                    self._deliver(client, spans[half:])
                    return
                if not (status in (408, 429) or status >= 500):
                    break
                if status == 429:
                    wait = _capped(retry_after_seconds(response.headers))
            if attempt < self.tries and self._stop.wait(wait if wait is not None else backoff(attempt, BACKOFF_BASE, BACKOFF_CAP)):
                break  # closing: no more tries
        self._count(failed=len(spans), problem=problem)

    def _count(self, *, sent: int = 0, failed: int = 0, problem: str = "") -> None:
        with self._lock:
            self.sent += sent
            self.failed += failed
            was_healthy, self._healthy = self._healthy, not failed
        if failed and was_healthy:
            log.warning("llmrelay: could not send %d log span(s) to %s (%s)", failed, _safe(self.endpoint), problem)
        elif not failed and not was_healthy:
            log.info("llmrelay: sending log spans to %s again", _safe(self.endpoint))

    def _excerpt(self, response: httpx.Response) -> str:
        return self._scrub(response.text[:200].replace("\n", " "))

    def _scrub(self, text: str) -> str:
        """The key out of a message (h11 quotes an invalid header value, e.g. a key with a newline)."""
        for form in {self._api_key, self._api_key.strip(), repr(self._api_key.encode())[2:-1]}:
            if form:
                text = text.replace(form, "***")
        return text


def _parts(batch: list[bytes]) -> Iterator[list[bytes]]:
    """The batch in runs of at most MAX_REQUEST_BYTES of JSON (a larger single span goes alone)."""
    part: list[bytes] = []
    size = 2
    for span in batch:
        if part and size + len(span) + 1 > MAX_REQUEST_BYTES:
            yield part
            part, size = [], 2
        part.append(span)
        size += len(span) + 1
    if part:
        yield part


def _safe(url: str) -> str:
    """The endpoint without userinfo or query, for log lines."""
    try:
        parsed = httpx.URL(url)
    except Exception:
        return "<invalid endpoint>"
    return str(parsed.copy_with(username=None, password=None, query=None))


def _capped(seconds: float | None) -> float | None:
    """A Retry-After, at most RETRY_AFTER_CAP: the sender waits on it."""
    return None if seconds is None else min(seconds, RETRY_AFTER_CAP)
