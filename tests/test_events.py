"""Provider events through nurture serve's webhooks: signatures checked first, each event recorded once."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient
from twilio.request_validator import RequestValidator

from histories import Business, local, run
from nurture.models import (
    Channel,
    Consent,
    ConsentEvent,
    ConsentStatus,
    Delivery,
    EmailSuppression,
    InboundKind,
    InboundMessage,
    Send,
    SendCategory,
    SendEvent,
    SendStatus,
)
from nurture.settings import Settings
from nurture.web import SENDGRID_SIGNATURE, SENDGRID_TIMESTAMP, TWILIO_SIGNATURE, create_app

REPO = Path(__file__).resolve().parent.parent
MADRID = "Europe/Madrid"
SENT_AT = dt.datetime(2026, 11, 20, 10, 0, tzinfo=dt.UTC)


class SendGrid:
    """Signs Event Webhook requests as SendGrid does: ECDSA P-256 over the timestamp and the raw body."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        der = self.key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        self.public_key = base64.b64encode(der).decode()  # as SendGrid's settings page shows it

    def headers(self, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signature = self.key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            SENDGRID_SIGNATURE: base64.b64encode(signature).decode(),
            SENDGRID_TIMESTAMP: stamp,
            "content-type": "application/json",
        }


@pytest.fixture
def sendgrid() -> SendGrid:
    return SendGrid()


@pytest.fixture
def settings(
    settings: Settings, sendgrid: SendGrid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The SendGrid key configured, and the shipped programme without its holdout."""
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    programme = templates / "programme.yaml"
    programme.write_text(programme.read_text().replace("holdout: 0.10", "holdout: 0"))
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(templates))
    return settings.model_copy(
        update={"templates_dir": templates, "sendgrid_webhook_public_key": sendgrid.public_key}
    )


@pytest.fixture
def business(sessions: sessionmaker[Session]) -> Business:
    return Business(sessions)


@pytest.fixture
def client(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(settings, sessions)) as client:
        yield client


def a_send(
    sessions: sessionmaker[Session], contact_id: int, channel: Channel, provider_id: str | None = None
) -> int:
    with sessions.begin() as session:
        send = Send(
            key=f"welcome:{contact_id}:{channel}",
            contact_id=contact_id,
            touch="welcome",
            occurrence="first",
            category=SendCategory.MARKETING,
            status=SendStatus.SENT,
            channel=channel,
            due_at=SENT_AT,
            claimed_at=SENT_AT,
            sent_at=SENT_AT,
            provider_message_id=provider_id,
        )
        session.add(send)
        session.flush()
        return send.id


def event(name: str, send_id: int | None, email: str, n: int, **extra: Any) -> dict[str, Any]:
    """One SendGrid event as the webhook posts it; custom_args come back as top-level string fields."""
    item: dict[str, Any] = {
        "email": email,
        "timestamp": int(SENT_AT.timestamp()) + n,
        "event": name,
        "sg_event_id": f"evt-{name}-{n}",
        "sg_message_id": f"msg{send_id}.filter0001",
        **extra,
    }
    if send_id is not None:
        item["nurture_send_id"] = str(send_id)
    return item


def body(*events: dict[str, Any]) -> bytes:
    return json.dumps(list(events)).encode()


def recorded_events(sessions: sessionmaker[Session]) -> list[tuple[int | None, str]]:
    with sessions() as session:
        return [
            tuple(row)
            for row in session.execute(select(SendEvent.send_id, SendEvent.event).order_by(SendEvent.id))
        ]  # type: ignore[misc]


def consent_of(sessions: sessionmaker[Session], contact_id: int) -> dict[Channel, ConsentStatus]:
    with sessions() as session:
        rows = session.execute(
            select(Consent.channel, Consent.status).where(Consent.contact_id == contact_id)
        )
        return {channel: status for channel, status in rows}


def suppressions(sessions: sessionmaker[Session]) -> dict[str, str]:
    with sessions() as session:
        return dict(session.execute(select(EmailSuppression.address, EmailSuppression.reason)).all())  # type: ignore[arg-type]


def written(sessions: sessionmaker[Session]) -> tuple[int, int, int]:
    """Rows any webhook could have written: events, suppressions, consent changes."""
    with sessions() as session:
        return (
            session.scalar(select(func.count()).select_from(SendEvent)) or 0,
            session.scalar(select(func.count()).select_from(EmailSuppression)) or 0,
            session.scalar(select(func.count()).select_from(ConsentEvent)) or 0,
        )


# SendGrid


def test_signed_events_are_recorded_against_their_send_once_however_often_sendgrid_repeats_them(
    client: TestClient, sendgrid: SendGrid, sessions: sessionmaker[Session], business: Business
) -> None:
    lucia = business.contact()
    send = a_send(sessions, lucia, Channel.EMAIL)
    address = f"c{lucia}@example.com"
    batch = body(
        event("processed", send, address, 1),
        event("delivered", send, address, 2, response="250 OK"),
        event("open", send, address, 3),
        event("click", send, address, 4, url="https://example.com/book"),
        event("click", send, address, 4, url="https://example.com/book"),  # repeated within the batch
        event("group_resubscribe", send, address, 5),  # not one nurture keeps
    )

    first = client.post("/webhooks/sendgrid", content=batch, headers=sendgrid.headers(batch))
    again = client.post("/webhooks/sendgrid", content=batch, headers=sendgrid.headers(batch))

    assert first.status_code == again.status_code == 200
    assert first.json() == {"received": 6, "recorded": 4, "repeated": 0, "unknown_sends": 0, "ignored": 1}
    assert again.json() == {"received": 6, "recorded": 0, "repeated": 4, "unknown_sends": 0, "ignored": 1}
    assert recorded_events(sessions) == [
        (send, "processed"),
        (send, "delivered"),
        (send, "open"),
        (send, "click"),
    ]
    with sessions() as session:
        stored = session.get_one(Send, send)
    assert (stored.status, stored.delivery, stored.delivery_error) == (
        SendStatus.SENT,
        Delivery.DELIVERED,
        "250 OK",
    )
    assert stored.delivery_at == SENT_AT + dt.timedelta(seconds=2)
    assert consent_of(sessions, lucia) == {Channel.EMAIL: ConsentStatus.GRANTED}


@pytest.mark.parametrize(
    "tamper",
    [
        "body changed after signing",
        "no signature",
        "no timestamp",
        "signature not base64",
        "signed by another key",
        "timestamp changed after signing",
        "timestamp too old",
        "timestamp in the future",
    ],
)
def test_a_bad_or_missing_signature_or_a_stale_timestamp_gets_403_and_writes_nothing(
    client: TestClient, sendgrid: SendGrid, sessions: sessionmaker[Session], business: Business, tamper: str
) -> None:
    lucia = business.contact()
    send = a_send(sessions, lucia, Channel.EMAIL)
    batch = body(event("spamreport", send, f"c{lucia}@example.com", 1))
    headers = sendgrid.headers(batch)
    now = int(time.time())
    if tamper == "body changed after signing":
        batch = batch.replace(b"spamreport", b"delivered!")
    elif tamper == "no signature":
        del headers[SENDGRID_SIGNATURE]
    elif tamper == "no timestamp":
        del headers[SENDGRID_TIMESTAMP]
    elif tamper == "signature not base64":
        headers[SENDGRID_SIGNATURE] = "!!not base64!!x"
    elif tamper == "signed by another key":
        headers = SendGrid().headers(batch)
    elif tamper == "timestamp changed after signing":
        headers[SENDGRID_TIMESTAMP] = str(now + 1)
    elif tamper == "timestamp too old":
        headers = sendgrid.headers(batch, timestamp=now - 301)
    else:
        headers = sendgrid.headers(batch, timestamp=now + 301)

    answer = client.post("/webhooks/sendgrid", content=batch, headers=headers)

    assert answer.status_code == 403
    assert written(sessions) == (0, 0, 0)
    assert consent_of(sessions, lucia) == {Channel.EMAIL: ConsentStatus.GRANTED}


def test_a_bounce_or_spam_report_suppresses_the_address_and_revokes_every_contact_on_it(
    client: TestClient, sendgrid: SendGrid, sessions: sessionmaker[Session], business: Business
) -> None:
    lucia = business.contact(email="Lucia@Example.com", consent=[Channel.EMAIL, Channel.SMS])
    sister = business.contact(email="lucia@example.com")  # a second record on the same mailbox
    pedro = business.contact(email="pedro@example.com")
    blocked = business.contact(email="blocked@example.com")
    send = a_send(sessions, lucia, Channel.EMAIL)
    batch = body(
        event("bounce", send, "Lucia@Example.com", 1, type="bounce", reason="550 5.1.1 no such user"),
        event("spamreport", None, "pedro@example.com", 2),
        event("bounce", None, "blocked@example.com", 3, type="blocked", reason="421 try later"),
    )

    answer = client.post("/webhooks/sendgrid", content=batch, headers=sendgrid.headers(batch))

    assert answer.status_code == 200
    assert answer.json()["unknown_sends"] == 2
    assert suppressions(sessions) == {"lucia@example.com": "bounce", "pedro@example.com": "spamreport"}
    assert consent_of(sessions, lucia) == {
        Channel.EMAIL: ConsentStatus.REVOKED,
        Channel.SMS: ConsentStatus.GRANTED,
    }
    assert consent_of(sessions, sister) == {Channel.EMAIL: ConsentStatus.REVOKED}
    assert consent_of(sessions, pedro) == {Channel.EMAIL: ConsentStatus.REVOKED}
    assert consent_of(sessions, blocked) == {Channel.EMAIL: ConsentStatus.GRANTED}  # a block is not a bounce
    with sessions() as session:
        sources = set(session.scalars(select(ConsentEvent.source)))
        stored = session.get_one(Send, send)
    assert sources == {"sendgrid bounce", "sendgrid spamreport"}
    assert (stored.delivery, stored.delivery_error) == (Delivery.BOUNCED, "550 5.1.1 no such user")


@pytest.mark.parametrize("name", ["unsubscribe", "group_unsubscribe"])
def test_an_unsubscribe_at_sendgrid_revokes_email_consent_without_suppressing_the_address(
    client: TestClient, sendgrid: SendGrid, sessions: sessionmaker[Session], business: Business, name: str
) -> None:
    lucia = business.contact(consent=[Channel.EMAIL, Channel.SMS])
    send = a_send(sessions, lucia, Channel.EMAIL)
    batch = body(event(name, send, f"c{lucia}@example.com", 1, asm_group_id=7))

    assert (
        client.post("/webhooks/sendgrid", content=batch, headers=sendgrid.headers(batch)).status_code == 200
    )

    assert consent_of(sessions, lucia) == {
        Channel.EMAIL: ConsentStatus.REVOKED,
        Channel.SMS: ConsentStatus.GRANTED,
    }
    assert suppressions(sessions) == {}


def test_events_for_sends_nurture_does_not_know_are_acknowledged_and_counted(
    client: TestClient, sendgrid: SendGrid, sessions: sessionmaker[Session]
) -> None:
    batch = body(
        event("delivered", 999_999, "someone@example.com", 1),
        event("open", None, "someone@example.com", 2),
        {**event("click", None, "someone@example.com", 3), "nurture_send_id": "not-a-number"},
    )

    answer = client.post("/webhooks/sendgrid", content=batch, headers=sendgrid.headers(batch))

    assert answer.status_code == 200
    assert answer.json() == {"received": 3, "recorded": 3, "repeated": 0, "unknown_sends": 3, "ignored": 0}
    assert recorded_events(sessions) == [(None, "delivered"), (None, "open"), (None, "click")]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "body is not JSON"),
        (b'{"event": "open"}', "body is not a JSON array of events"),
        (b'[{"event": "open", "timestamp": 1}, 7]', "event 1: not a JSON object"),
        (b'[{"event": "open", "timestamp": 1}, {"timestamp": 2}]', "event 1: event: missing"),
        (b'[{"event": "open", "timestamp": 1}, {"event": "open", "timestamp": "x"}]', "event 1: timestamp"),
        (b"\xff\xfe[]", "body is not UTF-8"),
    ],
)
def test_a_malformed_body_gets_400_naming_the_problem_and_writes_nothing(
    client: TestClient, sendgrid: SendGrid, sessions: sessionmaker[Session], content: bytes, problem: str
) -> None:
    answer = client.post("/webhooks/sendgrid", content=content, headers=sendgrid.headers(content))

    assert answer.status_code == 400
    assert problem in answer.text
    assert written(sessions) == (0, 0, 0)


def test_a_batch_over_the_size_limit_gets_413_and_without_a_key_every_request_is_refused(
    settings: Settings, sendgrid: SendGrid, sessions: sessionmaker[Session]
) -> None:
    batch = body(*(event("open", None, f"p{n}@example.com", n) for n in range(200)))
    with TestClient(create_app(settings.model_copy(update={"max_body_bytes": 4096}), sessions)) as client:
        assert (
            client.post("/webhooks/sendgrid", content=batch, headers=sendgrid.headers(batch)).status_code
            == 413
        )
    without_key = settings.model_copy(update={"sendgrid_webhook_public_key": None})
    with TestClient(create_app(without_key, sessions)) as client:
        refused = client.post("/webhooks/sendgrid", content=batch, headers=sendgrid.headers(batch))
        assert refused.status_code == 503
        assert "NURTURE_SENDGRID_WEBHOOK_PUBLIC_KEY" in refused.text
    assert written(sessions) == (0, 0, 0)


def test_the_next_calendar_run_sends_nothing_to_a_bounced_address(
    client: TestClient,
    sendgrid: SendGrid,
    settings: Settings,
    sessions: sessionmaker[Session],
    business: Business,
) -> None:
    yesterday = local(MADRID, 2026, 11, 22, 12, 0)
    bounced = business.contact(email="gone@example.com", visits=[yesterday])
    fine = business.contact(visits=[yesterday])
    batch = body(event("bounce", None, "gone@example.com", 1, type="bounce"))
    assert (
        client.post("/webhooks/sendgrid", content=batch, headers=sendgrid.headers(batch)).status_code == 200
    )

    summary = run(settings, local(MADRID, 2026, 11, 23, 10, 0), touches=["welcome"]).as_dict()

    assert [(s.contact_id, s.channel, s.status) for s in business.sends()] == [
        (fine, Channel.EMAIL, SendStatus.SENT)
    ]
    assert summary["suppressed_consent"] == 1
    assert bounced != fine


# Twilio


TOKEN = "twilio-test-auth-token-0123456789"
PHONE = "+34612345678"


def twilio_post(
    client: TestClient, settings: Settings, path: str, form: dict[str, str], **options: Any
) -> Any:
    """POST a form signed as Twilio does: the public URL and the sorted parameters, under the auth token."""
    signature = RequestValidator(TOKEN).compute_signature(f"{settings.public_url}{path}", form)
    headers = {TWILIO_SIGNATURE: options.pop("signature", signature)}
    return client.post(path, data=form, headers=headers)


@pytest.fixture
def twilio(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[tuple[TestClient, Settings]]:
    configured = settings.model_copy(
        update={"twilio_auth_token": SecretStr(TOKEN), "public_url": "https://hooks.salon.example"}
    )
    with TestClient(create_app(configured, sessions)) as client:
        yield client, configured


def inbound(sid: str, text: str, sender: str = PHONE) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "AccountSid": "AC" + "0" * 32,
        "From": sender,
        "To": "+34900000000",
        "Body": text,
    }


def inbound_rows(sessions: sessionmaker[Session]) -> list[tuple[str, int | None, int | None, InboundKind]]:
    with sessions() as session:
        rows = session.execute(
            select(
                InboundMessage.body, InboundMessage.contact_id, InboundMessage.send_id, InboundMessage.kind
            ).order_by(InboundMessage.id)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def test_status_callbacks_record_each_status_once_and_keep_the_final_answer_on_the_send(
    twilio: tuple[TestClient, Settings], sessions: sessionmaker[Session], business: Business
) -> None:
    client, settings = twilio
    lucia = business.contact(phone=PHONE, consent=[Channel.SMS])
    pedro = business.contact(phone="+34611111111", consent=[Channel.SMS])
    delivered = a_send(sessions, lucia, Channel.SMS, provider_id="SM" + "1" * 32)
    failed = a_send(sessions, pedro, Channel.SMS, provider_id="SM" + "2" * 32)
    path = "/webhooks/twilio/status"

    answers = [
        twilio_post(client, settings, path, {"MessageSid": "SM" + "1" * 32, "MessageStatus": "sent"}),
        twilio_post(client, settings, path, {"MessageSid": "SM" + "1" * 32, "MessageStatus": "delivered"}),
        twilio_post(client, settings, path, {"MessageSid": "SM" + "1" * 32, "MessageStatus": "delivered"}),
        twilio_post(
            client,
            settings,
            path,
            {"MessageSid": "SM" + "2" * 32, "MessageStatus": "undelivered", "ErrorCode": "30003"},
        ),
        twilio_post(client, settings, path, {"MessageSid": "SM" + "9" * 32, "MessageStatus": "delivered"}),
    ]

    assert [a.status_code for a in answers] == [200] * 5
    assert [a.json()["recorded"] for a in answers] == [1, 1, 0, 1, 1]
    assert answers[4].json()["unknown_sends"] == 1
    assert recorded_events(sessions) == [
        (delivered, "sent"),
        (delivered, "delivered"),
        (failed, "undelivered"),
        (None, "delivered"),
    ]
    with sessions() as session:
        one, two = session.get_one(Send, delivered), session.get_one(Send, failed)
    assert (one.status, one.delivery, one.delivery_error) == (SendStatus.SENT, Delivery.DELIVERED, None)
    # The channel said sent; the carrier could not deliver: both stay on record.
    assert (two.status, two.delivery, two.delivery_error) == (SendStatus.SENT, Delivery.UNDELIVERED, "30003")


def test_a_status_callback_with_twilios_opted_out_error_revokes_sms_consent(
    twilio: tuple[TestClient, Settings], sessions: sessionmaker[Session], business: Business
) -> None:
    client, settings = twilio
    lucia = business.contact(phone=PHONE, consent=[Channel.EMAIL, Channel.SMS])
    a_send(sessions, lucia, Channel.SMS, provider_id="SM" + "1" * 32)
    form = {"MessageSid": "SM" + "1" * 32, "MessageStatus": "failed", "ErrorCode": "21610"}

    assert twilio_post(client, settings, "/webhooks/twilio/status", form).status_code == 200

    assert consent_of(sessions, lucia) == {
        Channel.EMAIL: ConsentStatus.GRANTED,
        Channel.SMS: ConsentStatus.REVOKED,
    }


@pytest.mark.parametrize("path", ["/webhooks/twilio/status", "/webhooks/twilio/inbound"])
@pytest.mark.parametrize("tamper", ["missing", "wrong token", "form changed", "other url"])
def test_a_twilio_request_with_a_bad_or_missing_signature_gets_403_and_writes_nothing(
    twilio: tuple[TestClient, Settings],
    sessions: sessionmaker[Session],
    business: Business,
    path: str,
    tamper: str,
) -> None:
    client, settings = twilio
    lucia = business.contact(phone=PHONE, consent=[Channel.SMS])
    a_send(sessions, lucia, Channel.SMS, provider_id="SM" + "1" * 32)
    form = {**inbound("SM" + "1" * 32, "STOP"), "MessageStatus": "failed", "ErrorCode": "21610"}
    url = f"{settings.public_url}{path}"
    signature = {
        "missing": "",
        "wrong token": RequestValidator("another token").compute_signature(url, form),
        "form changed": RequestValidator(TOKEN).compute_signature(url, {**form, "Body": "hello"}),
        "other url": RequestValidator(TOKEN).compute_signature(f"http://testserver{path}", form),
    }[tamper]

    answer = twilio_post(client, settings, path, form, signature=signature)

    assert answer.status_code == 403
    assert written(sessions) == (0, 0, 0)
    assert inbound_rows(sessions) == []
    assert consent_of(sessions, lucia) == {Channel.SMS: ConsentStatus.GRANTED}


@pytest.mark.parametrize(
    "word",
    [
        "STOP",
        "stop",
        " Stop ",
        "STOPALL",
        "unsubscribe",
        "CANCEL",
        "End",
        "quit",
        "REVOKE",
        "optout",
        "\tSTOP\n",
    ],
)
def test_every_opt_out_word_in_any_case_revokes_sms_consent_of_everyone_on_that_number(
    twilio: tuple[TestClient, Settings], sessions: sessionmaker[Session], business: Business, word: str
) -> None:
    client, settings = twilio
    lucia = business.contact(phone=PHONE, consent=[Channel.EMAIL, Channel.SMS])
    shared = business.contact(phone=PHONE, consent=[Channel.SMS])  # a family sharing a phone
    other = business.contact(phone="+34611111111", consent=[Channel.SMS])

    answer = twilio_post(client, settings, "/webhooks/twilio/inbound", inbound("SM" + "5" * 32, word))

    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/xml")
    assert "<Message>" not in answer.text  # Twilio's Advanced Opt-Out answers opt-outs itself
    assert consent_of(sessions, lucia) == {
        Channel.EMAIL: ConsentStatus.GRANTED,
        Channel.SMS: ConsentStatus.REVOKED,
    }
    assert consent_of(sessions, shared) == {Channel.SMS: ConsentStatus.REVOKED}
    assert consent_of(sessions, other) == {Channel.SMS: ConsentStatus.GRANTED}
    assert [row[3] for row in inbound_rows(sessions)] == [InboundKind.OPT_OUT]


@pytest.mark.parametrize("word", ["START", "yes", " Unstop "])
def test_start_yes_and_unstop_restore_sms_consent_that_stop_revoked(
    twilio: tuple[TestClient, Settings], sessions: sessionmaker[Session], business: Business, word: str
) -> None:
    client, settings = twilio
    lucia = business.contact(phone=PHONE, consent=[Channel.SMS])
    never_agreed = business.contact(phone=PHONE, consent=[])
    path = "/webhooks/twilio/inbound"
    twilio_post(client, settings, path, inbound("SM" + "1" * 32, "STOP"))
    assert consent_of(sessions, lucia) == {Channel.SMS: ConsentStatus.REVOKED}

    assert twilio_post(client, settings, path, inbound("SM" + "2" * 32, word)).status_code == 200

    assert consent_of(sessions, lucia) == {Channel.SMS: ConsentStatus.GRANTED}
    assert consent_of(sessions, never_agreed) == {}  # a text does not sign up someone who never agreed
    with sessions() as session:
        sources = list(session.scalars(select(ConsentEvent.source).order_by(ConsentEvent.id)))
    assert sources == ["sms STOP", f"sms {word.strip().upper()}"]


@pytest.mark.parametrize("word", ["HELP", "help", " Info "])
def test_help_and_info_get_the_help_reply_and_change_nothing(
    twilio: tuple[TestClient, Settings], sessions: sessionmaker[Session], business: Business, word: str
) -> None:
    client, settings = twilio
    lucia = business.contact(phone=PHONE, consent=[Channel.SMS])

    answer = twilio_post(client, settings, "/webhooks/twilio/inbound", inbound("SM" + "1" * 32, word))

    assert answer.status_code == 200
    assert answer.text == (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Message>Luma Studio: appointment news and offers.'
        " Reply STOP to unsubscribe. Help: +1 555 0100</Message></Response>"
    )
    assert consent_of(sessions, lucia) == {Channel.SMS: ConsentStatus.GRANTED}


def test_anything_else_is_kept_once_as_a_reply_to_the_contacts_last_sms(
    twilio: tuple[TestClient, Settings], sessions: sessionmaker[Session], business: Business
) -> None:
    client, settings = twilio
    lucia = business.contact(phone=PHONE, consent=[Channel.SMS])
    first = a_send(sessions, lucia, Channel.SMS, provider_id="SM" + "1" * 32)
    with sessions.begin() as session:
        later = Send(
            key=f"birthday:{lucia}:2026",
            contact_id=lucia,
            touch="birthday",
            occurrence="2026",
            category=SendCategory.MARKETING,
            status=SendStatus.SENT,
            channel=Channel.SMS,
            due_at=SENT_AT,
            claimed_at=SENT_AT,
            sent_at=SENT_AT + dt.timedelta(days=1),
        )
        session.add(later)
        session.flush()
        last = later.id
    path = "/webhooks/twilio/inbound"
    reply = inbound("SM" + "7" * 32, "Stop sending me birthday wishes please")

    assert twilio_post(client, settings, path, reply).text == (
        '<?xml version="1.0" encoding="UTF-8"?><Response />'
    )
    twilio_post(client, settings, path, reply)  # Twilio retried: kept once
    twilio_post(client, settings, path, inbound("SM" + "8" * 32, "who is this?", sender="+34699999999"))

    assert inbound_rows(sessions) == [
        ("Stop sending me birthday wishes please", lucia, last, InboundKind.REPLY),
        ("who is this?", None, None, InboundKind.REPLY),
    ]
    assert first != last
    assert consent_of(sessions, lucia) == {Channel.SMS: ConsentStatus.GRANTED}


def test_twilio_webhooks_refuse_a_missing_field_or_a_missing_auth_token(
    twilio: tuple[TestClient, Settings], settings: Settings, sessions: sessionmaker[Session]
) -> None:
    client, configured = twilio
    path = "/webhooks/twilio/status"
    missing = twilio_post(client, configured, path, {"MessageSid": "SM" + "1" * 32})
    assert (missing.status_code, missing.text) == (400, "MessageStatus: missing\n")
    with TestClient(create_app(settings.model_copy(update={"twilio_auth_token": None}), sessions)) as bare:
        refused = twilio_post(bare, settings, path, {"MessageSid": "SM1", "MessageStatus": "sent"})
    assert refused.status_code == 503
    assert written(sessions) == (0, 0, 0)


def test_the_next_calendar_run_sends_no_sms_after_stop(
    twilio: tuple[TestClient, Settings], sessions: sessionmaker[Session], business: Business
) -> None:
    client, settings = twilio
    yesterday = local(MADRID, 2026, 11, 22, 12, 0)
    lucia = business.contact(phone=PHONE, email=None, consent=[Channel.SMS], visits=[yesterday])
    fine = business.contact(phone="+34611111111", email=None, consent=[Channel.SMS], visits=[yesterday])
    twilio_post(client, settings, "/webhooks/twilio/inbound", inbound("SM" + "1" * 32, "stop"))

    summary = run(settings, local(MADRID, 2026, 11, 23, 10, 0), touches=["welcome"]).as_dict()

    assert [(s.contact_id, s.channel, s.status) for s in business.sends()] == [
        (fine, Channel.SMS, SendStatus.SENT)
    ]
    assert summary["suppressed_consent"] == 1
    assert lucia != fine
