"""Retention: the figures a business asks for about keeping its customers, computed in SQL.

A report covers whole periods (UTC calendar months by default; Monday weeks or quarters on request) from
the one holding ``since`` to the one holding ``until``, the last one up to the end of ``until``. Passes
over the visits fill temporary tables private to a session's connection: each customer's visits and spend
per period and currency over the report, with the period of their first visit; each customer's first and
last visit up to its end. Every figure is then a query over those tables, the feedback, the profiles and
the ledger; the passes over the sends and over every visit can run on more sessions at once:

- retention rate of a period: of the customers who visited in the previous period, the share who visited
  in this one; churn rate = 1 - retention rate. Per cohort (the period of a customer's first visit ever):
  the share of the cohort who visited in each later period.
- repeat-visit rate: of the customers who visited during the report, the share who visited at least twice.
- lifetime value, per currency: margin x spend per visit x visits per customer a year x expected lifetime in
  years, the lifetime being one over the yearly churn: of the customers who visited in the year before the
  last one (up to the end of the report), the share who did not visit in the last. Beside it the
  historical revenue per customer over the report.
- cost of retention: the incentives of the messages sent during the report (an offer's face value at the
  contact's average visit: percent of it, the amount, a whole visit for a free service, nothing for points;
  nurture does not see redemptions, so this is what the offers could cost) plus the configured cost of each
  email and SMS segment, per retained customer: one who visited during the report and had visited before
  (earlier, or earlier in the report).
- cancellation requests saved: of the contacts who asked to cancel during the report, those who visited
  after asking.
- satisfaction: each contact's latest NPS and CSAT answer during the report.
- early warning: customers with at least ``MIN_VISITS_FOR_RHYTHM`` visits, none in the last week, whose time
  since their last visit now exceeds their usual interval (their mean gap between visits): a week ago they
  were a week less late, so the margin grows week over week until they come. Those already late by
  ``lapsed_after`` intervals or more are lapsed, past warning, and left out.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import queue
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import (
    Column,
    ColumnElement,
    Float,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Table,
    and_,
    case,
    cast,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from nurture import db
from nurture.models import (
    Channel,
    Contact,
    ContactProfile,
    Feedback,
    FeedbackKind,
    Send,
    SendStatus,
    UTCDateTime,
    Visit,
)
from nurture.programme import OfferKind, Programme
from nurture.settings import Settings

P = ParamSpec("P")
T = TypeVar("T")
DAY = 86400.0
YEAR_DAYS = 365.25
# Two gaps at least: one gap is a single interval, not yet a rhythm.
MIN_VISITS_FOR_RHYTHM = 3
WEEK = dt.timedelta(days=7)


class Period(StrEnum):
    WEEK = "week"
    MONTH = "month"
    QUARTER = "quarter"


PERIOD_DAYS = {Period.WEEK: 7.0, Period.MONTH: YEAR_DAYS / 12, Period.QUARTER: YEAR_DAYS / 4}
# Day 4 after the epoch, 1970-01-05, is a Monday: weeks are numbered from it.
_FIRST_MONDAY = 4


def period_index(period: Period, instant: Any) -> ColumnElement[int]:
    """The number of the period holding a stored instant (months, quarters since year 0; weeks since 1970)."""
    if period is Period.WEEK:
        return (db.utc_day(instant) - _FIRST_MONDAY) // 7
    months = db.month_number(instant)
    return months if period is Period.MONTH else months // 3


def index_of(period: Period, day: dt.date) -> int:
    """The number of the period holding ``day``, as ``period_index`` numbers it."""
    if period is Period.WEEK:
        return (day - dt.date(1970, 1, 5)).days // 7
    months = day.year * 12 + day.month - 1
    return months if period is Period.MONTH else months // 3


def start_of(period: Period, index: int) -> dt.date:
    """The first day of period number ``index``."""
    if period is Period.WEEK:
        return dt.date(1970, 1, 5) + dt.timedelta(days=7 * index)
    months = index if period is Period.MONTH else index * 3
    return dt.date(months // 12, months % 12 + 1, 1)


def label(period: Period, index: int) -> str:
    """How a period is named: 2026-10, 2026-W43, 2026-Q4."""
    start = start_of(period, index)
    if period is Period.WEEK:
        year, week, _ = start.isocalendar()
        return f"{year}-W{week:02d}"
    if period is Period.QUARTER:
        return f"{start.year}-Q{(start.month - 1) // 3 + 1}"
    return f"{start:%Y-%m}"


@dataclass(frozen=True)
class Window:
    """The periods a report covers: from the one holding ``since`` to the one holding ``until``."""

    period: Period
    first: int
    last: int
    until: dt.date

    @classmethod
    def of(cls, until: dt.date, since: dt.date | None = None, period: Period = Period.MONTH) -> Window:
        """The window up to the end of ``until``; without ``since``, the last twelve months (or weeks...)."""
        last = index_of(period, until)
        first = index_of(period, since) if since is not None else last - 11
        if first > last:
            raise ValueError(f"--since {since} is after --until {until}")
        return cls(period, first, last, until)

    @property
    def start(self) -> dt.datetime:
        return dt.datetime.combine(start_of(self.period, self.first), dt.time(), tzinfo=dt.UTC)

    @property
    def end(self) -> dt.datetime:
        return dt.datetime.combine(self.until + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)

    @property
    def partial(self) -> bool:
        """Tell whether the last period ends after ``until``."""
        return start_of(self.period, self.last + 1) > self.until + dt.timedelta(days=1)

    @property
    def years(self) -> float:
        return (self.end - self.start).total_seconds() / DAY / YEAR_DAYS


def offer_kinds(programme: Programme) -> dict[str, OfferKind]:
    """The kind of each touch's offer, for the touches that carry one."""
    return {touch.name: touch.offer.kind for touch in programme.touches if touch.offer is not None}


@dataclass(frozen=True)
class Costs:
    """What retention costs besides the offers: per message, and what a new customer costs to win."""

    currency: str
    email: Decimal = Decimal(0)
    sms_segment: Decimal = Decimal(0)
    acquisition: Decimal | None = None
    margin_rate: Decimal = Decimal("0.5")

    @classmethod
    def from_settings(cls, settings: Settings, margin_rate: Decimal) -> Costs:
        """The costs configured in the settings, and the programme's margin."""
        return cls(
            currency=settings.default_currency,
            email=settings.email_cost,
            sms_segment=settings.sms_segment_cost,
            acquisition=settings.acquisition_cost,
            margin_rate=margin_rate,
        )


@dataclass(frozen=True)
class PeriodFigures:
    """Retention in one period: who was there the period before, and who of them came again."""

    period: str
    start: dt.date
    active: int
    new: int
    base: int  # customers who visited in the previous period
    retained: int  # of them, those who visited in this one
    retention_rate: float | None
    churn_rate: float | None
    partial: bool


@dataclass(frozen=True)
class Cohort:
    """Customers whose first visit fell in one period, and how many visited in each period since."""

    cohort: str
    start: dt.date
    customers: int
    active: list[int]  # active[k]: visited in the k-th period after the first
    retention: list[float]


@dataclass(frozen=True)
class Money:
    """Revenue, lifetime value and the cost of retention in one currency."""

    currency: str
    customers: int
    retained_customers: int
    visits: int
    revenue: Decimal
    revenue_per_customer: Decimal
    revenue_per_visit: Decimal
    visits_per_customer_per_year: float
    lifetime_value: Decimal | None
    incentive_cost: Decimal
    message_cost: Decimal | None  # configured in one currency: None in the others
    retention_cost: Decimal
    retention_cost_per_retained: Decimal | None
    acquisition_cost: Decimal | None
    retention_to_acquisition: float | None  # cost per retained customer / cost of a new one


@dataclass(frozen=True)
class Slipping:
    """A customer whose visit rhythm is slipping: later than usual now, and later than a week ago."""

    external_id: str
    name: str
    visits: int
    last_visit: dt.datetime
    usual_interval_days: float
    days_since: float
    late_now: float  # days since the last visit beyond the usual interval, in intervals
    late_week_ago: float


@dataclass(frozen=True)
class Moment:
    """One period of the timeline: messages sent, visits, revenue and incentive cost per currency."""

    period: str
    start: dt.date
    emails: int
    sms: int
    visits: int
    revenue: dict[str, Decimal]
    incentive_cost: dict[str, Decimal]


@dataclass(frozen=True)
class Report:
    """Every retention figure of one window."""

    period: Period
    since: dt.date
    until: dt.date
    periods: list[PeriodFigures]
    cohorts: list[Cohort]
    customers: int
    repeat_customers: int
    repeat_visit_rate: float | None
    retained_customers: int
    new_customers: int
    churn_rate_per_period: float | None
    churn_rate_per_year: float | None
    expected_lifetime_years: float | None
    money: list[Money]
    messages: dict[str, int]
    cancellations: dict[str, Any]
    satisfaction: dict[str, Any]
    slipping_count: int
    slipping: list[Slipping] = field(default_factory=list)
    timeline: list[Moment] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON values: dates ISO 8601, money as decimal strings, rates rounded."""
        plain: dict[str, Any] = _plain(asdict(self))
        return plain


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, float):
        return round(value, 4)
    return value


# Each customer's visits and spend per period and currency over the report (and the period before it).
_SPEND = Table(
    "retention_spend",
    MetaData(),
    Column("contact_id", Integer, nullable=False),
    Column("period", Integer, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("visits", Integer, nullable=False),
    Column("revenue", Numeric(16, 2), nullable=False),
    # PostgreSQL only, filled in the same pass: the period of the customer's row before this one (the same
    # period in another currency, an earlier one, NULL on their first row of the report) and their first
    # visit ever. SQLite leaves them empty.
    Column("previous", Integer),
    Column("first_at", UTCDateTime),
    # SQLite adds each visit to its key's row (an upsert on the key). PostgreSQL inserts the rows already
    # grouped and joins by hashing: the key's index would only be upkeep, 3 million entries at 10 million
    # visits.
    PrimaryKeyConstraint("contact_id", "period", "currency").ddl_if(dialect="sqlite"),
    prefixes=["TEMPORARY"],
    # Its rows are found by their key alone: one b-tree, not a table and an index beside it.
    sqlite_with_rowid=False,
)
# The period of the first visit ever of each customer of the report (and of the period before it).
_FIRST_VISITS = Table(
    "retention_first",
    MetaData(),
    Column("contact_id", Integer, primary_key=True),
    Column("first_period", Integer, nullable=False),
    prefixes=["TEMPORARY"],
)
# Each customer's visits up to the end of the report: their rhythm, and whether they came in the last year.
_CUSTOMERS = Table(
    "retention_customers",
    MetaData(),
    Column("contact_id", Integer, primary_key=True),
    Column("last_at", UTCDateTime, nullable=False),
    Column("visits", Integer, nullable=False),
    Column("first_epoch", Float, nullable=False),
    Column("last_epoch", Float, nullable=False),
    Column("last_before_year", UTCDateTime),  # the last visit before the year up to the end, if any
    prefixes=["TEMPORARY"],
)
# The messages sent during the report per period, channel ('' for none) and currency of their contact.
_SENT = Table(
    "retention_sent",
    MetaData(),
    Column("period", Integer, primary_key=True),
    Column("channel", String(8), primary_key=True),
    Column("currency", String(3), primary_key=True),
    Column("messages", Integer, nullable=False),
    Column("segments", Integer, nullable=False),
    Column("incentive_cost", Numeric, nullable=False),
    prefixes=["TEMPORARY"],
    sqlite_with_rowid=False,
)
_TABLES = (_SPEND, _FIRST_VISITS)
YEAR = dt.timedelta(days=365)


def report(
    session: Session,
    window: Window,
    costs: Costs,
    offers: Mapping[str, OfferKind],
    *,
    lapsed_after: float = 3.0,
    slipping_limit: int = 50,
    aside: Sequence[Session] = (),
) -> Report:
    """Compute every retention figure of ``window``; ``offers`` gives the kind of each touch's offer.

    ``aside`` may hold more sessions on the same database: the sends, cut in as many parts, then each
    customer's rhythm (the early warning and the yearly churn) are summed up on them in threads while
    ``session`` sums up the visits of the window, so that SQLite and PostgreSQL work on several cores at
    once. Each session reads what was committed when its transaction began.
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        _in_memory(session)
        for other in aside:
            # The more sessions already share the sends out, a part each: parallel workers for each part too
            # would only take cores from this session's pass over the visits, which uses them better.
            other.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))
    free: queue.SimpleQueue[Session] = queue.SimpleQueue()
    for other in aside:
        free.put(other)
    spare = free if aside else None
    with ThreadPoolExecutor(max_workers=max(len(aside), 1), thread_name_prefix="retention") as threads:
        sending = [
            _started(threads, spare, session, _sends, window, offers, costs.currency, ids)
            for ids in _id_ranges(session, max(len(aside), 1))
        ]
        rhythms = _started(threads, spare, session, _rhythms, window, lapsed_after, slipping_limit)
        for table in _TABLES:
            table.drop(connection, checkfirst=True)
        _FIRST_VISITS.create(connection)
        # Not dropped when a query fails: the caller's rollback undoes their creation with the rest.
        _fill(session, window)
        periods = _periods(session, window)
        cohorts = _cohorts(session, window)
        complete = [p for p in periods if not p.partial and p.base]
        base = sum(p.base for p in complete)
        churn = 1 - sum(p.retained for p in complete) / base if base else None
        totals = _totals(session, window)
        cancellations = _cancellations(session, window)
        satisfaction = _satisfaction(session, window)
        yearly, (slipping_count, slipping) = rhythms()
        lifetime = 1 / yearly if yearly else None
        sent = _combined([part() for part in sending])
        messages = _messages(sent)
        money = _money(session, window, costs, _incentive_costs(sent), messages, lifetime)
        timeline = _timeline(session, window, sent)
    for table in _TABLES:
        table.drop(connection)
    return Report(
        period=window.period,
        since=start_of(window.period, window.first),
        until=window.until,
        periods=periods,
        cohorts=cohorts,
        customers=totals["customers"],
        repeat_customers=totals["repeat"],
        repeat_visit_rate=_share(totals["repeat"], totals["customers"]),
        retained_customers=totals["retained"],
        new_customers=totals["new"],
        churn_rate_per_period=churn,
        churn_rate_per_year=yearly,
        expected_lifetime_years=lifetime,
        money=money,
        messages=messages,
        cancellations=cancellations,
        satisfaction=satisfaction,
        slipping_count=slipping_count,
        slipping=slipping,
        timeline=timeline,
    )


def _in_memory(session: Session) -> None:
    """Let PostgreSQL group and keep the report's temporary tables in memory, for this transaction."""
    # Every visit of a year grouped in memory rather than in batches on disk.
    session.execute(text("SET LOCAL work_mem = '256MB'"))
    # Temporary tables live in each connection's own buffers, 8 MB by default: at 10 million visits the
    # per-period table is 300 MB, and with 8 MB the report took 100 s instead of 64. PostgreSQL refuses the
    # change once the connection has touched a temporary table; it then keeps the size it had.
    try:
        with session.begin_nested():
            session.execute(text("SET LOCAL temp_buffers = '512MB'"))
    except DBAPIError:
        pass


@contextlib.contextmanager
def _grouped_in_order(session: Session) -> Iterator[None]:
    """Let PostgreSQL group rows only as they come in order, from an index, for the statements inside.

    Grouping by hashing holds every group at once: half a GB for the numeric sums of 1.3 million, and then
    it spills to disk (18 s instead of 8 for the visits of the window at 10 million); in the index's order
    each group is done when the next one starts.
    """
    hashing = session.scalar(text("SHOW enable_hashagg"))
    session.execute(text("SET LOCAL enable_hashagg = off"))
    # Not put back when a statement fails: the transaction is then rolled back, and the setting with it.
    yield
    session.execute(text(f"SET LOCAL enable_hashagg = {'on' if hashing == 'on' else 'off'}"))


def _started(
    threads: ThreadPoolExecutor,
    spare: queue.SimpleQueue[Session] | None,
    session: Session,
    work: Callable[Concatenate[Session, P], T],
    *arguments: P.args,
    **options: P.kwargs,
) -> Callable[[], T]:
    """Start ``work`` in a thread on the first spare session free; without any, leave it to ``session``."""
    if spare is None:
        return functools.partial(work, session, *arguments, **options)
    queued = spare

    def on_spare() -> T:
        other = queued.get()
        try:
            return work(other, *arguments, **options)
        finally:
            queued.put(other)

    return threads.submit(on_spare).result


def _id_ranges(session: Session, parts: int) -> list[tuple[int, int]]:
    """The sends' ids cut into ``parts`` ranges of as many ids each: (lowest, highest) of each."""
    # Two queries: SQLite reads a lone min or max from one end of the table, both together from all of it.
    lowest = session.scalar(select(func.min(Send.id))) or 0
    highest = session.scalar(select(func.max(Send.id))) or 0
    step = (highest - lowest) // parts + 1
    return [(start, min(start + step - 1, highest)) for start in range(lowest, highest + 1, step)]


def _rhythms(
    session: Session, window: Window, lapsed_after: float, slipping_limit: int
) -> tuple[float | None, tuple[int, list[Slipping]]]:
    """The yearly churn and the early warning, from each customer's visits up to the end of the window."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        _in_memory(session)
    _CUSTOMERS.drop(connection, checkfirst=True)
    first = func.min(Visit.occurred_at)
    customers = (
        select(
            Visit.contact_id,
            func.max(Visit.occurred_at).label("last_at"),
            func.count().label("visits"),
            db.epoch_seconds(first).label("first_epoch"),
            db.epoch_seconds(func.max(Visit.occurred_at)).label("last_epoch"),
            func.max(case((Visit.occurred_at < window.end - YEAR, Visit.occurred_at))).label(
                "last_before_year"
            ),
        )
        .where(Visit.occurred_at < window.end)
        .group_by(Visit.contact_id)
    )
    if connection.dialect.name == "postgresql":
        # Made by the query, with no key to keep up (nothing looks a customer up in it): inserting the
        # million customers into the keyed table took 3.5 s more than the query itself.
        with _grouped_in_order(session):
            session.execute(db.create_table_as(_CUSTOMERS, customers))
        # Autovacuum never sees temporary tables: without statistics the planner takes them for small.
        session.execute(text(f"ANALYZE {_CUSTOMERS.name}"))
    else:
        _CUSTOMERS.create(connection)
        session.execute(
            insert(_CUSTOMERS).from_select([c.name for c in customers.selected_columns], customers)
        )
    figures = _yearly_churn(session, window), _slipping(session, window, lapsed_after, slipping_limit)
    _CUSTOMERS.drop(connection)
    return figures


def _yearly_churn(session: Session, window: Window) -> float | None:
    """Of the customers who visited in the year before last, the share who did not visit in the last year."""
    c = _CUSTOMERS.c
    base, retained = session.execute(
        select(func.count(), func.sum(case((c.last_at >= window.end - YEAR, 1), else_=0))).where(
            c.last_before_year >= window.end - 2 * YEAR
        )
    ).one()
    return 1 - int(retained or 0) / base if base else None


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _fill(session: Session, window: Window) -> None:
    """Sum the visits of the window up per customer and period, and find those customers' first visits."""
    period = period_index(window.period, Visit.occurred_at)
    # The period before the first is the base of the first period's retention.
    begin = dt.datetime.combine(start_of(window.period, window.first - 1), dt.time(), tzinfo=dt.UTC)
    if session.get_bind().dialect.name == "postgresql":
        _fill_in_order(session, window, begin)
        return
    _SPEND.create(session.connection())
    # Read from the covering index in contact order: through the date index, each visit of the window
    # would be a lookup in the table.
    visits = select(
        Visit.contact_id,
        period.label("period"),
        Visit.currency,
        literal(1).label("visits"),
        Visit.amount.label("revenue"),
    ).where(db.unindexed(Visit.occurred_at) >= begin, db.unindexed(Visit.occurred_at) < window.end)
    db.insert_summed(session, _SPEND, visits, keys=["contact_id", "period", "currency"])
    # One look in the visits' index per customer: the first entry of each is their first visit.
    each = select(_SPEND.c.contact_id).distinct().subquery()
    first = (
        select(period)
        .where(Visit.contact_id == each.c.contact_id)
        .order_by(Visit.occurred_at)
        .limit(1)
        .scalar_subquery()
    )
    session.execute(
        insert(_FIRST_VISITS).from_select(["contact_id", "first_period"], select(each.c.contact_id, first))
    )


def _fill_in_order(session: Session, window: Window, begin: dt.datetime) -> None:
    """``_fill`` on PostgreSQL: one parallel pass over every visit up to the end, in the index's order.

    Each customer's visits come one after another, in time: grouped per customer, period and currency as
    they come, with those before ``begin`` in one group per currency that gives the first visit ever; each
    row then learns the period of the customer's row before it, from which retention per period is a count.
    """
    in_range = Visit.occurred_at >= begin
    grouped = (
        select(
            Visit.contact_id,
            case((in_range, period_index(window.period, Visit.occurred_at))).label("period"),
            Visit.currency,
            func.count().label("visits"),
            func.sum(Visit.amount).label("revenue"),
            func.min(Visit.occurred_at).label("first_at"),
        )
        .where(Visit.occurred_at < window.end)
        .group_by(Visit.contact_id, "period", Visit.currency)
        .subquery()
    )
    # Ordered as the groups come out, so that no second sort is needed; the earlier visits' group (its
    # period NULL) comes last, and the whole frame lets each row see it.
    customer = {
        "partition_by": grouped.c.contact_id,
        "order_by": (grouped.c.period, grouped.c.currency),
        "rows": (None, None),
    }
    rows = select(
        grouped.c.contact_id,
        grouped.c.period,
        grouped.c.currency,
        cast(grouped.c.visits, Integer).label("visits"),
        cast(grouped.c.revenue, Numeric(16, 2)).label("revenue"),
        func.lag(grouped.c.period).over(**customer).label("previous"),  # type: ignore[arg-type]
        func.min(grouped.c.first_at).over(**customer).label("first_at"),  # type: ignore[arg-type]
    ).subquery()
    with _grouped_in_order(session):
        session.execute(db.create_table_as(_SPEND, select(rows).where(rows.c.period.is_not(None))))
    s = _SPEND.c
    session.execute(
        insert(_FIRST_VISITS).from_select(
            ["contact_id", "first_period"],
            select(s.contact_id, period_index(window.period, s.first_at)).where(s.previous.is_(None)),
        )
    )
    # Autovacuum never sees temporary tables: without statistics the planner takes them for small.
    session.execute(text(f"ANALYZE {_SPEND.name}, {_FIRST_VISITS.name}"))


def _periods(session: Session, window: Window) -> list[PeriodFigures]:
    """Active, new, base and retained customers of each period of the window."""
    s, later = _SPEND.c, _SPEND.alias("later")
    c = _FIRST_VISITS.c
    new: dict[int, int] = dict(
        session.execute(
            select(c.first_period, func.count())
            .where(c.first_period.between(window.first, window.last))
            .group_by(c.first_period)
        ).all()
    )
    in_range = s.period.between(window.first - 1, window.last)
    active: dict[int, int] = {}
    bases: dict[int, tuple[int, int]] = {}
    if session.get_bind().dialect.name == "postgresql":
        # A customer's first row of a period is the one whose previous row is of another period (or none):
        # it counts them as active there, and as retained from the period before when that is the previous
        # row's. One pass over the table, no join: 0.6 s instead of 8.9 at 10 million visits.
        came = func.count().filter(s.previous.is_distinct_from(s.period))
        stayed = func.count().filter(s.previous == s.period - 1)
        retained_in = {}
        for period, customers, retained in session.execute(
            select(s.period, came, stayed).where(in_range).group_by(s.period)
        ):
            active[period] = customers
            retained_in[period] = retained
        for period, customers in active.items():
            bases[period + 1] = (customers, retained_in.get(period + 1, 0))
    else:
        # One pass: the customers of each period are the active ones of that period and the base of the next.
        listed = select(s.contact_id, s.period).where(in_range).distinct().subquery()
        came_again = exists().where(
            later.c.contact_id == listed.c.contact_id, later.c.period == listed.c.period + 1
        )
        counted = select(listed.c.period, func.count(), func.sum(case((came_again, 1), else_=0))).group_by(
            listed.c.period
        )
        for period, customers, retained in session.execute(counted):
            active[period] = customers
            bases[period + 1] = (customers, retained)
    figures = []
    for index in range(window.first, window.last + 1):
        base, retained = bases.get(index, (0, 0))
        rate = _share(int(retained or 0), base)
        figures.append(
            PeriodFigures(
                period=label(window.period, index),
                start=start_of(window.period, index),
                active=active.get(index, 0),
                new=new.get(index, 0),
                base=base,
                retained=int(retained or 0),
                retention_rate=rate,
                churn_rate=None if rate is None else 1 - rate,
                partial=index == window.last and window.partial,
            )
        )
    return figures


def _cohorts(session: Session, window: Window) -> list[Cohort]:
    """Each cohort of the window and how many of it visited in each period since its first."""
    c, s = _FIRST_VISITS.c, _SPEND.c
    age = s.period - c.first_period
    in_window = c.first_period.between(window.first, window.last)
    sizes: dict[int, int] = dict(
        session.execute(select(c.first_period, func.count()).where(in_window).group_by(c.first_period)).all()
    )
    seen: dict[int, dict[int, int]] = defaultdict(dict)
    for cohort, k, count in session.execute(
        select(c.first_period, age, func.count(s.contact_id.distinct()))
        .join(_SPEND, s.contact_id == c.contact_id)
        .where(in_window)
        .group_by(c.first_period, age)
    ):
        seen[cohort][k] = count
    cohorts = []
    for index in range(window.first, window.last + 1):
        size = sizes.get(index, 0)
        active = [seen[index].get(k, 0) for k in range(window.last - index + 1)]
        cohorts.append(
            Cohort(
                cohort=label(window.period, index),
                start=start_of(window.period, index),
                customers=size,
                active=active,
                retention=[count / size if size else 0.0 for count in active],
            )
        )
    return cohorts


def _per_customer(window: Window, *by: Any) -> Any:
    s = _SPEND.c
    return (
        select(s.contact_id, *by, func.sum(s.visits).label("visits"), func.sum(s.revenue).label("revenue"))
        .where(s.period.between(window.first, window.last))
        .group_by(s.contact_id, *by)
        .subquery()
    )


def _retained(window: Window, visits: Any) -> ColumnElement[bool]:
    """A customer of the window who had visited before: before the window, or earlier within it."""
    return or_(_FIRST_VISITS.c.first_period < window.first, visits >= 2)


def _totals(session: Session, window: Window) -> dict[str, int]:
    """Customers of the window: all, those with two visits or more, the retained and the new."""
    each = _per_customer(window)
    c = _FIRST_VISITS.c
    row = session.execute(
        select(
            func.count(),
            func.sum(case((each.c.visits >= 2, 1), else_=0)),
            func.sum(case((_retained(window, each.c.visits), 1), else_=0)),
            func.sum(case((c.first_period >= window.first, 1), else_=0)),
        ).join(_FIRST_VISITS, c.contact_id == each.c.contact_id)
    ).one()
    customers, repeat, retained, new = (int(value or 0) for value in row)
    return {"customers": customers, "repeat": repeat, "retained": retained, "new": new}


def _sent_in(window: Window, ids: tuple[int, int]) -> ColumnElement[bool]:
    # One pass over the table in the order of its ids (a range of them): SQLite would otherwise walk the
    # attribution index, which lacks the segments, and look every send up in the table in no order.
    status, sent_at = db.unindexed(Send.status), db.unindexed(Send.sent_at)
    return and_(
        Send.id.between(*ids), status == SendStatus.SENT, sent_at >= window.start, sent_at < window.end
    )


@dataclass(frozen=True)
class _Sent:
    """The messages sent during the window, per period, channel and currency of their contact."""

    period: int
    channel: Channel | None
    currency: str
    messages: int
    segments: int
    incentive_cost: Decimal


def _sends(
    session: Session,
    window: Window,
    offers: Mapping[str, OfferKind],
    default_currency: str,
    ids: tuple[int, int],
) -> list[Row[*tuple[Any, ...]]]:
    """One pass over the sends of the window with ``ids``: how many went out, what their offers could cost.

    Per period, channel ('' for none) and currency; the costs not rounded yet, so that parts add up exactly.
    """
    by_kind = defaultdict(list)
    for touch, kind in offers.items():
        by_kind[kind].append(touch)
    p = ContactProfile
    visit = p.total_spend / func.nullif(p.visits, 0)
    cost = case(
        (Send.touch.in_(by_kind[OfferKind.PERCENT] or [""]), Send.incentive / 100 * visit),
        (Send.touch.in_(by_kind[OfferKind.AMOUNT] or [""]), Send.incentive),
        (Send.touch.in_(by_kind[OfferKind.FREE_SERVICE] or [""]), visit),
        else_=literal(0),
    )
    sends = (
        select(
            period_index(window.period, Send.sent_at).label("period"),
            func.coalesce(Send.channel, "").label("channel"),
            func.coalesce(p.currency, default_currency).label("currency"),
            literal(1).label("messages"),
            func.coalesce(Send.segments, 1).label("segments"),
            func.coalesce(cost, 0).label("incentive_cost"),
        )
        .select_from(Send)
        # Only the sends with an offer look their contact's profile up: the rest cost nothing.
        .outerjoin(p, and_(p.contact_id == Send.contact_id, Send.incentive.is_not(None)))
        .where(_sent_in(window, ids))
    )
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        _SENT.drop(connection, checkfirst=True)
        _SENT.create(connection)
    rows = db.summed(session, sends, keys=["period", "channel", "currency"], scratch=_SENT)
    if connection.dialect.name == "sqlite":
        _SENT.drop(connection)
    return list(rows)


def _combined(parts: Sequence[Sequence[Row[*tuple[Any, ...]]]]) -> list[_Sent]:
    """The parts of the sends' pass added up, in the order of their period, channel and currency."""
    summed: dict[tuple[int, str, str], tuple[int, int, Decimal]] = {}
    for rows in parts:
        for index, channel, code, count, segments, amount in rows:
            before = summed.get((index, channel, code), (0, 0, Decimal(0)))
            summed[(index, channel, code)] = (
                before[0] + count,
                before[1] + segments,
                before[2] + Decimal(str(amount or 0)),
            )
    return [
        _Sent(index, Channel(channel) if channel else None, code, count, segments, _money_value(cost))
        for (index, channel, code), (count, segments, cost) in sorted(summed.items())
    ]


def _messages(sent: list[_Sent]) -> dict[str, int]:
    """Emails, SMS and SMS segments sent during the window."""
    return {
        "email": sum(s.messages for s in sent if s.channel is Channel.EMAIL),
        "sms": sum(s.messages for s in sent if s.channel is Channel.SMS),
        "sms_segments": sum(s.segments for s in sent if s.channel is Channel.SMS),
    }


def _incentive_costs(sent: list[_Sent]) -> dict[str, Decimal]:
    """What the offers sent during the window could cost, per currency of their contacts."""
    costs: dict[str, Decimal] = defaultdict(Decimal)
    for s in sent:
        if s.incentive_cost:
            costs[s.currency] += s.incentive_cost
    return dict(costs)


def _money_value(value: Any) -> Decimal:
    return Decimal(str(value or 0)).quantize(Decimal("0.01"))


def _money(
    session: Session,
    window: Window,
    costs: Costs,
    incentives: Mapping[str, Decimal],
    messages: Mapping[str, int],
    lifetime_years: float | None,
) -> list[Money]:
    """Revenue, lifetime value and cost of retention per currency."""
    each = _per_customer(window, _SPEND.c.currency)
    c = _FIRST_VISITS.c
    rows = session.execute(
        select(
            each.c.currency,
            func.count(),
            func.sum(case((_retained(window, each.c.visits), 1), else_=0)),
            func.sum(each.c.visits),
            func.sum(each.c.revenue),
        )
        .join(_FIRST_VISITS, c.contact_id == each.c.contact_id)
        .group_by(each.c.currency)
        .order_by(func.count().desc(), each.c.currency)
    ).all()
    message_cost = _money_value(
        costs.email * messages["email"] + costs.sms_segment * messages["sms_segments"]
    )
    currencies = [row[0] for row in rows] + sorted(set(incentives) - {row[0] for row in rows})
    by_currency = {row[0]: row for row in rows}
    money = []
    for currency in currencies:
        _, customers, retained, visits, revenue = by_currency.get(currency, (currency, 0, 0, 0, 0))
        customers, retained, visits = int(customers), int(retained or 0), int(visits or 0)
        revenue = _money_value(revenue)
        per_visit = _money_value(revenue / visits) if visits else Decimal("0.00")
        frequency = visits / customers / window.years if customers else 0.0
        value = (
            _money_value(costs.margin_rate * per_visit * Decimal(frequency) * Decimal(lifetime_years))
            if lifetime_years is not None and visits
            else None
        )
        own = currency == costs.currency
        cost = incentives.get(currency, Decimal("0.00")) + (message_cost if own else 0)
        per_retained = _money_value(cost / retained) if retained else None
        acquisition = costs.acquisition if own else None
        money.append(
            Money(
                currency=currency,
                customers=customers,
                retained_customers=retained,
                visits=visits,
                revenue=revenue,
                revenue_per_customer=_money_value(revenue / customers) if customers else Decimal("0.00"),
                revenue_per_visit=per_visit,
                visits_per_customer_per_year=frequency,
                lifetime_value=value,
                incentive_cost=incentives.get(currency, Decimal("0.00")),
                message_cost=message_cost if own else None,
                retention_cost=_money_value(cost),
                retention_cost_per_retained=per_retained,
                acquisition_cost=acquisition,
                retention_to_acquisition=(
                    float(per_retained / acquisition) if per_retained is not None and acquisition else None
                ),
            )
        )
    return money


def _cancellations(session: Session, window: Window) -> dict[str, Any]:
    """Contacts who asked to cancel during the window, and those of them who visited after asking."""
    asked = (
        select(Feedback.contact_id, func.min(Feedback.occurred_at).label("asked_at"))
        .where(
            Feedback.kind == FeedbackKind.CANCEL_REQUEST,
            Feedback.occurred_at >= window.start,
            Feedback.occurred_at < window.end,
        )
        .group_by(Feedback.contact_id)
        .subquery()
    )
    came_back = exists().where(
        Visit.contact_id == asked.c.contact_id,
        Visit.occurred_at > asked.c.asked_at,
        Visit.occurred_at < window.end,
    )
    requests, saved = session.execute(
        select(func.count(), func.sum(case((came_back, 1), else_=0))).select_from(asked)
    ).one()
    saved = int(saved or 0)
    return {"asked": requests, "saved": saved, "saved_share": _share(saved, requests)}


def _satisfaction(session: Session, window: Window) -> dict[str, Any]:
    """Each contact's latest NPS and CSAT answers of the window, counted; complaints made and still open."""
    in_window = and_(Feedback.occurred_at >= window.start, Feedback.occurred_at < window.end)
    scored = and_(
        in_window, Feedback.kind.in_([FeedbackKind.NPS, FeedbackKind.CSAT]), Feedback.score.is_not(None)
    )
    latest = func.row_number().over(
        partition_by=(Feedback.contact_id, Feedback.kind), order_by=Feedback.occurred_at.desc()
    )
    ranked = select(Feedback.kind, Feedback.score, latest.label("n")).where(scored).subquery()
    scores: dict[str, dict[int, int]] = {"nps": {}, "csat": {}}
    for kind, score, count in session.execute(
        select(ranked.c.kind, ranked.c.score, func.count())
        .where(ranked.c.n == 1)
        .group_by(ranked.c.kind, ranked.c.score)
    ):
        scores[str(kind)][int(score)] = count
    nps, csat = scores["nps"], scores["csat"]
    promoters = sum(n for s, n in nps.items() if s >= 9)
    detractors = sum(n for s, n in nps.items() if s <= 6)
    answered = sum(nps.values())
    satisfied = sum(n for s, n in csat.items() if s >= 4)
    dissatisfied = sum(n for s, n in csat.items() if s <= 2)
    rated = sum(csat.values())
    # Satisfied or not by the latest answer of either kind, as the profiles classify it.
    overall = func.row_number().over(partition_by=Feedback.contact_id, order_by=Feedback.occurred_at.desc())
    happy = or_(
        and_(Feedback.kind == FeedbackKind.NPS, Feedback.score >= 9),
        and_(Feedback.kind == FeedbackKind.CSAT, Feedback.score == 5),
    )
    unhappy = or_(
        and_(Feedback.kind == FeedbackKind.NPS, Feedback.score <= 6),
        and_(Feedback.kind == FeedbackKind.CSAT, Feedback.score <= 3),
    )
    mood = (
        select(
            case((happy, "satisfied"), (unhappy, "dissatisfied"), else_="neutral").label("mood"),
            overall.label("n"),
        )
        .where(scored)
        .subquery()
    )
    moods: dict[str, int] = dict(
        session.execute(select(mood.c.mood, func.count()).where(mood.c.n == 1).group_by(mood.c.mood)).all()
    )
    complaints, still_open = session.execute(
        select(
            func.count(),
            func.sum(
                case((or_(Feedback.resolved_at.is_(None), Feedback.resolved_at >= window.end), 1), else_=0)
            ),
        ).where(in_window, Feedback.kind == FeedbackKind.COMPLAINT)
    ).one()
    return {
        "satisfied": moods.get("satisfied", 0),
        "neutral": moods.get("neutral", 0),
        "dissatisfied": moods.get("dissatisfied", 0),
        "nps": {
            "answers": answered,
            "promoters": promoters,
            "passives": answered - promoters - detractors,
            "detractors": detractors,
            "score": round(100 * (promoters - detractors) / answered) if answered else None,
        },
        "csat": {
            "answers": rated,
            "satisfied": satisfied,
            "neutral": rated - satisfied - dissatisfied,
            "dissatisfied": dissatisfied,
            "score": _share(satisfied, rated),
        },
        "complaints": complaints,
        "complaints_open": int(still_open or 0),
    }


def _slipping(
    session: Session, window: Window, lapsed_after: float, limit: int
) -> tuple[int, list[Slipping]]:
    """Customers past their usual interval at the end of the window, later than a week ago, not lapsed."""
    c = _CUSTOMERS.c
    end = window.end.timestamp()
    last = c.last_epoch
    interval = (last - c.first_epoch) / (c.visits - 1) / DAY
    days_since = (literal(end) - last) / DAY
    late = days_since / interval - 1
    slipping = and_(
        c.visits >= MIN_VISITS_FOR_RHYTHM,
        c.last_epoch < end - WEEK.total_seconds(),
        interval > 0,
        days_since > interval,
        days_since < interval * lapsed_after,
    )
    count = session.scalar(select(func.count()).select_from(_CUSTOMERS).where(slipping)) or 0
    rows = session.execute(
        select(
            Contact.external_id,
            Contact.first_name,
            Contact.last_name,
            c.visits,
            c.last_at,
            interval,
            days_since,
        )
        .join(Contact, Contact.id == c.contact_id)
        .where(slipping)
        .order_by(c.visits.desc(), late.desc(), Contact.external_id)
        .limit(limit)
    )
    found = []
    for external_id, first_name, last_name, visits, last_at, usual, since in rows:
        found.append(
            Slipping(
                external_id=external_id,
                name=" ".join(part for part in (first_name, last_name) if part),
                visits=visits,
                last_visit=last_at,
                usual_interval_days=float(usual),
                days_since=float(since),
                late_now=float(since) / float(usual) - 1,
                late_week_ago=(float(since) - 7) / float(usual) - 1,
            )
        )
    return count, found


def _timeline(session: Session, window: Window, sent: list[_Sent]) -> list[Moment]:
    """Per period of the window: messages sent, visits and revenue, and what the offers sent could cost."""
    sp = _SPEND.c
    visits: dict[int, int] = defaultdict(int)
    revenue: dict[int, dict[str, Decimal]] = defaultdict(dict)
    for index, currency, count, amount in session.execute(
        select(sp.period, sp.currency, func.sum(sp.visits), func.sum(sp.revenue))
        .where(sp.period.between(window.first, window.last))
        .group_by(sp.period, sp.currency)
        # Each period's currencies in the same order on every database (PostgreSQL groups by hashing).
        .order_by(sp.period, sp.currency)
    ):
        visits[index] += int(count)
        revenue[index][currency] = _money_value(amount)
    messages: dict[tuple[int, Channel | None], int] = defaultdict(int)
    costs: dict[int, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for s in sent:
        messages[(s.period, s.channel)] += s.messages
        if s.incentive_cost:
            costs[s.period][s.currency] += s.incentive_cost
    return [
        Moment(
            period=label(window.period, index),
            start=start_of(window.period, index),
            emails=messages[(index, Channel.EMAIL)],
            sms=messages[(index, Channel.SMS)],
            visits=visits[index],
            revenue=revenue[index],
            incentive_cost=dict(costs[index]),
        )
        for index in range(window.first, window.last + 1)
    ]
