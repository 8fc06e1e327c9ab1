"""Profiles: what nurture knows about each customer as of an instant, rebuilt set-based from the history.

A refresh is a handful of SQL statements over all contacts. Triggers on the history tables note in
``profile_changes`` every contact whose contacts, tags, visits or feedback rows were written; a refresh
takes those, adds the contacts with rows dated since the last refresh, accrues loyalty entries from their
visits and sums their history up again into ``contact_facts`` (one ``INSERT ... SELECT`` restricted to
them). Every profile is then recomputed from the facts with one more ``INSERT ... SELECT``, an upsert
that writes only the rows whose values changed: stages and value tiers move with time and with the
population. The medians the rhythms are shrunk toward are read from the facts' indexes, and the value
tiers' bounds found with one sort; each refresh is recorded in ``profile_refreshes``. ``sum_up`` and
``write_profiles`` are the two halves of a refresh: the contact calendar sums up once, then writes each
range's profiles in the worker that plans that range, so that the writing of one range overlaps the
planning of another. Nothing up to ``at`` is skipped and nothing after it is seen, so refreshing at an
earlier instant replays history. See README, "What nurture knows about each customer", for the rules.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import (
    Boolean,
    Column,
    ColumnElement,
    Integer,
    MetaData,
    Numeric,
    Select,
    String,
    Table,
    and_,
    case,
    cast,
    delete,
    distinct,
    exists,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
    union,
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
    ContactFacts,
    ContactProfile,
    ContactTag,
    Feedback,
    FeedbackKind,
    LoyaltyEntry,
    ProfileChange,
    ProfileRefresh,
    Satisfaction,
    Stage,
    ValueTier,
    Visit,
)
from nurture.settings import Settings


class Criteria(Protocol):
    """What a touch's audience or a segment asks of a contact's profile and tags; ``None`` asks nothing."""

    @property
    def stages(self) -> Sequence[Stage] | None: ...
    @property
    def value_tiers(self) -> Sequence[ValueTier] | None: ...
    @property
    def satisfaction(self) -> Sequence[Satisfaction] | None: ...
    @property
    def min_visits(self) -> int | None: ...
    @property
    def tags(self) -> Sequence[str] | None: ...


def matching(criteria: Criteria, contact_id: Any = ContactProfile.contact_id) -> list[ColumnElement[bool]]:
    """Give the SQL conditions over profiles for what ``criteria`` asks, each stated field one condition.

    ``tags`` asks for at least one of them on the contact whose id is ``contact_id``: a stated empty list
    matches nobody (callers for whom it means "anyone" leave it out).
    """
    profile = ContactProfile
    conditions: list[ColumnElement[bool]] = []
    if criteria.stages is not None:
        conditions.append(profile.stage.in_(criteria.stages))
    if criteria.value_tiers is not None:
        conditions.append(profile.value_tier.in_(criteria.value_tiers))
    if criteria.satisfaction is not None:
        conditions.append(profile.satisfaction.in_(criteria.satisfaction))
    if criteria.min_visits is not None:
        conditions.append(profile.visits >= criteria.min_visits)
    if criteria.tags is not None:
        tagged = exists().where(ContactTag.contact_id == contact_id, ContactTag.tag.in_(criteria.tags))
        conditions.append(tagged)
    return conditions


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


def refresh(session: Session, settings: Settings, at: dt.datetime, *, full: bool = False) -> RefreshSummary:
    """Bring every contact's profile to ``at`` and accrue loyalty entries from visits up to ``at``.

    Visits, feedback and ledger entries dated after ``at`` are ignored, so an earlier ``at`` replays
    history. Only the contacts whose history changed since the last refresh, or whose dated rows came into
    view since then, are summed up again (``contact_facts``); stages, rhythms and value tiers are then
    recomputed for everyone from those sums, because they move with time and with the population. The
    result is the same as summing everyone up again, which ``full`` (or an ``at`` before the last refresh's)
    does. Two refreshes never interleave: the second waits for the first's transaction to end.
    """
    basis = sum_up(session, settings, at, full=full)
    write_profiles(session, settings, basis)
    stages = {Stage(stage): count for stage, count in _counts(session, ContactProfile.stage)}
    tiers = {ValueTier(tier): count for tier, count in _counts(session, ContactProfile.value_tier)}
    return RefreshSummary(
        as_of=at,
        contacts=sum(stages.values()),
        stages={stage: stages.get(stage, 0) for stage in Stage},
        value_tiers={tier: tiers.get(tier, 0) for tier in ValueTier},
        loyalty_entries_added=basis.loyalty_entries_added,
    )


@dataclass(frozen=True)
class Basis:
    """What the profiles as of ``at`` are computed from besides each contact's facts: the population's part.

    ``sum_up`` finds it; ``write_profiles`` then writes the profiles, all at once or range by range (the
    calendar writes each range's just before planning it, in its worker processes).
    """

    at: dt.datetime
    priors: _Priors
    bounds: tuple[_Rank | None, _Rank | None]
    loyalty_entries_added: int


def sum_up(session: Session, settings: Settings, at: dt.datetime, *, full: bool = False) -> Basis:
    """Accrue loyalty, sum up again the contacts whose history changed, and find the population's medians
    and value-tier bounds as of ``at``; record the refresh. The profiles are written by ``write_profiles``.
    """
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at!r}: profiles are computed as of a timezone-aware instant")
    db.exclusive(session, "nurture.profiles.refresh")
    previous = last_refreshed(session)
    connection = session.connection()
    _DIRTY.drop(connection, checkfirst=True)
    _DIRTY.create(connection)
    _take_changes(session)
    everyone = full or previous is None or at < previous
    if not everyone:
        assert previous is not None
        _note_dated_rows(session, previous, at)
    only = None if everyone else _DIRTY
    added = accrue_loyalty(session, settings, at, only=only)
    if only is None:
        session.execute(delete(ContactFacts))
    else:
        session.execute(delete(ContactFacts).where(ContactFacts.contact_id.in_(select(only.c.contact_id))))
    facts = _facts_query(at, only)
    session.execute(insert(ContactFacts).from_select([c.name for c in facts.selected_columns], facts))
    summed = session.scalar(
        select(func.count()).select_from(ContactFacts).where(_among(ContactFacts.contact_id, only))
    )
    _DIRTY.drop(connection)

    priors = _priors(session)
    bounds = _tier_bounds(session, settings, at, priors)
    session.add(
        ProfileRefresh(
            as_of=at,
            refreshed_at=dt.datetime.now(dt.UTC),
            contacts_summed_up=summed or 0,
        )
    )
    session.flush()
    return Basis(at, priors, bounds, added)


def write_profiles(
    session: Session, settings: Settings, basis: Basis, low: int | None = None, high: int | None = None
) -> None:
    """Write the profiles as of ``basis.at``, of everyone or of the contacts with ids in [low, high)."""
    among = []
    if low is not None:
        among.append(ContactFacts.contact_id >= low)
    if high is not None:
        among.append(ContactFacts.contact_id < high)
    _write_profiles(session, _profiles_query(settings, basis.at, basis.priors, basis.bounds, *among))


def _write_profiles(session: Session, query: Select[Any]) -> None:
    """Upsert a profile per row of ``query``, leaving alone the rows in which nothing changed."""
    names = [column.name for column in query.selected_columns]
    # (SQLite reads an upsert after INSERT ... SELECT only when the SELECT has a WHERE clause.)
    statement = _dialect(session).insert(ContactProfile).from_select(names, query.where(true()))
    new = {name: statement.excluded[name] for name in names if name != "contact_id"}
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[ContactProfile.contact_id],
            set_=new,
            where=or_(
                *(getattr(ContactProfile, name).is_distinct_from(value) for name, value in new.items())
            ),
        )
    )


# The contacts a refresh sums up again; a temporary table, private to the refresh's connection.
_DIRTY = Table(
    "refresh_contacts", MetaData(), Column("contact_id", Integer, primary_key=True), prefixes=["TEMPORARY"]
)


def _dialect(session: Session) -> Any:
    return postgresql if session.get_bind().dialect.name == "postgresql" else sqlite


def _take_changes(session: Session) -> None:
    """Move the contacts the history triggers noted into the refresh's own set, emptying ``profile_changes``.

    A change committed after this point stays noted for the next refresh, so none is lost to a race.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text(
                "WITH taken AS (DELETE FROM profile_changes RETURNING contact_id) "
                f"INSERT INTO {_DIRTY.name} (contact_id) SELECT contact_id FROM taken"
            )
        )
    else:  # SQLite: the refresh holds the only write lock, nothing can slip in between.
        session.execute(insert(_DIRTY).from_select(["contact_id"], select(ProfileChange.contact_id)))
        session.execute(delete(ProfileChange))


def _note_dated_rows(session: Session, previous: dt.datetime, at: dt.datetime) -> None:
    """Add the contacts with a visit, score, complaint, resolution or loyalty entry in (previous, at]."""

    def between(column: Any) -> ColumnElement[bool]:
        return and_(column > previous, column <= at)

    dated = union(
        select(Visit.contact_id).where(between(Visit.occurred_at)),
        select(Feedback.contact_id).where(or_(between(Feedback.occurred_at), between(Feedback.resolved_at))),
        select(LoyaltyEntry.contact_id).where(between(LoyaltyEntry.occurred_at)),
    ).subquery()
    session.execute(
        _dialect(session)
        .insert(_DIRTY)
        # (SQLite reads an upsert after INSERT ... SELECT only when the SELECT has a WHERE clause.)
        .from_select(["contact_id"], select(dated.c.contact_id).where(dated.c.contact_id.is_not(None)))
        .on_conflict_do_nothing(index_elements=[_DIRTY.c.contact_id])
    )


def accrue_loyalty(
    session: Session, settings: Settings, at: dt.datetime, *, only: Table | None = None
) -> int:
    """Write the points and stamp earned by each visit up to ``at`` once; return how many entries are new.

    With ``only``, a table of contact ids, just the visits of those contacts are looked at.
    """
    earned = select(
        (literal("visit:") + cast(Visit.id, String)).label("key"),
        Visit.contact_id,
        Visit.occurred_at,
        db.floor_integer(Visit.amount * settings.points_per_unit).label("points"),
        literal(1).label("stamps"),
        literal("visit").label("reason"),
    ).where(
        Visit.occurred_at <= at,
        _among(Visit.contact_id, only),
        # Looked up among the contact's own entries (one index range), not in the whole ledger's keys.
        ~exists().where(
            LoyaltyEntry.contact_id == Visit.contact_id,
            LoyaltyEntry.occurred_at == Visit.occurred_at,
            LoyaltyEntry.key == literal("visit:") + cast(Visit.id, String),
        ),
    )
    columns = ["key", "contact_id", "occurred_at", "points", "stamps", "reason"]
    statement = (
        _dialect(session)
        .insert(LoyaltyEntry)
        .from_select(columns, earned)
        .on_conflict_do_nothing(index_elements=[LoyaltyEntry.key])
        # SQLAlchemy keeps an INSERT's row count only when asked.
        .execution_options(preserve_rowcount=True)
    )
    result = session.execute(statement)
    return int(getattr(result, "rowcount", 0))


def _among(column: Any, only: Table | None) -> ColumnElement[bool]:
    return true() if only is None else column.in_(select(only.c.contact_id))


def _counts(session: Session, column: Any) -> list[tuple[str, int]]:
    rows = session.execute(select(column, func.count()).group_by(column)).all()
    return [(str(value), int(count)) for value, count in rows]


@dataclass(frozen=True)
class _Priors:
    """The medians of the contacts' own rhythms: per primary tag shared widely enough, and overall."""

    by_tag: dict[str, float]  # only tags shared by at least MIN_SIMILAR rhythms: the others are not used
    overall: float | None


def _priors(session: Session) -> _Priors:
    """Read the medians from the facts' interval indexes: one count, then one seek per tag used, no sort.

    Only tags with at least ``MIN_SIMILAR`` rhythms get a median, so a business with thousands of rare
    tags still costs a few queries.
    """
    own = ContactFacts.own_interval_days
    counts = session.execute(
        select(ContactFacts.primary_tag, func.count())
        .where(own.is_not(None))
        .group_by(ContactFacts.primary_tag)
    ).all()

    def median(count: int, *where: ColumnElement[bool]) -> float | None:
        if not count:
            return None
        # The middle value, or the mean of the two middle values of an even count.
        middle = select(own).where(own.is_not(None), *where).order_by(own)
        values = [
            v for v in session.scalars(middle.offset((count - 1) // 2).limit(2 - count % 2)) if v is not None
        ]
        return sum(values) / len(values)

    by_tag = {}
    for tag, count in counts:
        value = median(count, ContactFacts.primary_tag == tag) if count >= MIN_SIMILAR else None
        if value is not None:
            by_tag[tag] = value
    return _Priors(by_tag, median(sum(count for _, count in counts)))


def _facts_query(at: dt.datetime, only: Table | None) -> Select[Any]:
    """One SELECT that yields a ``contact_facts`` row as of ``at`` per contact, or per contact in ``only``."""
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
        .where(Visit.occurred_at <= at, _among(Visit.contact_id, only))
        .group_by(Visit.contact_id)
        .cte("visit_stats")
    )
    # "Similar" customers share a primary interest tag: tags are unordered, so the first alphabetically.
    tags = (
        select(ContactTag.contact_id, func.min(ContactTag.tag).label("tag"))
        .where(_among(ContactTag.contact_id, only))
        .group_by(ContactTag.contact_id)
        .cte("primary_tags")
    )
    # The latest score, looked up per contact through its feedback index (a window over all feedback,
    # joined back, would be scanned once per contact by SQLite).
    latest_id = (
        select(Feedback.id)
        .where(
            Feedback.contact_id == Contact.id,
            Feedback.kind.in_([FeedbackKind.NPS, FeedbackKind.CSAT]),
            Feedback.score.is_not(None),
            Feedback.occurred_at <= at,
        )
        .order_by(Feedback.occurred_at.desc(), Feedback.id.desc())
        .limit(1)
        .correlate(Contact)
        .scalar_subquery()
    )
    latest = aliased(Feedback, name="latest_score")
    complaints = (
        select(Feedback.contact_id)
        .where(
            Feedback.kind == FeedbackKind.COMPLAINT,
            Feedback.occurred_at <= at,
            or_(Feedback.resolved_at.is_(None), Feedback.resolved_at > at),
            _among(Feedback.contact_id, only),
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
        .where(LoyaltyEntry.occurred_at <= at, _among(LoyaltyEntry.contact_id, only))
        .group_by(LoyaltyEntry.contact_id)
        .cte("balances")
    )
    return (
        select(
            Contact.id.label("contact_id"),
            func.coalesce(stats.c.visits, 0).label("visits"),
            func.coalesce(stats.c.days, 0).label("visit_days"),
            stats.c.first_visit,
            stats.c.last_visit,
            stats.c.first_epoch,
            stats.c.last_epoch,
            case(
                (stats.c.days > 1, (stats.c.last_epoch - stats.c.first_epoch) / DAY / (stats.c.days - 1)),
                else_=None,
            ).label("own_interval_days"),
            stats.c.spend.label("total_spend"),
            stats.c.currency,
            func.coalesce(tags.c.tag, "").label("primary_tag"),
            latest.kind.label("score_kind"),
            latest.score,
            cast(complaints.c.contact_id.is_not(None), Boolean).label("complaint_open"),
            func.coalesce(balances.c.points, 0).label("points"),
            func.coalesce(balances.c.stamps, 0).label("stamps"),
        )
        .select_from(Contact)
        .outerjoin(stats, stats.c.contact_id == Contact.id)
        .outerjoin(tags, tags.c.contact_id == Contact.id)
        .outerjoin(latest, latest.id == latest_id)
        .outerjoin(complaints, complaints.c.contact_id == Contact.id)
        .outerjoin(balances, balances.c.contact_id == Contact.id)
        .where(_among(Contact.id, only))
    )


@dataclass(frozen=True)
class _Rank:
    """Where a customer stands in the value ranking: expected value, then total spend, then contact id."""

    expected_value: Decimal | None
    total_spend: Decimal | None
    contact_id: int


def _expectations(settings: Settings, at: dt.datetime, priors: _Priors) -> tuple[Any, Any, Any]:
    """SQL over ``contact_facts`` for a customer's expected interval, days since the last visit, and value."""
    facts = ContactFacts
    # A rhythm seen n+1 visit days is shrunk toward similar customers' (those sharing the primary tag, when
    # there are enough of them), else toward everyone's, else toward the configured default.
    fallback = priors.overall if priors.overall is not None else settings.default_interval_days
    similar = priors.by_tag
    prior: Any = case(similar, value=facts.primary_tag, else_=fallback) if similar else literal(fallback)
    n = facts.visit_days - 1
    weight = settings.prior_weight
    expected = case((n == 0, prior), else_=(n * facts.own_interval_days + weight * prior) / (n + weight))
    elapsed = (at.timestamp() - facts.last_epoch) / DAY
    # The visit rate ahead slows once a customer is overdue: one visit per expected interval or per the
    # time already waited, whichever is longer; and never more than one visit day a day.
    # (One GREATEST, not nested CASEs: each CASE branch would compute ``expected`` once more.)
    rate = YEAR_DAYS / db.greatest(elapsed, expected, 1.0)
    value = func.round(cast(facts.total_spend / facts.visit_days * rate, Numeric), 2)
    return expected, elapsed, value


def _tier_bounds(
    session: Session, settings: Settings, at: dt.datetime, priors: _Priors
) -> tuple[_Rank | None, _Rank | None]:
    """The last customer of the high tier and of the medium tier, found with one sort of the ranking."""
    facts = ContactFacts
    customers = session.scalar(select(func.count()).where(facts.visits > 0)) or 0
    # Position p (from 0) is in a tier when p < share * customers: the first ceil(share * customers) are.
    high, medium = (
        min(customers, math.ceil(share * customers))
        for share in (settings.high_value_share, settings.high_value_share + settings.medium_value_share)
    )
    _, _, value = _expectations(settings, at, priors)
    ranking = (
        select(
            value.label("expected_value"),
            facts.total_spend,
            facts.contact_id,
            func.row_number()
            .over(order_by=[value.desc(), facts.total_spend.desc(), facts.contact_id])
            .label("n"),
        )
        .where(facts.visits > 0)
        .subquery()
    )
    rows = session.execute(
        select(ranking.c.n, ranking.c.expected_value, ranking.c.total_spend, ranking.c.contact_id).where(
            ranking.c.n.in_([high, medium])
        )
    ).all()
    # Decimals whatever the driver gives (SQLite a float): a basis handed as JSON to a calendar run on another
    # machine then ranks exactly as here. str() of a float round-trips, so the comparisons do not move.
    found = {
        row.n: _Rank(_decimal(row.expected_value), _decimal(row.total_spend), row.contact_id) for row in rows
    }
    return found.get(high), found.get(medium)


def _decimal(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def _profiles_query(
    settings: Settings,
    at: dt.datetime,
    priors: _Priors,
    bounds: tuple[_Rank | None, _Rank | None],
    *among: ColumnElement[bool],
) -> Select[Any]:
    """One SELECT that yields a ``contact_profiles`` row per contact as of ``at``, from ``contact_facts``.

    ``among`` narrows the contacts (conditions on ``contact_facts``).
    """
    # Each contact's expected interval, days since the last visit and value, worked out once, in a
    # materialized CTE: the stage and tier below compare them several times each, and the database would
    # otherwise compute the whole expression again at every mention.
    expected, elapsed, value = _expectations(settings, at, priors)
    scored = (
        select(
            *ContactFacts.__table__.columns,
            expected.label("expected"),
            elapsed.label("elapsed"),
            # (Guarded: without visits there is no value, and PostgreSQL refuses to divide by zero.)
            case((ContactFacts.visit_days > 0, value), else_=None).label("value"),
        )
        .where(*among)
        .cte("scored")
        .prefix_with("MATERIALIZED")
    )
    facts = scored.c
    expected, elapsed, value = facts.expected, facts.elapsed, facts.value

    def up_to(bound: _Rank | None) -> ColumnElement[bool]:
        """Ranked at or before ``bound``: more value, or as much and more spend, or both and a lower id."""
        if bound is None:
            return false()
        return or_(
            value > bound.expected_value,
            and_(
                value == bound.expected_value,
                or_(
                    facts.total_spend > bound.total_spend,
                    and_(facts.total_spend == bound.total_spend, facts.contact_id <= bound.contact_id),
                ),
            ),
        )

    no_visits = facts.visits == 0
    high, medium = bounds
    stage = case(
        (no_visits, Stage.PROSPECT.value),
        (elapsed > settings.lost_after * expected, Stage.LOST.value),
        (elapsed > settings.lapsed_after * expected, Stage.LAPSED.value),
        (elapsed > settings.at_risk_after * expected, Stage.AT_RISK.value),
        (facts.visit_days == 1, Stage.NEW.value),
        (facts.visit_days < settings.loyal_min_visits, Stage.RETURNING.value),
        else_=Stage.LOYAL.value,
    )
    tier = case(
        (no_visits, ValueTier.NONE.value),
        (up_to(high), ValueTier.HIGH.value),
        (up_to(medium), ValueTier.MEDIUM.value),
        else_=ValueTier.LOW.value,
    )
    return select(
        facts.contact_id,
        stage.label("stage"),
        tier.label("value_tier"),
        *_described(settings, facts),
        func.coalesce(facts.total_spend, 0).label("total_spend"),
        facts.currency,
        facts.own_interval_days,
        case((no_visits, None), else_=expected).label("expected_interval_days"),
        db.instant_from_epoch(facts.last_epoch + expected * DAY).label("expected_next_visit"),
        case((no_visits, 0), else_=value).label("expected_value"),
    )


def _described(settings: Settings, row: Any) -> list[Any]:
    """The profile columns read straight off the facts: satisfaction, complaint, visits, loyalty."""
    score, card = row.score, settings.punch_card_size
    is_nps = row.score_kind == FeedbackKind.NPS.value
    satisfaction = case(
        (and_(is_nps, score >= 9), Satisfaction.PROMOTER.value),
        (and_(is_nps, score >= 7), Satisfaction.PASSIVE.value),
        (is_nps, Satisfaction.DETRACTOR.value),
        (score >= 5, Satisfaction.PROMOTER.value),
        (score == 4, Satisfaction.PASSIVE.value),
        (score.is_not(None), Satisfaction.DETRACTOR.value),
        else_=Satisfaction.UNKNOWN.value,
    )
    return [
        satisfaction.label("satisfaction"),
        row.complaint_open,
        row.visits,
        row.first_visit,
        row.last_visit,
        row.points,
        (((row.stamps % card) + card) % card).label("stamps"),
    ]


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
    return session.scalar(select(ProfileRefresh.as_of).order_by(ProfileRefresh.id.desc()).limit(1))
