"""Provider events: what SendGrid and Twilio tell nurture about its sends, once each.

Each event is recorded in ``send_events`` under the provider's own id for it, so that a webhook the
provider repeats writes nothing twice and acts once. What an event does besides being recorded:

- a final delivery answer (delivered, bounced, dropped; Twilio's delivered, undelivered, failed) is kept on
  the send as ``delivery``; the send's ``status`` stays what the channel answered when it was sent;
- a bounce or a spam report puts the address in ``email_suppressions`` and revokes the email consent of
  every contact with that address; an unsubscribe revokes it too, so the next calendar run sends nothing
  there;
- an event about a send this database does not know is recorded without one and counted;
- an SMS a contact sends is kept once (by Twilio's MessageSid): an opt-out word revokes SMS consent of every
  contact with that number, an opt-in word restores it, anything else is a reply to their last SMS.

The functions take a ``Session`` and write nothing when they raise.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, or_, select, update
from sqlalchemy.orm import Session

from nurture import consent, db
from nurture.channels.sendgrid import SEND_ID_ARG
from nurture.models import (
    IS_SMS,
    Channel,
    Consent,
    Contact,
    Delivery,
    InboundKind,
    InboundMessage,
    Provider,
    Send,
    SendEvent,
    SendStatus,
)

SENDGRID_EVENTS = frozenset(
    {
        "processed",
        "delivered",
        "open",
        "click",
        "bounce",
        "dropped",
        "deferred",
        "spamreport",
        "unsubscribe",
        "group_unsubscribe",
    }
)
_SENDGRID_DELIVERY = {
    "delivered": Delivery.DELIVERED,
    "bounce": Delivery.BOUNCED,
    "dropped": Delivery.DROPPED,
}
_SUPPRESSING = frozenset({"bounce", "spamreport"})
_UNSUBSCRIBING = frozenset({"bounce", "spamreport", "unsubscribe", "group_unsubscribe"})


# Twilio's own keywords (Advanced Opt-Out's defaults): the whole message, any case, spaces around.
OPT_OUT_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"})
OPT_IN_WORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_WORDS = frozenset({"HELP", "INFO"})
_TWILIO_DELIVERY = {
    "delivered": Delivery.DELIVERED,
    "undelivered": Delivery.UNDELIVERED,
    "failed": Delivery.FAILED,
}
OPTED_OUT_ERROR = "21610"  # Twilio: the recipient replied STOP; no message reaches them


class MalformedEvents(ValueError):
    """Raised when a webhook body is not what the provider sends; names the event and field."""


@dataclass(frozen=True, slots=True)
class EmailEvent:
    """One SendGrid event, read from the webhook's JSON."""

    dedupe_key: str
    event: str
    email: str | None
    send_id: int | None  # as the event carries it: may name no send this database has
    occurred_at: dt.datetime
    reason: str | None
    bounce_type: str | None  # "bounce" (permanent) or "blocked" (the receiving server refused for now)
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Recorded:
    """What a webhook request did: events new to nurture, repeats, and the rest."""

    received: int
    recorded: int
    repeated: int
    unknown_sends: int  # recorded without a send: nurture does not know the message
    ignored: int  # event types nurture does not keep

    def as_dict(self) -> dict[str, int]:
        """Give the counts as a JSON-ready dict."""
        return {
            "received": self.received,
            "recorded": self.recorded,
            "repeated": self.repeated,
            "unknown_sends": self.unknown_sends,
            "ignored": self.ignored,
        }


def parse_sendgrid(body: str) -> list[EmailEvent]:
    """Read the Event Webhook's body (a JSON array of events); raise ``MalformedEvents`` naming the field."""
    try:
        raw = json.loads(body)
    except ValueError as exc:
        raise MalformedEvents(f"body is not JSON: {exc}") from None
    if not isinstance(raw, list):
        raise MalformedEvents("body is not a JSON array of events")
    events = []
    for index, item in enumerate(raw):
        where = f"event {index}"
        if not isinstance(item, dict):
            raise MalformedEvents(f"{where}: not a JSON object")
        name = item.get("event")
        if not isinstance(name, str) or not name:
            raise MalformedEvents(f"{where}: event: missing")
        timestamp = item.get("timestamp")
        if not isinstance(timestamp, int | float) or isinstance(timestamp, bool):
            raise MalformedEvents(f"{where}: timestamp: not a Unix time")
        try:
            occurred_at = dt.datetime.fromtimestamp(timestamp, dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise MalformedEvents(f"{where}: timestamp: out of range") from None
        email = item.get("email")
        if email is not None and not isinstance(email, str):
            raise MalformedEvents(f"{where}: email: not a string")
        event_id = item.get("sg_event_id")
        if event_id is not None and not isinstance(event_id, str):
            raise MalformedEvents(f"{where}: sg_event_id: not a string")
        # Without SendGrid's id, the event's own content identifies it: a repeat has the same bytes.
        key = event_id or hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest()
        events.append(
            EmailEvent(
                dedupe_key=f"sendgrid:{key}",
                event=name,
                email=email,
                send_id=_send_id(item.get(SEND_ID_ARG)),
                occurred_at=occurred_at,
                reason=_text(item.get("reason")) or _text(item.get("response")),
                bounce_type=_text(item.get("type")),
                payload=item,
            )
        )
    return events


def _send_id(value: Any) -> int | None:
    """Read a send id from custom_args, where SendGrid keeps every value a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def record_email_events(session: Session, events: Sequence[EmailEvent], *, at: dt.datetime) -> Recorded:
    """Record SendGrid's events once each and act on the new ones (delivery, suppression, consent)."""
    kept: dict[str, EmailEvent] = {}
    for event in events:
        if event.event in SENDGRID_EVENTS:
            kept.setdefault(event.dedupe_key, event)
    ignored = len(events) - sum(1 for e in events if e.event in SENDGRID_EVENTS)
    known = _known_sends(session, {e.send_id for e in kept.values() if e.send_id is not None})
    new_keys = _insert_events(
        session,
        [
            {
                "send_id": event.send_id if event.send_id in known else None,
                "provider": Provider.SENDGRID,
                "event": event.event[:32],
                "dedupe_key": event.dedupe_key,
                "occurred_at": event.occurred_at,
                "received_at": at,
                "payload": event.payload,
            }
            for event in kept.values()
        ],
    )
    new = [kept[key] for key in kept if key in new_keys]
    _record_delivery(
        session,
        [
            (e.send_id, _SENDGRID_DELIVERY[e.event], e.reason, e.occurred_at)
            for e in new
            if e.send_id in known and e.event in _SENDGRID_DELIVERY
        ],
    )
    suppressed = {
        e.email.lower(): e.event
        for e in new
        if e.email and e.event in _SUPPRESSING and (e.event != "bounce" or e.bounce_type != "blocked")
    }
    consent.suppress(session, suppressed, at=at)
    by_source: dict[str, set[int]] = defaultdict(set)
    addresses: dict[str, set[str]] = defaultdict(set)
    for e in new:
        if e.event not in _UNSUBSCRIBING or (e.event == "bounce" and e.bounce_type == "blocked"):
            continue
        if e.send_id in known:
            by_source[e.event].add(known[e.send_id])
        if e.email:
            addresses[e.event].add(e.email)
    for name, found in addresses.items():
        by_source[name] |= contacts_with_email(session, found)
    for name, contact_ids in sorted(by_source.items()):
        consent.revoke(session, [(c, Channel.EMAIL) for c in contact_ids], at=at, source=f"sendgrid {name}")
    return Recorded(
        received=len(events),
        recorded=len(new),
        repeated=len(kept) - len(new),
        unknown_sends=sum(1 for e in new if e.send_id not in known),
        ignored=ignored,
    )


def contacts_with_email(session: Session, addresses: Iterable[str]) -> set[int]:
    """Give the contacts whose email is one of ``addresses``, as written or lowercased."""
    variants = sorted({v for address in addresses for v in (address, address.lower())})
    if not variants:
        return set()
    return set(session.scalars(select(Contact.id).where(Contact.email.in_(variants))))


def _known_sends(session: Session, ids: set[int]) -> dict[int, int]:
    """Give, for those of ``ids`` that are sends, their contact."""
    if not ids:
        return {}
    rows = session.execute(select(Send.id, Send.contact_id).where(Send.id.in_(sorted(ids))))
    return {send_id: contact_id for send_id, contact_id in rows}


def _insert_events(session: Session, rows: list[dict[str, Any]]) -> set[str]:
    """Insert the events not recorded yet; give their dedupe keys."""
    if not rows:
        return set()
    statement = db.insert_new(session, SendEvent, unique=("dedupe_key",)).returning(SendEvent.dedupe_key)
    return set(session.scalars(statement, rows))


def _record_delivery(
    session: Session, answers: Iterable[tuple[int | None, Delivery, str | None, dt.datetime]]
) -> None:
    """Keep each send's latest final delivery answer; an older one arriving late changes nothing."""
    latest: dict[int, tuple[Delivery, str | None, dt.datetime]] = {}
    for send_id, delivery, error, occurred_at in answers:
        if send_id is None:
            continue
        if send_id not in latest or latest[send_id][2] <= occurred_at:
            latest[send_id] = (delivery, error, occurred_at)
    if not latest:
        return
    table = cast(Table, Send.__table__)
    session.execute(
        update(table)
        .where(
            table.c.id == bindparam("send"),
            or_(table.c.delivery_at.is_(None), table.c.delivery_at <= bindparam("occurred")),
        )
        .values(
            delivery=bindparam("answer"), delivery_error=bindparam("why"), delivery_at=bindparam("occurred")
        ),
        [
            {"send": send_id, "answer": delivery, "why": error, "occurred": occurred_at}
            for send_id, (delivery, error, occurred_at) in sorted(latest.items())
        ],
    )


def inbound_kind(body: str) -> InboundKind:
    """Tell what an inbound SMS asks for: the whole message is one keyword, or it is a reply."""
    word = body.strip().upper()
    if word in OPT_OUT_WORDS:
        return InboundKind.OPT_OUT
    if word in OPT_IN_WORDS:
        return InboundKind.OPT_IN
    if word in HELP_WORDS:
        return InboundKind.HELP
    return InboundKind.REPLY


def record_sms_status(
    session: Session,
    *,
    message_sid: str,
    status: str,
    error_code: str | None,
    payload: dict[str, Any],
    at: dt.datetime,
) -> Recorded:
    """Record a Twilio status callback once (by MessageSid and status); keep a final answer on the send."""
    found = session.execute(
        select(Send.id, Send.contact_id).where(Send.provider_message_id == message_sid, IS_SMS)
    ).first()
    send_id, contact_id = (found.id, found.contact_id) if found is not None else (None, None)
    new = _insert_events(
        session,
        [
            {
                "send_id": send_id,
                "provider": Provider.TWILIO,
                "event": status[:32],
                "dedupe_key": f"twilio:{message_sid}:{status}"[:255],
                "occurred_at": at,
                "received_at": at,
                "payload": payload,
            }
        ],
    )
    if new and send_id is not None:
        if status in _TWILIO_DELIVERY:
            _record_delivery(session, [(send_id, _TWILIO_DELIVERY[status], error_code, at)])
        if error_code == OPTED_OUT_ERROR and contact_id is not None:
            consent.revoke(session, [(contact_id, Channel.SMS)], at=at, source=f"twilio {OPTED_OUT_ERROR}")
    return Recorded(
        received=1,
        recorded=len(new),
        repeated=1 - len(new),
        unknown_sends=1 if new and send_id is None else 0,
        ignored=0,
    )


def record_inbound(
    session: Session,
    *,
    message_sid: str,
    from_number: str,
    to_number: str | None,
    body: str,
    at: dt.datetime,
) -> InboundKind:
    """Keep an inbound SMS once and do what it asks; give its kind (a repeat does nothing again)."""
    kind = inbound_kind(body)
    contact_ids = set(session.scalars(select(Contact.id).where(Contact.phone == from_number)))
    last = None
    if contact_ids:
        last = session.execute(
            select(Send.id, Send.contact_id)
            .where(
                Send.contact_id.in_(sorted(contact_ids)),
                Send.channel == Channel.SMS,
                Send.status == SendStatus.SENT,
            )
            .order_by(Send.sent_at.desc(), Send.id.desc())
            .limit(1)
        ).first()
    contact_id = last.contact_id if last is not None else min(contact_ids, default=None)
    statement = db.insert_new(session, InboundMessage, unique=("provider_sid",)).returning(InboundMessage.id)
    inserted = session.scalars(
        statement,
        [
            {
                "provider_sid": message_sid,
                "contact_id": contact_id,
                "send_id": last.id if last is not None else None,
                "from_number": from_number[:32],
                "to_number": to_number[:32] if to_number else None,
                "body": body,
                "kind": kind,
                "received_at": at,
            }
        ],
    ).all()
    if not inserted or not contact_ids:
        return kind
    if kind not in (InboundKind.OPT_OUT, InboundKind.OPT_IN):
        return kind
    # Only contacts who have an SMS consent on record: a text alone does not sign up a number that never
    # agreed, and one that never agreed is not messaged anyway.
    on_record = sorted(
        session.scalars(
            select(Consent.contact_id).where(
                Consent.contact_id.in_(sorted(contact_ids)), Consent.channel == Channel.SMS
            )
        )
    )
    pairs = [(c, Channel.SMS) for c in on_record]
    source = f"sms {body.strip().upper()}"
    if kind is InboundKind.OPT_OUT:
        consent.revoke(session, pairs, at=at, source=source)
    else:
        consent.grant(session, pairs, at=at, source=source)
    return kind
