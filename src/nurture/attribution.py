"""Attribution: which visits the messages brought, credited and measured against the holdout.

Three views of the same ledger and visits, each computed in SQL over every send (set-based, the same on
SQLite and PostgreSQL):

- **Last touch.** A visit is credited to the latest ``sent`` send to its contact whose window holds it: the
  send's touch window (``attribution_days`` in the touch's file) or its channel's
  (``NURTURE_ATTRIBUTION_EMAIL_DAYS``, 5; ``NURTURE_ATTRIBUTION_SMS_DAYS``, 1), counted from the send.
  Each visit is credited at most once, so the touches' revenue adds up to no more than the visits'.
- **Influenced.** Every touch with a send whose window holds the visit gets it (once per touch): a visit
  may count for several touches.
- **Incrementality.** For each touch and each ad-hoc campaign (``sends.campaign``), the sends that went out
  (treated) against the ones held out (``held_out`` rows, same key scheme), each followed for the touch's
  window from its send, or, held out, from the claim of the run that would have sent it. The unit is one
  send: did the contact visit in the window (conversion), how many visits, how much revenue. Only sends whose
  window has closed by ``now`` count. Absolute lift in conversion rate with Newcombe's hybrid score
  interval (Newcombe 1998, method 10); relative lift (rate ratio - 1) with the log (Katz) interval; revenue
  per send, per currency, with Welch's t interval; all at 95%. Incremental conversions, visits and revenue
  are the lift per send times the treated sends. A group smaller than ``NURTURE_ATTRIBUTION_MIN_GROUP``
  sends shows why instead of a number.

Incentive cost assumes that the first visit credited (last touch) to a send with an offer redeemed it:
a percentage of that visit, the fixed amount, or the whole visit for a free service; points cost nothing
in money. Money stays in its own currency: nothing is converted.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, text
from sqlalchemy.orm import Session

from nurture.models import UTCDateTime
from nurture.programme import OfferKind, Programme
from nurture.settings import Settings

CONFIDENCE = 0.95
DAY_SECONDS = 86400
_MOST_RANGES = 4  # of contacts read at once, one per core, on SQLite


@dataclass(frozen=True)
class Windows:
    """How long after a send a visit is credited to it: per touch when its file says, else per channel."""

    email_days: float = 5.0
    sms_days: float = 1.0
    by_touch: Mapping[str, float] = field(default_factory=dict)
    channels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # each touch's channels

    @classmethod
    def of(cls, settings: Settings, programme: Programme | None) -> Windows:
        """Give the windows the settings and the programme's touches set."""
        touches = programme.touches if programme is not None else ()
        return cls(
            email_days=settings.attribution_email_days,
            sms_days=settings.attribution_sms_days,
            by_touch={t.name: t.attribution_days for t in touches if t.attribution_days is not None},
            channels={t.name: tuple(str(channel) for channel in t.channels) for t in touches},
        )

    def for_send(self, touch: str, channel: str | None) -> float:
        """Give the window of one send, in days."""
        if touch in self.by_touch:
            return self.by_touch[touch]
        return self.sms_days if channel == "sms" else self.email_days

    def for_touch(self, touch: str) -> float:
        """Give the window a touch's treated and held-out sends are both followed for: the longest it uses."""
        if touch in self.by_touch:
            return self.by_touch[touch]
        channels = self.channels.get(touch) or ("email", "sms")
        return max(self.for_send(touch, channel) for channel in channels)


@dataclass(frozen=True)
class RevenueLift:
    """Revenue per send in one currency: treated against held out."""

    currency: str
    treated_per_send: float
    held_out_per_send: float
    lift: float | None  # treated minus held out, per send
    low: float | None
    high: float | None
    incremental: float | None  # lift times the treated sends
    incentive_cost: float  # of the treated sends' redemptions in this currency
    return_on_incentive: float | None  # incremental revenue per unit of incentive cost


@dataclass(frozen=True)
class Incrementality:
    """A touch's (or campaign's) treated sends against its held-out ones over the same window."""

    window_days: float
    treated: int  # sends whose window has closed
    held_out: int
    treated_converted: int
    held_out_converted: int
    treated_visits: int
    held_out_visits: int
    open_windows: int  # sends left out because their window has not closed yet
    too_small: str | None  # why there is no number, when there is none
    treated_rate: float | None = None
    held_out_rate: float | None = None
    absolute_lift: float | None = None
    absolute_low: float | None = None
    absolute_high: float | None = None
    relative_lift: float | None = None
    relative_low: float | None = None
    relative_high: float | None = None
    significant: bool | None = None  # the absolute interval excludes zero
    incremental_conversions: float | None = None
    incremental_visits: float | None = None
    revenue: tuple[RevenueLift, ...] = ()


@dataclass(frozen=True)
class TouchAttribution:
    """What one touch, or one ad-hoc campaign, brought: credited visits and its lift over the holdout."""

    name: str
    touch: str
    campaign: str | None
    sent: int
    held_out: int
    last_touch_visits: int
    last_touch_revenue: dict[str, float]
    influenced_visits: int
    influenced_revenue: dict[str, float]
    incentive_cost: dict[str, float]
    lift: Incrementality

    def to_dict(self) -> dict[str, Any]:
        """Give the result as plain JSON values."""
        return asdict(self)


@dataclass(frozen=True)
class AttributionReport:
    """Attribution over the sends of a period: per touch, per campaign, and the totals."""

    since: dt.datetime | None
    until: dt.datetime | None
    now: dt.datetime
    email_days: float
    sms_days: float
    touches: tuple[TouchAttribution, ...]
    campaigns: tuple[TouchAttribution, ...]
    last_touch_visits: int  # visits credited to some send, each once
    last_touch_revenue: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """Give the report as plain JSON values."""
        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "now": self.now.isoformat(),
            "windows": {"email_days": self.email_days, "sms_days": self.sms_days},
            "confidence": CONFIDENCE,
            "last_touch_visits": self.last_touch_visits,
            "last_touch_revenue": self.last_touch_revenue,
            "touches": [t.to_dict() for t in self.touches],
            "campaigns": [c.to_dict() for c in self.campaigns],
        }

    def rows(self) -> list[dict[str, Any]]:
        """Give one flat row per touch and campaign, for tables (a Prefect table artifact, a chart)."""
        rows = []
        for result in (*self.touches, *self.campaigns):
            lift = result.lift
            rows.append(
                {
                    "touch": result.name if result.campaign is None else f"campaign {result.name}",
                    "sent": result.sent,
                    "held_out": result.held_out,
                    "last_touch_visits": result.last_touch_visits,
                    "last_touch_revenue": money(result.last_touch_revenue),
                    "influenced_visits": result.influenced_visits,
                    "window_days": lift.window_days,
                    "treated_rate": _round(lift.treated_rate),
                    "held_out_rate": _round(lift.held_out_rate),
                    "absolute_lift": _round(lift.absolute_lift),
                    "absolute_low": _round(lift.absolute_low),
                    "absolute_high": _round(lift.absolute_high),
                    "relative_lift": _round(lift.relative_lift),
                    "significant": lift.significant,
                    "incremental_visits": _round(lift.incremental_visits, 1),
                    "incremental_revenue": money(
                        {r.currency: r.incremental for r in lift.revenue if r.incremental is not None}
                    ),
                    "incentive_cost": money(result.incentive_cost),
                    "note": lift.too_small or "",
                }
            )
        return rows

    @property
    def period(self) -> str:
        """Give the days of the sends covered, both included: ``2026-10-01 to 2026-10-31``."""
        first = _day(self.since) if self.since is not None else "the first send"
        last = self.until - dt.timedelta(microseconds=1) if self.until is not None else self.now
        return f"{first} to {_day(last)}"

    def tables(self) -> list[Any]:
        """Give the report as rich renderables: lift over the holdout, credited visits, a footnote."""
        from rich.markup import escape
        from rich.table import Table
        from rich.text import Text

        results = [*self.touches, *self.campaigns]
        lift_table = Table(
            "touch", "window", "sent", "held out", "converted: sent", "held out", "lift (95% CI)", "relative",
            "incr. visits", "incr. revenue", "incentive cost",
            title=f"Lift over the holdout, sends of {self.period}",
        )  # fmt: skip
        credit_table = Table(
            "touch", "last-touch visits", "last-touch revenue", "influenced visits", "influenced revenue",
            title="Visits credited to the messages",
        )  # fmt: skip
        for result in results:
            lift = result.lift
            name = escape(result.name if result.campaign is None else f"campaign {result.name}")
            lift_table.add_row(
                name,
                f"{lift.window_days:g} d",
                f"{result.sent:,}",
                f"{result.held_out:,}",
                percent(lift.treated_rate),
                percent(lift.held_out_rate),
                escape(lift_text(lift)),
                escape(relative_text(lift)),
                _number(lift.incremental_visits),
                money({r.currency: r.incremental for r in lift.revenue}),
                money(result.incentive_cost),
            )
            credit_table.add_row(
                name,
                f"{result.last_touch_visits:,}",
                money(result.last_touch_revenue),
                f"{result.influenced_visits:,}",
                money(result.influenced_revenue),
            )
        note = Text(
            f"Windows: {self.email_days:g} days after an email, {self.sms_days:g} after an SMS, unless a"
            f" touch sets attribution_days. Visits credited by last touch: {self.last_touch_visits:,}"
            f" ({money(self.last_touch_revenue) or 'no revenue'}). * the interval excludes zero; sends whose"
            " window is still open wait."
        )
        return [lift_table, credit_table, note]

    def markdown(self) -> str:
        """Give the report as Markdown (the Prefect artifact)."""
        period = self.period
        lines = [
            f"# Attribution: {period}",
            "",
            f"Windows: {self.email_days:g} days after an email, {self.sms_days:g} after an SMS (unless a"
            f" touch sets its own). Visits credited by last touch: {self.last_touch_visits:,}"
            f" ({money(self.last_touch_revenue) or 'no revenue'}).",
            "",
            "## Lift over the holdout (95% intervals)",
            "",
            "| touch | sent | held out | converted, sent | converted, held out | lift | relative"
            " | incremental visits | incremental revenue | incentive cost |",
            "|---|---:|---:|---:|---:|---|---|---:|---|---|",
        ]
        for result in (*self.touches, *self.campaigns):
            lift = result.lift
            name = result.name if result.campaign is None else f"campaign {result.name}"
            if lift.too_small is not None:
                lines.append(
                    f"| {name} | {result.sent} | {result.held_out} | | | {lift.too_small} | | | |"
                    f" {money(result.incentive_cost)} |"
                )
                continue
            lines.append(
                f"| {name} | {result.sent} | {result.held_out} | {percent(lift.treated_rate)}"
                f" | {percent(lift.held_out_rate)} | {lift_text(lift)} | {relative_text(lift)}"
                f" | {_number(lift.incremental_visits)}"
                f" | {money({r.currency: r.incremental for r in lift.revenue if r.incremental is not None})}"
                f" | {money(result.incentive_cost)} |"
            )
        lines += [
            "",
            "## Credited visits",
            "",
            "| touch | last-touch visits | last-touch revenue | influenced visits | influenced revenue |",
            "|---|---:|---|---:|---|",
        ]
        for result in (*self.touches, *self.campaigns):
            name = result.name if result.campaign is None else f"campaign {result.name}"
            lines.append(
                f"| {name} | {result.last_touch_visits} | {money(result.last_touch_revenue)}"
                f" | {result.influenced_visits} | {money(result.influenced_revenue)} |"
            )
        return "\n".join(lines) + "\n"


def report(
    session: Session,
    settings: Settings,
    programme: Programme | None,
    *,
    now: dt.datetime,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> AttributionReport:
    """Attribute the visits after the sends made in [since, until) and measure each touch's lift as of now.

    The windows come from the settings and the programme's touches (``attribution_days``), and so do the
    offers whose incentive cost is counted. Without a programme, every send has its channel's window.
    """
    return attribute(
        session,
        Windows.of(settings, programme),
        now=now,
        since=since,
        until=until,
        offers=offer_kinds(programme) if programme is not None else {},
        min_group=settings.attribution_min_group,
    )


def attribute(
    session: Session,
    windows: Windows,
    *,
    now: dt.datetime,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    offers: Mapping[str, OfferKind] | None = None,
    min_group: int = 30,
) -> AttributionReport:
    """Attribute with the given windows; ``offers`` gives each touch's kind of offer, for its cost."""
    dialect = session.get_bind().dialect.name
    bounds = _Bounds(since, until, now)
    exposures, outcomes, credits = _visits_after(session, dialect, windows, bounds, offers or {})

    def build(key: tuple[str, str | None], name: str) -> TouchAttribution:
        touch, campaign = key
        counts = exposures.get(key, {})
        lift = _incrementality(
            windows.for_touch(touch), counts, outcomes.get(key, _Outcomes()), credits.cost(key), min_group
        )
        return TouchAttribution(
            name=name,
            touch=touch,
            campaign=campaign,
            sent=counts.get("sent", _Counts()).all,
            held_out=counts.get("held_out", _Counts()).all,
            last_touch_visits=credits.last_visits.get(key, 0),
            last_touch_revenue=_floats(credits.last_revenue.get(key, {})),
            influenced_visits=credits.influenced_visits.get(key, 0),
            influenced_revenue=_floats(credits.influenced_revenue.get(key, {})),
            incentive_cost=_floats(credits.cost(key)),
            lift=lift,
        )

    keys = set(exposures) | set(credits.last_visits) | set(credits.influenced_visits)
    touches = sorted({touch for touch, campaign in keys if campaign is None})
    campaigns = sorted({(touch, campaign) for touch, campaign in keys if campaign is not None})
    total_revenue: dict[str, Decimal] = defaultdict(Decimal)
    for key, revenue in credits.last_revenue.items():
        if key[1] is None:
            for currency, amount in revenue.items():
                total_revenue[currency] += amount
    return AttributionReport(
        since=since,
        until=until,
        now=now,
        email_days=windows.email_days,
        sms_days=windows.sms_days,
        touches=tuple(build((touch, None), touch) for touch in touches),
        campaigns=tuple(build(key, str(key[1])) for key in campaigns),
        last_touch_visits=sum(v for (_, campaign), v in credits.last_visits.items() if campaign is None),
        last_touch_revenue=_floats(total_revenue),
    )


def report_for(
    settings: Settings,
    *,
    now: dt.datetime,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> AttributionReport:
    """Report on the configured database with the configured programme: the entry point of the flows."""
    from nurture import db
    from nurture.programme import load_programme

    programme = load_programme(settings.templates_dir)
    engine = db.connect(settings)
    try:
        with db.session_factory(engine)() as session:
            return report(session, settings, programme, now=now, since=since, until=until)
    finally:
        engine.dispose()


def offer_kinds(programme: Programme) -> dict[str, OfferKind]:
    """Give the kind of offer of each touch that has one."""
    return {touch.name: touch.offer.kind for touch in programme.touches if touch.offer is not None}


# SQL ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bounds:
    since: dt.datetime | None
    until: dt.datetime | None
    now: dt.datetime

    def where(self, column: str) -> str:
        clauses = [f"{column} <= :now"]  # as of now: a replay ignores what was sent after it
        if self.since is not None:
            clauses.append(f"{column} >= :since")
        if self.until is not None:
            clauses.append(f"{column} < :until")
        return " AND ".join(clauses)

    def params(self) -> dict[str, Any]:
        return {"since": self.since, "until": self.until, "now": self.now}


def _bind(sql: str, parameters: Mapping[str, Any]) -> Any:
    statement = text(sql)
    binds = [
        bindparam(name, value, type_=UTCDateTime())
        if isinstance(value, dt.datetime)
        else bindparam(name, value)
        for name, value in parameters.items()
        if f":{name}" in sql
    ]
    return statement.bindparams(*binds)


def _window_end(dialect: str, at: str, seconds: str) -> str:
    """SQL for the instant ``seconds`` after ``at``, in the form the dialect stores instants in."""
    if dialect == "sqlite":
        # Stored as 'YYYY-MM-DD HH:MM:SS.ffffff' text: datetime() drops the fraction, which is put back.
        return f"(datetime({at}, '+' || {seconds} || ' seconds') || substr({at}, 20))"
    return f"({at} + {seconds} * interval '1 second')"


def _cases(column: str, mapping: Mapping[str, int], otherwise: str, parameters: dict[str, Any]) -> str:
    """SQL CASE giving each touch's seconds; touch names are bound, never spliced in."""
    if not mapping:
        return otherwise
    arms = []
    for number, (touch, seconds) in enumerate(sorted(mapping.items())):
        parameters[f"touch_{number}"] = touch
        arms.append(f"WHEN :touch_{number} THEN {int(seconds)}")
    return f"(CASE {column} {' '.join(arms)} ELSE {otherwise} END)"


def _seconds(days: float) -> int:
    return round(days * DAY_SECONDS)


def _send_window_sql(windows: Windows, parameters: dict[str, Any]) -> str:
    sms, email = _seconds(windows.sms_days), _seconds(windows.email_days)
    by_channel = f"(CASE WHEN channel = 'sms' THEN {sms} ELSE {email} END)"
    return _cases("touch", {t: _seconds(d) for t, d in windows.by_touch.items()}, by_channel, parameters)


def _touch_window_sql(windows: Windows, parameters: dict[str, Any]) -> str:
    touches = set(windows.channels) | set(windows.by_touch)
    longest = _seconds(max(windows.email_days, windows.sms_days))
    return _cases("touch", {t: _seconds(windows.for_touch(t)) for t in touches}, str(longest), parameters)


@dataclass
class _Counts:
    all: int = 0
    closed: int = 0


def _closed_sql(windows: Windows, bounds: _Bounds, parameters: dict[str, Any]) -> str:
    """SQL telling whether a send's window (its touch's) has closed by now: its instant is before a cutoff.

    The cutoffs are worked out here, once per touch, rather than in SQL once per row.
    """
    touches = sorted(set(windows.channels) | set(windows.by_touch))
    arms = []
    for number, touch in enumerate(touches):
        parameters[f"closed_touch_{number}"] = touch
        parameters[f"cutoff_{number}"] = bounds.now - dt.timedelta(days=windows.for_touch(touch))
        arms.append(f"WHEN :closed_touch_{number} THEN :cutoff_{number}")
    parameters["cutoff"] = bounds.now - dt.timedelta(days=max(windows.email_days, windows.sms_days))
    cutoff = f"(CASE touch {' '.join(arms)} ELSE :cutoff END)" if arms else ":cutoff"
    return f"CASE WHEN {_AT} <= {cutoff} THEN 1 ELSE 0 END"


_AT = "(CASE WHEN status = 'sent' THEN sent_at ELSE claimed_at END)"


@dataclass
class _Group:
    converted: int = 0
    visits: int = 0
    revenue: dict[str, tuple[Decimal, Decimal]] = field(
        default_factory=dict
    )  # currency: (sum, sum of squares)


@dataclass
class _Outcomes:
    by_status: dict[str, _Group] = field(default_factory=dict)

    def group(self, status: str) -> _Group:
        return self.by_status.setdefault(status, _Group())


@dataclass
class _Credits:
    last_visits: dict[tuple[str, str | None], int] = field(default_factory=lambda: defaultdict(int))
    last_revenue: dict[tuple[str, str | None], dict[str, Decimal]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Decimal))
    )
    influenced_visits: dict[tuple[str, str | None], int] = field(default_factory=lambda: defaultdict(int))
    influenced_revenue: dict[tuple[str, str | None], dict[str, Decimal]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Decimal))
    )
    costs: dict[tuple[str, str | None], dict[str, Decimal]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Decimal))
    )

    def cost(self, key: tuple[str, str | None]) -> dict[str, Decimal]:
        return dict(self.costs.get(key, {}))


def _visits_after(
    session: Session, dialect: str, windows: Windows, bounds: _Bounds, offers: Mapping[str, OfferKind]
) -> tuple[
    dict[tuple[str, str | None], dict[str, _Counts]], dict[tuple[str, str | None], _Outcomes], _Credits
]:
    """Count the sends of the period, follow each to the visits after it once, and sum those up.

    For the lift: what the contacts did in each closed window of the touch, sent and held out alike: who
    visited, how often, how much they spent. For the credits: each visit in a sent message's own window goes
    to the latest such message (last touch), and to every touch with one (influenced); the first visit
    credited to a message with an offer redeemed it.
    """
    parameters = bounds.params()
    touch_seconds = _touch_window_sql(windows, parameters)
    send_seconds = _send_window_sql(windows, parameters)
    reach = f"{'max' if dialect == 'sqlite' else 'GREATEST'}(e.touch_seconds, e.send_seconds)"
    longest = max([windows.email_days, windows.sms_days, *windows.by_touch.values()])
    parameters["visits_until"] = min(bounds.until or bounds.now, bounds.now) + dt.timedelta(days=longest)
    # SQLite: the sends in the visits' order, from the index led by the contact (whatever the period), and
    # each probe bounded by whole days, cheap to work out; the exact end (a unary + keeps it off the index)
    # is worked out for the few visits that fall within those days.
    if dialect == "sqlite":
        indexed, plus = "INDEXED BY ix_sends_by_contact", "+"
        days = f"AND v.occurred_at < date(e.at, '+{math.ceil(longest) + 1} days')"
    else:
        indexed = plus = days = ""
    after = f"AND {plus}v.occurred_at > :since" if bounds.since is not None else ""
    sends = f"""
        SELECT id, contact_id, touch, campaign, status, incentive, {_AT} AS at,
               {_closed_sql(windows, bounds, parameters)} AS closed,
               {touch_seconds} AS touch_seconds,
               CASE WHEN status = 'sent' THEN {send_seconds} ELSE 0 END AS send_seconds
        FROM sends {indexed}
        WHERE status IN ('sent', 'held_out') AND {_AT} IS NOT NULL AND {bounds.where("claimed_at")}
          AND contact_id BETWEEN :first_contact AND :last_contact
    """
    sql = f"""
        -- Not materialized: SQLite would first copy every send of the period into a temporary table.
        WITH e AS NOT MATERIALIZED ({sends}),
        -- Each send's contact's visits in its longest window, read from the visits' covering index by
        -- (contact, instant): SQLite is made to probe it per send (CROSS JOIN keeps the sends outside).
        pairs AS MATERIALIZED (
            SELECT e.id AS send_id, e.touch, e.campaign, e.status, e.incentive, e.at, e.closed,
                   e.touch_seconds, e.send_seconds, v.id AS visit_id, v.occurred_at, v.amount, v.currency
            FROM e CROSS JOIN visits v
            WHERE v.contact_id = e.contact_id AND v.occurred_at > e.at {days}
              AND {plus}v.occurred_at <= {_window_end(dialect, "e.at", reach)}
              AND {plus}v.occurred_at <= :visits_until {after}
        ),
        hits AS (
            SELECT send_id, touch, campaign, status, currency, COUNT(*) AS visits, SUM(amount) AS revenue
            FROM pairs
            WHERE closed = 1 AND occurred_at <= {_window_end(dialect, "at", "touch_seconds")}
            GROUP BY send_id, touch, campaign, status, currency
        ),
        ranked AS (
            SELECT send_id, touch, campaign, incentive, visit_id, occurred_at, amount, currency,
                   ROW_NUMBER() OVER (PARTITION BY visit_id ORDER BY at DESC, send_id DESC) AS latest
            FROM pairs
            WHERE status = 'sent' AND occurred_at <= {_window_end(dialect, "at", "send_seconds")}
        ),
        -- The first visit credited to each send with an offer: numbered only where there is an offer, so
        -- that the other credited visits are not sorted by send for nothing.
        redeeming AS (
            SELECT touch, campaign, incentive, amount, currency,
                   ROW_NUMBER() OVER (PARTITION BY send_id ORDER BY occurred_at, visit_id) AS nth
            FROM ranked WHERE latest = 1 AND incentive IS NOT NULL
        ),
        influenced AS (
            SELECT DISTINCT touch, visit_id, amount, currency FROM ranked
        ),
        influenced_in_campaign AS (
            SELECT DISTINCT touch, campaign, visit_id, amount, currency FROM ranked WHERE campaign IS NOT NULL
        )
        SELECT 'converted', touch, campaign, status, NULL, COUNT(DISTINCT send_id), NULL, NULL, NULL
        FROM hits GROUP BY touch, campaign, status
        UNION ALL
        SELECT 'revenue', touch, campaign, status, currency, COUNT(*), SUM(visits), SUM(revenue),
               SUM(revenue * revenue)
        FROM hits GROUP BY touch, campaign, status, currency
        UNION ALL
        SELECT 'last', touch, campaign, NULL, currency, COUNT(*), SUM(amount), NULL, NULL
        FROM ranked WHERE latest = 1 GROUP BY touch, campaign, currency
        UNION ALL
        SELECT 'redeemed', touch, campaign, NULL, currency, COUNT(*), SUM(amount), SUM(amount * incentive),
               SUM(incentive)
        FROM redeeming WHERE nth = 1 GROUP BY touch, campaign, currency
        UNION ALL
        SELECT 'influenced', touch, NULL, NULL, currency, COUNT(*), SUM(amount), NULL, NULL
        FROM influenced GROUP BY touch, currency
        UNION ALL
        SELECT 'influenced', touch, campaign, NULL, currency, COUNT(*), SUM(amount), NULL, NULL
        FROM influenced_in_campaign GROUP BY touch, campaign, currency
    """

    def contacts(connection: Connection, first: int, last: int) -> list[Any]:
        bounded = {**parameters, "first_contact": first, "last_contact": last}
        counted = _sends_counted(connection, dialect, sends, bounded)
        return [*counted, *connection.execute(_bind(sql, bounded))]

    exposures: dict[tuple[str, str | None], dict[str, _Counts]] = defaultdict(dict)
    outcomes: dict[tuple[str, str | None], _Outcomes] = defaultdict(_Outcomes)
    credits = _Credits()
    rows = _by_contact_ranges(session, dialect, contacts)
    for kind, touch, campaign, status, currency, n, first, second, third in rows:
        if kind == "sends":
            for key in {(touch, None), (touch, campaign)}:
                counts = exposures[key].setdefault(status, _Counts())
                counts.all += n
                counts.closed += int(first or 0)
            continue
        if kind == "influenced":
            # A visit counts once per touch, and once per campaign: the SQL counted each level apart.
            credits.influenced_visits[(touch, campaign)] += n
            credits.influenced_revenue[(touch, campaign)][currency] += _decimal(first)
            continue
        for key in {(touch, None), (touch, campaign)}:
            if kind == "converted":
                outcomes[key].group(status).converted += n
            elif kind == "revenue":
                group = outcomes[key].group(status)
                group.visits += int(first)
                total, squares = group.revenue.get(currency, (Decimal(0), Decimal(0)))
                group.revenue[currency] = (total + _decimal(second), squares + _decimal(third))
            elif kind == "last":
                credits.last_visits[key] += n
                credits.last_revenue[key][currency] += _decimal(first)
            else:
                credits.costs[key][currency] += _cost(
                    offers.get(touch), _decimal(first), _decimal(second), _decimal(third)
                )
    return dict(exposures), dict(outcomes), credits


def _sends_counted(
    connection: Connection, dialect: str, sends: str, parameters: Mapping[str, Any]
) -> list[Any]:
    """Count the sends per touch, campaign and status: all of them, and those whose window has closed."""
    if dialect != "sqlite":
        counted = f"""
            SELECT 'sends', touch, campaign, status, NULL, COUNT(*), SUM(closed), NULL, NULL
            FROM ({sends}) AS e GROUP BY touch, campaign, status
        """
        return list(connection.execute(_bind(counted, parameters)))
    # SQLite would sort every send to group them (most of the time the count took); adding each to its
    # group's row in a small table as it comes reads them once. The key cannot hold a NULL campaign.
    connection.execute(text("DROP TABLE IF EXISTS temp.attribution_sends"))
    connection.execute(
        text(
            "CREATE TEMPORARY TABLE attribution_sends (touch TEXT NOT NULL, in_campaign INTEGER NOT NULL,"
            " campaign TEXT NOT NULL, status TEXT NOT NULL, sends INTEGER NOT NULL, closed INTEGER NOT NULL,"
            " PRIMARY KEY (touch, in_campaign, campaign, status)) WITHOUT ROWID"
        )
    )
    connection.execute(
        _bind(
            f"""
            INSERT INTO attribution_sends
            SELECT touch, campaign IS NOT NULL, coalesce(campaign, ''), status, 1, closed
            FROM ({sends}) AS e WHERE true
            ON CONFLICT (touch, in_campaign, campaign, status)
            DO UPDATE SET sends = sends + 1, closed = closed + excluded.closed
            """,
            parameters,
        )
    )
    rows = list(
        connection.execute(
            text(
                "SELECT 'sends', touch, CASE WHEN in_campaign THEN campaign END, status, NULL, sends, closed,"
                " NULL, NULL FROM attribution_sends"
            )
        )
    )
    connection.execute(text("DROP TABLE attribution_sends"))
    return rows


def _by_contact_ranges(
    session: Session, dialect: str, work: Callable[[Connection, int, int], list[Any]]
) -> list[Any]:
    """Run ``work`` over the contacts with sends, in ranges of contact ids, and give all their rows.

    Every sum the report makes is a sum over contacts (a send and the visits it is followed to belong to one
    contact), so the ranges' rows add up. A SQLite file is read in one range per core, each on a connection
    of its own in a thread (sqlite3 lets go of the GIL while a statement runs), unless the session holds
    writes the other connections could not see; PostgreSQL reads with parallel workers by itself.
    """
    first, last = session.execute(
        text("SELECT (SELECT MIN(contact_id) FROM sends), (SELECT MAX(contact_id) FROM sends)")
    ).one()
    if first is None:
        return []
    bind = session.get_bind()
    parts = min(os.cpu_count() or 1, _MOST_RANGES)
    if dialect != "sqlite" or parts < 2 or not isinstance(bind, Engine) or not _reads_apart(session, bind):
        return work(session.connection(), first, last)
    step = -(-(last - first + 1) // parts)
    ranges = [(low, min(low + step - 1, last)) for low in range(first, last + 1, step)]

    def on_own_connection(bounds: tuple[int, int]) -> list[Any]:
        with bind.connect() as connection:
            return work(connection, *bounds)

    with ThreadPoolExecutor(len(ranges)) as pool:
        return [row for rows in pool.map(on_own_connection, ranges) for row in rows]


def _reads_apart(session: Session, engine: Engine) -> bool:
    """Tell whether other connections to the engine's SQLite database see what the session sees."""
    database = engine.url.database
    if not database or database == ":memory:" or "mode=memory" in str(engine.url):
        return False
    return not session.connection().connection.dbapi_connection.in_transaction  # type: ignore[union-attr]


def _decimal(value: Any) -> Decimal:
    """Give a sum from SQL as a Decimal: PostgreSQL gives Decimals, SQLite integers or floats."""
    if value is None:
        return Decimal(0)
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _cost(kind: OfferKind | None, amount: Decimal, amount_x_value: Decimal, value: Decimal) -> Decimal:
    """Give what redemptions of an offer cost, from the sums of their visits' amounts and offer values."""
    if kind is OfferKind.PERCENT:
        return amount_x_value / 100
    if kind is OfferKind.AMOUNT:
        return value
    if kind is OfferKind.FREE_SERVICE:
        return amount
    return Decimal(0)


# Statistics ---------------------------------------------------------------------------------------------


def _incrementality(
    window_days: float,
    counts: Mapping[str, _Counts],
    outcomes: _Outcomes,
    costs: Mapping[str, Decimal],
    min_group: int,
) -> Incrementality:
    """Compare the treated sends with the held-out ones: conversion, visits and revenue per send."""
    treated = counts.get("sent", _Counts())
    held = counts.get("held_out", _Counts())
    t, c = outcomes.group("sent"), outcomes.group("held_out")
    n_t, n_c = treated.closed, held.closed
    base = Incrementality(
        window_days=window_days,
        treated=n_t,
        held_out=n_c,
        treated_converted=t.converted,
        held_out_converted=c.converted,
        treated_visits=t.visits,
        held_out_visits=c.visits,
        open_windows=(treated.all - n_t) + (held.all - n_c),
        too_small=None,
    )
    if n_t < min_group or n_c < min_group:
        return replace(
            base,
            too_small=f"too small: {n_t} sent and {n_c} held out, {min_group} each needed",
        )
    p_t, p_c = t.converted / n_t, c.converted / n_c
    low, high = _difference_interval(t.converted, n_t, c.converted, n_c)
    relative = relative_low = relative_high = None
    if c.converted > 0:
        relative = p_t / p_c - 1
        if t.converted > 0:
            ratio_low, ratio_high = _ratio_interval(t.converted, n_t, c.converted, n_c)
            relative_low, relative_high = ratio_low - 1, ratio_high - 1
    revenue = []
    for currency in sorted(set(t.revenue) | set(c.revenue) | set(costs)):
        revenue.append(
            _revenue_lift(currency, t.revenue.get(currency), n_t, c.revenue.get(currency), n_c, costs)
        )
    return replace(
        base,
        treated_rate=p_t,
        held_out_rate=p_c,
        absolute_lift=p_t - p_c,
        absolute_low=low,
        absolute_high=high,
        relative_lift=relative,
        relative_low=relative_low,
        relative_high=relative_high,
        significant=not (low <= 0 <= high),
        incremental_conversions=(p_t - p_c) * n_t,
        incremental_visits=(t.visits / n_t - c.visits / n_c) * n_t,
        revenue=tuple(revenue),
    )


def _difference_interval(x_t: int, n_t: int, x_c: int, n_c: int) -> tuple[float, float]:
    """Newcombe's hybrid score interval for the difference of two proportions."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    low, high = confint_proportions_2indep(
        x_t, n_t, x_c, n_c, method="newcomb", compare="diff", alpha=1 - CONFIDENCE
    )
    return float(low), float(high)


def _ratio_interval(x_t: int, n_t: int, x_c: int, n_c: int) -> tuple[float, float]:
    """The log (Katz) interval for the ratio of two proportions."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    low, high = confint_proportions_2indep(
        x_t, n_t, x_c, n_c, method="log", compare="ratio", alpha=1 - CONFIDENCE
    )
    return float(low), float(high)


def _revenue_lift(
    currency: str,
    treated: tuple[Decimal, Decimal] | None,
    n_t: int,
    held: tuple[Decimal, Decimal] | None,
    n_c: int,
    costs: Mapping[str, Decimal],
) -> RevenueLift:
    """Welch's interval for the difference in mean revenue per send, from the groups' sums and squares."""
    mean_t, var_t = _moments(treated, n_t)
    mean_c, var_c = _moments(held, n_c)
    lift = mean_t - mean_c
    low = high = None
    se2_t, se2_c = var_t / n_t, var_c / n_c
    if se2_t + se2_c > 0:
        from scipy.stats import t as student

        df = (se2_t + se2_c) ** 2 / (se2_t**2 / (n_t - 1) + se2_c**2 / (n_c - 1))
        half = float(student.ppf(1 - (1 - CONFIDENCE) / 2, df)) * math.sqrt(se2_t + se2_c)
        low, high = lift - half, lift + half
    cost = float(costs.get(currency, Decimal(0)))
    incremental = lift * n_t
    return RevenueLift(
        currency=currency,
        treated_per_send=mean_t,
        held_out_per_send=mean_c,
        lift=lift,
        low=low,
        high=high,
        incremental=incremental,
        incentive_cost=cost,
        return_on_incentive=incremental / cost if cost > 0 else None,
    )


def _moments(sums: tuple[Decimal, Decimal] | None, n: int) -> tuple[float, float]:
    """Mean and sample variance of revenue per send, sends without a visit counting as zero."""
    total, squares = (float(sums[0]), float(sums[1])) if sums is not None else (0.0, 0.0)
    mean = total / n
    variance = max(0.0, (squares - n * mean * mean) / (n - 1))
    return mean, variance


# Presentation --------------------------------------------------------------------------------------------


def _floats(amounts: Mapping[str, Decimal]) -> dict[str, float]:
    return {currency: float(round(amount, 2)) for currency, amount in sorted(amounts.items())}


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _day(instant: dt.datetime | None) -> str:
    return instant.date().isoformat() if instant is not None else "…"


def money(amounts: Mapping[str, float | None]) -> str:
    """Give amounts by currency as one short text: ``EUR 1,234.50, BRL 80.00``."""
    return ", ".join(
        f"{currency} {amount:,.2f}" for currency, amount in sorted(amounts.items()) if amount is not None
    )


def percent(value: float | None) -> str:
    """Give a share as a percentage with one decimal."""
    return "" if value is None else f"{100 * value:.1f}%"


def lift_text(lift: Incrementality) -> str:
    """Give the absolute lift with its interval, in percentage points."""
    if lift.absolute_lift is None or lift.absolute_low is None or lift.absolute_high is None:
        return lift.too_small or ""
    mark = " *" if lift.significant else ""
    low, high = 100 * lift.absolute_low, 100 * lift.absolute_high
    return f"{100 * lift.absolute_lift:+.1f} pp [{low:+.1f}, {high:+.1f}]{mark}"


def relative_text(lift: Incrementality) -> str:
    """Give the relative lift with its interval."""
    if lift.relative_lift is None:
        return ""
    if lift.relative_low is None or lift.relative_high is None:
        return f"{100 * lift.relative_lift:+.0f}%"
    low, high = 100 * lift.relative_low, 100 * lift.relative_high
    return f"{100 * lift.relative_lift:+.0f}% [{low:+.0f}%, {high:+.0f}%]"


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:,.1f}"
