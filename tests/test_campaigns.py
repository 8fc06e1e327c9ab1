"""Ad-hoc campaigns on hand-made contacts: dry run, the calendar's rules, waves, exactly once, resuming."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from channels import fake_providers
from channels.fake_providers import Answer, Received
from histories import NOW, Business, outbox_emails, outbox_files, outbox_sms
from nurture import campaigns, profiles
from nurture.campaigns import CampaignSpec, run_campaign
from nurture.channels import Delivery, OutgoingMessage
from nurture.channels.outbox import EmailOutbox
from nurture.errors import CampaignError, UnknownSegment, UnknownTouch
from nurture.models import Channel, SendStatus
from nurture.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DAY = dt.timedelta(days=1)
LOYAL_VISITS = [NOW - DAY * d for d in (100, 70, 40, 10)]


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """The shipped templates without the holdout, and a segment of everyone who visited."""
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates", root)
    programme = root / "programme.yaml"
    programme.write_text(programme.read_text().replace("holdout: 0.10", "holdout: 0"))
    with (root / "segments.yaml").open("a") as segments:
        segments.write("\nvisitors:\n  min_visits: 1\n")
    return root


@pytest.fixture
def settings(settings: Settings, templates: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(templates))
    return settings.model_copy(
        update={"templates_dir": templates, "calendar_processes": 1, "sms_segment_price": Decimal("0.05")}
    )


@pytest.fixture
def business(sessions: sessionmaker[Session]) -> Business:
    return Business(sessions)


def spec(**options: object) -> CampaignSpec:
    values: dict[str, object] = {
        "name": "winter",
        "touch": "promotion",
        "segment": "visitors",
        "starts_at": NOW,
    }
    values.update(options)
    return CampaignSpec(**values)  # type: ignore[arg-type]


def started(settings: Settings, asked: CampaignSpec, at: dt.datetime = NOW) -> CampaignSpec:
    planned = campaigns.plan(settings, asked, at)
    return campaigns.begin(settings, planned.spec, at, approved=False)


def per_contact(business: Business) -> dict[int, list[SendStatus]]:
    found: dict[int, list[SendStatus]] = {}
    for send in business.sends():
        found.setdefault(send.contact_id, []).append(send.status)
    return found


def test_a_dry_run_counts_renders_and_estimates_and_writes_nothing(
    settings: Settings, business: Business
) -> None:
    emailed = business.contact(visits=LOYAL_VISITS)
    business.contact(locale="pt", timezone="Europe/Lisbon", visits=LOYAL_VISITS)
    texted = business.contact(
        email=None, phone="+34612345678", consent=[Channel.SMS], visits=[NOW - DAY * 5], locale="es"
    )
    business.contact(consent=[], visits=[NOW - DAY * 5])  # agreed to nothing
    business.contact(timezone="Pacific/Honolulu", locale="en", visits=[NOW - DAY * 5])  # 02:00 there
    business.contact(visits=[])  # a prospect: not in the segment

    asked = spec(channel=None)
    planned = campaigns.plan(settings, asked, NOW).spec
    summary = run_campaign(settings, planned, NOW, dry_run=True)

    assert not campaigns.plan(settings, asked, NOW).started
    assert summary.audience == 5
    assert summary.totals["planned"] == 5
    # promotion goes by email only: the SMS-only contact has no channel it agreed to
    assert summary.totals["suppressed_consent"] == 2
    assert summary.totals["deferred_window"] == 1
    assert summary.totals["sent"] == 2 and summary.by_channel == {"email": 2}
    assert summary.sms_segments == 0
    assert [s.locale for s in summary.samples] == ["es", "pt"]
    assert summary.samples[0].contact == "c1" and summary.samples[0].subject
    assert business.sends() == [] and outbox_files(settings) == []

    by_sms = run_campaign(settings, dataclasses.replace(planned, channel=Channel.SMS), NOW, dry_run=True)
    assert by_sms.totals["sent"] == 1 and by_sms.by_channel == {"sms": 1}
    assert by_sms.sms_segments >= 1
    assert by_sms.sms_cost == by_sms.sms_segments * settings.sms_segment_price
    [sample] = by_sms.samples
    assert sample.channel == "sms" and sample.encoding in ("GSM-7", "UCS-2")
    markdown = by_sms.markdown()
    assert "Segment **visitors**: **5** contacts" in markdown and "estimated cost" in markdown
    assert business.sends() == [] and emailed and texted


def test_a_campaign_sends_once_with_its_name_on_every_ledger_row(
    settings: Settings, business: Business
) -> None:
    ids = [business.contact(visits=LOYAL_VISITS) for _ in range(6)]
    campaign = started(settings, spec(holdout=0.5))

    first = run_campaign(settings, campaign, NOW)
    again = run_campaign(settings, campaign, NOW + dt.timedelta(hours=1))

    assert first.totals["sent"] + first.totals["held_out"] == 6
    assert 0 < first.totals["held_out"] < 6  # a 50% holdout of six, drawn per campaign
    assert again.totals["sent"] == again.totals["held_out"] == again.totals["planned"] == 0
    sends = business.sends()
    assert sorted(s.contact_id for s in sends) == ids
    assert {s.campaign for s in sends} == {"winter"}
    assert {s.key for s in sends} == {f"promotion:{i}:campaign:winter" for i in ids}
    assert len(outbox_emails(settings)) == first.totals["sent"]


def test_the_calendar_rules_hold_caps_and_window(settings: Settings, business: Business) -> None:
    today = business.contact(visits=[NOW - DAY * 2, NOW - DAY * 1])  # welcome-like news today
    night = business.contact(timezone="America/Los_Angeles", visits=[NOW - DAY * 3])  # 04:00 there
    campaign = started(settings, spec(name="a"))
    assert run_campaign(settings, campaign, NOW).totals["sent"] == 2 - 1  # Los Angeles waits

    # A second campaign the same local day is over the cap for the contact who got the first.
    second = started(settings, spec(name="b"))
    capped = run_campaign(settings, second, NOW)
    assert capped.totals["deferred_cap"] == 1 and capped.totals["sent"] == 0
    assert capped.totals["deferred_window"] == 1

    la_morning = NOW + dt.timedelta(hours=6)  # 10:00 in Los Angeles
    later = run_campaign(settings, campaign, la_morning)
    assert later.totals["sent"] == 1
    assert {s.contact_id for s in business.sends() if s.campaign == "a"} == {today, night}


def test_loyal_customers_first_then_everyone_once_as_the_second_wave(
    settings: Settings, business: Business
) -> None:
    loyal = business.contact(visits=LOYAL_VISITS)
    newer = business.contact(visits=[NOW - DAY * 3])
    campaign = started(settings, spec(loyalty_first_hours=48))
    assert campaign.second_wave_at() == NOW + 2 * DAY

    first = run_campaign(settings, campaign, NOW)
    assert first.audience == 2 and first.early_access == 1
    assert first.totals["sent"] == 1 and [s.contact_id for s in business.sends()] == [loyal]
    assert campaigns.next_run(campaign, first) == NOW + 2 * DAY

    assert run_campaign(settings, campaign, NOW + DAY).totals["sent"] == 0  # still early access

    wave = NOW + 2 * DAY + dt.timedelta(hours=1)
    second = run_campaign(settings, campaign, wave)
    twice = run_campaign(settings, campaign, wave)  # triggered again: nothing more
    assert second.totals["sent"] == 1 and twice.totals["sent"] == 0
    assert per_contact(business) == {loyal: [SendStatus.SENT], newer: [SendStatus.SENT]}
    assert campaigns.next_run(campaign, twice) is None


class Cancelled(BaseException):
    """What a cancelled flow run's process gets: not an error the run may catch and go on from."""


class CancelledMidway(EmailOutbox):
    """The outbox, cancelled while pushing its second batch: half of it written, nothing recorded."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.batches = 0

    def push(self, messages: Sequence[OutgoingMessage]) -> list[Delivery]:
        self.batches += 1
        if self.batches == 2:
            super().push(messages[: len(messages) // 2])
            raise Cancelled
        return super().push(messages)


def test_a_cancelled_campaign_keeps_what_it_sent_and_resuming_sends_nothing_twice(
    settings: Settings, business: Business
) -> None:
    ids = [business.contact(visits=LOYAL_VISITS) for _ in range(10)]
    settings = settings.model_copy(update={"send_batch_size": 4})
    campaign = started(settings, spec())

    with pytest.raises(Cancelled):
        run_campaign(settings, campaign, NOW, messengers={Channel.EMAIL: CancelledMidway(settings)})
    before = {s.contact_id: s for s in business.sends()}
    assert [s.status for s in before.values()].count(SendStatus.SENT) == 4  # the first batch, recorded
    assert len(outbox_emails(settings)) == 4 + 2

    resumed = run_campaign(settings, campaign, NOW + dt.timedelta(minutes=10))

    assert resumed.totals["sent"] == 6  # the second batch's claims taken over, and the rest
    assert per_contact(business) == {i: [SendStatus.SENT] for i in ids}
    after = {s.contact_id: s for s in business.sends()}
    for contact_id, send in before.items():
        assert after[contact_id].id == send.id  # what was sent stays recorded as it was
    emails = outbox_emails(settings)
    assert len(emails) == 10
    assert sorted(int(m["X-Nurture-Send-Id"]) for m in emails) == sorted(s.id for s in after.values())


def test_a_campaign_stopped_while_sendgrid_sends_records_what_went_out_and_gives_up_the_rest(
    settings: Settings, business: Business
) -> None:
    ids = [business.contact(visits=LOYAL_VISITS) for _ in range(12)]
    provider = fake_providers.sendgrid()
    settings = settings.model_copy(
        update=fake_providers.sendgrid_settings(provider.url).model_dump(
            include={"email_channel", "sendgrid_api_key", "sendgrid_base_url", "email_from"}
        )
        | {"send_batch_size": 4, "sendgrid_concurrency": 2}
    )
    campaign = started(settings, spec())

    with provider.running(), campaigns.open_campaign(settings, campaign, NOW) as run:

        def cancelled_at_the_fifth(received: Received, before: int) -> Answer:
            if before == 4:
                run.stop()  # as a cancelled flow run's process does, from another thread
            return Answer(202, headers={"X-Message-Id": f"sg-{before + 1}"}, delay=0.2)

        provider.script = cancelled_at_the_fifth
        _, ranges = run.begin(100)
        for low, high in ranges:
            run.send(low, high)
        went_out = len(provider.requests)
        # The fifth and any request in flight with it finish; no other starts.
        assert 5 <= went_out <= 6
        assert [s.status for s in business.sends()] == [SendStatus.SENT] * went_out

        provider.script = lambda received, before: Answer(202, headers={"X-Message-Id": f"sg-{before + 1}"})
        resumed = run_campaign(settings, campaign, NOW + dt.timedelta(minutes=10))

    assert resumed.totals["sent"] == 12 - went_out
    assert per_contact(business) == {i: [SendStatus.SENT] for i in ids}
    recipients = [r.body["personalizations"][0]["to"][0]["email"] for r in provider.requests]
    assert len(recipients) == 12 and len(set(recipients)) == 12


def test_resuming_with_other_options_is_refused_naming_them(settings: Settings, business: Business) -> None:
    business.contact(visits=LOYAL_VISITS)
    started(settings, spec(holdout=0.2))
    with pytest.raises(CampaignError, match=r"campaign 'winter'.*holdout 0.2 \(asked: 0.3\)"):
        campaigns.plan(settings, spec(holdout=0.3), NOW)
    resumed = campaigns.plan(settings, spec(holdout=0.2, starts_at=NOW + DAY), NOW + DAY)
    assert resumed.started and resumed.spec.starts_at == NOW  # the start stays what the first run fixed


def test_a_limit_keeps_the_campaign_to_the_same_first_contacts(
    settings: Settings, business: Business
) -> None:
    ids = [business.contact(visits=LOYAL_VISITS) for _ in range(5)]
    with pytest.raises(CampaignError, match="nurture contacts refresh"):
        started(settings, spec(limit=3))
    with business.sessions.begin() as session:
        profiles.refresh(session, settings, NOW)
    campaign = started(settings, spec(limit=3))
    business.contact(visits=LOYAL_VISITS)
    summary = run_campaign(settings, campaign, NOW)
    assert summary.audience == 3 and summary.totals["sent"] == 3
    assert sorted(per_contact(business)) == ids[:3]


def test_an_unknown_segment_or_touch_is_one_clear_error(settings: Settings) -> None:
    with pytest.raises(UnknownSegment, match="unknown segment 'vip'"):
        campaigns.plan(settings, spec(segment="vip"), NOW)
    with pytest.raises(UnknownTouch, match="unknown touch promo"):
        campaigns.plan(settings, spec(touch="promo"), NOW)


def test_sms_goes_out_with_its_segments_counted(settings: Settings, business: Business) -> None:
    business.contact(email=None, phone="+34612345678", consent=[Channel.SMS], visits=LOYAL_VISITS)
    campaign = started(settings, spec(channel=Channel.SMS))
    summary = run_campaign(settings, campaign, NOW)
    [sms] = outbox_sms(settings)
    assert summary.totals["sent"] == 1 and sms["segments"] == summary.sms_segments
