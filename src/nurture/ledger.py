"""The send ledger: a message is claimed under its idempotency key before any channel is called.

The key names one message: (touch, contact, occurrence). Its uniqueness in the database is what makes a
second send impossible, whatever crashes or runs concurrently: a claim inserts the key or finds it taken,
in one statement. The channel is called only for keys this run claimed; the outcome is recorded after.
A run killed between the two leaves ``claimed`` rows, which the next run settles (see ``calendar``); a
run stopped (cancelled) gives up the claims whose message it never handed to a provider (``unclaim``).

A send whose outcome nobody knows (``unknown``) waits for a person: ``confirm_sent`` records that it went
out, ``release`` lets the next run try it once more (``nurture sends reconcile``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import CursorResult, String, Table, bindparam, cast, delete, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from nurture.models import UNSETTLED, Channel, Contact, Send, SendCategory, SendStatus

_SENDS: Table = Send.__table__  # type: ignore[assignment]


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
    # On the table rather than the mapped class: the ORM's bulk insert costs a fifth more per row.
    statement = insert(_SENDS).on_conflict_do_nothing(index_elements=["key"])
    returning = statement.returning(_SENDS.c.key, _SENDS.c.id)
    return {key: send_id for key, send_id in session.connection().execute(returning, rows)}


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


def unclaim(session: Session, ids: Collection[int]) -> None:
    """Give up claims whose message no provider was asked for, so that a later run claims and sends it."""
    if ids:
        session.execute(delete(Send).where(Send.id.in_(list(ids)), Send.status == SendStatus.CLAIMED))


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
            UNSETTLED,
            Send.status == SendStatus.CLAIMED,
            Send.claimed_at < claimed_before,
            Send.channel.in_(list(channels)),
        )
        .values(status=SendStatus.UNKNOWN, error=reason)
    )
    result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
    return result.rowcount or 0


# Reconciling unknown sends: a person says what became of them (``nurture sends reconcile``).

RELEASED = ":released:"


@dataclass(frozen=True, slots=True)
class UnknownSend:
    """A send whose outcome nobody knows: the provider may or may not have it."""

    id: int
    contact_id: int
    contact: str  # the contact's external id
    touch: str
    channel: Channel | None
    claimed_at: dt.datetime
    error: str | None


class NotUnknown(ValueError):
    """Raised when a send asked to be reconciled does not exist or is not unknown; nothing was changed."""

    def __init__(self, problems: Mapping[int, str]) -> None:
        self.problems = dict(problems)
        super().__init__("; ".join(f"send {send_id} {why}" for send_id, why in sorted(self.problems.items())))


def unknown_sends(session: Session) -> list[UnknownSend]:
    """Give every unknown send, oldest claim first."""
    statement = (
        select(Send.id, Send.contact_id, Contact.external_id, Send.touch, Send.channel)
        .add_columns(Send.claimed_at, Send.error)
        .join(Contact, Contact.id == Send.contact_id)
        .where(UNSETTLED, Send.status == SendStatus.UNKNOWN)
        .order_by(Send.claimed_at, Send.id)
    )
    return [UnknownSend(*row) for row in session.execute(statement)]


def confirm_sent(
    session: Session, ids: Collection[int], *, at: dt.datetime, provider_message_id: str | None = None
) -> list[int]:
    """Record unknown sends as sent, as a person found out: sent when claimed, the provider's id if given."""
    _check_unknown(session, ids)
    if provider_message_id is not None and len(ids) != 1:
        raise ValueError("a provider message id names one send: give exactly one")
    note = f"confirmed sent by a person at {at.isoformat()}; before: "
    statement = (
        update(Send)
        .where(Send.id.in_(list(ids)), Send.status == SendStatus.UNKNOWN)
        .values(
            status=SendStatus.SENT,
            sent_at=Send.claimed_at,
            provider_message_id=func.coalesce(provider_message_id, Send.provider_message_id),
            error=literal(note) + func.coalesce(Send.error, ""),
        )
        .returning(Send.id)
    )
    return sorted(session.scalars(statement))


def release(session: Session, ids: Collection[int], *, at: dt.datetime) -> list[int]:
    """Let the next calendar run send these unknown messages once more, if they are still due then.

    The row stays, as ``failed`` with why, and gives up its key (``<key>:released:<id>``), so that the
    message can be claimed afresh under its own key: one more try, recorded as a new send. Only an
    ``unknown`` row can be released, so releasing twice, or releasing a send that went out, changes nothing.
    """
    _check_unknown(session, ids)
    note = f"released for one more try by a person at {at.isoformat()}; before: "
    statement = (
        update(Send)
        .where(Send.id.in_(list(ids)), Send.status == SendStatus.UNKNOWN)
        .values(
            status=SendStatus.FAILED,
            key=Send.key + RELEASED + cast(Send.id, String),
            error=literal(note) + func.coalesce(Send.error, ""),
        )
        .returning(Send.id)
    )
    return sorted(session.scalars(statement))


def _check_unknown(session: Session, ids: Collection[int]) -> None:
    """Raise ``NotUnknown`` unless every send in ``ids`` exists and is unknown."""
    if not ids:
        raise ValueError("no send ids given")
    found = dict(session.execute(select(Send.id, Send.status).where(Send.id.in_(list(ids)))).all())
    problems = {
        send_id: "does not exist" if send_id not in found else f"is {found[send_id]}, not unknown"
        for send_id in ids
        if found.get(send_id) is not SendStatus.UNKNOWN
    }
    if problems:
        raise NotUnknown(problems)
