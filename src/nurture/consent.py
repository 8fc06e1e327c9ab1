"""Consent: whether a contact agreed to hear from us on a channel, changed only with a recorded reason.

``consents`` holds the current answer per (contact, channel); ``consent_events`` keeps every change,
forever, with when and where it came from (an import, an unsubscribe link, a STOP reply, a provider's
opt-out error). A contact can also leave one topic (a touch) and keep the rest: ``topic_unsubscribes``.
An address that bounced or reported spam is suppressed (``email_suppressions``): an import does not grant
email consent to it again. A change that changes nothing (a second click on the same unsubscribe link,
SendGrid repeating an event) writes nothing, so that the history holds only real changes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Container, Iterable, Sequence

from sqlalchemy import insert, select, tuple_, update
from sqlalchemy.orm import Session

from nurture import db
from nurture.models import Channel, Consent, ConsentEvent, ConsentStatus, EmailSuppression, TopicUnsubscribe
from nurture.tokens import UnsubscribeToken


def change(
    session: Session,
    pairs: Iterable[tuple[int, Channel]],
    status: ConsentStatus,
    *,
    at: dt.datetime,
    source: str,
) -> int:
    """Set consent on each (contact, channel) to ``status``; give how many really changed."""
    wanted = set(pairs)
    if not wanted:
        return 0
    current = {
        (contact_id, channel): was
        for contact_id, channel, was in session.execute(
            select(Consent.contact_id, Consent.channel, Consent.status).where(
                tuple_(Consent.contact_id, Consent.channel).in_(sorted(wanted))
            )
        )
    }
    changed = sorted(pair for pair in wanted if current.get(pair) is not status)
    record(session, [(*pair, status) for pair in changed], existing=current, at=at, source=source)
    return len(changed)


def record(
    session: Session,
    changes: Sequence[tuple[int, Channel, ConsentStatus]],
    *,
    existing: Container[tuple[int, Channel]],
    at: dt.datetime,
    source: str,
) -> None:
    """Write changes known to be real, to the current answers (``existing`` have one) and the history."""
    if not changes:
        return
    rows = [
        {"contact_id": contact_id, "channel": channel, "status": status, "changed_at": at, "source": source}
        for contact_id, channel, status in changes
    ]
    new = [row for row in rows if (row["contact_id"], row["channel"]) not in existing]
    known = [row for row in rows if (row["contact_id"], row["channel"]) in existing]
    if new:
        session.execute(insert(Consent), new)
    if known:
        session.execute(update(Consent), known)
    session.execute(
        insert(ConsentEvent),
        [
            {
                "contact_id": contact_id,
                "channel": channel,
                "status": status,
                "occurred_at": at,
                "source": source,
            }
            for contact_id, channel, status in changes
        ],
    )


def revoke(session: Session, pairs: Iterable[tuple[int, Channel]], *, at: dt.datetime, source: str) -> int:
    """Withdraw consent on each (contact, channel): nothing more is sent there from the next run."""
    return change(session, pairs, ConsentStatus.REVOKED, at=at, source=source)


def grant(session: Session, pairs: Iterable[tuple[int, Channel]], *, at: dt.datetime, source: str) -> int:
    """Give consent on each (contact, channel), as when a contact replies START."""
    return change(session, pairs, ConsentStatus.GRANTED, at=at, source=source)


def unsubscribe_topics(
    session: Session, pairs: Iterable[tuple[int, str]], *, at: dt.datetime, source: str
) -> int:
    """Unsubscribe each (contact, topic): the calendar sends that touch no more; give how many are new."""
    wanted = set(pairs)
    if not wanted:
        return 0
    rows = [
        {"contact_id": contact_id, "topic": topic, "unsubscribed_at": at, "source": source}
        for contact_id, topic in sorted(wanted)
    ]
    statement = db.insert_new(session, TopicUnsubscribe, unique=("contact_id", "topic"))
    inserted = session.execute(statement.returning(TopicUnsubscribe.contact_id), rows).all()
    return len(inserted)


def unsubscribe(session: Session, token: UnsubscribeToken, *, at: dt.datetime, source: str) -> bool:
    """Do what an unsubscribe link asks: revoke its channel or leave its topic; give whether it changed."""
    if token.channel is not None:
        return revoke(session, [(token.contact_id, token.channel)], at=at, source=source) > 0
    assert token.topic is not None
    return unsubscribe_topics(session, [(token.contact_id, token.topic)], at=at, source=source) > 0


def suppress(session: Session, addresses: dict[str, str], *, at: dt.datetime) -> None:
    """Add each address (lowercased) to the suppression list with its reason; one already there stays."""
    if not addresses:
        return
    session.execute(
        db.insert_new(session, EmailSuppression, unique=("address",)),
        [
            {"address": address, "reason": reason, "suppressed_at": at}
            for address, reason in sorted(addresses.items())
        ],
    )


def suppressed(session: Session, addresses: Iterable[str]) -> set[str]:
    """Give those of ``addresses`` (compared lowercased) that are on the suppression list, lowercased."""
    wanted = sorted({address.lower() for address in addresses})
    found: set[str] = set()
    for start in range(0, len(wanted), 10_000):
        chunk = wanted[start : start + 10_000]
        found.update(
            session.scalars(select(EmailSuppression.address).where(EmailSuppression.address.in_(chunk)))
        )
    return found
