"""Profiles: what nurture knows about each customer as of an instant, rebuilt set-based from the history.

A refresh is a handful of SQL statements over all contacts: loyalty entries are accrued from visits with
one ``INSERT ... SELECT``, then ``contact_profiles`` is replaced by one ``INSERT ... SELECT`` whose CTEs
aggregate visits, feedback and the loyalty ledger per contact. Nothing up to ``at`` is skipped and nothing
after it is seen, so refreshing at an earlier instant replays history. See README, "What nurture knows
about each customer", for the rules.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Numeric,
    Select,
    String,
    and_,
    case,
    cast,
    delete,
    distinct,
    false,
    func,
    insert,
    literal,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from nurture import db
from nurture.errors import ContactNotFound, ProfileNotRefreshed
from nurture.models import (
    Channel,
    Consent,
    ConsentStatus,
    Contact,
    ContactProfile,
    ContactTag,
    Feedback,
    FeedbackKind,
    LoyaltyEntry,
    Satisfaction,
    Stage,
    UTCDateTime,
    ValueTier,
    Visit,
)
from nurture.settings import Settings

DAY = 86400.0
YEAR_DAYS = 365.25
# A tag's median rhythm is trusted only when this many of its customers have one; else everyone's median.
MIN_SIMILAR = 30

COLUMNS = (
    "external_id",
    "stage",
    "value_tier",
    "satisfaction",
    "complaint_open",
    "visits",
    "first_visit",
    "last_visit",
    "expected_next_visit",
    "expected_interval_days",
    "total_spend",
    "currency",
    "points",
    "stamps",
    "email_consent",
    "sms_consent",
)


@dataclass(frozen=True)
class RefreshSummary:
    """What a refresh did: how many contacts it profiled, by stage and value tier."""

    as_of: dt.datetime
    contacts: int
    stages: dict[Stage, int]
    value_tiers: dict[ValueTier, int]
    loyalty_entries_added: int


@dataclass(frozen=True)
class Profile:
    """One contact's profile as shown and exported, under the documented column names."""

    external_id: str
    stage: Stage
    value_tier: ValueTier
    satisfaction: Satisfaction
    complaint_open: bool
    visits: int
    first_visit: dt.datetime | None
    last_visit: dt.datetime | None
    expected_next_visit: dt.datetime | None
    expected_interval_days: float | None
    total_spend: Decimal
    currency: str | None
    points: int
    stamps: int
    email_consent: bool
    sms_consent: bool

    def as_record(self) -> dict[str, Any]:
        """The profile as plain JSON values: dates ISO 8601, money as a decimal string."""
        record: dict[str, Any] = {}
        for name in COLUMNS:
            value = getattr(self, name)
            if isinstance(value, StrEnum):
                value = value.value
            elif isinstance(value, dt.datetime):
                value = value.isoformat()
            elif isinstance(value, Decimal):
                value = str(value)
            elif isinstance(value, float):
                value = round(value, 2)
            record[name] = value
        return record


def refresh(session: Session, settings: Settings, at: dt.datetime) -> RefreshSummary:
    """Rebuild every contact's profile as of ``at`` and accrue loyalty entries from visits up to ``at``.

    Visits, feedback and ledger entries dated after ``at`` are ignored, so an earlier ``at`` replays
    history. Two refreshes never interleave: the second waits for the first's transaction to end.
    """
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at!r}: profiles are computed as of a timezone-aware instant")
    db.exclusive(session, "nurture.profiles.refresh")
    added = accrue_loyalty(session, settings, at)
    session.execute(delete(ContactProfile))
    query = _profiles_query(settings, at)
    session.execute(
        insert(ContactProfile).from_select([column.name for column in query.selected_columns], query)
    )
    stages = {Stage(stage): count for stage, count in _counts(session, ContactProfile.stage)}
    tiers = {ValueTier(tier): count for tier, count in _counts(session, ContactProfile.value_tier)}
    return RefreshSummary(
        as_of=at,
        contacts=sum(stages.values()),
        stages={stage: stages.get(stage, 0) for stage in Stage},
        value_tiers={tier: tiers.get(tier, 0) for tier in ValueTier},
        loyalty_entries_added=added,
    )


def accrue_loyalty(session: Session, settings: Settings, at: dt.datetime) -> int:
    """Write the points and stamp earned by each visit up to ``at`` once; return how many entries are new."""
    earned = select(
        (literal("visit:") + cast(Visit.id, String)).label("key"),
        Visit.contact_id,
        Visit.occurred_at,
        db.floor_integer(Visit.amount * settings.points_per_unit).label("points"),
        literal(1).label("stamps"),
        literal("visit").label("reason"),
    ).where(Visit.occurred_at <= at)
    columns = ["key", "contact_id", "occurred_at", "points", "stamps", "reason"]
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(LoyaltyEntry)
        .from_select(columns, earned)
        .on_conflict_do_nothing(index_elements=[LoyaltyEntry.key])
        # SQLAlchemy keeps an INSERT's row count only when asked.
        .execution_options(preserve_rowcount=True)
    )
    result = session.execute(statement)
    return int(getattr(result, "rowcount", 0))


def _counts(session: Session, column: Any) -> list[tuple[str, int]]:
    rows = session.execute(select(column, func.count()).group_by(column)).all()
    return [(str(value), int(count)) for value, count in rows]


def _median(values: Any, group: ColumnElement[Any] | None, name: str) -> Any:
    """Per-``group`` medians of ``values.c.own`` (portable: no percentile function in SQLite)."""
    partition = [group] if group is not None else []
    ranked = (
        select(
            *partition,
            values.c.own,
            func.row_number().over(partition_by=partition or None, order_by=values.c.own).label("rn"),
            func.count().over(partition_by=partition or None).label("cnt"),
        )
        .where(values.c.own.is_not(None))
        .cte(f"{name}_ranked")
    )
    middle = ranked.c.rn.in_([(ranked.c.cnt + 1) // 2, (ranked.c.cnt + 2) // 2])
    keys = [ranked.c.grp] if group is not None else []
    return (
        select(*keys, func.avg(ranked.c.own).label("median"), func.max(ranked.c.cnt).label("cnt"))
        .where(middle)
        .group_by(*keys)
        .cte(name)
    )


def _profiles_query(settings: Settings, at: dt.datetime) -> Select[Any]:
    """One SELECT that yields a ``contact_profiles`` row per contact as of ``at``."""
    at_epoch = at.timestamp()
    day = db.utc_day(Visit.occurred_at)
    stats = (
        select(
            Visit.contact_id,
            func.count().label("visits"),
            func.count(distinct(day)).label("days"),
            func.min(Visit.occurred_at).label("first_visit"),
            func.max(Visit.occurred_at).label("last_visit"),
            db.epoch_seconds(func.min(Visit.occurred_at)).label("first_epoch"),
            db.epoch_seconds(func.max(Visit.occurred_at)).label("last_epoch"),
            func.sum(Visit.amount).label("spend"),
            func.max(Visit.currency).label("currency"),
        )
        .where(Visit.occurred_at <= at)
        .group_by(Visit.contact_id)
        .cte("visit_stats")
    )
    # "Similar" customers share a primary interest tag: tags are unordered, so the first alphabetically.
    tags = (
        select(ContactTag.contact_id, func.min(ContactTag.tag).label("tag"))
        .group_by(ContactTag.contact_id)
        .cte("primary_tags")
    )
    # Visits on the same UTC day count as one for the rhythm: the mean gap between n+1 visit days is
    # the span from the first to the last visit divided by n, so no window over visits is needed.
    rhythms = (
        select(
            stats.c.contact_id,
            func.coalesce(tags.c.tag, "").label("grp"),
            (stats.c.days - 1).label("n"),
            case(
                (stats.c.days > 1, (stats.c.last_epoch - stats.c.first_epoch) / DAY / (stats.c.days - 1)),
                else_=None,
            ).label("own"),
        )
        .select_from(stats)
        .outerjoin(tags, tags.c.contact_id == stats.c.contact_id)
        .cte("rhythms")
    )
    by_tag = _median(rhythms, rhythms.c.grp, "tag_medians")
    overall = _median(rhythms, None, "overall_median")
    prior = func.coalesce(
        by_tag.c.median,
        select(overall.c.median).scalar_subquery(),
        settings.default_interval_days,
    )
    weight = settings.prior_weight
    expected = case(
        (rhythms.c.n == 0, prior),
        else_=(rhythms.c.n * rhythms.c.own + weight * prior) / (rhythms.c.n + weight),
    )
    rhythm = (
        select(rhythms.c.contact_id, expected.label("expected"))
        .select_from(rhythms)
        .outerjoin(by_tag, and_(by_tag.c.grp == rhythms.c.grp, by_tag.c.cnt >= MIN_SIMILAR))
        .cte("expected_rhythms")
    )
    elapsed = (at_epoch - stats.c.last_epoch) / DAY
    # The visit rate ahead slows once a customer is overdue: one visit per expected interval or per the
    # time already waited, whichever is longer; and never more than one visit day a day.
    wait = case((elapsed > rhythm.c.expected, elapsed), else_=rhythm.c.expected)
    rate = YEAR_DAYS / case((wait > 1.0, wait), else_=1.0)
    value = (
        select(
            stats.c.contact_id,
            rhythm.c.expected,
            elapsed.label("elapsed"),
            func.round(cast(stats.c.spend / stats.c.days * rate, Numeric), 2).label("expected_value"),
        )
        .select_from(stats)
        .join(rhythm, rhythm.c.contact_id == stats.c.contact_id)
        .cte("values")
    )
    ranked = (
        select(
            value,
            func.row_number()
            .over(order_by=[value.c.expected_value.desc(), stats.c.spend.desc(), value.c.contact_id])
            .label("position"),
            func.count().over().label("ranked"),
        )
        .select_from(value)
        .join(stats, stats.c.contact_id == value.c.contact_id)
        .cte("ranked_values")
    )

    latest = (
        select(
            Feedback.contact_id,
            Feedback.kind,
            Feedback.score,
            func.row_number()
            .over(
                partition_by=Feedback.contact_id,
                order_by=[Feedback.occurred_at.desc(), Feedback.id.desc()],
            )
            .label("rn"),
        )
        .where(
            Feedback.kind.in_([FeedbackKind.NPS, FeedbackKind.CSAT]),
            Feedback.score.is_not(None),
            Feedback.occurred_at <= at,
        )
        .cte("latest_scores")
    )
    complaints = (
        select(Feedback.contact_id)
        .where(
            Feedback.kind == FeedbackKind.COMPLAINT,
            Feedback.occurred_at <= at,
            or_(Feedback.resolved_at.is_(None), Feedback.resolved_at > at),
        )
        .group_by(Feedback.contact_id)
        .cte("open_complaints")
    )
    balances = (
        select(
            LoyaltyEntry.contact_id,
            func.sum(LoyaltyEntry.points).label("points"),
            func.sum(LoyaltyEntry.stamps).label("stamps"),
        )
        .where(LoyaltyEntry.occurred_at <= at)
        .group_by(LoyaltyEntry.contact_id)
        .cte("balances")
    )

    expected_days = ranked.c.expected
    overdue = ranked.c.elapsed
    stage = case(
        (stats.c.contact_id.is_(None), Stage.PROSPECT.value),
        (overdue > settings.lost_after * expected_days, Stage.LOST.value),
        (overdue > settings.lapsed_after * expected_days, Stage.LAPSED.value),
        (overdue > settings.at_risk_after * expected_days, Stage.AT_RISK.value),
        (stats.c.days == 1, Stage.NEW.value),
        (stats.c.days < settings.loyal_min_visits, Stage.RETURNING.value),
        else_=Stage.LOYAL.value,
    )
    place = ranked.c.position - 1
    tier = case(
        (stats.c.contact_id.is_(None), ValueTier.NONE.value),
        (place < settings.high_value_share * ranked.c.ranked, ValueTier.HIGH.value),
        (
            place < (settings.high_value_share + settings.medium_value_share) * ranked.c.ranked,
            ValueTier.MEDIUM.value,
        ),
        else_=ValueTier.LOW.value,
    )
    score = latest.c.score
    is_nps = latest.c.kind == FeedbackKind.NPS.value
    satisfaction = case(
        (and_(is_nps, score >= 9), Satisfaction.PROMOTER.value),
        (and_(is_nps, score >= 7), Satisfaction.PASSIVE.value),
        (is_nps, Satisfaction.DETRACTOR.value),
        (score >= 5, Satisfaction.PROMOTER.value),
        (score == 4, Satisfaction.PASSIVE.value),
        (score.is_not(None), Satisfaction.DETRACTOR.value),
        else_=Satisfaction.UNKNOWN.value,
    )
    card = settings.punch_card_size
    stamps = func.coalesce(balances.c.stamps, 0)
    own = case((stats.c.days > 1, (stats.c.last_epoch - stats.c.first_epoch) / DAY / (stats.c.days - 1)))
    return (
        select(
            Contact.id.label("contact_id"),
            literal(at, UTCDateTime()).label("as_of"),
            stage.label("stage"),
            tier.label("value_tier"),
            satisfaction.label("satisfaction"),
            cast(complaints.c.contact_id.is_not(None), Boolean).label("complaint_open"),
            func.coalesce(stats.c.visits, 0).label("visits"),
            stats.c.first_visit,
            stats.c.last_visit,
            func.coalesce(stats.c.spend, 0).label("total_spend"),
            stats.c.currency,
            own.label("own_interval_days"),
            expected_days.label("expected_interval_days"),
            db.instant_from_epoch(stats.c.last_epoch + expected_days * DAY).label("expected_next_visit"),
            func.coalesce(ranked.c.expected_value, 0).label("expected_value"),
            func.coalesce(balances.c.points, 0).label("points"),
            (((stamps % card) + card) % card).label("stamps"),
        )
        .select_from(Contact)
        .outerjoin(stats, stats.c.contact_id == Contact.id)
        .outerjoin(ranked, ranked.c.contact_id == Contact.id)
        .outerjoin(latest, and_(latest.c.contact_id == Contact.id, latest.c.rn == 1))
        .outerjoin(complaints, complaints.c.contact_id == Contact.id)
        .outerjoin(balances, balances.c.contact_id == Contact.id)
    )


def _profile_rows() -> Select[*tuple[Any, ...]]:
    email = aliased(Consent)
    sms = aliased(Consent)

    def granted(consent: Any) -> Any:
        return func.coalesce(cast(consent.status == ConsentStatus.GRANTED.value, Boolean), false())

    return (
        select(
            Contact.external_id,
            ContactProfile.stage,
            ContactProfile.value_tier,
            ContactProfile.satisfaction,
            ContactProfile.complaint_open,
            ContactProfile.visits,
            ContactProfile.first_visit,
            ContactProfile.last_visit,
            ContactProfile.expected_next_visit,
            ContactProfile.expected_interval_days,
            ContactProfile.total_spend,
            ContactProfile.currency,
            ContactProfile.points,
            ContactProfile.stamps,
            granted(email).label("email_consent"),
            granted(sms).label("sms_consent"),
        )
        .join(ContactProfile, ContactProfile.contact_id == Contact.id)
        .outerjoin(email, and_(email.contact_id == Contact.id, email.channel == Channel.EMAIL))
        .outerjoin(sms, and_(sms.contact_id == Contact.id, sms.channel == Channel.SMS))
    )


def _profile(row: Any) -> Profile:
    return Profile(**{name: getattr(row, name) for name in COLUMNS})


def profile(session: Session, external_id: str) -> Profile:
    """The profile of the contact with ``external_id``, as of the last refresh."""
    row = session.execute(_profile_rows().where(Contact.external_id == external_id)).one_or_none()
    if row is not None:
        return _profile(row)
    if session.scalar(select(Contact.id).where(Contact.external_id == external_id)) is None:
        raise ContactNotFound(external_id=external_id)
    raise ProfileNotRefreshed(external_id=external_id)


def profiles(session: Session, *, batch_size: int = 5000) -> Iterator[Profile]:
    """Every profile, by external id, streamed in batches."""
    statement = _profile_rows().order_by(Contact.external_id).execution_options(yield_per=batch_size)
    for row in session.execute(statement):
        yield _profile(row)


def unprofiled_contacts(session: Session) -> int:
    """How many contacts have no profile yet (imported since the last refresh)."""
    missing = (
        select(func.count())
        .select_from(Contact)
        .outerjoin(ContactProfile, ContactProfile.contact_id == Contact.id)
        .where(ContactProfile.contact_id.is_(None))
    )
    return int(session.scalar(missing) or 0)


def last_refreshed(session: Session) -> dt.datetime | None:
    """The instant the profiles were last computed as of, if ever."""
    return session.scalar(select(func.max(ContactProfile.as_of)))
