"""Hand-made customer histories for calendar tests: a tiny business built row by row."""

from __future__ import annotations

import datetime as dt
import email
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from nurture.calendar import RunSummary, run_calendar
from nurture.models import (
    Channel,
    Consent,
    ConsentStatus,
    Contact,
    ContactTag,
    Feedback,
    FeedbackKind,
    Referral,
    Send,
    Visit,
)
from nurture.settings import Settings

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def local(timezone: str, *args: int) -> dt.datetime:
    """Give a wall-clock time in ``timezone`` as an aware datetime."""
    return dt.datetime(*args, tzinfo=ZoneInfo(timezone))  # type: ignore[misc]


@dataclass
class Business:
    """Builds contacts with their visits, feedback, consents and referrals, straight into the database."""

    sessions: sessionmaker[Session]
    _next: int = field(default=0)

    def contact(
        self,
        *,
        timezone: str = "Europe/Madrid",
        locale: str = "es",
        email: str | None = "auto",
        phone: str | None = None,
        consent: Iterable[Channel] = (Channel.EMAIL,),
        first_name: str = "Lucía",
        birthday: dt.date | None = None,
        tags: Iterable[str] = (),
        visits: Iterable[dt.datetime] = (),
        amount: Decimal = Decimal("40.00"),
        external_id: str | None = None,
        country: str | None = None,
    ) -> int:
        """Add a contact and their history; give its id."""
        self._next += 1
        n = self._next
        external_id = external_id or f"c{n}"
        created = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
        with self.sessions.begin() as session:
            contact = Contact(
                external_id=external_id,
                first_name=first_name,
                last_name="García",
                email=f"{external_id}@example.com" if email == "auto" else email,
                phone=phone,
                country=country,
                locale=locale,
                timezone=timezone,
                birthday=birthday,
                referral_code=f"REF{n:05d}",
                attributes={},
                created_at=created,
                updated_at=created,
            )
            session.add(contact)
            session.flush()
            for tag in tags:
                session.add(ContactTag(contact_id=contact.id, tag=tag))
            for channel in consent:
                session.add(
                    Consent(
                        contact_id=contact.id,
                        channel=channel,
                        status=ConsentStatus.GRANTED,
                        changed_at=created,
                        source="test",
                    )
                )
            for i, moment in enumerate(visits):
                session.add(
                    Visit(
                        external_id=f"{external_id}-v{i}",
                        contact_id=contact.id,
                        occurred_at=moment,
                        amount=amount,
                        currency="EUR",
                        created_at=created,
                    )
                )
            return contact.id

    def visit(self, contact_id: int, moment: dt.datetime, amount: Decimal = Decimal("40.00")) -> None:
        """Add one visit."""
        with self.sessions.begin() as session:
            count = len(session.scalars(select(Visit.id).where(Visit.contact_id == contact_id)).all())
            session.add(
                Visit(
                    external_id=f"x{contact_id}-{count}-{moment.timestamp()}",
                    contact_id=contact_id,
                    occurred_at=moment,
                    amount=amount,
                    currency="EUR",
                    created_at=moment,
                )
            )

    def feedback(
        self,
        contact_id: int,
        moment: dt.datetime,
        kind: FeedbackKind,
        score: int | None = None,
        resolved_at: dt.datetime | None = None,
    ) -> None:
        """Add one piece of feedback."""
        with self.sessions.begin() as session:
            session.add(
                Feedback(
                    contact_id=contact_id,
                    occurred_at=moment,
                    kind=kind,
                    score=score,
                    resolved_at=resolved_at,
                    created_at=moment,
                )
            )

    def referral(self, referrer_id: int, referred_id: int) -> None:
        """Record that ``referrer_id`` brought ``referred_id``."""
        with self.sessions.begin() as session:
            session.add(Referral(referrer_id=referrer_id, referred_id=referred_id, created_at=NOW))

    def revoke(self, contact_id: int, channel: Channel) -> None:
        """Revoke a contact's consent on ``channel``."""
        with self.sessions.begin() as session:
            consent = session.get(Consent, (contact_id, channel))
            assert consent is not None
            consent.status = ConsentStatus.REVOKED

    def sends(self, contact_id: int | None = None) -> list[Send]:
        """Give the ledger, oldest first (optionally for one contact)."""
        with self.sessions() as session:
            query = select(Send).order_by(Send.id)
            if contact_id is not None:
                query = query.where(Send.contact_id == contact_id)
            return list(session.scalars(query))


def run(settings: Settings, at: dt.datetime, **options: object) -> RunSummary:
    """Run the calendar for ``at`` in-process."""
    return run_calendar(settings, at, **options)  # type: ignore[arg-type]


def outbox_emails(settings: Settings) -> list[EmailMessage]:
    """Give every email the outbox holds, parsed."""
    folder = settings.outbox_dir / "email"
    return [
        email.message_from_bytes(path.read_bytes(), policy=default)  # type: ignore[misc]
        for path in sorted(folder.glob("*.eml"))
    ]


def outbox_sms(settings: Settings) -> list[dict[str, object]]:
    """Give every SMS the outbox holds."""
    folder = settings.outbox_dir / "sms"
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def outbox_files(settings: Settings) -> list[Path]:
    """Give every file in the outbox."""
    return sorted(p for p in settings.outbox_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
