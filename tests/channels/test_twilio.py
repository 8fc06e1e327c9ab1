"""Twilio against a local stand-in: the contract, opt-outs, retries, unknowns, segments a second."""

from __future__ import annotations

import base64
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
from fake_providers import Answer, FakeProvider, twilio_contract, twilio_error
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from histories import Business, local, run
from nurture.channels import Delivery, OutgoingMessage, messenger_for
from nurture.channels.twilio import TwilioMessenger
from nurture.errors import ConfigurationError
from nurture.models import Channel, Consent, ConsentEvent, ConsentStatus, SendStatus
from nurture.settings import Settings

REPO = Path(__file__).resolve().parents[2]
MADRID = "Europe/Madrid"
ACCOUNT = "AC" + "0123456789abcdef" * 2
SERVICE = "MG" + "fedcba9876543210" * 2


def twilio_settings(url: str, **values: Any) -> Settings:
    defaults: dict[str, Any] = {
        "sms_channel": "twilio",
        "twilio_account_sid": ACCOUNT,
        "twilio_auth_token": "secret-token",
        "twilio_messaging_service_sid": SERVICE,
        "twilio_base_url": url,
        "public_url": "https://nurture.luma.example/",
        "send_backoff_seconds": 0.01,
        "send_timeout_seconds": 0.5,
    }
    return Settings(_env_file=None, **(defaults | values))  # type: ignore[call-arg]


def sms(send_id: int, *, segments: int = 1, to: str = "+34612345678") -> OutgoingMessage:
    return OutgoingMessage(
        send_id=send_id,
        key=f"welcome:{send_id}:first",
        channel=Channel.SMS,
        to=to,
        to_name="Ana",
        subject=None,
        html=None,
        text="Hola Ana, ¿qué tal tu visita? https://luma.example/s/1",
        locale="es",
        touch="welcome",
        unsubscribe_url="https://luma.example/u/t",
        encoding="UCS-2",
        segments=segments,
    )


def push(settings: Settings, *messages: OutgoingMessage) -> list[Delivery]:
    messenger = messenger_for(Channel.SMS, settings)
    try:
        return messenger.push(list(messages))
    finally:
        messenger.close()


# The request.


def test_an_sms_is_one_messages_create_request_that_twilios_contract_accepts(
    twilio_api: FakeProvider,
) -> None:
    [delivery] = push(twilio_settings(twilio_api.url), sms(8))

    assert delivery.status is SendStatus.SENT and delivery.provider_message_id == f"SM{1:032x}"
    [request] = twilio_api.requests
    assert request.path == f"/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
    assert request.errors == []
    assert (
        request.headers["Authorization"]
        == "Basic " + base64.b64encode(f"{ACCOUNT}:secret-token".encode()).decode()
    )
    assert request.body == {
        "To": "+34612345678",
        "Body": "Hola Ana, ¿qué tal tu visita? https://luma.example/s/1",
        "MessagingServiceSid": SERVICE,
        "StatusCallback": "https://nurture.luma.example/webhooks/twilio/status",
    }


def test_a_sender_number_instead_of_a_messaging_service(twilio_api: FakeProvider) -> None:
    settings = twilio_settings(twilio_api.url, twilio_messaging_service_sid=None, twilio_from="+34911222333")

    [delivery] = push(settings, sms(1))

    assert delivery.status is SendStatus.SENT
    [request] = twilio_api.requests
    assert request.errors == []
    assert request.body["From"] == "+34911222333" and "MessagingServiceSid" not in request.body


def test_the_fake_twilio_really_checks_the_contract() -> None:
    errors = twilio_contract()({"Body": "hi", "ScheduleType": "later"})

    assert "(body): 'To' is a required property" in errors
    assert any(e.startswith("ScheduleType:") for e in errors)


@pytest.mark.parametrize(
    ("values", "setting"),
    [
        ({"twilio_auth_token": None}, "NURTURE_TWILIO_AUTH_TOKEN"),
        ({"twilio_account_sid": None}, "NURTURE_TWILIO_ACCOUNT_SID"),
        ({"twilio_messaging_service_sid": None}, "NURTURE_TWILIO_MESSAGING_SERVICE_SID"),
        ({"twilio_from": "+34911222333"}, "NURTURE_TWILIO_MESSAGING_SERVICE_SID"),
    ],
)
def test_a_missing_or_doubled_setting_is_named_when_the_channel_is_built(
    values: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ConfigurationError, match=setting):
        messenger_for(Channel.SMS, twilio_settings("http://127.0.0.1:9", **values))


def test_a_malformed_sender_is_refused_with_the_setting_named() -> None:
    with pytest.raises(ValueError, match="twilio_from"):
        twilio_settings("http://127.0.0.1:9", twilio_from="0034 911 222 333")


# Answers.


def test_21610_fails_the_message_and_asks_to_revoke_sms_consent(twilio_api: FakeProvider) -> None:
    twilio_api.answer(twilio_error(400, 21610, "Attempt to send to unsubscribed recipient"))

    opted_out, sent = push(twilio_settings(twilio_api.url), sms(1), sms(2))

    assert opted_out.status is SendStatus.FAILED
    said = "Unable to create record: Attempt to send to unsubscribed recipient"
    assert opted_out.error == f"Twilio answered 400, error 21610: {said}"
    assert opted_out.revoke_consent == "twilio 21610"
    assert sent.status is SendStatus.SENT and sent.revoke_consent is None
    assert len(twilio_api.requests) == 2


def test_another_4xx_fails_the_message_with_twilios_code_and_keeps_consent(twilio_api: FakeProvider) -> None:
    twilio_api.answer(twilio_error(400, 21211, "Invalid 'To' Phone Number"))

    [delivery] = push(twilio_settings(twilio_api.url), sms(1, to="+3400"))

    assert delivery.status is SendStatus.FAILED and "error 21211" in (delivery.error or "")
    assert delivery.revoke_consent is None
    assert len(twilio_api.requests) == 1


def test_a_429_waits_as_long_as_retry_after_says_then_sends(twilio_api: FakeProvider) -> None:
    twilio_api.answer(twilio_error(429, 20429, "Too Many Requests", **{"Retry-After": "1"}))

    [delivery] = push(twilio_settings(twilio_api.url), sms(1))

    assert delivery.status is SendStatus.SENT
    first, second = twilio_api.requests
    assert second.at - first.at >= 0.95 and first.body == second.body


def test_5xx_answers_are_retried(twilio_api: FakeProvider) -> None:
    twilio_api.answer(
        twilio_error(500, 20500, "Internal Server Error"), twilio_error(503, 20503, "Unavailable")
    )

    [delivery] = push(twilio_settings(twilio_api.url), sms(1))

    assert delivery.status is SendStatus.SENT and delivery.provider_message_id == f"SM{3:032x}"
    assert len(twilio_api.requests) == 3


def test_a_request_that_went_out_and_got_no_answer_is_unknown_and_not_retried(
    twilio_api: FakeProvider,
) -> None:
    twilio_api.answer(Answer(201, delay=1.5))

    [delivery] = push(twilio_settings(twilio_api.url, send_timeout_seconds=0.3), sms(1))

    assert delivery.status is SendStatus.UNKNOWN
    assert "no answer from Twilio after the request went out" in (delivery.error or "")
    assert len(twilio_api.requests) == 1


def test_a_connection_dropped_after_the_request_is_unknown(twilio_api: FakeProvider) -> None:
    twilio_api.answer(Answer(drop=True))

    [delivery] = push(twilio_settings(twilio_api.url), sms(1))

    assert delivery.status is SendStatus.UNKNOWN
    assert len(twilio_api.requests) == 1


def test_twilio_out_of_reach_is_retried_and_fails_not_unknown() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = twilio_settings(f"http://127.0.0.1:{port}", send_max_retries=1)

    [delivery] = push(settings, sms(1))

    assert delivery.status is SendStatus.FAILED
    assert (delivery.error or "").startswith("could not reach Twilio")
    assert "gave up after 2 attempts" in (delivery.error or "")


# The rate, in segments.


def test_the_rate_is_held_in_segments_a_second_at_the_server(twilio_api: FakeProvider) -> None:
    settings = twilio_settings(twilio_api.url, twilio_rate=20, twilio_concurrency=4)

    deliveries = push(settings, *(sms(i, segments=2) for i in range(20)))

    assert [d.status for d in deliveries] == [SendStatus.SENT] * 20
    times = sorted(r.at for r in twilio_api.requests)
    busiest = max(2 * sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 20 + 2
    assert times[-1] - times[0] >= 19 * 2 / 20 * 0.98


# Through the calendar.


@pytest.fixture
def calendar_settings(settings: Settings, tmp_path: Path, twilio_api: FakeProvider) -> Settings:
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates", root)
    programme = root / "programme.yaml"
    programme.write_text(programme.read_text().replace("holdout: 0.10", "holdout: 0"))
    chosen = twilio_settings(twilio_api.url).model_dump(
        include={
            "sms_channel",
            "twilio_account_sid",
            "twilio_auth_token",
            "twilio_messaging_service_sid",
            "twilio_base_url",
            "send_backoff_seconds",
            "send_timeout_seconds",
        }
    )
    return settings.model_copy(update=chosen | {"templates_dir": root})


def test_21610_revokes_the_contacts_sms_consent_where_the_run_records_the_failure(
    calendar_settings: Settings, sessions: sessionmaker[Session], twilio_api: FakeProvider
) -> None:
    business = Business(sessions)
    first = [local(MADRID, 2026, 11, 22, 12, 0)]
    stopped = business.contact(consent=[Channel.SMS], phone="+34612345678", email=None, visits=first)
    willing = business.contact(consent=[Channel.SMS], phone="+34612345679", email=None, visits=first)
    twilio_api.script = lambda received, n: (
        twilio_error(400, 21610, "Attempt to send to unsubscribed recipient")
        if received.body["To"] == "+34612345678"
        else Answer(201, {"sid": f"SM{n + 1:032x}", "status": "queued"})
    )

    summary = run(calendar_settings, local(MADRID, 2026, 11, 23, 10, 0), touches=["welcome"])

    assert (summary.totals["sent"], summary.totals["failed"], summary.totals["consent_revoked"]) == (1, 1, 1)
    assert twilio_api.invalid == []
    [failed] = business.sends(stopped)
    assert failed.status is SendStatus.FAILED and "21610" in (failed.error or "")
    [sent] = business.sends(willing)
    assert sent.status is SendStatus.SENT and sent.provider_message_id is not None
    with sessions() as session:
        consents = {row.contact_id: row.status for row in session.scalars(select(Consent))}
        events = [(e.contact_id, e.source) for e in session.scalars(select(ConsentEvent))]
    assert consents == {stopped: ConsentStatus.REVOKED, willing: ConsentStatus.GRANTED}
    assert events == [(stopped, "twilio 21610")]


def test_the_twilio_messenger_is_what_the_setting_chooses(twilio_api: FakeProvider) -> None:
    messenger = messenger_for(Channel.SMS, twilio_settings(twilio_api.url))
    try:
        assert isinstance(messenger, TwilioMessenger)
        assert (messenger.name, messenger.channel, messenger.idempotent) == ("twilio", "sms", False)
    finally:
        messenger.close()
