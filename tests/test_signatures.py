"""Webhook signatures checked against the providers' own published test vectors.

tests/test_events.py signs requests with keys made in the test; here the keys, bodies and signatures are
the ones SendGrid and Twilio publish in their SDKs' test suites, so that nurture is shown to accept what
the providers really sign and not only what nurture's tests think they sign.
"""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import FormData
from starlette.testclient import TestClient

from nurture.models import ConsentEvent, EmailSuppression, Provider, SendEvent
from nurture.settings import Settings
from nurture.web import SENDGRID_SIGNATURE, SENDGRID_TIMESTAMP, Clock, _twilio_validator, create_app

# From sendgrid/sendgrid-python, test/unit/test_eventwebhook.py (MIT licence): a verification key, and a
# signature it verifies over the timestamp followed by the payload, trailing CRLF included.
SENDGRID_PUBLIC_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNNRaINXvVpi"
    "glSI8eNEc6wEA3F+g=="
)
SENDGRID_SIGNED = (
    "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM="
)
SENDGRID_SIGNED_AT = "1600112502"
# The SDK builds it with json.dumps(..., sort_keys=True, separators=(",", ":")) + "\r\n"; these are its bytes.
SENDGRID_PAYLOAD = (
    b'[{"email":"hello@world.com","event":"dropped","reason":"Bounced Address",'
    b'"sg_event_id":"ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",'
    b'"sg_message_id":"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",'
    b'"smtp-id":"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>","timestamp":1600112492}]\r\n'
)

# From twilio/twilio-python, tests/unit/test_request_validator.py (MIT licence): an auth token, the URL
# Twilio was given, the POST parameters, and the X-Twilio-Signature Twilio computes for them.
TWILIO_AUTH_TOKEN = "12345"
TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
    "Caller": "+14158675309",
}
TWILIO_SIGNED = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
# The same file's JSON-body vector (bodySHA256 in the URL) is left out: Twilio posts SMS status callbacks
# and incoming messages as forms, and nurture's two Twilio routes read nothing else.


def flip(data: bytes, index: int) -> bytes:
    """Flip the lowest bit of one byte, which keeps ASCII text ASCII."""
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


def flip_signature(signature: str, index: int) -> str:
    return base64.b64encode(flip(base64.b64decode(signature), index)).decode()


def written(sessions: sessionmaker[Session]) -> tuple[int, int, int]:
    """Rows the SendGrid webhook could have written: events, suppressions, consent changes."""
    with sessions() as session:
        return (
            session.scalar(select(func.count()).select_from(SendEvent)) or 0,
            session.scalar(select(func.count()).select_from(EmailSuppression)) or 0,
            session.scalar(select(func.count()).select_from(ConsentEvent)) or 0,
        )


def sendgrid_client(settings: Settings, sessions: sessionmaker[Session], *, now: Clock | None) -> TestClient:
    configured = settings.model_copy(update={"sendgrid_webhook_public_key": SENDGRID_PUBLIC_KEY})
    return TestClient(create_app(configured, sessions, clock=now))


# The vector was signed in September 2020, far outside the 300 s webhook_tolerance_seconds that web.py
# compares against its clock. Rather than widen the tolerance (which would switch the replay check off),
# the app's clock is set to ten seconds after SendGrid signed, so the check still runs as shipped.
SIGNED_AT = dt.datetime.fromtimestamp(int(SENDGRID_SIGNED_AT), dt.UTC)


def just_after_signing() -> dt.datetime:
    return SIGNED_AT + dt.timedelta(seconds=10)


def sendgrid_headers(signature: str = SENDGRID_SIGNED) -> dict[str, str]:
    return {
        SENDGRID_SIGNATURE: signature,
        SENDGRID_TIMESTAMP: SENDGRID_SIGNED_AT,
        "content-type": "application/json",
    }


def test_sendgrids_published_vector_is_accepted_and_its_event_recorded(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    with sendgrid_client(settings, sessions, now=just_after_signing) as client:
        answer = client.post("/webhooks/sendgrid", content=SENDGRID_PAYLOAD, headers=sendgrid_headers())

    assert answer.status_code == 200
    # A drop of a message this database never sent: kept without a send, and counted as such.
    assert answer.json() == {"received": 1, "recorded": 1, "repeated": 0, "unknown_sends": 1, "ignored": 0}
    with sessions() as session:
        stored = session.execute(
            select(SendEvent.send_id, SendEvent.provider, SendEvent.event, SendEvent.dedupe_key)
        ).all()
    assert [tuple(row) for row in stored] == [
        (None, Provider.SENDGRID, "dropped", "sendgrid:ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA")
    ]


def test_sendgrids_published_vector_replayed_today_gets_403_and_writes_nothing(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    with sendgrid_client(settings, sessions, now=None) as client:  # the real clock, as `nurture serve` runs
        answer = client.post("/webhooks/sendgrid", content=SENDGRID_PAYLOAD, headers=sendgrid_headers())

    assert answer.status_code == 403
    assert "tolerance" in answer.text
    assert written(sessions) == (0, 0, 0)


def test_sendgrids_published_vector_with_any_body_byte_flipped_gets_403_and_writes_nothing(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    with sendgrid_client(settings, sessions, now=just_after_signing) as client:
        answers = {
            index: client.post(
                "/webhooks/sendgrid", content=flip(SENDGRID_PAYLOAD, index), headers=sendgrid_headers()
            ).status_code
            for index in range(len(SENDGRID_PAYLOAD))
        }

    assert answers == dict.fromkeys(range(len(SENDGRID_PAYLOAD)), 403)
    assert written(sessions) == (0, 0, 0)


def test_sendgrids_published_vector_with_any_signature_byte_flipped_gets_403_and_writes_nothing(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    der = base64.b64decode(SENDGRID_SIGNED)
    with sendgrid_client(settings, sessions, now=just_after_signing) as client:
        answers = {
            index: client.post(
                "/webhooks/sendgrid",
                content=SENDGRID_PAYLOAD,
                headers=sendgrid_headers(flip_signature(SENDGRID_SIGNED, index)),
            ).status_code
            for index in range(len(der))
        }

    assert answers == dict.fromkeys(range(len(der)), 403)
    assert written(sessions) == (0, 0, 0)


# Twilio signs the URL it was given plus the sorted POST parameters. nurture's routes rebuild that URL
# as NURTURE_PUBLIC_URL + /webhooks/twilio/status (or /inbound), and no public URL makes that end in the
# vector's /myapp.php?foo=1&bar=2, so the vector cannot reach a route. It is checked instead with the
# validator the routes use (web._twilio_validator, built from NURTURE_TWILIO_AUTH_TOKEN) given the form
# as the routes hand it over: a Starlette FormData. The routes' own 403s are in tests/test_events.py.


@pytest.fixture
def twilio_settings() -> Settings:
    return Settings(_env_file=None, twilio_auth_token=SecretStr(TWILIO_AUTH_TOKEN))  # type: ignore[call-arg]


def test_twilios_published_vector_is_accepted_by_the_validator_nurtures_routes_use(
    twilio_settings: Settings,
) -> None:
    validator = _twilio_validator(twilio_settings)

    assert validator.validate(TWILIO_URL, FormData(list(TWILIO_PARAMS.items())), TWILIO_SIGNED)


@pytest.mark.parametrize("name", sorted(TWILIO_PARAMS))
def test_twilios_published_vector_with_one_form_byte_flipped_is_refused(
    twilio_settings: Settings, name: str
) -> None:
    validator = _twilio_validator(twilio_settings)
    params = {**TWILIO_PARAMS, name: flip(TWILIO_PARAMS[name].encode(), 0).decode()}

    assert not validator.validate(TWILIO_URL, FormData(list(params.items())), TWILIO_SIGNED)


def test_twilios_published_vector_with_any_signature_byte_flipped_is_refused(
    twilio_settings: Settings,
) -> None:
    validator = _twilio_validator(twilio_settings)
    form = FormData(list(TWILIO_PARAMS.items()))
    length = len(base64.b64decode(TWILIO_SIGNED))

    accepted = [
        index
        for index in range(length)
        if validator.validate(TWILIO_URL, form, flip_signature(TWILIO_SIGNED, index))
    ]

    assert accepted == []
