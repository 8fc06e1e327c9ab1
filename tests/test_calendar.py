"""The contact calendar on hand-made histories: each touch's trigger and every rule a send obeys."""

from __future__ import annotations

import datetime as dt
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from histories import NOW, Business, local, outbox_emails, outbox_files, outbox_sms, run
from nurture.models import Channel, ContactProfile, Feedback, FeedbackKind, SendStatus, Stage
from nurture.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """A copy of the shipped templates without the holdout, so that every due message goes out."""
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates", root)
    programme = root / "programme.yaml"
    programme.write_text(programme.read_text().replace("holdout: 0.10", "holdout: 0"))
    return root


@pytest.fixture
def settings(settings: Settings, templates: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(templates))
    return settings.model_copy(update={"templates_dir": templates})


@pytest.fixture
def business(sessions: sessionmaker[Session]) -> Business:
    return Business(sessions)


def touches_sent(business: Business, contact_id: int) -> list[str]:
    return [s.touch for s in business.sends(contact_id) if s.status is SendStatus.SENT]


def only(settings: Settings, at: dt.datetime, touch: str) -> dict[str, int]:
    summary = run(settings, at, touches=[touch])
    return {k: v for k, v in summary.as_dict().items() if isinstance(v, int) and v}


# Welcome, the local day, the window and DST.


def test_welcome_goes_out_the_day_after_the_first_visit_inside_the_local_window(
    settings: Settings, business: Business
) -> None:
    madrid = "Europe/Madrid"
    lucia = business.contact(visits=[local(madrid, 2026, 11, 22, 18, 0)])

    assert only(settings, local(madrid, 2026, 11, 22, 19, 0), "welcome") == {}  # same day: not yet
    early = only(settings, local(madrid, 2026, 11, 23, 8, 30), "welcome")
    assert early == {"planned": 1, "deferred_window": 1}
    assert outbox_files(settings) == []
    sent = only(settings, local(madrid, 2026, 11, 23, 9, 0), "welcome")
    assert sent == {"planned": 1, "sent": 1}
    assert only(settings, local(madrid, 2026, 11, 23, 12, 0), "welcome") == {}  # never twice

    [message] = outbox_emails(settings)
    assert message["To"].addresses[0].addr_spec == "c1@example.com"
    assert message["List-Unsubscribe"].startswith("<http")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    [send] = business.sends(lucia)
    assert message["X-Nurture-Send-Id"] == str(send.id)
    assert send.locale == "es" and send.channel is Channel.EMAIL


def test_a_message_due_on_a_local_day_that_is_missed_is_not_sent_later(
    settings: Settings, business: Business
) -> None:
    madrid = "Europe/Madrid"
    business.contact(visits=[local(madrid, 2026, 11, 20, 18, 0)])
    # Welcome is valid for two local days after the day after the first visit (21st and 22nd).
    assert only(settings, local(madrid, 2026, 11, 23, 10, 0), "welcome") == {}
    assert outbox_files(settings) == []


def test_spring_forward_uses_the_new_offset_for_the_window(settings: Settings, business: Business) -> None:
    madrid = "Europe/Madrid"  # 29 March 2026: 02:00 CET becomes 03:00 CEST
    business.contact(visits=[local(madrid, 2026, 3, 28, 23, 30)])

    before = dt.datetime(2026, 3, 29, 6, 30, tzinfo=dt.UTC)  # 08:30 CEST
    assert only(settings, before, "welcome") == {"planned": 1, "deferred_window": 1}
    opening = dt.datetime(2026, 3, 29, 7, 0, tzinfo=dt.UTC)  # 09:00 CEST (it would be 08:00 CET)
    assert only(settings, opening, "welcome") == {"planned": 1, "sent": 1}


def test_fall_back_birthday_on_the_day_the_clocks_change(settings: Settings, business: Business) -> None:
    lisbon = "Europe/Lisbon"  # 25 October 2026: 02:00 WEST becomes 01:00 WET
    business.contact(
        timezone=lisbon, locale="pt", birthday=dt.date(1990, 10, 25), visits=[local(lisbon, 2026, 9, 1, 10)]
    )

    assert only(settings, dt.datetime(2026, 10, 25, 8, 59, tzinfo=dt.UTC), "birthday") == {
        "planned": 1,
        "deferred_window": 1,
    }
    assert only(settings, dt.datetime(2026, 10, 25, 9, 0, tzinfo=dt.UTC), "birthday") == {
        "planned": 1,
        "sent": 1,
    }
    [message] = outbox_emails(settings)
    assert message.get_body(("plain",)) is not None


@pytest.mark.parametrize(
    ("timezone", "birthday", "instant", "expected"),
    [
        # Tonga is UTC+13: its 24 November starts at 11:00 UTC on the 23rd.
        ("Pacific/Tongatapu", dt.date(1985, 11, 24), dt.datetime(2026, 11, 23, 10, 30, tzinfo=dt.UTC), {}),
        (
            "Pacific/Tongatapu",
            dt.date(1985, 11, 24),
            dt.datetime(2026, 11, 23, 11, 30, tzinfo=dt.UTC),
            {"planned": 1, "deferred_window": 1},
        ),
        (
            "Pacific/Tongatapu",
            dt.date(1985, 11, 24),
            dt.datetime(2026, 11, 23, 20, 30, tzinfo=dt.UTC),
            {"planned": 1, "sent": 1},
        ),
        # Honolulu is UTC-10: its 23 November lasts until 10:00 UTC on the 24th.
        (
            "Pacific/Honolulu",
            dt.date(1985, 11, 23),
            dt.datetime(2026, 11, 24, 5, 30, tzinfo=dt.UTC),
            {"planned": 1, "sent": 1},
        ),
        ("Pacific/Honolulu", dt.date(1985, 11, 23), dt.datetime(2026, 11, 24, 10, 30, tzinfo=dt.UTC), {}),
        (
            "Pacific/Honolulu",
            dt.date(1985, 11, 24),
            dt.datetime(2026, 11, 24, 9, 30, tzinfo=dt.UTC),
            {},
        ),
    ],
)
def test_birthdays_follow_the_contacts_local_midnight(
    settings: Settings,
    business: Business,
    timezone: str,
    birthday: dt.date,
    instant: dt.datetime,
    expected: dict[str, int],
) -> None:
    business.contact(timezone=timezone, locale="en", birthday=birthday, visits=[NOW - dt.timedelta(days=40)])
    assert only(settings, instant, "birthday") == expected


# Consent and fallback.


def test_fallback_only_to_a_channel_the_contact_agreed_to(settings: Settings, business: Business) -> None:
    madrid = "Europe/Madrid"
    first = [local(madrid, 2026, 11, 22, 12, 0)]
    sms_only = business.contact(consent=[Channel.SMS], phone="+34612345678", visits=first)
    no_phone = business.contact(consent=[Channel.SMS], phone=None, visits=first)
    nothing = business.contact(consent=[], phone="+34612345679", visits=first)

    result = only(settings, local(madrid, 2026, 11, 23, 10, 0), "welcome")

    assert result == {"planned": 3, "sent": 1, "suppressed_consent": 2}
    [sms] = outbox_sms(settings)
    assert sms["to"] == "+34612345678"
    assert int(sms["segments"]) >= 1 and sms["encoding"] in ("GSM-7", "UCS-2")  # type: ignore[call-overload]
    assert touches_sent(business, sms_only) == ["welcome"]
    assert business.sends(no_phone) == [] and business.sends(nothing) == []
    assert outbox_emails(settings) == []


def test_a_revoked_consent_stops_the_next_message(settings: Settings, business: Business) -> None:
    madrid = "Europe/Madrid"
    lucia = business.contact(visits=[local(madrid, 2026, 11, 22, 12, 0)])
    business.revoke(lucia, Channel.EMAIL)
    assert only(settings, local(madrid, 2026, 11, 23, 10, 0), "welcome") == {
        "planned": 1,
        "suppressed_consent": 1,
    }


# Caps and deferral.


def test_caps_pick_the_highest_priority_and_defer_the_rest_while_valid(
    settings: Settings, business: Business
) -> None:
    madrid = "Europe/Madrid"
    lucia = business.contact(birthday=dt.date(1990, 11, 23), visits=[local(madrid, 2026, 11, 22, 12, 0)])

    first = run(settings, local(madrid, 2026, 11, 23, 10, 0), touches=["welcome", "birthday"]).as_dict()
    assert first["sent"] == 1 and first["deferred_cap"] == 1
    assert touches_sent(business, lucia) == ["birthday"]  # priority 95 beats welcome's 90

    second = run(settings, local(madrid, 2026, 11, 24, 10, 0), touches=["welcome", "birthday"]).as_dict()
    assert second["sent"] == 1
    assert touches_sent(business, lucia) == ["birthday", "welcome"]  # welcome was still valid


def test_service_messages_are_not_capped(settings: Settings, business: Business) -> None:
    madrid = "Europe/Madrid"
    lucia = business.contact(birthday=dt.date(1990, 11, 23), visits=[local(madrid, 2026, 10, 1, 12, 0)])
    business.feedback(lucia, local(madrid, 2026, 11, 23, 9, 0), FeedbackKind.COMPLAINT)

    summary = run(settings, local(madrid, 2026, 11, 23, 10, 0), touches=["birthday", "complaint_recovery"])

    # The open complaint holds back the birthday promotion; the apology goes out at once.
    assert touches_sent(business, lucia) == ["complaint_recovery"]
    assert summary.as_dict()["held_complaint"] == 1


def test_the_rolling_week_cap_counts_across_touches(settings: Settings, business: Business) -> None:
    madrid = "Europe/Madrid"
    lucia = business.contact(visits=[local(madrid, 2026, 11, 22, 12, 0)], birthday=dt.date(1990, 11, 25))
    caps = settings.templates_dir / "programme.yaml"
    caps.write_text(
        caps.read_text()
        .replace("per_local_day: 1", "per_local_day: 5")
        .replace("per_rolling_7_days: 3", "per_rolling_7_days: 1")
    )
    run(settings, local(madrid, 2026, 11, 23, 10, 0))
    summary = run(settings, local(madrid, 2026, 11, 25, 10, 0))
    assert touches_sent(business, lucia) == ["welcome"]
    assert summary.as_dict()["by_touch"]["birthday"]["deferred_cap"] == 1


# Holdout.


def test_holdout_is_deterministic_recorded_and_never_sent(
    settings: Settings, business: Business, sessions: sessionmaker[Session]
) -> None:
    programme = settings.templates_dir / "programme.yaml"
    programme.write_text(programme.read_text().replace("holdout: 0\n", "holdout: 0.5\n"))
    madrid = "Europe/Madrid"
    ids = [
        business.contact(external_id=f"h{i}", visits=[local(madrid, 2026, 11, 22, 12, 0)]) for i in range(60)
    ]
    at = local(madrid, 2026, 11, 23, 10, 0)

    dry = run(settings, at, touches=["welcome"], dry_run=True).as_dict()
    summary = run(settings, at, touches=["welcome"]).as_dict()

    held = {s.contact_id for s in business.sends() if s.status is SendStatus.HELD_OUT}
    sent = {s.contact_id for s in business.sends() if s.status is SendStatus.SENT}
    assert 15 <= len(held) <= 45 and held | sent == set(ids) and not held & sent
    assert summary["held_out"] == len(held) == dry["held_out"]
    assert len(outbox_emails(settings)) == len(sent)
    # The same contacts are held out on any database, from their external ids alone.
    from nurture.calendar import _held_out
    from nurture.programme import load_programme

    programme_ = load_programme(settings.templates_dir)
    welcome = programme_.touch("welcome")
    by_external = {f"h{i}": cid for i, cid in enumerate(ids)}
    assert {cid for ext, cid in by_external.items() if _held_out(programme_, welcome, ext)} == held


def test_a_run_says_how_fast_its_message_path_went_counting_the_holdout(
    settings: Settings, business: Business
) -> None:
    programme = settings.templates_dir / "programme.yaml"
    programme.write_text(programme.read_text().replace("holdout: 0\n", "holdout: 0.5\n"))
    madrid = "Europe/Madrid"
    for i in range(20):
        business.contact(external_id=f"s{i}", visits=[local(madrid, 2026, 11, 22, 12, 0)])

    summary = run(settings, local(madrid, 2026, 11, 23, 10, 0), touches=["welcome"])

    assert summary.totals["sent"] + summary.totals["held_out"] == 20
    assert set(summary.wall) == {"prepare", "profiles", "plan", "render", "claim", "push", "record"}
    assert all(seconds >= 0 for seconds in summary.cpu.values())
    speed = summary.speed()
    assert "Message path (render + claim + push + record): 20 messages in " in speed
    assert "messages a second per core" in speed
    assert "prepare" not in summary.as_dict()  # the JSON of a run stays the same from run to run


# Template errors and dry runs.


def test_a_template_error_skips_that_touch_for_that_contact_and_names_template_line_and_contact(
    settings: Settings, business: Business
) -> None:
    madrid = "Europe/Madrid"
    spanish = business.contact(external_id="es-1", visits=[local(madrid, 2026, 11, 22, 12, 0)])
    english = business.contact(external_id="en-1", locale="en", visits=[local(madrid, 2026, 11, 22, 12, 0)])
    broken = settings.templates_dir / "messages" / "welcome" / "es" / "email.txt"
    broken.write_text("Hola {{ contact.first_name }}\n{{ contact.no_such_field.upper() }}\n")

    summary = run(settings, local(madrid, 2026, 11, 23, 10, 0), touches=["welcome"]).as_dict()

    assert summary["template_errors"] == 1 and summary["sent"] == 1
    [error] = summary["errors"]
    assert "es-1" in error and "welcome/es/email.txt" in error and ":2" in error
    assert touches_sent(business, english) == ["welcome"]
    assert business.sends(spanish) == []  # nothing claimed: it goes out once the template is fixed
    broken.write_text("Hola {{ contact.first_name }}\n")
    assert only(settings, local(madrid, 2026, 11, 23, 11, 0), "welcome") == {"planned": 1, "sent": 1}


def test_a_dry_run_claims_and_sends_nothing(settings: Settings, business: Business) -> None:
    madrid = "Europe/Madrid"
    business.contact(visits=[local(madrid, 2026, 11, 22, 12, 0)])
    summary = run(settings, local(madrid, 2026, 11, 23, 10, 0), dry_run=True).as_dict()
    assert summary["sent"] == 1 and summary["dry_run"] is True
    assert business.sends() == [] and outbox_files(settings) == []


# Each touch's trigger.


def regular(timezone: str, last: dt.datetime, every_days: int, count: int) -> list[dt.datetime]:
    return [last - dt.timedelta(days=every_days * i) for i in range(count)][::-1]


def test_education_follows_interests_and_never_repeats_an_item(
    settings: Settings, business: Business
) -> None:
    madrid = "Europe/Madrid"
    lucia = business.contact(tags=["nails"], visits=[local(madrid, 2026, 9, 1, 12, 0)])
    subjects = []
    day = local(madrid, 2026, 9, 22, 10, 0)
    for _ in range(4):
        run(settings, day, touches=["education"])
        day += dt.timedelta(days=21)
    sends = [s for s in business.sends(lucia) if s.status is SendStatus.SENT]
    items = [s.occurrence for s in sends]
    subjects = [s.subject for s in sends]
    assert items[0] == "nail-health"  # her interest first, then general content
    assert len(items) == len(set(items)) >= 2
    assert all(subjects)


def test_education_goes_out_on_its_local_day_on_both_sides_of_the_date_line(
    settings: Settings, business: Business
) -> None:
    # At 21:00 UTC it is 10:00 tomorrow in Auckland and 11:00 today in Honolulu: one run, two local dates.
    auckland, honolulu = (
        business.contact(timezone=zone, locale="en", tags=["nails"], visits=[local(zone, 2026, 9, 1, 12, 0)])
        for zone in ("Pacific/Auckland", "Pacific/Honolulu")
    )
    day = dt.datetime(2026, 9, 19, 21, 0, tzinfo=dt.UTC)
    while day < dt.datetime(2026, 10, 16, tzinfo=dt.UTC):
        run(settings, day, touches=["education"])
        day += dt.timedelta(days=1)

    def sent(contact_id: int) -> list[tuple[dt.date, dt.date]]:
        sends = [s for s in business.sends(contact_id) if s.status is SendStatus.SENT]
        return sorted((s.due_at.date(), s.claimed_at.date()) for s in sends)

    due = [dt.date(2026, 9, 22), dt.date(2026, 10, 13)]  # 21 days after the first visit, then 21 more
    assert sent(auckland) == [(d, d - dt.timedelta(days=1)) for d in due]  # the UTC day before
    assert sent(honolulu) == [(d, d) for d in due]


def test_incentive_arrives_days_before_the_expected_visit_sized_by_tier(
    settings: Settings, business: Business
) -> None:
    madrid = "Europe/Madrid"
    last = local(madrid, 2026, 11, 1, 11, 0)
    lucia = business.contact(visits=regular(madrid, last, 28, 6))
    # Expected next visit: 29 November; the incentive is due three days before.
    assert only(settings, local(madrid, 2026, 11, 25, 10, 0), "incentive") == {}
    assert only(settings, local(madrid, 2026, 11, 26, 10, 0), "incentive") == {"planned": 1, "sent": 1}
    [send] = business.sends(lucia)
    assert send.incentive is not None and send.incentive >= Decimal(10)


def test_loyalty_milestone_when_the_next_visit_completes_the_card(
    settings: Settings, business: Business
) -> None:
    madrid = "Europe/Madrid"
    lucia = business.contact(visits=regular(madrid, local(madrid, 2026, 11, 22, 11, 0), 14, 9))
    assert only(settings, local(madrid, 2026, 11, 23, 10, 0), "loyalty_milestone") == {
        "planned": 1,
        "sent": 1,
    }
    assert business.sends(lucia)[0].occurrence == "card:1"


def test_promotion_reaches_loyal_customers_first(
    settings: Settings, business: Business, sessions: sessionmaker[Session]
) -> None:
    madrid = "Europe/Madrid"
    loyal = business.contact(visits=regular(madrid, local(madrid, 2026, 11, 25, 11, 0), 21, 8))
    newcomer = business.contact(visits=[local(madrid, 2026, 11, 20, 11, 0)])

    run(settings, local(madrid, 2026, 12, 1, 10, 0), touches=["promotion"])
    assert touches_sent(business, loyal) == ["promotion"] and touches_sent(business, newcomer) == []
    run(settings, local(madrid, 2026, 12, 4, 10, 0), touches=["promotion"])
    assert touches_sent(business, newcomer) == ["promotion"]


def test_referral_reward_goes_to_both_sides_when_the_friend_first_visits(
    settings: Settings, business: Business
) -> None:
    madrid = "Europe/Madrid"
    ana = business.contact(first_name="Ana", visits=regular(madrid, local(madrid, 2026, 11, 1, 11, 0), 30, 4))
    bea = business.contact(first_name="Bea")
    business.referral(ana, bea)
    assert only(settings, local(madrid, 2026, 11, 23, 10, 0), "referral_reward") == {}
    business.visit(bea, local(madrid, 2026, 11, 23, 10, 30))
    result = only(settings, local(madrid, 2026, 11, 23, 12, 0), "referral_reward")
    assert result == {"planned": 2, "sent": 2}
    bodies = {
        m["To"].addresses[0].addr_spec: m.get_body(("plain",)).get_content() for m in outbox_emails(settings)
    }
    assert "Bea" in bodies["c1@example.com"] and "Ana" in bodies["c2@example.com"]


def test_a_detractor_score_gets_an_apology_within_a_day_and_no_referral_ask(
    settings: Settings, business: Business
) -> None:
    madrid = "Europe/Madrid"
    lucia = business.contact(visits=regular(madrid, local(madrid, 2026, 11, 25, 11, 0), 21, 8))
    business.feedback(lucia, local(madrid, 2026, 11, 30, 19, 0), FeedbackKind.NPS, score=3)

    run(settings, local(madrid, 2026, 11, 30, 19, 30), touches=["complaint_recovery", "referral_ask"])
    assert touches_sent(business, lucia) == ["complaint_recovery"]
    [send] = business.sends(lucia)
    assert send.incentive == Decimal(20)  # the make-good offer
    assert only(settings, local(madrid, 2026, 12, 2, 10, 0), "complaint_recovery") == {}  # once, not daily


def test_an_open_complaint_holds_promotions_back_until_resolved(
    settings: Settings, business: Business, sessions: sessionmaker[Session]
) -> None:
    madrid = "Europe/Madrid"
    lucia = business.contact(visits=regular(madrid, local(madrid, 2026, 11, 25, 11, 0), 21, 8))
    business.feedback(lucia, local(madrid, 2026, 11, 10, 19, 0), FeedbackKind.COMPLAINT)
    summary = run(settings, local(madrid, 2026, 12, 1, 10, 0), touches=["promotion"]).as_dict()
    assert summary["held_complaint"] == 1 and touches_sent(business, lucia) == []

    with sessions.begin() as session:
        complaint = session.scalars(select(Feedback).where(Feedback.contact_id == lucia)).one()
        complaint.resolved_at = local(madrid, 2026, 12, 1, 12, 0)
    run(settings, local(madrid, 2026, 12, 2, 10, 0), touches=["promotion"])
    assert touches_sent(business, lucia) == ["promotion"]


def test_winback_sends_at_most_three_spaced_messages_then_counts_the_contact_lost(
    settings: Settings, business: Business, sessions: sessionmaker[Session]
) -> None:
    madrid = "Europe/Madrid"
    lucia = business.contact(visits=regular(madrid, local(madrid, 2026, 3, 1, 11, 0), 14, 6))
    day = local(madrid, 2026, 4, 1, 10, 0)  # lapses around 12 April: 3 × the 14-day rhythm after 1 March
    for _ in range(70):
        run(settings, day, touches=["winback"])
        day += dt.timedelta(days=1)
    sent = [s for s in business.sends(lucia) if s.touch == "winback"]
    assert [s.occurrence.split(":")[-1] for s in sent] == ["step1", "step2", "step3"]
    gaps = [(b.claimed_at - a.claimed_at).days for a, b in zip(sent, sent[1:], strict=False)]
    assert gaps == [14, 21]
    with sessions() as session:
        assert (
            session.scalar(select(ContactProfile.stage).where(ContactProfile.contact_id == lucia))
            is Stage.LOST
        )


def test_appreciation_day_for_active_customers_once_a_year(settings: Settings, business: Business) -> None:
    madrid = "Europe/Madrid"
    active = business.contact(visits=regular(madrid, local(madrid, 2026, 11, 10, 11, 0), 21, 3))
    prospect = business.contact()
    assert only(settings, local(madrid, 2026, 11, 26, 10, 0), "appreciation_day") == {"planned": 1, "sent": 1}
    assert only(settings, local(madrid, 2026, 11, 26, 15, 0), "appreciation_day") == {}
    assert touches_sent(business, active) == ["appreciation_day"] and business.sends(prospect) == []


def test_referral_ask_goes_to_promoters_and_loyal_customers(settings: Settings, business: Business) -> None:
    madrid = "Europe/Madrid"
    promoter = business.contact(visits=regular(madrid, local(madrid, 2026, 11, 10, 11, 0), 30, 2))
    business.feedback(promoter, local(madrid, 2026, 11, 10, 12, 0), FeedbackKind.NPS, score=10)
    passive = business.contact(visits=regular(madrid, local(madrid, 2026, 11, 10, 11, 0), 30, 2))
    business.feedback(passive, local(madrid, 2026, 11, 10, 12, 0), FeedbackKind.NPS, score=7)
    run(settings, local(madrid, 2026, 11, 23, 10, 0), touches=["referral_ask"])
    assert touches_sent(business, promoter) == ["referral_ask"] and touches_sent(business, passive) == []
