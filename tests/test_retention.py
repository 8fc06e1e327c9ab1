"""Retention figures on small businesses whose answers are worked out by hand."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from decimal import Decimal

import pytest
from sqlalchemy.orm import Session, sessionmaker
from tests.histories import Business
from typer.testing import CliRunner

from nurture import profiles, retention
from nurture.cli import app
from nurture.models import Channel, FeedbackKind, Send, SendCategory, SendStatus, Visit
from nurture.programme import OfferKind
from nurture.settings import Settings

# The first quarter of 2026, month by month; December 2025 is the base of January's retention.
WINDOW = retention.Window.of(dt.date(2026, 3, 31), dt.date(2026, 1, 1))
COSTS = retention.Costs(currency="EUR")


def day(year: int, month: int, date: int) -> dt.datetime:
    return dt.datetime(year, month, date, 12, tzinfo=dt.UTC)


def figures(
    sessions: sessionmaker[Session],
    costs: retention.Costs = COSTS,
    *,
    aside: int = 0,
    **options: object,
) -> retention.Report:
    """The report of ``WINDOW``, with ``aside`` more sessions summing the sends and rhythms up in threads."""
    with contextlib.ExitStack() as stack:
        session, *others = (stack.enter_context(sessions()) for _ in range(1 + aside))
        return retention.report(session, WINDOW, costs, OFFERS, aside=others, **options)  # type: ignore[arg-type]


# On one session; with one more (the sends, then the rhythms, on it); three more (the sends in three parts).
ASIDE = pytest.mark.parametrize("aside", [0, 1, 3], ids=["one session", "two sessions", "four sessions"])


OFFERS = {
    "incentive": OfferKind.PERCENT,
    "voucher": OfferKind.AMOUNT,
    "treat": OfferKind.FREE_SERVICE,
    "points": OfferKind.POINTS,
}


def five_customers(business: Business) -> dict[str, int]:
    """A came every month; B skipped January; C came once; D in January and February; E new in March."""
    return {
        "A": business.contact(
            visits=[day(2025, 12, 5), day(2026, 1, 10), day(2026, 2, 10), day(2026, 3, 10)]
        ),
        "B": business.contact(visits=[day(2025, 12, 20), day(2026, 2, 15)]),
        "C": business.contact(visits=[day(2026, 1, 20)]),
        "D": business.contact(visits=[day(2026, 1, 5), day(2026, 2, 25)]),
        "E": business.contact(visits=[day(2026, 3, 3)]),
    }


def test_retention_and_churn_per_month(sessions: sessionmaker[Session]) -> None:
    five_customers(Business(sessions))
    report = figures(sessions)
    rows = [(p.period, p.active, p.new, p.base, p.retained) for p in report.periods]
    assert rows == [
        ("2026-01", 3, 2, 2, 1),  # A, C, D came; C and D new; of December's A and B, A came again
        ("2026-02", 3, 0, 3, 2),  # A, B, D; of January's A, C, D: A and D
        ("2026-03", 2, 1, 3, 1),  # A, E; of February's A, B, D: A
    ]
    assert [p.retention_rate for p in report.periods] == pytest.approx([1 / 2, 2 / 3, 1 / 3])
    assert [p.churn_rate for p in report.periods] == pytest.approx([1 / 2, 1 / 3, 2 / 3])
    assert report.churn_rate_per_period == pytest.approx(1 - 4 / 8)
    assert not any(p.partial for p in report.periods)
    assert (report.customers, report.new_customers, report.retained_customers) == (5, 3, 3)
    assert (report.repeat_customers, report.repeat_visit_rate) == (2, pytest.approx(2 / 5))


def test_cohorts_count_who_came_back_in_each_later_month(sessions: sessionmaker[Session]) -> None:
    five_customers(Business(sessions))
    cohorts = {c.cohort: (c.customers, c.active) for c in figures(sessions).cohorts}
    assert cohorts == {"2026-01": (2, [2, 1, 0]), "2026-02": (0, [0, 0]), "2026-03": (1, [1])}


def test_a_customer_counts_once_a_month_whatever_they_paid_in_and_however_long_ago_they_first_came(
    sessions: sessionmaker[Session],
) -> None:
    business = Business(sessions)
    # H first came in June 2025, long before the report, then in February: not new, and retained.
    business.contact(visits=[day(2025, 6, 1), day(2026, 2, 10)])
    # I came new in January and paid in euros and in reais, then in February in reais.
    i = business.contact(visits=[day(2026, 1, 10)])
    with sessions.begin() as session:
        for n, moment in enumerate([day(2026, 1, 20), day(2026, 2, 5)]):
            session.add(
                Visit(
                    external_id=f"brl-{n}",
                    contact_id=i,
                    occurred_at=moment,
                    amount=Decimal("200.00"),
                    currency="BRL",
                    created_at=moment,
                )
            )
    report = figures(sessions)
    rows = [(p.period, p.active, p.new, p.base, p.retained) for p in report.periods]
    assert rows == [
        ("2026-01", 1, 1, 0, 0),  # I, new; nobody came in December
        ("2026-02", 2, 0, 1, 1),  # H and I; of January's I: I
        ("2026-03", 0, 0, 2, 0),
    ]
    cohorts = {c.cohort: (c.customers, c.active) for c in report.cohorts}
    assert cohorts == {"2026-01": (1, [1, 1, 0]), "2026-02": (0, [0, 0]), "2026-03": (0, [0])}
    assert (report.customers, report.new_customers, report.retained_customers) == (2, 1, 2)
    assert [(m.currency, m.customers, m.visits) for m in report.money] == [("EUR", 2, 2), ("BRL", 1, 2)]


def test_weeks_and_a_partial_last_period(sessions: sessionmaker[Session]) -> None:
    business = Business(sessions)
    # Monday 2 March 2026 starts a week; the report stops on Wednesday 11 March, in the middle of the next.
    business.contact(visits=[day(2026, 2, 24), day(2026, 3, 3), day(2026, 3, 10)])
    business.contact(visits=[day(2026, 3, 4)])
    window = retention.Window.of(dt.date(2026, 3, 11), dt.date(2026, 3, 2), retention.Period.WEEK)
    with sessions() as session:
        report = retention.report(session, window, COSTS, OFFERS)
    assert [(p.period, p.start, p.active, p.base, p.retained, p.partial) for p in report.periods] == [
        ("2026-W10", dt.date(2026, 3, 2), 2, 1, 1, False),
        ("2026-W11", dt.date(2026, 3, 9), 1, 2, 1, True),
    ]


@ASIDE
def test_lifetime_value_from_spend_frequency_and_yearly_churn(
    sessions: sessionmaker[Session], aside: int
) -> None:
    business = Business(sessions)
    five_customers(business)
    # The year before last (to 1 Apr 2025): F and G came; in the last year only G came again.
    business.contact(visits=[day(2025, 3, 10)])
    business.contact(visits=[day(2025, 2, 1), day(2025, 6, 1)])
    report = figures(sessions, retention.Costs(currency="EUR", margin_rate=Decimal("0.5")), aside=aside)
    assert report.churn_rate_per_year == pytest.approx(0.5)
    assert report.expected_lifetime_years == pytest.approx(2.0)
    (eur,) = report.money
    assert (eur.currency, eur.customers, eur.visits, eur.revenue) == ("EUR", 5, 8, Decimal("320.00"))
    assert (eur.revenue_per_customer, eur.revenue_per_visit) == (Decimal("64.00"), Decimal("40.00"))
    visits_a_year = 8 / 5 / (90 / 365.25)  # the window is 1 Jan to 31 Mar: 90 days
    assert eur.visits_per_customer_per_year == pytest.approx(visits_a_year)
    expected = Decimal(0.5 * 40 * visits_a_year * 2).quantize(Decimal("0.01"))
    assert eur.lifetime_value == expected


def send(
    session: Session,
    contact_id: int,
    touch: str,
    at: dt.datetime,
    *,
    channel: Channel = Channel.EMAIL,
    status: SendStatus = SendStatus.SENT,
    incentive: str | None = None,
    segments: int | None = None,
) -> None:
    session.add(
        Send(
            key=f"{touch}:{contact_id}:{at.isoformat()}",
            contact_id=contact_id,
            touch=touch,
            occurrence=at.isoformat(),
            category=SendCategory.MARKETING,
            status=status,
            channel=channel,
            segments=segments,
            incentive=None if incentive is None else Decimal(incentive),
            due_at=at,
            claimed_at=at,
            sent_at=at if status is SendStatus.SENT else None,
        )
    )


@ASIDE
def test_cost_of_retention_per_retained_customer(
    sessions: sessionmaker[Session], settings: Settings, aside: int
) -> None:
    ids = five_customers(Business(sessions))
    with sessions.begin() as session:
        profiles.refresh(session, settings, day(2026, 4, 1))  # everyone's average visit: 40.00
        send(session, ids["A"], "incentive", day(2026, 1, 2), incentive="20")  # 20% of 40: 8.00
        send(session, ids["B"], "voucher", day(2026, 2, 2), incentive="5")  # 5.00
        send(
            session, ids["D"], "treat", day(2026, 2, 3), channel=Channel.SMS, incentive="1", segments=2
        )  # 40
        send(session, ids["C"], "points", day(2026, 2, 4), incentive="100")  # points cost no money
        send(session, ids["E"], "welcome", day(2026, 3, 4))
        # Not counted: held out (never sent), or sent before the window.
        send(session, ids["C"], "incentive", day(2026, 2, 5), status=SendStatus.HELD_OUT, incentive="20")
        send(session, ids["B"], "voucher", day(2025, 12, 24), incentive="5")
    costs = retention.Costs(
        currency="EUR", email=Decimal("0.01"), sms_segment=Decimal("0.05"), acquisition=Decimal("30")
    )
    report = figures(sessions, costs, aside=aside)
    assert report.messages == {"email": 4, "sms": 1, "sms_segments": 2}
    (eur,) = report.money
    assert eur.incentive_cost == Decimal("53.00")
    assert eur.message_cost == Decimal("0.14")  # 4 emails at 0.01 and 2 segments at 0.05
    assert eur.retained_customers == 3  # A and B came before the window, D twice within it
    assert eur.retention_cost_per_retained == Decimal("17.71")  # 53.14 / 3
    assert eur.acquisition_cost == Decimal("30")
    assert eur.retention_to_acquisition == pytest.approx(17.71 / 30)


def test_cancellation_requests_saved_and_satisfaction(sessions: sessionmaker[Session]) -> None:
    business = Business(sessions)
    ids = five_customers(business)
    business.feedback(ids["C"], day(2026, 1, 21), FeedbackKind.CANCEL_REQUEST)  # never came again
    business.feedback(ids["D"], day(2026, 1, 6), FeedbackKind.CANCEL_REQUEST)  # came on 25 February
    business.feedback(ids["B"], day(2025, 11, 1), FeedbackKind.CANCEL_REQUEST)  # before the window
    business.feedback(ids["A"], day(2026, 1, 11), FeedbackKind.NPS, 10)
    business.feedback(ids["A"], day(2026, 3, 11), FeedbackKind.NPS, 5)  # the latest answer counts
    business.feedback(ids["B"], day(2026, 2, 16), FeedbackKind.NPS, 9)
    business.feedback(ids["E"], day(2026, 3, 4), FeedbackKind.NPS, 8)
    business.feedback(ids["C"], day(2026, 1, 20), FeedbackKind.CSAT, 2)
    business.feedback(ids["D"], day(2026, 2, 26), FeedbackKind.CSAT, 4)
    business.feedback(ids["E"], day(2026, 3, 5), FeedbackKind.COMPLAINT)
    business.feedback(ids["A"], day(2026, 1, 12), FeedbackKind.COMPLAINT, resolved_at=day(2026, 1, 14))
    report = figures(sessions)
    assert report.cancellations == {"asked": 2, "saved": 1, "saved_share": 0.5}
    s = report.satisfaction
    assert s["nps"] == {"answers": 3, "promoters": 1, "passives": 1, "detractors": 1, "score": 0}
    assert s["csat"] == {"answers": 2, "satisfied": 1, "neutral": 0, "dissatisfied": 1, "score": 0.5}
    # By each contact's latest answer: B a promoter; A (NPS 5) and C (CSAT 2) not; D (CSAT 4) and E between.
    assert (s["satisfied"], s["neutral"], s["dissatisfied"]) == (1, 2, 2)
    assert (s["complaints"], s["complaints_open"]) == (2, 1)


@ASIDE
def test_early_warning_lists_customers_slipping_past_their_rhythm(
    sessions: sessionmaker[Session], aside: int
) -> None:
    business = Business(sessions)
    every_ten_days = [0, 10, 20, 30]
    # The report ends on 1 April 2026 at midnight.
    business.contact(
        external_id="late", visits=[day(2026, 2, 1) + dt.timedelta(days=d) for d in every_ten_days]
    )
    business.contact(external_id="just", visits=[day(2026, 3, 1) + dt.timedelta(days=d) for d in (0, 10, 20)])
    business.contact(
        external_id="lapsed", visits=[day(2026, 1, 1) + dt.timedelta(days=d) for d in (0, 10, 20)]
    )
    business.contact(
        external_id="recent", visits=[day(2026, 3, 9) + dt.timedelta(days=d) for d in (0, 10, 20)]
    )
    business.contact(external_id="twice", visits=[day(2026, 1, 1), day(2026, 1, 11)])
    report = figures(sessions, aside=aside)
    assert report.slipping_count == 2
    by_id = {row.external_id: row for row in report.slipping}
    assert set(by_id) == {"late", "just"}
    late = by_id["late"]  # last came 3 March, usually every 10 days: 28.5 days later, 1.85 intervals late
    assert late.usual_interval_days == pytest.approx(10)
    assert late.days_since == pytest.approx(28.5)
    assert late.late_now == pytest.approx(1.85)
    assert late.late_week_ago == pytest.approx(1.15)
    assert report.slipping[0].external_id == "late"  # more visits first
    assert by_id["just"].late_now == pytest.approx(0.05)


def test_report_retention_command(sessions: sessionmaker[Session], settings: Settings) -> None:
    five_customers(Business(sessions))
    runner = CliRunner()
    result = runner.invoke(
        app, ["report", "retention", "--since", "2026-01-01", "--until", "2026-03-31", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [p["retained"] for p in report["periods"]] == [1, 2, 1]
    assert report["money"][0]["revenue"] == "320.00"
    assert report["repeat_visit_rate"] == 0.4

    result = runner.invoke(app, ["report", "retention", "--since", "2026-01-01", "--until", "2026-03-31"])
    assert result.exit_code == 0, result.output
    assert "2026-02" in result.output and "66.7%" in result.output
    assert "Early warning" in result.output

    result = runner.invoke(app, ["report", "retention", "--until", "2026-02-30"])
    assert result.exit_code == 1
    assert "--until '2026-02-30'" in result.output
    result = runner.invoke(app, ["report", "retention", "--since", "2026-04-01", "--until", "2026-03-31"])
    assert result.exit_code == 1
    assert "--since" in result.output
