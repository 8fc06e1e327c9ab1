"""Simulated customers: they visit on their own rhythm, and messages move them exactly as TRUE_LIFT says."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from nurture import db
from nurture.imports import import_file
from nurture.models import Channel, Contact, Referral, Send, SendCategory, SendStatus, Visit
from nurture.settings import Settings
from nurture.simulation import TRUE_LIFT, Customer, simulate_day, visit_chance, visit_hazard
from nurture.synthetic import generate

DAY = dt.date(2026, 11, 2)
START = dt.datetime(2026, 11, 2, tzinfo=dt.UTC)


def _customer(touches: list[str], **traits: str) -> Customer:
    customer = Customer(
        contact_id=1,
        external_id="C1",
        timezone="Europe/Madrid",
        locale="es",
        traits={"sim_interval_days": "30", "sim_responsiveness": "1", **traits},
        visits=3,
        last_visit=START - dt.timedelta(days=30),
    )
    customer.lifts = [(TRUE_LIFT[touch], 1.0) for touch in touches]
    return customer


def test_visits_are_likeliest_around_the_customers_own_interval() -> None:
    too_soon, nearly, due = (visit_hazard(days, 30.0) for days in (5, 20, 30))
    assert too_soon < 0.001 < nearly < due
    assert visit_hazard(30, 60.0) < nearly  # a slower customer is not due yet


def test_an_incentive_raises_the_chance_of_visiting_and_education_does_not() -> None:
    plain = visit_chance(_customer([]), START)
    assert visit_chance(_customer(["incentive"]), START) == 2 * plain
    assert visit_chance(_customer(["education"]), START) == plain
    assert visit_chance(_customer(["incentive"], sim_responsiveness="0"), START) == plain


def test_winback_brings_churned_customers_back() -> None:
    churned = {"sim_churned_on": "2026-06-01"}
    assert visit_chance(_customer(["winback"], **churned), START) > 3 * visit_chance(
        _customer([], **churned), START
    )


def _business(sessions: sessionmaker[Session], settings: Settings, tmp_path: Path, contacts: int) -> None:
    files = generate(tmp_path / "biz", contacts=contacts, seed=21, end=DAY)
    for kind in ("contacts", "visits", "feedback"):
        import_file(sessions, kind, getattr(files, kind), settings)


def _send_to_everyone(sessions: sessionmaker[Session], touch: str) -> tuple[set[int], set[int]]:
    """Send ``touch`` to every other contact and hold the rest out; return (sent, held out) ids."""
    with sessions.begin() as session:
        ids = session.execute(select(Contact.id).order_by(Contact.id)).scalars().all()
        sent, held = set(ids[::2]), set(ids[1::2])
        session.add_all(
            Send(
                key=f"{touch}:{contact_id}",
                contact_id=contact_id,
                touch=touch,
                occurrence="test",
                category=SendCategory.MARKETING,
                status=SendStatus.SENT if contact_id in sent else SendStatus.HELD_OUT,
                channel=Channel.EMAIL if contact_id in sent else None,
                due_at=START,
                claimed_at=START,
                sent_at=START if contact_id in sent else None,
            )
            for contact_id in ids
        )
    return sent, held


def _visitors(sessions: sessionmaker[Session]) -> list[int]:
    with sessions() as session:
        query = select(Visit.contact_id).where(Visit.occurred_at >= START).order_by(Visit.contact_id)
        return list(session.execute(query).scalars())


def test_customers_sent_an_incentive_visit_more_than_those_held_out(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    _business(sessions, settings, tmp_path, contacts=800)
    sent, held = _send_to_everyone(sessions, "incentive")
    rng = random.Random(5)
    for offset in range(10):
        summary = simulate_day(
            sessions, settings, DAY + dt.timedelta(days=offset), rng, directory=tmp_path / "sim"
        )
        assert summary.rejected == 0
    visitors = _visitors(sessions)
    sent_visits = sum(1 for contact_id in visitors if contact_id in sent)
    held_visits = sum(1 for contact_id in visitors if contact_id in held)
    assert sent_visits > 1.25 * held_visits > 0  # sending education instead gives 0.8-1.0


def test_education_moves_nobody(sessions: sessionmaker[Session], settings: Settings, tmp_path: Path) -> None:
    # The same business twice, education sent to everyone in one: the same draws give the same visits.
    other_settings = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'other.db'}"})
    other = db.session_factory(db.connect(other_settings))
    _business(sessions, settings, tmp_path / "a", contacts=300)
    _business(other, other_settings, tmp_path / "b", contacts=300)
    _send_to_everyone(sessions, "education")
    simulate_day(sessions, settings, DAY, random.Random(3), directory=tmp_path / "with")
    simulate_day(other, other_settings, DAY, random.Random(3), directory=tmp_path / "without")
    assert _visitors(sessions)
    assert _visitors(sessions) == _visitors(other)


def test_referred_friends_import_as_contacts_linked_to_their_referrer(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    _business(sessions, settings, tmp_path, contacts=600)
    _send_to_everyone(sessions, "referral_ask")
    rng = random.Random(8)
    referrals = 0
    for offset in range(5):
        summary = simulate_day(
            sessions, settings, DAY + dt.timedelta(days=offset), rng, directory=tmp_path / "sim"
        )
        assert summary.rejected == 0
        referrals += summary.referrals
    assert referrals > 0
    with sessions() as session:
        friends = session.execute(select(Contact).where(Contact.external_id.like("R%"))).scalars().all()
        assert len(friends) == referrals
        assert all(friend.referred_by for friend in friends)
        linked = session.execute(
            select(func.count())
            .select_from(Referral)
            .where(Referral.referred_id.in_([f.id for f in friends]))
        ).scalar_one()
        assert linked == referrals
