"""Alerts: limit policies call `Notifier.send` on the request path when a warn or block threshold
is crossed; background workers deliver to Slack, email and signed webhooks, with retries.

`send` only puts jobs on a bounded queue: a full queue drops the alert (counted in
`alerts_failed`), it never blocks a request. Webhook URLs, secrets and the SMTP password are
credentials (a Slack URL's path is its token): logs name only a target's scheme and host.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import json
import logging
import re
import smtplib
import ssl
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import msgspec

if TYPE_CHECKING:  # settings import this module: prometheus_client must not load before the CLI sets its
    from proxy.metrics import Metrics  # multiprocess folder

log = logging.getLogger("llmrelay.alerts")

MAX_BACKOFF = 30.0
# A few workers, so one dead target retrying with back-off does not hold up every other alert.
WORKERS = 4
SIGNATURE_HEADER = "X-Respan-Signature"


class Webhook(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str
    secret: str  # HMAC-SHA256 key of the X-Respan-Signature header

    def __repr__(self) -> str:
        return f"Webhook(url={_origin(self.url)!r}, secret='***')"


class Notify(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    slack_webhook_urls: list[str] = []
    emails: list[str] = []
    webhooks: list[Webhook] = []

    def empty(self) -> bool:
        return not (self.slack_webhook_urls or self.emails or self.webhooks)


class Smtp(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 25
    username: str | None = None
    password: str | None = None
    from_address: str = "llmrelay@localhost"
    starttls: bool = False
    timeout: float = 10.0

    def __repr__(self) -> str:
        return f"Smtp(host={self.host!r}, port={self.port}, username={self.username!r}, password='***')"


class AlertSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    smtp: Smtp | None = None
    retries: int = 5  # delivery attempts per target
    backoff: float = 0.5  # seconds before the second attempt, doubled each time, capped at 30
    timeout: float = 5.0  # seconds per HTTP attempt
    queue_size: int = 1000


class Alert(msgspec.Struct, kw_only=True):
    event: str  # "limit.warn" | "limit.block"
    policy: str
    scope: str
    scope_id: str
    metric: str
    window: str
    threshold: float
    value: float
    window_start: float  # unix seconds
    window_end: float | None  # None: a lifetime window
    timestamp: float

    def message(self) -> str:
        action = self.event.rpartition(".")[2]
        period = "in total" if self.window == "lifetime" else f"this {self.window}"
        text = (f"llmrelay limit {self.policy!r} {action}: {self.scope} {self.scope_id} used "
                f"{_number(self.value)} of {_number(self.threshold)} {self.metric} {period}")
        if self.window_end is not None:
            text += f" (window ends {datetime.fromtimestamp(self.window_end, UTC):%Y-%m-%dT%H:%M:%SZ})"
        return text


class _Job(msgspec.Struct):
    alert: Alert
    channel: str  # "slack" | "email" | "webhook"
    target: str | Webhook  # Slack URL, email address, or webhook


class _Retry(Exception):
    """A failure worth another attempt (5xx, 429)."""


class _Permanent(Exception):
    """A failure that another attempt would not fix (4xx, bad address, refused login)."""


class Notifier:
    def __init__(self, settings: AlertSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(settings.queue_size)
        self._client: httpx.AsyncClient | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._warned_no_smtp = False
        self._last_drop_log = 0.0

    # -- the request path ------------------------------------------------------------------

    def send(self, alert: Alert, targets: Notify) -> None:
        """Queue one delivery per target. Never blocks and never raises."""
        try:
            jobs = [_Job(alert, "slack", url) for url in targets.slack_webhook_urls]
            jobs += [_Job(alert, "webhook", hook) for hook in targets.webhooks]
            if targets.emails and self.settings.smtp is None:
                if not self._warned_no_smtp:
                    self._warned_no_smtp = True
                    log.warning("alert policies name emails but alerts.smtp is not configured; not sending them")
                self.metrics.alerts_failed.labels("email").inc(len(targets.emails))
            else:
                jobs += [_Job(alert, "email", address) for address in targets.emails]
            for job in jobs:
                if self._closing:
                    self._drop(job, "the notifier is stopping")
                    continue
                try:
                    self._queue.put_nowait(job)
                except asyncio.QueueFull:
                    self._drop(job, "the alert queue is full")
        except Exception:
            log.exception("could not queue alert %r", getattr(alert, "policy", None))

    def _drop(self, job: _Job, why: str) -> None:
        self.metrics.alerts_failed.labels(job.channel).inc()
        now = time.monotonic()
        if now - self._last_drop_log >= 10.0:  # a burst of drops is one log line, not thousands
            self._last_drop_log = now
            log.warning("dropped %s alert for policy %r: %s", job.channel, job.alert.policy, why)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if _HIDE_URLS not in _httpx_log.filters:
            _httpx_log.addFilter(_HIDE_URLS)
        self._client = httpx.AsyncClient(timeout=self.settings.timeout)
        self._workers = [asyncio.create_task(self._work(), name=f"llmrelay-alerts-{i}") for i in range(WORKERS)]

    async def stop(self, deadline: float = 5.0) -> None:
        """Deliver what is queued within `deadline` seconds, then give up on the rest."""
        self._closing = True
        if self._workers:
            try:
                await asyncio.wait_for(self._queue.join(), deadline)
            except TimeoutError:
                log.warning("alerts not delivered within %.1fs of shutdown are dropped", deadline)
            for task in self._workers:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            self._workers = []
        while not self._queue.empty():
            self.metrics.alerts_failed.labels(self._queue.get_nowait().channel).inc()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- delivery ------------------------------------------------------------------------------

    async def _work(self) -> None:
        _delivering.set(True)  # this task's context only: lets the httpx log filter know
        while True:
            job = await self._queue.get()
            try:
                await self._deliver(job)
            except asyncio.CancelledError:
                self.metrics.alerts_failed.labels(job.channel).inc()
                raise
            except Exception:
                self.metrics.alerts_failed.labels(job.channel).inc()
                log.exception("alert delivery to %s failed", _describe(job))
            finally:
                self._queue.task_done()

    async def _deliver(self, job: _Job) -> None:
        attempts = max(self.settings.retries, 1)
        reason = ""
        for attempt in range(1, attempts + 1):
            try:
                await self._attempt(job)
            except _Permanent as exc:
                reason = str(exc)
                break
            except (httpx.TransportError, OSError, _Retry) as exc:  # (smtplib's errors are OSErrors)
                reason = f"{type(exc).__name__}: {exc}"
                if attempt < attempts:
                    await asyncio.sleep(min(self.settings.backoff * 2 ** (attempt - 1), MAX_BACKOFF))
            except Exception as exc:  # a bad URL and the like: no retry, and no traceback that may quote it
                reason = f"{type(exc).__name__}: {exc}"
                break
            else:
                self.metrics.alerts_sent.labels(job.channel).inc()
                return
        self.metrics.alerts_failed.labels(job.channel).inc()
        log.warning("gave up on %s alert for policy %r to %s after %d attempt(s): %s", job.channel,
                    job.alert.policy, _describe(job), attempt, _redact(reason, job, self.settings.smtp))

    async def _attempt(self, job: _Job) -> None:
        if job.channel == "email":
            await asyncio.to_thread(self._send_email, job.alert, str(job.target))
            return
        assert self._client is not None, "Notifier.start() was not awaited"
        if isinstance(job.target, Webhook):
            body = json.dumps({"event": job.alert.event, "alert": msgspec.structs.asdict(job.alert),
                               "message": job.alert.message()}).encode()
            # Receivers recompute the HMAC over json.dumps of what they parsed: sign exactly these bytes.
            signature = hmac.new(job.target.secret.encode(), body, hashlib.sha256).hexdigest()
            url, headers = job.target.url, {SIGNATURE_HEADER: signature}
        else:
            url, body, headers = job.target, json.dumps({"text": job.alert.message()}).encode(), {}
        headers["Content-Type"] = "application/json"
        try:
            response = await self._client.post(url, content=body, headers=headers)
        except httpx.UnsupportedProtocol as exc:
            raise _Permanent(f"unsupported URL scheme: {exc}") from None
        if response.status_code >= 500 or response.status_code == 429:
            raise _Retry(f"HTTP {response.status_code}")
        if response.status_code >= 300:
            raise _Permanent(f"HTTP {response.status_code}")

    def _send_email(self, alert: Alert, address: str) -> None:
        """Runs in a thread: smtplib blocks."""
        smtp = self.settings.smtp
        assert smtp is not None
        message = EmailMessage()
        message["From"] = smtp.from_address
        message["To"] = address
        message["Subject"] = f"[llmrelay] {alert.event.replace('.', ' ')}: {alert.policy}"
        message.set_content(alert.message())
        try:
            with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout) as client:
                if smtp.starttls:
                    client.starttls(context=ssl.create_default_context())
                if smtp.username:
                    client.login(smtp.username, smtp.password or "")
                client.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            raise _Permanent(f"recipient refused: {exc}") from None
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code >= 500:
                raise _Permanent(f"SMTP {exc.smtp_code}") from None
            raise


def _number(x: float) -> str:
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.4g}"  # a small cost keeps its digits


def _origin(url: str) -> str:
    """Scheme and host of a URL: its path, query and user info may be credentials."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "<invalid url>"


def _describe(job: _Job) -> str:
    if isinstance(job.target, Webhook):
        return _origin(job.target.url)
    return job.target if job.channel == "email" else _origin(job.target)


def _redact(text: str, job: _Job, smtp: Smtp | None) -> str:
    secrets: list[str] = [smtp.password] if smtp is not None and smtp.password else []
    if isinstance(job.target, Webhook):
        secrets += [job.target.url, job.target.secret]
    elif job.channel == "slack":
        secrets.append(job.target)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


# httpx logs each request's full URL at INFO; for alert deliveries that URL is a credential.
_delivering: contextvars.ContextVar[bool] = contextvars.ContextVar("llmrelay_alert_delivery", default=False)
_httpx_log = logging.getLogger("httpx")


_URL_PATH = re.compile(r"(https?://[^/\s\"']+)[^\s\"']*")


class _HideUrls(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _delivering.get():
            # on the formatted message: another filter may already have merged the args into it
            record.msg = _URL_PATH.sub(r"\1", record.getMessage())
            record.args = ()
        return True


_HIDE_URLS = _HideUrls()
