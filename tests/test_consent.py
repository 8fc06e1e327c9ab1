"""Consent changes: each real change recorded once, with its source; repeats change nothing."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from nurture import consent
from nurture.models import Channel, Consent, ConsentEvent, ConsentStatus, Contact

AT = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)


def _contacts(session: Session, n: int) -> list[int]:
    rows = [
        {
            "external_id": f"c{i}",
            "email": f"c{i}@example.com",
            "locale": "es",
            "timezone": "Europe/Madrid",
            "referral_code": f"C{i:05d}",
            "attributes": {},
            "created_at": AT,
            "updated_at": AT,
        }
        for i in range(n)
    ]
    return list(session.scalars(insert(Contact).returning(Contact.id), rows))


def test_a_revocation_is_recorded_once_and_a_repeat_changes_nothing(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        first, second = _contacts(session, 2)
        consent.grant(session, [(first, Channel.EMAIL), (first, Channel.SMS)], at=AT, source="import")

    later = AT + dt.timedelta(hours=1)
    with sessions.begin() as session:
        pairs = [(first, Channel.EMAIL), (second, Channel.EMAIL)]
        assert consent.revoke(session, pairs, at=later, source="unsubscribe link") == 2
    with sessions.begin() as session:
        assert consent.revoke(session, pairs, at=later, source="unsubscribe link") == 0

    with sessions.begin() as session:
        current = {(c.contact_id, c.channel): c.status for c in session.scalars(select(Consent))}
        events = session.execute(
            select(
                ConsentEvent.contact_id, ConsentEvent.channel, ConsentEvent.status, ConsentEvent.source
            ).order_by(ConsentEvent.id)
        ).all()
    assert current == {
        (first, Channel.EMAIL): ConsentStatus.REVOKED,
        (first, Channel.SMS): ConsentStatus.GRANTED,
        (second, Channel.EMAIL): ConsentStatus.REVOKED,
    }
    assert [tuple(e) for e in events] == [
        (first, Channel.EMAIL, ConsentStatus.GRANTED, "import"),
        (first, Channel.SMS, ConsentStatus.GRANTED, "import"),
        (first, Channel.EMAIL, ConsentStatus.REVOKED, "unsubscribe link"),
        (second, Channel.EMAIL, ConsentStatus.REVOKED, "unsubscribe link"),
    ]
