"""Alerts: proxy/alerts.py against real loopback receivers: an aiohttp server in the test's own loop
for Slack and signed webhooks, and an aiosmtpd SMTP server in a thread for email."""

from __future__ import annotations

import asyncio
import calendar
import email
import email.policy
import hashlib
import hmac
import json
import logging
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from proxy.alerts import Alert, AlertSettings, Notifier, Notify, Smtp, Webhook
from proxy.metrics import Metrics
from tests.mock_server import free_port

SECRET = "whsec-very-secret-key"
SLACK_PATH = "/services/T0001/B0002/slackTokenXYZ"
HOOK_PATH = "/hooks/pathTokenABC"
SMTP_USER, SMTP_PASSWORD = "alerts", "smtp-pass-hunter2"
WINDOW_END = calendar.timegm((2026, 11, 25, 0, 0, 0))


def alert(**fields: Any) -> Alert:
    values: dict[str, Any] = dict(
        event="limit.warn", policy="team-a-cost", scope="customer", scope_id="acme", metric="cost", window="day",
        threshold=50.0, value=51.2, window_start=WINDOW_END - 86400, window_end=WINDOW_END, timestamp=WINDOW_END - 600)
    return Alert(**{**values, **fields})


def fast(**fields: Any) -> AlertSettings:
    return AlertSettings(**{"retries": 3, "backoff": 0.01, "timeout": 2.0, **fields})


def count(metrics: Metrics, name: str, channel: str) -> float:
    return metrics.registry.get_sample_value(f"llmrelay_{name}_total", {"channel": channel}) or 0.0


def sign(body: bytes) -> str:
    return hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


class Receiver:
    """An aiohttp server in the running loop. Answers each request with the next of `statuses`
    (then 200), after `gate` is set when one is given; `received` holds the answered-200 ones."""

    def __init__(self, statuses: list[int] | None = None, gate: asyncio.Event | None = None) -> None:
        self.statuses = list(statuses or [])
        self.gate = gate
        self.attempts = 0
        self.received: list[dict[str, Any]] = []

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.gate is not None:
            self.gate.set()
        await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        raw = await request.read()
        if self.gate is not None:
            await self.gate.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.received.append({"path": request.path, "headers": dict(request.headers), "raw": raw})
        return web.Response(status=status)


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], email.message.EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 OK"


def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (SMTP_USER.encode(), SMTP_PASSWORD.encode())
    return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535 itself


@pytest.fixture
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, auth_require_tls=False, authenticator=authenticate)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


# -- the structs -------------------------------------------------------------------------------


def test_message_and_config_structs():
    assert alert().message() == ("llmrelay limit 'team-a-cost' warn: customer acme used 51.20 of 50 cost this day "
                                 "(window ends 2026-11-25T00:00:00Z)")
    lifetime = alert(event="limit.block", metric="requests", window="lifetime", window_end=None, value=1000, threshold=1000)
    assert lifetime.message() == "llmrelay limit 'team-a-cost' block: customer acme used 1000 of 1000 requests in total"
    assert Notify().empty()
    assert not Notify(emails=["a@example.com"]).empty()
    notify = msgspec.convert({"webhooks": [{"url": "https://h.example" + HOOK_PATH, "secret": SECRET}]}, Notify)
    assert notify.webhooks == [Webhook(url="https://h.example" + HOOK_PATH, secret=SECRET)]
    with pytest.raises(msgspec.ValidationError, match="slack_urls"):
        msgspec.convert({"slack_urls": []}, Notify)
    settings = msgspec.convert({"smtp": {"host": "mail", "password": SMTP_PASSWORD}, "retries": 2}, AlertSettings)
    assert settings.smtp == Smtp(host="mail", password=SMTP_PASSWORD) and settings.retries == 2
    assert SMTP_PASSWORD not in repr(settings)
    assert SECRET not in repr(notify) and HOOK_PATH not in repr(notify)


# -- channels ------------------------------------------------------------------------------------


def test_webhook_is_signed_over_the_bytes_sent():
    async def main() -> tuple[Receiver, Metrics]:
        metrics = Metrics()
        notifier = Notifier(fast(), metrics)
        await notifier.start()
        async with Receiver() as receiver:
            notifier.send(alert(), Notify(webhooks=[Webhook(url=receiver.url + HOOK_PATH, secret=SECRET)]))
            await notifier.stop()
        return receiver, metrics

    receiver, metrics = asyncio.run(main())
    [request] = receiver.received
    raw, signature = request["raw"], request["headers"]["X-Respan-Signature"]
    assert request["path"] == HOOK_PATH
    assert request["headers"]["Content-Type"] == "application/json"
    parsed = json.loads(raw)
    # Respan's receivers recompute the HMAC over json.dumps(request.data); so can anyone over the raw body
    assert hmac.compare_digest(signature, sign(json.dumps(parsed).encode()))
    assert hmac.compare_digest(signature, sign(raw))
    assert parsed == {"event": "limit.warn", "alert": msgspec.structs.asdict(alert()), "message": alert().message()}
    assert count(metrics, "alerts_sent", "webhook") == 1


def test_slack_gets_the_message_as_text():
    async def main() -> Receiver:
        notifier = Notifier(fast(), Metrics())
        await notifier.start()
        async with Receiver() as receiver:
            notifier.send(alert(event="limit.block"), Notify(slack_webhook_urls=[receiver.url + SLACK_PATH]))
            await notifier.stop()
        return receiver

    [request] = asyncio.run(main()).received
    assert request["path"] == SLACK_PATH
    assert json.loads(request["raw"]) == {"text": alert(event="limit.block").message()}


def test_email_through_a_real_smtp_server(smtp_server: tuple[Inbox, int]):
    inbox, port = smtp_server
    smtp = Smtp(port=port, username=SMTP_USER, password=SMTP_PASSWORD, from_address="gw@example.com")
    metrics = Metrics()

    async def main() -> None:
        notifier = Notifier(fast(smtp=smtp), metrics)
        await notifier.start()
        notifier.send(alert(), Notify(emails=["ops@example.com", "cfo@example.com"]))
        await notifier.stop()

    asyncio.run(main())
    assert sorted(rcpt for _, [rcpt], _ in inbox.messages) == ["cfo@example.com", "ops@example.com"]
    for sender, [rcpt], message in inbox.messages:
        assert sender == "gw@example.com" and message["To"] == rcpt
        assert message["Subject"] == "[llmrelay] limit warn: team-a-cost"
        assert message.get_content().strip() == alert().message()
    assert count(metrics, "alerts_sent", "email") == 2


def test_emails_without_smtp_are_counted_failed_and_warned_once(caplog: pytest.LogCaptureFixture):
    metrics = Metrics()

    async def main() -> None:
        notifier = Notifier(fast(), metrics)
        await notifier.start()
        notifier.send(alert(), Notify(emails=["ops@example.com", "cfo@example.com"]))
        notifier.send(alert(), Notify(emails=["ops@example.com"]))
        await notifier.stop()

    with caplog.at_level(logging.WARNING, logger="llmrelay.alerts"):
        asyncio.run(main())
    assert count(metrics, "alerts_failed", "email") == 3
    assert sum("smtp is not configured" in r.getMessage() for r in caplog.records) == 1


# -- retries and failures --------------------------------------------------------------------------


def test_retries_5xx_then_delivers_once():
    async def main() -> tuple[Receiver, Metrics]:
        metrics = Metrics()
        notifier = Notifier(fast(retries=5), metrics)
        await notifier.start()
        async with Receiver(statuses=[500, 500]) as receiver:
            notifier.send(alert(), Notify(webhooks=[Webhook(url=receiver.url, secret=SECRET)]))
            await notifier.stop()
        return receiver, metrics

    receiver, metrics = asyncio.run(main())
    assert receiver.attempts == 3 and len(receiver.received) == 1
    assert count(metrics, "alerts_sent", "webhook") == 1 and count(metrics, "alerts_failed", "webhook") == 0


def test_gives_up_after_retries_and_counts_failed():
    async def main() -> tuple[Receiver, Receiver, Metrics]:
        metrics = Metrics()
        notifier = Notifier(fast(retries=3), metrics)
        await notifier.start()
        async with Receiver(statuses=[429, 503, 500, 500]) as flaky, Receiver(statuses=[404]) as gone:
            notifier.send(alert(), Notify(slack_webhook_urls=[flaky.url, gone.url]))
            await notifier.stop()
        return flaky, gone, metrics

    flaky, gone, metrics = asyncio.run(main())
    assert flaky.attempts == 3 and flaky.received == []
    assert gone.attempts == 1  # a 4xx other than 429 is not retried
    assert count(metrics, "alerts_failed", "slack") == 2 and count(metrics, "alerts_sent", "slack") == 0


def test_connection_refused_is_retried_then_failed():
    metrics = Metrics()

    async def main() -> None:
        notifier = Notifier(fast(retries=2), metrics)
        await notifier.start()
        notifier.send(alert(), Notify(slack_webhook_urls=[f"http://127.0.0.1:{free_port()}/x"]))
        await notifier.stop()

    asyncio.run(main())
    assert count(metrics, "alerts_failed", "slack") == 1


# -- never on the request path ------------------------------------------------------------------------


def test_full_queue_drops_without_blocking_and_counts(caplog: pytest.LogCaptureFixture):
    async def main() -> tuple[Receiver, Metrics]:
        metrics = Metrics()
        notifier = Notifier(fast(queue_size=2), metrics)  # not started yet: nothing takes from the queue
        async with Receiver() as receiver:
            targets = Notify(webhooks=[Webhook(url=receiver.url, secret=SECRET)])
            for _ in range(5):
                notifier.send(alert(), targets)
            assert count(metrics, "alerts_failed", "webhook") == 3
            await notifier.start()
            await notifier.stop()
        return receiver, metrics

    with caplog.at_level(logging.WARNING, logger="llmrelay.alerts"):
        receiver, metrics = asyncio.run(main())
    assert len(receiver.received) == 2 and count(metrics, "alerts_sent", "webhook") == 2
    assert any("queue is full" in r.getMessage() for r in caplog.records)


def test_send_returns_before_a_slow_receiver_answers():
    async def main() -> None:
        gate = asyncio.Event()
        metrics = Metrics()
        notifier = Notifier(fast(), metrics)
        await notifier.start()
        async with Receiver(gate=gate) as receiver:
            targets = Notify(webhooks=[Webhook(url=receiver.url, secret=SECRET)])
            notifier.send(alert(), targets)
            assert receiver.attempts == 0 and receiver.received == []
            await wait_for(lambda: receiver.attempts == 1)  # the first delivery now hangs in the receiver
            notifier.send(alert(event="limit.block"), targets)
            assert receiver.received == []
            gate.set()
            await notifier.stop()
            assert len(receiver.received) == 2 and count(metrics, "alerts_sent", "webhook") == 2

    asyncio.run(main())


def test_stop_drains_what_is_queued():
    async def main() -> None:
        metrics = Metrics()
        notifier = Notifier(fast(), metrics)
        await notifier.start()
        async with Receiver() as receiver:
            for i in range(20):
                notifier.send(alert(value=51.0 + i), Notify(slack_webhook_urls=[receiver.url]))
            await notifier.stop()
            assert len(receiver.received) == 20 and count(metrics, "alerts_sent", "slack") == 20
            notifier.send(alert(), Notify(slack_webhook_urls=[receiver.url]))  # after stop: dropped, counted
            assert count(metrics, "alerts_failed", "slack") == 1

    asyncio.run(main())


def test_stop_gives_up_at_the_deadline():
    async def main() -> None:
        metrics = Metrics()
        notifier = Notifier(fast(), metrics)
        await notifier.start()
        async with Receiver(gate=asyncio.Event()) as receiver:  # never answers before stop
            for _ in range(6):
                notifier.send(alert(), Notify(slack_webhook_urls=[receiver.url]))
            async with asyncio.timeout(2):
                await notifier.stop(deadline=0.1)
        assert count(metrics, "alerts_failed", "slack") == 6 and count(metrics, "alerts_sent", "slack") == 0

    asyncio.run(main())


# -- secrets ---------------------------------------------------------------------------------------------


def test_secrets_never_reach_the_logs(caplog: pytest.LogCaptureFixture, smtp_server: tuple[Inbox, int]):
    inbox, port = smtp_server

    async def main() -> None:
        wrong = Notifier(fast(retries=2, smtp=Smtp(port=port, username=SMTP_USER, password="wrong-" + SMTP_PASSWORD)),
                         Metrics())
        right = Notifier(fast(retries=2, smtp=Smtp(port=port, username=SMTP_USER, password=SMTP_PASSWORD)), Metrics())
        await wrong.start()
        await right.start()
        async with Receiver() as ok, Receiver(statuses=[500] * 8) as failing:
            for receiver in (ok, failing):
                targets = Notify(slack_webhook_urls=[receiver.url + SLACK_PATH], emails=["ops@example.com"],
                                 webhooks=[Webhook(url=receiver.url + HOOK_PATH, secret=SECRET)])
                wrong.send(alert(), targets)
                right.send(alert(), targets)
            await wrong.stop()
            await right.stop()
        assert len(ok.received) == 4 and failing.received == []
        assert len(inbox.messages) == 2  # `right` logged in; `wrong` was refused

    caplog.set_level(logging.DEBUG, logger="httpx")  # another test's import (litellm) may have quieted it
    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    text = caplog.text
    assert "gave up on slack alert" in text and "gave up on email alert" in text  # the failures were logged
    assert "HTTP Request: POST http://127.0.0.1" in text  # and so was httpx, at INFO
    for secret in (SECRET, SMTP_PASSWORD, SLACK_PATH, "slackTokenXYZ", HOOK_PATH, "pathTokenABC"):
        assert secret not in text, secret
