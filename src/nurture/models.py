"""The schema: every table nurture keeps, as typed SQLAlchemy 2 models.

Timestamps are timezone-aware UTC in Python and UTC in storage. Statuses are closed sets (``StrEnum``)
mirrored in the schema as CHECK constraints. Changes to this module go with an Alembic migration in
``nurture/migrations/versions``.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Date,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    literal_column,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware instant, stored as UTC; naive datetimes are refused rather than guessed."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: nurture stores timezone-aware instants only")
        value = value.astimezone(dt.UTC)
        # SQLite has no timezone type: store naive UTC so that text comparison orders instants.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _enum(enum: type[StrEnum], name: str) -> Enum:
    return Enum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"


class ConsentStatus(StrEnum):
    GRANTED = "granted"
    REVOKED = "revoked"


class FeedbackKind(StrEnum):
    NPS = "nps"
    CSAT = "csat"
    COMPLAINT = "complaint"
    CANCEL_REQUEST = "cancel_request"


class Stage(StrEnum):
    PROSPECT = "prospect"
    NEW = "new"
    RETURNING = "returning"
    LOYAL = "loyal"
    AT_RISK = "at_risk"
    LAPSED = "lapsed"
    LOST = "lost"


class ValueTier(StrEnum):
    NONE = "none"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class Satisfaction(StrEnum):
    PROMOTER = "promoter"
    PASSIVE = "passive"
    DETRACTOR = "detractor"
    UNKNOWN = "unknown"


class SendStatus(StrEnum):
    CLAIMED = "claimed"  # the key is taken; the channel may or may not have been called yet
    SENT = "sent"
    FAILED = "failed"
    HELD_OUT = "held_out"  # in the holdout: recorded, never sent
    UNKNOWN = "unknown"  # the provider may have it; never resent without a person's say


class SendCategory(StrEnum):
    MARKETING = "marketing"
    SERVICE = "service"


class Delivery(StrEnum):
    """What the provider last said about a sent message reaching the recipient (a final answer only)."""

    DELIVERED = "delivered"
    BOUNCED = "bounced"  # SendGrid: the receiving server refused it
    DROPPED = "dropped"  # SendGrid: never sent (a suppressed or invalid address)
    UNDELIVERED = "undelivered"  # Twilio: the carrier could not deliver it
    FAILED = "failed"  # Twilio: it never left Twilio


class Provider(StrEnum):
    SENDGRID = "sendgrid"
    TWILIO = "twilio"


class InboundKind(StrEnum):
    OPT_OUT = "opt_out"  # STOP and Twilio's other opt-out words
    OPT_IN = "opt_in"  # START, YES, UNSTOP
    HELP = "help"  # HELP, INFO
    REPLY = "reply"  # anything else


naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=naming_convention)
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Contact(Base):
    __tablename__ = "contacts"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(255), unique=True)
    first_name: Mapped[str | None] = mapped_column(String(255))
    last_name: Mapped[str | None] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(320), index=True)
    phone: Mapped[str | None] = mapped_column(String(20), index=True)  # E.164
    country: Mapped[str | None] = mapped_column(String(2))  # ISO 3166-1 alpha-2
    locale: Mapped[str] = mapped_column(String(16))  # e.g. "es", "pt_BR"
    timezone: Mapped[str] = mapped_column(String(64))  # IANA
    birthday: Mapped[dt.date | None] = mapped_column(Date)
    referral_code: Mapped[str] = mapped_column(String(16), unique=True)
    referred_by: Mapped[str | None] = mapped_column(String(255))  # as imported: an external id or a code
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)  # unknown import columns, kept
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]


class ContactTag(Base):
    """An interest tag of a contact; one row per (contact, tag) so that segments select by tag in SQL."""

    __tablename__ = "contact_tags"

    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class Visit(Base):
    """A purchase or an appointment: the conversion every touch is measured by."""

    __tablename__ = "visits"
    # Covering what a refresh sums per contact, so that it reads the index alone.
    __table_args__ = (Index("ix_visits_contact_occurred", "contact_id", "occurred_at", "amount", "currency"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(255), unique=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    occurred_at: Mapped[dt.datetime] = mapped_column(index=True)
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    currency: Mapped[str] = mapped_column(String(3))
    created_at: Mapped[dt.datetime]


class Feedback(Base):
    """An NPS or CSAT score, a complaint or a cancellation request; a complaint stays open until resolved."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("contact_id", "kind", "occurred_at", name="uq_feedback_contact_kind_occurred"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), index=True)
    occurred_at: Mapped[dt.datetime]
    kind: Mapped[FeedbackKind] = mapped_column(_enum(FeedbackKind, "feedback_kind"))
    score: Mapped[int | None] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    resolved_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]


class Consent(Base):
    """The current consent of a contact on a channel; no row means not given."""

    __tablename__ = "consents"

    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)
    channel: Mapped[Channel] = mapped_column(_enum(Channel, "channel"), primary_key=True)
    status: Mapped[ConsentStatus] = mapped_column(_enum(ConsentStatus, "consent_status"))
    changed_at: Mapped[dt.datetime]
    source: Mapped[str] = mapped_column(String(255))


class ConsentEvent(Base):
    """One change of consent, kept forever: when, to what, and where it came from."""

    __tablename__ = "consent_events"
    __table_args__ = (Index("ix_consent_events_contact_channel", "contact_id", "channel", "occurred_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    channel: Mapped[Channel] = mapped_column(_enum(Channel, "channel"))
    status: Mapped[ConsentStatus] = mapped_column(_enum(ConsentStatus, "consent_status"))
    occurred_at: Mapped[dt.datetime]
    source: Mapped[str] = mapped_column(String(255))


class LoyaltyEntry(Base):
    """Points and punch-card stamps earned (positive) or redeemed (negative), each once by ``key``."""

    __tablename__ = "loyalty_entries"
    __table_args__ = (
        # Covering a contact's balance, so that a refresh reads the index alone.
        Index("ix_loyalty_entries_contact_occurred", "contact_id", "occurred_at", "points", "stamps"),
        Index("ix_loyalty_entries_occurred_at", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)  # e.g. "visit:<visit id>"
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    occurred_at: Mapped[dt.datetime]
    points: Mapped[int] = mapped_column(default=0)
    stamps: Mapped[int] = mapped_column(default=0)
    reason: Mapped[str] = mapped_column(String(64))


class Referral(Base):
    """A referred contact and who referred them; one referrer per referred contact."""

    __tablename__ = "referrals"

    id: Mapped[int] = mapped_column(primary_key=True)
    referrer_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), index=True)
    referred_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), unique=True)
    created_at: Mapped[dt.datetime]


class ContactProfile(Base):
    """What nurture knows about a contact as of the last refresh (``profile_refreshes``).

    A refresh rewrites only the rows whose values changed, so that an hourly run does not rewrite every row.
    """

    __tablename__ = "contact_profiles"
    __table_args__ = (Index("ix_contact_profiles_stage", "stage"),)

    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)
    stage: Mapped[Stage] = mapped_column(_enum(Stage, "stage"))
    value_tier: Mapped[ValueTier] = mapped_column(_enum(ValueTier, "value_tier"))
    satisfaction: Mapped[Satisfaction] = mapped_column(_enum(Satisfaction, "satisfaction"))
    complaint_open: Mapped[bool]
    visits: Mapped[int]
    first_visit: Mapped[dt.datetime | None]
    last_visit: Mapped[dt.datetime | None]
    total_spend: Mapped[Decimal] = mapped_column(Numeric(14, 2))
    currency: Mapped[str | None] = mapped_column(String(3))
    own_interval_days: Mapped[float | None]  # mean gap between the contact's own visits
    expected_interval_days: Mapped[float | None]  # own rhythm shrunk toward similar customers'
    expected_next_visit: Mapped[dt.datetime | None]
    expected_value: Mapped[Decimal] = mapped_column(Numeric(14, 2))  # spend expected over the next year
    points: Mapped[int]
    stamps: Mapped[int]  # progress on the current punch card


class ProfileRefresh(Base):
    """One refresh of the profiles: the instant they were computed as of."""

    __tablename__ = "profile_refreshes"

    id: Mapped[int] = mapped_column(primary_key=True)
    as_of: Mapped[dt.datetime]
    refreshed_at: Mapped[dt.datetime]
    contacts_summed_up: Mapped[int]  # how many contacts' history was summed up again


class ContactFacts(Base):
    """A contact's history summed up as of the last refresh: what a profile is computed from.

    Kept between refreshes, so that a refresh only sums up again the contacts whose history changed
    (``profile_changes``) or whose dated rows came into view since the last refresh.
    """

    __tablename__ = "contact_facts"
    __table_args__ = (
        # Medians of the rhythms, by primary tag and overall, read from these indexes.
        Index("ix_contact_facts_tag_interval", "primary_tag", "own_interval_days"),
        Index("ix_contact_facts_interval", "own_interval_days"),
    )

    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)
    visits: Mapped[int]
    visit_days: Mapped[int]  # distinct UTC days with a visit: same-day visits count once for the rhythm
    first_visit: Mapped[dt.datetime | None]
    last_visit: Mapped[dt.datetime | None]
    first_epoch: Mapped[float | None]
    last_epoch: Mapped[float | None]
    own_interval_days: Mapped[float | None]  # mean gap between visit days; none before a second one
    total_spend: Mapped[Decimal | None] = mapped_column(Numeric(14, 2))
    currency: Mapped[str | None] = mapped_column(String(3))
    primary_tag: Mapped[str] = mapped_column(String(64))  # the first interest tag alphabetically, or ""
    score_kind: Mapped[str | None] = mapped_column(String(32))  # of the latest NPS or CSAT score
    score: Mapped[int | None]
    complaint_open: Mapped[bool]
    points: Mapped[int]
    stamps: Mapped[int]  # every stamp ever earned less those redeemed


class ProfileChange(Base):
    """A contact whose history changed since the last refresh; written by triggers on the history tables."""

    __tablename__ = "profile_changes"

    contact_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


# The conditions of the sends' partial indexes.
_UNSETTLED_SQL = text("status IN ('claimed', 'unknown')")
_SMS_SQL = text("channel = 'sms'")


class Send(Base):
    """The ledger: one row per (contact, touch, occurrence), claimed before any channel is called.

    ``key`` is the idempotency key; its uniqueness is what makes a second send of the same message
    impossible, whatever crashes or runs concurrently.
    """

    __tablename__ = "sends"
    __table_args__ = (
        # Every claim inserts into each index and every record updates most of them: at two million sends
        # that upkeep, not the row, is what a message costs the ledger. So the sends have three.
        # By contact, covering what the calendar asks of a range's ledger per touch (the last education
        # item, win-back steps since the last visit, cooldowns) and what attribution reads of the sends of
        # a period in the order of the visits' index; also what webhooks and caps ask of one contact.
        Index(
            "ix_sends_by_contact",
            "contact_id",
            "touch",
            "claimed_at",
            "due_at",
            "status",
            "campaign",
            "channel",
            "sent_at",
            "incentive",
        ),
        # The few sends not settled yet: stale claims, unknown outcomes (a query names them by ``UNSETTLED``).
        Index(
            "ix_sends_unsettled",
            "status",
            "claimed_at",
            sqlite_where=_UNSETTLED_SQL,
            postgresql_where=_UNSETTLED_SQL,
        ),
        # Twilio's status callbacks name the message by its SID (``IS_SMS``); nothing looks an email up so.
        Index(
            "ix_sends_provider_message_id",
            "provider_message_id",
            sqlite_where=_SMS_SQL,
            postgresql_where=_SMS_SQL,
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    touch: Mapped[str] = mapped_column(String(64))
    occurrence: Mapped[str] = mapped_column(String(128))
    campaign: Mapped[str | None] = mapped_column(String(128))
    category: Mapped[SendCategory] = mapped_column(_enum(SendCategory, "send_category"))
    status: Mapped[SendStatus] = mapped_column(_enum(SendStatus, "send_status"))
    channel: Mapped[Channel | None] = mapped_column(_enum(Channel, "channel"))
    locale: Mapped[str | None] = mapped_column(String(16))
    template: Mapped[str | None] = mapped_column(String(255))
    subject: Mapped[str | None] = mapped_column(Text)
    segments: Mapped[int | None]
    incentive: Mapped[Decimal | None] = mapped_column(Numeric(12, 2))
    due_at: Mapped[dt.datetime]
    claimed_at: Mapped[dt.datetime]
    sent_at: Mapped[dt.datetime | None]
    provider_message_id: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(Text)
    run_id: Mapped[str | None] = mapped_column(String(64))
    # What the provider's webhooks last said; ``status`` stays what the channel answered.
    delivery: Mapped[Delivery | None] = mapped_column(_enum(Delivery, "delivery"))
    delivery_error: Mapped[str | None] = mapped_column(Text)
    delivery_at: Mapped[dt.datetime | None]


# What a query repeats of a partial index's condition to use it: as SQL literals, not parameters, which
# neither SQLite nor PostgreSQL's generic plans can tell the index holds.
UNSETTLED = Send.status.in_([literal_column("'claimed'"), literal_column("'unknown'")])
IS_SMS = Send.channel == literal_column("'sms'")


class SendEvent(Base):
    """One event a provider reported about a send (delivered, opened, bounced...), recorded once.

    ``dedupe_key`` is the provider's own id for the event, so that a repeated webhook writes nothing.
    ``send_id`` is empty for events about messages this database does not know; they are kept and counted.
    """

    __tablename__ = "send_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    send_id: Mapped[int | None] = mapped_column(ForeignKey("sends.id", ondelete="SET NULL"), index=True)
    provider: Mapped[Provider] = mapped_column(_enum(Provider, "provider"))
    event: Mapped[str] = mapped_column(String(32))  # the provider's own name: "open", "undelivered"...
    dedupe_key: Mapped[str] = mapped_column(String(255), unique=True)
    occurred_at: Mapped[dt.datetime]
    received_at: Mapped[dt.datetime]
    payload: Mapped[dict[str, Any]]


class EmailSuppression(Base):
    """An address nothing is emailed to again: it bounced or its owner reported spam."""

    __tablename__ = "email_suppressions"

    id: Mapped[int] = mapped_column(primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)  # lowercased
    reason: Mapped[str] = mapped_column(String(32))  # the provider's event: "bounce", "spamreport"
    suppressed_at: Mapped[dt.datetime]


class InboundMessage(Base):
    """An SMS a contact sent us: an opt-out or opt-in word, a request for help, or a reply to a send."""

    __tablename__ = "inbound_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    provider_sid: Mapped[str] = mapped_column(String(64), unique=True)
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contacts.id", ondelete="SET NULL"), index=True)
    send_id: Mapped[int | None] = mapped_column(ForeignKey("sends.id", ondelete="SET NULL"), index=True)
    from_number: Mapped[str] = mapped_column(String(32))
    to_number: Mapped[str | None] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    kind: Mapped[InboundKind] = mapped_column(_enum(InboundKind, "inbound_kind"))
    received_at: Mapped[dt.datetime]


class TopicUnsubscribe(Base):
    """A contact who asked for no more messages of one touch (its topic), on any channel."""

    __tablename__ = "topic_unsubscribes"

    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)
    topic: Mapped[str] = mapped_column(String(64), primary_key=True)  # a touch name
    unsubscribed_at: Mapped[dt.datetime]
    source: Mapped[str] = mapped_column(String(255))


class AdhocCampaign(Base):
    """An ad-hoc campaign ops started: its options, fixed when it started, so that every run of it agrees.

    Its sends are ledger rows with ``sends.campaign`` set to ``name`` and the occurrence ``campaign:<name>``,
    so that each contact gets it once, however often the campaign is run, resumed or triggered.
    """

    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    touch: Mapped[str] = mapped_column(String(64))
    segment: Mapped[str] = mapped_column(String(64))
    channel: Mapped[Channel | None] = mapped_column(_enum(Channel, "channel"))
    holdout: Mapped[float | None]  # share held out; None: the touch's own
    loyalty_first_hours: Mapped[int | None]  # loyal customers first, everyone else this many hours later
    contact_limit: Mapped[int | None]  # --limit as asked
    last_contact_id: Mapped[int | None]  # the limit as fixed at the start: contacts up to this id
    starts_at: Mapped[dt.datetime]
    created_at: Mapped[dt.datetime]
    approved_at: Mapped[dt.datetime | None]  # when a person approved it, if it needed approval
