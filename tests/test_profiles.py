from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from nurture import profiles
from nurture.cli import app
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
    ProfileRefresh,
    Stage,
    ValueTier,
    Visit,
)
from nurture.profiles import Profile, RefreshSummary
from nurture.settings import Settings

T0 = dt.datetime(2026, 1, 5, 10, 0, tzinfo=dt.UTC)


def day(n: float) -> dt.datetime:
    return T0 + dt.timedelta(days=n)


class Shop:
    """A hand-made history: contacts, their visits and feedback, written straight through the ORM."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings
        self.visits = 0

    def customer(
        self,
        external_id: str,
        visit_days: Iterable[float] = (),
        *,
        amount: str = "20.00",
        tags: Iterable[str] = (),
    ) -> int:
        with self.sessions.begin() as session:
            contact = Contact(
                external_id=external_id,
                locale="es",
                timezone="Europe/Madrid",
                referral_code=f"R-{external_id}",
                created_at=T0,
                updated_at=T0,
            )
            session.add(contact)
            session.flush()
            session.add_all(ContactTag(contact_id=contact.id, tag=tag) for tag in tags)
            contact_id = contact.id
        self.visit(contact_id, visit_days, amount=amount)
        return contact_id

    def visit(self, contact_id: int, visit_days: Iterable[float], *, amount: str = "20.00") -> None:
        with self.sessions.begin() as session:
            for n in visit_days:
                self.visits += 1
                session.add(
                    Visit(
                        external_id=f"v{self.visits}",
                        contact_id=contact_id,
                        occurred_at=day(n),
                        amount=Decimal(amount),
                        currency="EUR",
                        created_at=T0,
                    )
                )

    def feedback(self, contact_id: int, kind: FeedbackKind, at: float, **fields: Any) -> None:
        with self.sessions.begin() as session:
            session.add(
                Feedback(contact_id=contact_id, kind=kind, occurred_at=day(at), created_at=T0, **fields)
            )

    def refresh(self, at: float, **overrides: Any) -> RefreshSummary:
        settings = self.settings.model_copy(update=overrides)
        with self.sessions.begin() as session:
            return profiles.refresh(session, settings, day(at))

    def profile(self, external_id: str) -> Profile:
        with self.sessions() as session:
            return profiles.profile(session, external_id)

    def stage(self, external_id: str, at: float, **overrides: Any) -> Stage:
        self.refresh(at, **overrides)
        return self.profile(external_id).stage


@pytest.fixture
def shop(sessions: sessionmaker[Session], settings: Settings) -> Shop:
    return Shop(sessions, settings)


def test_a_contact_who_never_visited_is_a_prospect(shop: Shop) -> None:
    shop.customer("ana")
    summary = shop.refresh(10)
    ana = shop.profile("ana")
    assert (ana.stage, ana.value_tier, ana.visits) == (Stage.PROSPECT, ValueTier.NONE, 0)
    assert ana.last_visit is None and ana.expected_next_visit is None and ana.points == 0
    assert summary.contacts == 1 and summary.stages[Stage.PROSPECT] == 1


def test_one_visit_is_new_until_overdue_against_the_default_rhythm(shop: Shop) -> None:
    shop.customer("ana", [0])
    # Nobody has visited twice, so the prior is default_interval_days (30): at risk after 45 days.
    assert shop.stage("ana", 44) == Stage.NEW
    assert shop.profile("ana").expected_next_visit == day(30)
    assert shop.stage("ana", 46) == Stage.AT_RISK
    assert shop.stage("ana", 91) == Stage.LAPSED
    assert shop.stage("ana", 181) == Stage.LOST


def test_a_regular_rhythm_predicts_the_next_visit_and_becomes_loyal(shop: Shop) -> None:
    shop.customer("ana", [0, 14, 28])
    shop.refresh(30)
    ana = shop.profile("ana")
    assert ana.stage == Stage.RETURNING
    assert ana.expected_interval_days == pytest.approx(14)
    assert ana.expected_next_visit == day(42)

    with shop.sessions.begin() as session:
        contact_id = session.scalar(select(Contact.id).where(Contact.external_id == "ana"))
    assert contact_id is not None
    shop.visit(contact_id, [42])
    shop.refresh(43)
    ana = shop.profile("ana")
    assert (ana.stage, ana.visits, ana.expected_next_visit) == (Stage.LOYAL, 4, day(56))


def test_an_irregular_rhythm_uses_the_mean_gap_not_the_last_one(shop: Shop) -> None:
    shop.customer("ana", [0, 5, 25, 60])
    shop.refresh(61, prior_weight=0)
    ana = shop.profile("ana")
    assert ana.expected_interval_days == pytest.approx(20)
    assert ana.expected_next_visit == day(80)


def test_overdue_stages_follow_the_multiples_of_the_expected_interval(shop: Shop) -> None:
    shop.customer("ana", [0, 10, 20, 30])
    # Loyal while on time; "exceeds" means strictly more than 1.5, 3 and 6 intervals.
    assert shop.stage("ana", 45) == Stage.LOYAL
    assert shop.stage("ana", 45.1) == Stage.AT_RISK
    assert shop.stage("ana", 60) == Stage.AT_RISK
    assert shop.stage("ana", 60.1) == Stage.LAPSED
    assert shop.stage("ana", 90.1) == Stage.LOST


def test_a_short_history_is_shrunk_toward_the_population_rhythm(shop: Shop) -> None:
    shop.customer("ana", [0, 10])
    for n in range(5):
        shop.customer(f"regular{n}", [0, 40, 80])
    shop.refresh(81, prior_weight=3)
    # Median of everyone's own rhythm [10, 40 x 5] is 40; one own interval against 3 pseudo-intervals.
    ana = shop.profile("ana")
    assert ana.expected_interval_days == pytest.approx((1 * 10 + 3 * 40) / 4)
    assert ana.expected_next_visit == day(10 + 32.5)
    # A long history barely moves: the regulars' own rhythm equals the median anyway.
    assert shop.profile("regular0").expected_interval_days == pytest.approx(40)


def test_similar_customers_share_a_primary_tag(shop: Shop) -> None:
    for n in range(30):
        shop.customer(f"hair{n}", [0, 7], tags=["hair"])
        shop.customer(f"nails{n}", [0, 60], tags=["nails"])
    shop.customer("new-hair", [61], tags=["hair", "spa"])
    shop.customer("new-spa", [61], tags=["spa"])
    shop.refresh(62)
    assert shop.profile("new-hair").expected_interval_days == pytest.approx(7)
    # "spa" has too few customers with a rhythm of their own: everyone's median, (7 + 60) / 2.
    assert shop.profile("new-spa").expected_interval_days == pytest.approx(33.5)


def test_same_day_visits_count_once_for_the_rhythm(shop: Shop) -> None:
    shop.customer("ana", [0, 0.1, 10])
    shop.refresh(11, prior_weight=0)
    ana = shop.profile("ana")
    assert ana.visits == 3
    assert ana.stage == Stage.RETURNING
    assert ana.expected_interval_days == pytest.approx(10)


def test_a_future_dated_visit_counts_only_once_its_time_has_come(shop: Shop) -> None:
    shop.customer("ana", [0, 20, 200], amount="10.00")
    shop.refresh(30)
    ana = shop.profile("ana")
    assert (ana.visits, ana.last_visit, ana.total_spend, ana.points) == (2, day(20), Decimal("20.00"), 20)
    shop.refresh(201)
    ana = shop.profile("ana")
    assert (ana.visits, ana.last_visit, ana.total_spend, ana.points) == (3, day(200), Decimal("30.00"), 30)


def test_refreshing_at_an_earlier_instant_replays_history(shop: Shop) -> None:
    shop.customer("ana", [0, 10, 20, 30, 40], amount="10.00")
    shop.refresh(41)
    assert shop.profile("ana").stage == Stage.LOYAL
    shop.refresh(12)
    ana = shop.profile("ana")
    assert (ana.stage, ana.visits, ana.last_visit, ana.points, ana.stamps) == (
        Stage.RETURNING,
        2,
        day(10),
        20,
        2,
    )


def test_satisfaction_comes_from_the_latest_score_as_of_the_refresh(shop: Shop) -> None:
    ana = shop.customer("ana", [0])
    bea = shop.customer("bea", [0])
    shop.feedback(ana, FeedbackKind.NPS, 1, score=9)
    shop.feedback(ana, FeedbackKind.CSAT, 5, score=3)
    shop.feedback(bea, FeedbackKind.NPS, 1, score=8)
    shop.feedback(bea, FeedbackKind.CSAT, 2, score=4)
    shop.feedback(bea, FeedbackKind.NPS, 3, score=None, comment="no score given")
    shop.refresh(2)
    assert shop.profile("ana").satisfaction == "promoter"
    assert shop.profile("bea").satisfaction == "passive"
    shop.refresh(6)
    assert shop.profile("ana").satisfaction == "detractor"
    assert shop.profile("bea").satisfaction == "passive"
    shop.refresh(0.5)
    assert shop.profile("ana").satisfaction == "unknown"


def test_a_complaint_is_open_until_it_is_resolved(shop: Shop) -> None:
    ana = shop.customer("ana", [0])
    shop.feedback(ana, FeedbackKind.COMPLAINT, 2, comment="cold coffee", resolved_at=day(4))

    def complaint_open(at: float) -> bool:
        shop.refresh(at)
        return shop.profile("ana").complaint_open

    assert [complaint_open(1), complaint_open(3), complaint_open(5)] == [False, True, False]


def test_loyalty_accrues_once_and_the_punch_card_wraps(shop: Shop) -> None:
    ana = shop.customer("ana", [0, 1, 2, 3], amount="12.75")
    first = shop.refresh(4, punch_card_size=3)
    second = shop.refresh(4, punch_card_size=3)
    assert (first.loyalty_entries_added, second.loyalty_entries_added) == (4, 0)
    profile = shop.profile("ana")
    assert (profile.points, profile.stamps) == (48, 1)
    with shop.sessions.begin() as session:
        assert session.scalar(select(func.count()).select_from(LoyaltyEntry)) == 4
        session.add(
            LoyaltyEntry(
                key="redeem:1", contact_id=ana, occurred_at=day(5), points=-40, stamps=-3, reason="reward"
            )
        )
    shop.visit(ana, [6, 7], amount="1.50")
    shop.refresh(8, punch_card_size=3, points_per_unit=2)
    profile = shop.profile("ana")
    # Entries keep the points they were written with; the two new visits earn 3 points each.
    assert (profile.points, profile.stamps) == (48 - 40 + 6, 0)


def test_value_tiers_rank_customers_by_expected_spend(shop: Shop) -> None:
    for n in range(10):
        shop.customer(f"c{n}", [0, 10, 20], amount=f"{10 * (n + 1)}.00")
    shop.customer("gone", [-400, -390], amount="500.00")
    shop.customer("prospect")
    summary = shop.refresh(21)
    tiers = {name: shop.profile(name).value_tier for name in ["c9", "c8", "c7", "c6", "c4", "c3", "gone"]}
    assert tiers == {
        "c9": ValueTier.HIGH,
        "c8": ValueTier.HIGH,
        "c7": ValueTier.HIGH,
        "c6": ValueTier.MEDIUM,
        "c4": ValueTier.MEDIUM,
        "c3": ValueTier.LOW,
        # The biggest spender per visit, but a year silent: the visits ahead are few.
        "gone": ValueTier.LOW,
    }
    assert summary.value_tiers == {
        ValueTier.HIGH: 3,
        ValueTier.MEDIUM: 3,
        ValueTier.LOW: 5,
        ValueTier.NONE: 1,
    }


def test_show_explains_an_unknown_contact_or_a_missing_profile(shop: Shop) -> None:
    shop.customer("ana", [0])
    with pytest.raises(ProfileNotRefreshed, match="nurture contacts refresh"):
        shop.profile("ana")
    shop.refresh(1)
    with pytest.raises(ContactNotFound, match="nobody"):
        shop.profile("nobody")


def test_the_cli_refreshes_shows_and_exports(shop: Shop, tmp_path: Path) -> None:
    ana = shop.customer("ana", [0, 14], amount="30.00")
    shop.customer("bea")
    with shop.sessions.begin() as session:
        session.add(
            Consent(
                contact_id=ana, channel=Channel.EMAIL, status=ConsentStatus.GRANTED, changed_at=T0, source="t"
            )
        )
        session.add(
            Consent(
                contact_id=ana, channel=Channel.SMS, status=ConsentStatus.REVOKED, changed_at=T0, source="t"
            )
        )
    runner = CliRunner()

    before = runner.invoke(app, ["contacts", "show", "ana"])
    assert before.exit_code == 1 and "nurture contacts refresh" in before.output

    refreshed = runner.invoke(app, ["contacts", "refresh", "--at", day(15).isoformat(), "--json"])
    assert refreshed.exit_code == 0, refreshed.output
    summary = json.loads(refreshed.stdout)
    assert summary["contacts"] == 2
    assert summary["stages"]["returning"] == 1 and summary["stages"]["prospect"] == 1

    # --full sums everyone up again (nothing changed, so a plain refresh would sum up no one) and agrees.
    again = runner.invoke(app, ["contacts", "refresh", "--at", day(15).isoformat(), "--full", "--json"])
    assert again.exit_code == 0, again.output
    repeated = json.loads(again.stdout)
    assert repeated["loyalty_entries_added"] == 0
    assert {k: repeated[k] for k in ("as_of", "contacts", "stages", "value_tiers")} == {
        k: summary[k] for k in ("as_of", "contacts", "stages", "value_tiers")
    }
    with shop.sessions() as session:
        latest = session.scalars(select(ProfileRefresh).order_by(ProfileRefresh.id.desc())).first()
        assert latest is not None and latest.contacts_summed_up == 2

    shown = runner.invoke(app, ["contacts", "show", "ana", "--json"])
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.stdout)
    assert list(record) == list(profiles.COLUMNS)
    assert record["stage"] == "returning"
    assert record["last_visit"] == day(14).isoformat()
    assert record["expected_next_visit"] == day(28).isoformat()
    assert (record["email_consent"], record["sms_consent"]) == (True, False)
    assert (record["points"], record["total_spend"], record["currency"]) == (60, "60.00", "EUR")

    assert runner.invoke(app, ["contacts", "show", "nobody"]).exit_code == 1

    target = tmp_path / "profiles.csv"
    exported = runner.invoke(app, ["contacts", "export", str(target)])
    assert exported.exit_code == 0, exported.output
    with target.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["external_id"] for row in rows] == ["ana", "bea"]
    assert rows[0]["expected_next_visit"] == day(28).isoformat()
    assert (rows[0]["email_consent"], rows[1]["email_consent"]) == ("true", "false")
    assert rows[1]["stage"] == "prospect" and rows[1]["last_visit"] == ""


def test_the_cli_refuses_a_timestamp_it_cannot_read(shop: Shop) -> None:
    result = CliRunner().invoke(app, ["contacts", "refresh", "--at", "yesterday"])
    assert result.exit_code == 1 and "ISO 8601" in result.output


def _all_profiles(shop: Shop) -> dict[int, dict[str, Any]]:
    with shop.sessions() as session:
        rows = session.scalars(select(ContactProfile)).all()
        return {
            row.contact_id: {c.name: getattr(row, c.name) for c in ContactProfile.__table__.columns}
            for row in rows
        }


def test_a_refresh_sums_up_again_what_changed_and_agrees_with_a_full_one(shop: Shop) -> None:
    regulars = [shop.customer(f"r{n}", [n, n + 12, n + 25], tags=["nails"]) for n in range(8)]
    ana = shop.customer("ana", [0, 14])
    bea = shop.customer("bea", [0, 20, 40], amount="30.00")
    cid = shop.customer("cid", [1, 21])
    dan = shop.customer("dan", [5])
    eva = shop.customer("eva", [2, 9, 30])
    fay = shop.customer("fay", [3, 33])
    hal = shop.customer("hal", [0, 15])
    ivy = shop.customer("ivy", [0, 30])
    jon = shop.customer("jon", [0, 45])  # the second visit is booked ahead
    kim = shop.customer("kim", [0, 10, 20, 30])
    shop.feedback(ivy, FeedbackKind.COMPLAINT, 35, comment="rude")
    shop.refresh(40)
    before = _all_profiles(shop)

    shop.visit(ana, [41])  # a new visit
    shop.visit(regulars[0], [12.5])  # a late import of an old visit
    with shop.sessions.begin() as session:
        session.execute(update(Visit).where(Visit.contact_id == bea).values(amount=Decimal("90.00")))
        moved = session.scalars(select(Visit.id).where(Visit.contact_id == cid).order_by(Visit.id)).first()
        session.execute(update(Visit).where(Visit.id == moved).values(contact_id=dan))
        session.execute(delete(Visit).where(Visit.contact_id == eva, Visit.occurred_at > day(20)))
        session.add(ContactTag(contact_id=fay, tag="bridal"))
        session.add(
            Feedback(contact_id=hal, kind=FeedbackKind.NPS, occurred_at=day(16), score=2, created_at=T0)
        )
        session.execute(update(Feedback).where(Feedback.contact_id == ivy).values(resolved_at=day(42)))
        session.add(
            LoyaltyEntry(
                key="redeem:kim", contact_id=kim, occurred_at=day(43), points=-50, stamps=-4, reason="x"
            )
        )
    gil = shop.customer("gil", [10, 25, 38])  # a contact imported late with their history
    shop.refresh(46)
    after = _all_profiles(shop)
    with shop.sessions.begin() as session:
        profiles.refresh(session, shop.settings, day(46), full=True)
    assert _all_profiles(shop) == after
    changed = {c for c in after if c in before and after[c] != before[c]}
    assert {ana, bea, cid, dan, eva, fay, hal, ivy, jon, kim, regulars[0]} <= changed
    assert gil in after


def test_each_refresh_is_recorded_with_how_many_contacts_it_summed_up(shop: Shop) -> None:
    for n in range(5):
        shop.customer(f"c{n}", [0, 10])
    shop.refresh(11)
    ana = shop.customer("ana", [5])
    shop.visit(ana, [12])
    shop.refresh(13)
    with shop.sessions() as session:
        rows = session.execute(
            select(ProfileRefresh.as_of, ProfileRefresh.contacts_summed_up).order_by(ProfileRefresh.id)
        ).all()
        assert profiles.last_refreshed(session) == day(13)
    # The first refresh sums everyone up; the second only the contact imported since, with two visits.
    assert [tuple(row) for row in rows] == [(day(11), 5), (day(13), 1)]


def test_a_basis_sent_as_json_writes_the_same_profiles_on_the_other_side(shop: Shop) -> None:
    # A calendar run hands its basis to the runs that send its ranges, on other machines, as JSON.
    for n in range(12):
        shop.customer(f"c{n}", [0, 7, 19], amount=f"{13.37 * (n % 4 + 1):.2f}", tags=["color"] * (n % 2))
    shop.customer("prospect")
    with shop.sessions.begin() as session:
        basis = profiles.sum_up(session, shop.settings, day(21))
    as_json = TypeAdapter(profiles.Basis).dump_json(basis)
    travelled = TypeAdapter(profiles.Basis).validate_json(as_json)
    assert travelled == basis

    def tiers(sent: profiles.Basis) -> dict[str, ValueTier]:
        with shop.sessions.begin() as session:
            profiles.write_profiles(session, shop.settings, sent)
        return {f"c{n}": shop.profile(f"c{n}").value_tier for n in range(12)}

    here = tiers(basis)
    assert tiers(travelled) == here
    # Three customers at each value: ties, ranked by spend and then by contact id.
    assert set(here.values()) == {ValueTier.HIGH, ValueTier.MEDIUM, ValueTier.LOW}
