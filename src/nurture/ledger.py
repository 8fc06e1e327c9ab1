"""The send ledger: a message is claimed under its idempotency key before any channel is called.

The key names one message: (touch, contact, occurrence). Its uniqueness in the database is what makes a
second send impossible, whatever crashes or runs concurrently: a claim inserts the key or finds it taken,
in one statement. The channel is called only for keys this run claimed; the outcome is recorded after.
A run killed between the two leaves ``claimed`` rows, which the next run settles (see ``calendar``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import CursorResult, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from nurture.models import Channel, Send, SendCategory, SendStatus


def send_key(touch: str, contact_id: int, occurrence: str) -> str:
    """Give the idempotency key of one message."""
    return f"{touch}:{contact_id}:{occurrence}"


@dataclass(frozen=True, slots=True)
class Entry:
    """A message about to be claimed (or recorded as held out) in the ledger."""

    key: str
    contact_id: int
    touch: str
    occurrence: str
    category: SendCategory
    status: SendStatus  # CLAIMED, or HELD_OUT for the holdout
    due_at: dt.datetime
    channel: Channel | None = None
    locale: str | None = None
    template: str | None = None
    subject: str | None = None
    segments: int | None = None
    incentive: Decimal | None = None
    campaign: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the channel said about one claimed message."""

    send_id: int
    status: SendStatus  # SENT, FAILED or UNKNOWN
    provider_message_id: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Existing:
    """A ledger row already holding a key."""

    id: int
    key: str
    status: SendStatus
    channel: Channel | None


def claim(session: Session, entries: Sequence[Entry], *, at: dt.datetime, run_id: str) -> dict[str, int]:
    """Insert ``entries`` whose keys are free; give the keys this call took, with their send ids."""
    if not entries:
        return {}
    rows = [
        {
            "key": e.key,
            "contact_id": e.contact_id,
            "touch": e.touch,
            "occurrence": e.occurrence,
            "campaign": e.campaign,
            "category": e.category,
            "status": e.status,
            "channel": e.channel,
            "locale": e.locale,
            "template": e.template,
            "subject": e.subject,
            "segments": e.segments,
            "incentive": e.incentive,
            "due_at": e.due_at,
            "claimed_at": at,
            "run_id": run_id,
        }
        for e in entries
    ]
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(Send).on_conflict_do_nothing(index_elements=["key"]).returning(Send.key, Send.id)
    return {key: send_id for key, send_id in session.execute(statement, rows)}


def reclaim(session: Session, keys: Collection[str], *, run_id: str) -> dict[str, int]:
    """Take over claimed rows left by a run that died, for a channel that may safely be called again."""
    if not keys:
        return {}
    statement = (
        update(Send)
        .where(Send.key.in_(list(keys)), Send.status == SendStatus.CLAIMED)
        .values(run_id=run_id)
        .returning(Send.key, Send.id)
    )
    return {key: send_id for key, send_id in session.execute(statement)}


def record(session: Session, outcomes: Iterable[Outcome], *, at: dt.datetime) -> None:
    """Record what the channels said; only rows still ``claimed`` change, so a settled row stays settled."""
    rows = [
        {
            "b_id": o.send_id,
            "b_status": o.status,
            "b_sent_at": at if o.status == SendStatus.SENT else None,
            "b_provider_message_id": o.provider_message_id,
            "b_error": o.error,
        }
        for o in outcomes
    ]
    if not rows:
        return
    statement = (
        update(Send)
        .where(Send.id == bindparam("b_id"), Send.status == SendStatus.CLAIMED)
        .values(
            status=bindparam("b_status"),
            sent_at=bindparam("b_sent_at"),
            provider_message_id=bindparam("b_provider_message_id"),
            error=bindparam("b_error"),
        )
    )
    session.connection().execute(statement, rows)


def existing(session: Session, keys: Collection[str]) -> dict[str, Existing]:
    """Give the ledger rows already holding any of ``keys``."""
    if not keys:
        return {}
    statement = select(Send.id, Send.key, Send.status, Send.channel).where(Send.key.in_(list(keys)))
    return {row.key: Existing(row.id, row.key, row.status, row.channel) for row in session.execute(statement)}


def mark_unknown(
    session: Session, *, claimed_before: dt.datetime, channels: Collection[Channel], reason: str
) -> int:
    """Settle stale claims on channels that cannot be called twice as ``unknown``: never resent by itself."""
    if not channels:
        return 0
    statement = (
        update(Send)
        .where(
            Send.status == SendStatus.CLAIMED,
            Send.claimed_at < claimed_before,
            Send.channel.in_(list(channels)),
        )
        .values(status=SendStatus.UNKNOWN, error=reason)
    )
    result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
    return result.rowcount or 0
