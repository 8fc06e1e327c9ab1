"""Measure nurture serve's webhooks: SendGrid event batches and Twilio inbound messages, end to end.

    .venv/bin/python benchmarks/webhooks.py [--sends 1000] [--postgres URL]

On a fresh database (a temporary SQLite file, or the PostgreSQL database given, emptied first) it writes
``--sends`` contacts with one sent email each, then posts through the real app (Starlette's test client,
no network): one signed SendGrid batch with processed, delivered and open for every send (3 × sends
events, about as large as a SendGrid batch gets), the same batch again (all repeats), a batch of bounces for
a tenth of the addresses, and 200 Twilio inbound messages one request each (half STOP, half replies).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import SecretStr
from sqlalchemy import insert, text
from starlette.testclient import TestClient
from twilio.request_validator import RequestValidator

from nurture import db
from nurture.models import Channel, Consent, ConsentStatus, Contact, Send, SendCategory, SendStatus
from nurture.settings import Settings
from nurture.web import SENDGRID_SIGNATURE, SENDGRID_TIMESTAMP, TWILIO_SIGNATURE, create_app

AT = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)
TOKEN = "benchmark-auth-token"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=1000)
    parser.add_argument("--postgres", help="a PostgreSQL URL to measure on instead of SQLite (emptied first)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url = options.postgres or f"sqlite:///{Path(folder) / 'nurture.db'}"
        engine = db.make_engine(url)
        if options.postgres:
            with engine.begin() as connection:
                connection.execute(text("DROP SCHEMA public CASCADE"))
                connection.execute(text("CREATE SCHEMA public"))
        db.upgrade(engine)
        sessions = db.session_factory(engine)
        with sessions.begin() as session:
            ids = _business(session, options.sends)
        key = ec.generate_private_key(ec.SECP256R1())
        public = base64.b64encode(
            key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        ).decode()
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            database_url=url,
            sendgrid_webhook_public_key=public,
            twilio_auth_token=SecretStr(TOKEN),
            max_body_bytes=64 * 1024 * 1024,
        )
        print(f"database: {engine.dialect.name}, {options.sends:,} sends")
        with TestClient(create_app(settings, sessions)) as client:
            events = [
                _event(name, send_id, n)
                for n, send_id in enumerate(ids)
                for name in ("processed", "delivered", "open")
            ]
            _sendgrid(client, key, events, "SendGrid batch, new events")
            _sendgrid(client, key, events, "SendGrid batch, all repeats")
            bounces = [_event("bounce", send_id, n) for n, send_id in enumerate(ids[::10])]
            _sendgrid(client, key, bounces, "SendGrid batch, bounces")
            _twilio(client, settings, 200)
        engine.dispose()


def _business(session: Any, count: int) -> list[int]:
    rows = [
        {
            "external_id": f"c{n}",
            "email": f"c{n}@example.com",
            "phone": f"+3461{n:07d}",
            "locale": "es",
            "timezone": "Europe/Madrid",
            "referral_code": f"R{n:07d}",
            "attributes": {},
            "created_at": AT,
            "updated_at": AT,
        }
        for n in range(count)
    ]
    contacts = list(session.scalars(insert(Contact).returning(Contact.id), rows))
    consents = [
        {
            "contact_id": c,
            "channel": channel,
            "status": ConsentStatus.GRANTED,
            "changed_at": AT,
            "source": "x",
        }
        for c in contacts
        for channel in Channel
    ]
    session.execute(insert(Consent), consents)
    sends = [
        {
            "key": f"welcome:{c}:first",
            "contact_id": c,
            "touch": "welcome",
            "occurrence": "first",
            "category": SendCategory.MARKETING,
            "status": SendStatus.SENT,
            "channel": Channel.EMAIL,
            "due_at": AT,
            "claimed_at": AT,
            "sent_at": AT,
        }
        for c in contacts
    ]
    return list(session.scalars(insert(Send).returning(Send.id), sends))


def _event(name: str, send_id: int, n: int) -> dict[str, Any]:
    return {
        "email": f"c{n}@example.com",
        "timestamp": int(AT.timestamp()) + n,
        "event": name,
        "sg_event_id": f"{name}-{send_id}",
        "sg_message_id": f"m{send_id}.filter",
        "nurture_send_id": str(send_id),
        "type": "bounce",
    }


def _sendgrid(
    client: TestClient, key: ec.EllipticCurvePrivateKey, events: list[dict[str, Any]], what: str
) -> None:
    body = json.dumps(events).encode()
    stamp = str(int(time.time()))
    signature = base64.b64encode(key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()
    headers = {SENDGRID_SIGNATURE: signature, SENDGRID_TIMESTAMP: stamp, "content-type": "application/json"}
    started = time.perf_counter()
    answer = client.post("/webhooks/sendgrid", content=body, headers=headers)
    took = time.perf_counter() - started
    assert answer.status_code == 200, answer.text
    print(
        f"{what}: {len(events):,} events, {len(body) / 1024:,.0f} KiB, {took * 1000:,.0f} ms"
        f" ({len(events) / took:,.0f} events/s) -> {answer.json()}"
    )


def _twilio(client: TestClient, settings: Settings, count: int) -> None:
    validator = RequestValidator(TOKEN)
    path = "/webhooks/twilio/inbound"
    started = time.perf_counter()
    for n in range(count):
        form = {
            "MessageSid": f"SM{n:032d}",
            "From": f"+3461{n:07d}",
            "To": "+34900000000",
            "Body": "STOP" if n % 2 else "¿A qué hora abrís el sábado?",
        }
        signature = validator.compute_signature(f"{settings.public_url}{path}", form)
        answer = client.post(path, data=form, headers={TWILIO_SIGNATURE: signature})
        assert answer.status_code == 200, answer.text
    took = time.perf_counter() - started
    print(
        f"Twilio inbound: {count} requests one by one,"
        f" {took / count * 1000:.1f} ms each ({count / took:,.0f}/s)"
    )


if __name__ == "__main__":
    main()
