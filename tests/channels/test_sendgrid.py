"""SendGrid against a local stand-in: requests the contract accepts, retries, failures, unknowns, the rate."""

from __future__ import annotations

import datetime as dt
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fake_providers import Answer, FakeProvider, sendgrid_contract, sendgrid_error, sendgrid_settings
from sqlalchemy.orm import Session, sessionmaker

from histories import Business, local, run
from nurture import ledger
from nurture.channels import OutgoingMessage, messenger_for, sendgrid
from nurture.channels.sendgrid import SendGridMessenger
from nurture.errors import ConfigurationError
from nurture.models import Channel, SendStatus
from nurture.settings import Settings

REPO = Path(__file__).resolve().parents[2]
MADRID = "Europe/Madrid"


def email(send_id: int, *, marketing: bool = True, to: str = "ana@example.com") -> OutgoingMessage:
    return OutgoingMessage(
        send_id=send_id,
        key=f"welcome:{send_id}:first",
        channel=Channel.EMAIL,
        to=to,
        to_name="Ana Pérez",
        subject="¡Bienvenida!",
        html="<p>Hola Ana</p>",
        text="Hola Ana",
        locale="es",
        touch="welcome",
        unsubscribe_url=f"https://luma.example/u/token{send_id}" if marketing else None,
        encoding=None,
        segments=None,
    )


def push(settings: Settings, *messages: OutgoingMessage) -> list[Any]:
    messenger = messenger_for(Channel.EMAIL, settings)
    try:
        return messenger.push(list(messages))
    finally:
        messenger.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# The request.


def test_an_email_is_one_mail_send_request_that_sendgrids_contract_accepts(
    sendgrid_api: FakeProvider,
) -> None:
    settings = sendgrid_settings(sendgrid_api.url, sendgrid_unsubscribe_group=4242)

    [delivery] = push(settings, email(17))

    assert delivery.status is SendStatus.SENT and delivery.provider_message_id == "sg-1"
    [request] = sendgrid_api.requests
    assert request.path == "/v3/mail/send"
    assert request.errors == []
    assert request.headers["Authorization"] == "Bearer SG.test-key"
    body = request.body
    assert body["from"] == {"email": "hola@luma.example", "name": "Luma Studio"}
    assert body["reply_to"] == {"email": "desk@luma.example", "name": "Front desk"}
    assert body["personalizations"] == [
        {"to": [{"email": "ana@example.com", "name": "Ana Pérez"}], "custom_args": {"nurture_send_id": "17"}}
    ]
    assert body["subject"] == "¡Bienvenida!"
    assert body["content"] == [
        {"type": "text/plain", "value": "Hola Ana"},
        {"type": "text/html", "value": "<p>Hola Ana</p>"},
    ]
    assert body["categories"] == ["welcome"]
    assert body["asm"] == {"group_id": 4242}
    assert body["headers"] == {
        "List-Unsubscribe": "<https://luma.example/u/token17>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def test_a_service_email_has_no_unsubscribe_header_or_group(sendgrid_api: FakeProvider) -> None:
    settings = sendgrid_settings(sendgrid_api.url, sendgrid_unsubscribe_group=4242, email_reply_to=None)

    [delivery] = push(settings, email(3, marketing=False))

    assert delivery.status is SendStatus.SENT
    [request] = sendgrid_api.requests
    assert request.errors == []
    assert "headers" not in request.body and "asm" not in request.body and "reply_to" not in request.body


def test_the_fake_sendgrid_really_checks_the_contract() -> None:
    validate = sendgrid_contract()
    broken = {"personalizations": [{"to": "ana@example.com"}], "from": {"name": "no address"}, "subject": ""}

    errors = validate(broken)

    assert any("personalizations/0/to" in e for e in errors)
    assert any(e.startswith("from:") for e in errors)
    assert any(e.startswith("subject:") for e in errors)


def test_without_an_api_key_the_channel_names_the_setting(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, email_channel="sendgrid")  # type: ignore[call-arg]

    with pytest.raises(ConfigurationError, match="NURTURE_SENDGRID_API_KEY"):
        messenger_for(Channel.EMAIL, settings)


# Answers.


def test_a_429_waits_as_long_as_retry_after_says_then_sends(sendgrid_api: FakeProvider) -> None:
    sendgrid_api.answer(sendgrid_error(429, "too many requests", **{"Retry-After": "1"}))

    [delivery] = push(sendgrid_settings(sendgrid_api.url), email(1))

    assert delivery.status is SendStatus.SENT and delivery.provider_message_id == "sg-2"
    first, second = sendgrid_api.requests
    assert second.at - first.at >= 0.95
    assert first.body == second.body


def test_5xx_answers_are_retried_with_backoff(sendgrid_api: FakeProvider) -> None:
    sendgrid_api.answer(sendgrid_error(500, "internal error"), sendgrid_error(503, "unavailable"))

    [delivery] = push(sendgrid_settings(sendgrid_api.url, send_backoff_seconds=0.2), email(1))

    assert delivery.status is SendStatus.SENT
    first, second, third = (r.at for r in sendgrid_api.requests)
    assert second - first >= 0.1  # at least half of the first delay, the rest is jitter
    assert third - second >= 0.2  # doubled


def test_a_permanent_4xx_fails_the_message_with_sendgrids_error_and_is_not_retried(
    sendgrid_api: FakeProvider,
) -> None:
    sendgrid_api.answer(sendgrid_error(400, "Does not contain a valid address.", "personalizations.0.to"))

    failed, sent = push(sendgrid_settings(sendgrid_api.url), email(1, to="ana@invalid"), email(2))

    assert failed.status is SendStatus.FAILED
    assert failed.error == "SendGrid answered 400: personalizations.0.to: Does not contain a valid address."
    assert sent.status is SendStatus.SENT
    assert len(sendgrid_api.requests) == 2


def test_a_provider_that_keeps_failing_is_given_up_after_the_retries(sendgrid_api: FakeProvider) -> None:
    sendgrid_api.script = lambda received, before: sendgrid_error(503, "unavailable")

    [delivery] = push(sendgrid_settings(sendgrid_api.url, send_max_retries=2), email(1))

    assert delivery.status is SendStatus.FAILED
    assert delivery.error == "SendGrid answered 503: unavailable (gave up after 3 attempts)"
    assert len(sendgrid_api.requests) == 3


def test_the_runs_retry_budget_is_shared_by_all_messages(sendgrid_api: FakeProvider) -> None:
    sendgrid_api.script = lambda received, before: sendgrid_error(503, "unavailable")
    settings = sendgrid_settings(
        sendgrid_api.url, send_max_retries=5, send_retry_budget=2, sendgrid_concurrency=1
    )

    deliveries = push(settings, email(1), email(2), email(3))

    assert [d.status for d in deliveries] == [SendStatus.FAILED] * 3
    assert len(sendgrid_api.requests) == 3 + 2
    assert "NURTURE_SEND_RETRY_BUDGET" in (deliveries[-1].error or "")


def test_a_request_that_went_out_and_got_no_answer_is_unknown_and_not_retried(
    sendgrid_api: FakeProvider,
) -> None:
    sendgrid_api.answer(Answer(202, delay=1.5))

    unknown, sent = push(sendgrid_settings(sendgrid_api.url, send_timeout_seconds=0.3), email(1), email(2))

    assert unknown.status is SendStatus.UNKNOWN
    assert "no answer from SendGrid after the request went out" in (unknown.error or "")
    assert sent.status is SendStatus.SENT
    assert sorted(
        r.body["personalizations"][0]["custom_args"]["nurture_send_id"] for r in sendgrid_api.requests
    ) == ["1", "2"]


def test_a_connection_dropped_after_the_request_is_unknown(sendgrid_api: FakeProvider) -> None:
    sendgrid_api.answer(Answer(drop=True))

    [delivery] = push(sendgrid_settings(sendgrid_api.url), email(1))

    assert delivery.status is SendStatus.UNKNOWN
    assert len(sendgrid_api.requests) == 1


def test_a_provider_that_cannot_be_reached_is_retried_and_fails_not_unknown() -> None:
    settings = sendgrid_settings(f"http://127.0.0.1:{free_port()}", send_max_retries=2)

    [delivery] = push(settings, email(1))

    assert delivery.status is SendStatus.FAILED
    assert delivery.error is not None and delivery.error.startswith("could not reach SendGrid")
    assert "gave up after 3 attempts" in delivery.error


# Connections.


def test_one_connection_carries_one_email_after_another_errors_included(sendgrid_api: FakeProvider) -> None:
    sendgrid_api.answer(sendgrid_error(500, "internal error"), sendgrid_error(400, "bad", "subject"))
    settings = sendgrid_settings(sendgrid_api.url, sendgrid_concurrency=1)

    deliveries = push(settings, *(email(i) for i in range(1, 6)))

    assert [d.status for d in deliveries] == [SendStatus.FAILED] + [SendStatus.SENT] * 4
    assert len(sendgrid_api.requests) == 6
    assert len({r.peer for r in sendgrid_api.requests}) == 1


def test_a_connection_the_server_closed_while_idle_is_replaced_and_the_email_sent(
    sendgrid_api: FakeProvider,
) -> None:
    sendgrid_api.answer(Answer(202, headers={"X-Message-Id": "sg-1"}, close=True))
    messenger = messenger_for(Channel.EMAIL, sendgrid_settings(sendgrid_api.url, sendgrid_concurrency=1))
    try:
        [first] = messenger.push([email(1)])
        assert sendgrid_api.closed.acquire(timeout=5)
        [second] = messenger.push([email(2)])
    finally:
        messenger.close()

    assert (first.status, second.status) == (SendStatus.SENT, SendStatus.SENT)
    one, two = sendgrid_api.requests
    assert one.peer != two.peer


def test_a_connection_idle_for_long_is_not_reused(
    sendgrid_api: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sendgrid, "IDLE_REUSE_SECONDS", 0.2)
    messenger = messenger_for(Channel.EMAIL, sendgrid_settings(sendgrid_api.url, sendgrid_concurrency=1))
    try:
        messenger.push([email(1), email(2)])
        time.sleep(0.3)
        messenger.push([email(3)])
    finally:
        messenger.close()

    first, second, third = (r.peer for r in sendgrid_api.requests)
    assert first == second != third


def test_a_connection_reset_while_the_request_is_written_is_retried(sendgrid_api: FakeProvider) -> None:
    sendgrid_api.reset_next_before_body = True
    large = replace(email(1), html="<p>" + "x" * 16_000_000 + "</p>")  # more than the sockets buffer

    [delivery] = push(sendgrid_settings(sendgrid_api.url), large)

    assert delivery.status is SendStatus.SENT
    [request] = sendgrid_api.requests  # the reset one was never read
    assert request.body["personalizations"][0]["custom_args"] == {"nurture_send_id": "1"}


# The rate.


def test_the_configured_rate_is_held_at_the_server_with_requests_in_flight_together(
    sendgrid_api: FakeProvider,
) -> None:
    sendgrid_api.script = lambda received, before: Answer(
        202, headers={"X-Message-Id": f"m{before}"}, delay=0.25
    )
    settings = sendgrid_settings(sendgrid_api.url, sendgrid_rate=20, sendgrid_concurrency=8)
    started = time.monotonic()

    deliveries = push(settings, *(email(i) for i in range(40)))

    took = time.monotonic() - started
    assert [d.status for d in deliveries] == [SendStatus.SENT] * 40
    times = sorted(r.at for r in sendgrid_api.requests)
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 20 + 1
    assert times[-1] - times[0] >= 39 / 20 * 0.98
    assert took < 40 * 0.25 / 2  # one at a time would take 10 s


# Through the calendar.


def new_customers(business: Business, n: int) -> list[int]:
    return [business.contact(visits=[local(MADRID, 2026, 11, 22, 18, 0)]) for _ in range(n)]


def test_the_calendar_sends_through_sendgrid_and_keeps_the_message_id(
    sendgrid_calendar: Settings, sessions: sessionmaker[Session], sendgrid_api: FakeProvider
) -> None:
    business = Business(sessions)
    [lucia] = new_customers(business, 1)

    summary = run(sendgrid_calendar, local(MADRID, 2026, 11, 23, 10, 0), touches=["welcome"])

    assert summary.totals["sent"] == 1
    [send] = business.sends(lucia)
    [request] = sendgrid_api.requests
    assert request.errors == []
    assert send.status is SendStatus.SENT and send.provider_message_id == "sg-1"
    assert request.body["personalizations"][0]["custom_args"] == {"nurture_send_id": str(send.id)}
    assert request.body["personalizations"][0]["to"][0]["email"] == "c1@example.com"


def test_an_unknown_send_is_listed_in_the_summary_and_not_resent_by_the_next_run(
    sendgrid_calendar: Settings, sessions: sessionmaker[Session], sendgrid_api: FakeProvider
) -> None:
    business = Business(sessions)
    [lucia] = new_customers(business, 1)
    sendgrid_api.answer(Answer(202, delay=1.5))
    settings = sendgrid_calendar.model_copy(update={"send_timeout_seconds": 0.3})

    first = run(settings, local(MADRID, 2026, 11, 23, 10, 0), touches=["welcome"])
    again = run(settings, local(MADRID, 2026, 11, 23, 14, 0), touches=["welcome"])

    [send] = business.sends(lucia)
    assert first.totals["unknown"] == 1 and first.unknown_sends == [send.id]
    assert (
        f"unknown outcome (the provider may have them) and will not be resent by themselves: {send.id}"
        in (first.markdown())
    )
    assert send.status is SendStatus.UNKNOWN and "no answer from SendGrid" in (send.error or "")
    assert again.totals["sent"] == 0
    assert len(sendgrid_api.requests) == 1


def test_a_run_that_crashes_mid_batch_and_is_run_again_sends_nothing_twice(
    sendgrid_calendar: Settings,
    sessions: sessionmaker[Session],
    sendgrid_api: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    business = Business(sessions)
    contacts = new_customers(business, 5)
    record = ledger.record
    calls = 0

    def crash_on_the_second_batch(session: Session, outcomes: Any, *, at: dt.datetime) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt  # the process dies after SendGrid took the batch, before it is recorded
        record(session, outcomes, at=at)

    monkeypatch.setattr(ledger, "record", crash_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run(sendgrid_calendar, local(MADRID, 2026, 11, 23, 10, 0), touches=["welcome"])
    monkeypatch.setattr(ledger, "record", record)
    assert len(sendgrid_api.requests) == 4  # two batches of two went out; the third was never claimed

    again = run(sendgrid_calendar, local(MADRID, 2026, 11, 23, 10, 5), touches=["welcome"])
    later = run(sendgrid_calendar, local(MADRID, 2026, 11, 23, 12, 0), touches=["welcome"])

    recipients = [r.body["personalizations"][0]["to"][0]["email"] for r in sendgrid_api.requests]
    assert sorted(recipients) == sorted(f"c{i}@example.com" for i in range(1, 6))
    assert again.totals["sent"] == 1 and later.totals["sent"] == 0
    statuses = [s.status for c in contacts for s in business.sends(c)]
    # The batch SendGrid took but nobody recorded waits for a person: unknown once the claim is stale.
    assert sorted(statuses) == sorted([SendStatus.SENT] * 3 + [SendStatus.UNKNOWN] * 2)
    assert later.totals["unknown"] == 2


@pytest.mark.slow
def test_a_run_spread_over_worker_processes_holds_the_configured_rate_in_all(
    sendgrid_calendar: Settings, sessions: sessionmaker[Session], sendgrid_api: FakeProvider
) -> None:
    business = Business(sessions)
    new_customers(business, 160)
    settings = sendgrid_calendar.model_copy(
        update={"calendar_processes": 2, "sendgrid_rate": 40, "send_batch_size": 20}
    )

    summary = run(settings, local(MADRID, 2026, 11, 23, 10, 0), touches=["welcome"], batch_size=40)

    assert summary.totals["sent"] == 160
    times = sorted(r.at for r in sendgrid_api.requests)
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    # Each process holds 20 a second; a loaded machine bunches their arrivals a little. The full rate in each
    # process would show about 80.
    assert busiest <= 40 * 1.25
    assert times[-1] - times[0] >= (160 - 2) / 40 * 0.98


def test_the_sendgrid_messenger_is_what_the_setting_chooses(sendgrid_api: FakeProvider) -> None:
    messenger = messenger_for(Channel.EMAIL, sendgrid_settings(sendgrid_api.url))
    try:
        assert isinstance(messenger, SendGridMessenger)
        assert (messenger.name, messenger.channel, messenger.idempotent) == ("sendgrid", "email", False)
    finally:
        messenger.close()
