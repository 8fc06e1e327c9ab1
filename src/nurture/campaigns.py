"""Ad-hoc campaigns: one touch of the programme sent to a segment, by the calendar's rules and ledger.

A campaign is a contact calendar run with one touch whose audience is a segment: the same ranges and worker
processes, consent and fallback, send window, frequency caps, holdout, rendering and ledger. Each contact's
message has the key ``<touch>:<contact>:campaign:<name>`` and ``sends.campaign`` = the campaign's name, so
that a campaign run again (resumed after a cancel, or triggered twice) sends nothing twice.

A campaign's options are fixed in ``campaigns`` by its first real run: its start, and with loyalty first,
the start of its second wave. Loyal customers are due from the start, everyone else from the start plus
the early-access hours; each contact's message goes out in the first run inside their local send window
once it is due, for the touch's ``valid_days`` local days.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, and_, case, exists, func, select, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from nurture import db, ledger, profiles
from nurture.calendar import DAY, Calendar, Due, Plan, Rendered, Run, RunRequest, RunSummary, local_date
from nurture.channels import Messenger
from nurture.errors import CampaignError, UnknownTouch
from nurture.models import (
    AdhocCampaign,
    Channel,
    Contact,
    ContactProfile,
    SendStatus,
    Stage,
    TopicUnsubscribe,
)
from nurture.programme import Programme, Touch, load_programme
from nurture.rendering import Renderer
from nurture.segments import Segment, load_segments
from nurture.settings import Settings

P = ContactProfile
C = Contact
SAMPLES = 3
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


@dataclass(frozen=True, slots=True)
class CampaignSpec:
    """What a campaign is: one touch to one segment, with its options; fixed by its first real run."""

    name: str
    touch: str
    segment: str
    starts_at: dt.datetime
    channel: Channel | None = None
    holdout: float | None = None  # share of contacts held out; None: the touch's own
    loyalty_first_hours: int | None = None
    limit: int | None = None
    last_contact_id: int | None = None  # the limit, as contacts up to this id

    def second_wave_at(self) -> dt.datetime | None:
        """Give when everyone but loyal customers becomes due, if the campaign goes to loyal ones first."""
        if not self.loyalty_first_hours:
            return None
        return self.starts_at + dt.timedelta(hours=self.loyalty_first_hours)

    def differences(self, other: CampaignSpec) -> list[str]:
        """Name the options in which ``other`` asks for something else than this campaign has."""
        names = ("touch", "segment", "channel", "holdout", "loyalty_first_hours", "limit")
        return [
            f"{name} {getattr(self, name)!r} (asked: {getattr(other, name)!r})"
            for name in names
            if getattr(self, name) != getattr(other, name)
        ]


def default_name(touch: str, segment: str) -> str:
    """Give the name of a campaign when ops give none: the touch and the segment."""
    return f"{touch}-{segment}"[:64]


@dataclass(frozen=True, slots=True)
class Sample:
    """One rendered message of a campaign, shown to ops before it goes out."""

    contact: str  # external id, not the address: the summary is published as a Prefect artifact
    channel: str
    locale: str
    subject: str | None
    text: str
    encoding: str | None
    segments: int | None


@dataclass
class CampaignSummary(RunSummary):
    """What a campaign run did or, dry, would do: the calendar's counts, SMS segments and sample renders."""

    campaign: str = ""
    segment: str = ""
    audience: int = 0  # contacts in the segment (within the limit)
    early_access: int = 0  # of which loyal customers, in the first wave
    second_wave_at: dt.datetime | None = None
    sms_segments: int = 0
    sms_segment_price: Decimal = Decimal(0)
    samples: list[Sample] = field(default_factory=list)

    def combine(self, other: RunSummary) -> RunSummary:
        """Add another part of the same run into this summary."""
        super().combine(other)
        if isinstance(other, CampaignSummary):
            self.sms_segments += other.sms_segments
            self.samples = _pick_samples([*self.samples, *other.samples])
        return self

    @property
    def sms_cost(self) -> Decimal:
        """Give what the SMS cost (or would cost) at the configured price per segment."""
        return self.sms_segments * self.sms_segment_price

    def as_dict(self) -> dict[str, Any]:
        """Give the summary as plain JSON-ready data."""
        return {
            **super().as_dict(),
            "campaign": self.campaign,
            "segment": self.segment,
            "audience": self.audience,
            "early_access": self.early_access,
            "second_wave_at": self.second_wave_at.isoformat() if self.second_wave_at else None,
            "sms_segments": self.sms_segments,
            "sms_cost": str(self.sms_cost.quantize(Decimal("0.01"))),
            "samples": [dataclasses.asdict(sample) for sample in self.samples],
        }

    def markdown(self) -> str:
        """Give the summary as a Markdown report (the flow's artifact and the approval's description)."""
        mode = " (dry run: nothing claimed or sent)" if self.dry_run else ""
        t = self.totals
        lines = [
            f"# Campaign {self.campaign} at {self.at.isoformat()}{mode}",
            "",
            f"Segment **{self.segment}**: **{self.audience}** contacts"
            + (
                f", of which {self.early_access} loyal customers first; everyone else from"
                f" {self.second_wave_at.isoformat()}"
                if self.second_wave_at
                else ""
            )
            + ".",
            "",
            "| outcome | messages |",
            "|---|---:|",
        ]
        for name, label in (
            ("planned", "due now"),
            ("sent", "would go out" if self.dry_run else "sent"),
            ("held_out", "held out (control group)"),
            ("suppressed_consent", "no consent on any of its channels"),
            ("held_complaint", "held: open complaint"),
            ("deferred_window", "outside their local send window: a later run"),
            ("deferred_cap", "over the frequency caps: a later run"),
            ("skipped_margin", "offer above the margin"),
            ("template_errors", "template errors"),
            ("failed", "failed"),
            ("unknown", "unknown outcome"),
            ("taken_by_other_run", "taken by another run"),
        ):
            if t[name] or name in ("planned", "sent"):
                lines.append(f"| {label} | {t[name]} |")
        channels = ", ".join(f"{k} {v}" for k, v in sorted(self.by_channel.items())) or "none"
        lines += [
            "",
            f"By channel: {channels}. SMS segments: {self.sms_segments}, estimated cost"
            f" {self.sms_cost:.2f} (at {self.sms_segment_price} a segment).",
        ]
        for sample in self.samples:
            lines += ["", f"## Sample: {sample.channel}, {sample.locale}, contact {sample.contact}", ""]
            if sample.subject is not None:
                lines.append(f"**{sample.subject}**")
                lines.append("")
            if sample.encoding is not None:
                lines.append(f"{sample.encoding}, {sample.segments} segment(s)")
                lines.append("")
            lines += ["```", sample.text[:1200].rstrip(), "```"]
        if self.errors:
            lines += ["", "## Errors", ""] + [f"- {error}" for error in self.errors[:50]]
        return "\n".join(lines) + "\n"


def _pick_samples(samples: Sequence[Sample]) -> list[Sample]:
    """Keep up to three samples, different channels and locales first."""
    seen: set[tuple[str, str]] = set()
    distinct: list[Sample] = []
    rest: list[Sample] = []
    for sample in samples:
        combo = (sample.channel, sample.locale)
        (rest if combo in seen else distinct).append(sample)
        seen.add(combo)
    return [*distinct, *rest][:SAMPLES]


class CampaignCalendar(Calendar):
    """The contact calendar narrowed to one touch, due for a segment from the campaign's start (or wave)."""

    def __init__(
        self,
        settings: Settings,
        programme: Programme,
        at: dt.datetime,
        spec: CampaignSpec,
        segment: Segment,
        *,
        dry_run: bool = False,
        run_id: str | None = None,
    ) -> None:
        touch = campaign_touch(programme, spec)
        # Its own control group: the holdout is drawn per campaign, not per touch.
        rules = programme.rules.model_copy(
            update={"holdout_salt": f"{programme.rules.holdout_salt}:campaign:{spec.name}"}
        )
        super().__init__(
            settings,
            dataclasses.replace(programme, rules=rules),
            at,
            dry_run=dry_run,
            touches=[spec.touch],
            run_id=run_id,
        )
        self.touches = (touch,)
        self.spec = spec
        self.segment = segment
        self._sms_segments = 0
        self._samples: list[Sample] = []

    def prepare(self, session: Session) -> tuple[RunSummary, profiles.Basis]:
        """Bring every profile to the run's instant, so that the segment is judged on today's profiles."""
        summary, basis = super().prepare(session)
        low, high = session.execute(select(func.min(C.id), func.max(C.id))).one()
        if low is not None:
            super()._profile_range(session, basis, low, high + 1)
        campaign = CampaignSummary(
            at=summary.at,
            dry_run=self.dry_run,
            totals=summary.totals,
            campaign=self.spec.name,
            segment=self.spec.segment,
            second_wave_at=self.spec.second_wave_at(),
            sms_segment_price=self.settings.sms_segment_price,
        )
        campaign.audience, campaign.early_access = audience(session, self.spec, self.segment, self.at)
        return campaign, basis

    def _profile_range(self, session: Session, basis: profiles.Basis, low: int, high: int) -> Counter[str]:
        return Counter()  # every profile was written once, by ``prepare``

    def run_range(
        self, sessions: sessionmaker[Session], basis: profiles.Basis, low: int, high: int
    ) -> RunSummary:
        """Plan and send the campaign to the segment's contacts with ids in [low, high)."""
        self._sms_segments, self._samples = 0, []
        part = super().run_range(sessions, basis, low, high)
        fields = {f.name: getattr(part, f.name) for f in dataclasses.fields(RunSummary)}
        return CampaignSummary(
            **fields, sms_segments=self._sms_segments, samples=_pick_samples(self._samples)
        )

    def _due(self, session: Session, touch: Touch, low: int, high: int) -> Iterator[Due]:
        spec, at = self.spec, self.at
        if at < spec.starts_at:
            return
        second = spec.second_wave_at()
        early = P.stage == Stage.LOYAL if second is not None else true()
        query = (
            select(P.contact_id, C.timezone, case((early, True), else_=False).label("early"))
            .join(C, C.id == P.contact_id)
            .where(P.contact_id >= low, P.contact_id < high, members(spec, self.segment, at))
            .where(~exists().where(TopicUnsubscribe.contact_id == C.id, TopicUnsubscribe.topic == touch.name))
        )
        if second is not None and at < second:
            query = query.where(early)
        occurrence = f"campaign:{spec.name}"
        for row in session.execute(query):
            begins = spec.starts_at if row.early or second is None else second
            due = local_date(begins, row.timezone)
            yield Due(
                row.contact_id,
                touch,
                occurrence,
                due,
                due + (touch.valid_days - 1) * DAY,
                early=bool(row.early),
            )

    def _entry(self, plan: Plan, message: Rendered | None, status: SendStatus) -> ledger.Entry:
        return dataclasses.replace(super()._entry(plan, message, status), campaign=self.spec.name)

    def _render(
        self, plan: Plan, friends: Mapping[int, str | None], tags: Mapping[int, list[str]]
    ) -> Rendered:
        message = super()._render(plan, friends, tags)
        if message.segments is not None and plan.channel is Channel.SMS:
            self._sms_segments += message.segments
        if len(self._samples) < 20:
            self._samples.append(
                Sample(
                    contact=plan.recipient.external_id,
                    channel=str(plan.channel),
                    locale=message.locale,
                    subject=message.subject,
                    text=message.text,
                    encoding=message.encoding,
                    segments=message.segments,
                )
            )
        return message


def campaign_touch(programme: Programme, spec: CampaignSpec) -> Touch:
    """Give the programme's touch as the campaign sends it: its channel and holdout as ops chose."""
    try:
        touch = programme.touch(spec.touch)
    except KeyError:
        raise UnknownTouch([spec.touch], known=[t.name for t in programme.touches]) from None
    update: dict[str, Any] = {}
    if spec.channel is not None:
        update["channels"] = [spec.channel]
    if spec.holdout is not None:
        update["holdout"] = spec.holdout
    return touch.model_copy(update=update)


def members(spec: CampaignSpec, segment: Segment, at: dt.datetime) -> ColumnElement[bool]:
    """Give the SQL condition selecting the campaign's contacts: the segment, within its limit."""
    condition = segment.condition(at)
    if spec.last_contact_id is not None:
        condition = and_(condition, C.id <= spec.last_contact_id)
    return condition


def audience(session: Session, spec: CampaignSpec, segment: Segment, at: dt.datetime) -> tuple[int, int]:
    """Count the campaign's contacts, and the loyal customers among them."""
    loyal = func.coalesce(func.sum(case((P.stage == Stage.LOYAL, 1), else_=0)), 0)
    query = select(func.count(), loyal).select_from(P).join(C, C.id == P.contact_id)
    total, early = session.execute(query.where(members(spec, segment, at))).one()
    return int(total), int(early)


def last_contact_id(session: Session, segment: Segment, limit: int, at: dt.datetime) -> int | None:
    """Give the id of the ``limit``-th contact of the segment by id; None when the segment is smaller."""
    query = (
        select(C.id)
        .join(P, P.contact_id == C.id)
        .where(segment.condition(at))
        .order_by(C.id)
        .offset(limit - 1)
        .limit(1)
    )
    return session.scalar(query)


# A campaign's record: its options fixed by the first real run.


def stored(session: Session, name: str) -> AdhocCampaign | None:
    """Give the campaign called ``name`` if a real run started it."""
    return session.scalar(select(AdhocCampaign).where(AdhocCampaign.name == name))


def resolve(session: Session, asked: CampaignSpec, segment: Segment, at: dt.datetime) -> CampaignSpec:
    """Give the campaign as stored when it has started, else as asked; refuse other options for it."""
    record = stored(session, asked.name)
    if record is None:
        if asked.limit is None:
            return asked
        if profiles.last_refreshed(session) is None:
            raise CampaignError(
                "--limit picks the segment's first contacts by their profiles, and there are none yet:"
                " run `nurture contacts refresh` first",
                campaign=asked.name,
            )
        return dataclasses.replace(asked, last_contact_id=last_contact_id(session, segment, asked.limit, at))
    spec = _spec(record)
    different = spec.differences(asked)
    if different:
        raise CampaignError(
            f"it started on {spec.starts_at.isoformat()} with other options: {'; '.join(different)}."
            " Run it again with the same options to resume it, or give a new --campaign name",
            campaign=asked.name,
        )
    return spec


def start(session: Session, spec: CampaignSpec, *, at: dt.datetime, approved: bool) -> CampaignSpec:
    """Record the campaign's options unless a run recorded them first; give them as stored."""
    row = {
        "name": spec.name,
        "touch": spec.touch,
        "segment": spec.segment,
        "channel": spec.channel,
        "holdout": spec.holdout,
        "loyalty_first_hours": spec.loyalty_first_hours,
        "contact_limit": spec.limit,
        "last_contact_id": spec.last_contact_id,
        "starts_at": spec.starts_at,
        "created_at": at,
        "approved_at": at if approved else None,
    }
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    session.execute(insert(AdhocCampaign).on_conflict_do_nothing(index_elements=["name"]), [row])
    record = stored(session, spec.name)
    assert record is not None
    return _spec(record)


def _spec(record: AdhocCampaign) -> CampaignSpec:
    return CampaignSpec(
        name=record.name,
        touch=record.touch,
        segment=record.segment,
        starts_at=record.starts_at,
        channel=record.channel,
        holdout=record.holdout,
        loyalty_first_hours=record.loyalty_first_hours,
        limit=record.contact_limit,
        last_contact_id=record.last_contact_id,
    )


def next_run(spec: CampaignSpec, summary: RunSummary) -> dt.datetime | None:
    """Give when the campaign should run again to finish, or None when nothing is left for it to do.

    Before its start: at the start. Contacts outside their send window or over the caps: within the hour.
    Loyal customers first: at the second wave, when it has not begun.
    """
    at = summary.at
    if at < spec.starts_at:
        return spec.starts_at
    waiting = summary.totals["deferred_window"] + summary.totals["deferred_cap"]
    candidates = [at + dt.timedelta(hours=1)] if waiting else []
    second = spec.second_wave_at()
    if second is not None and at < second:
        candidates.append(second)
    return min(candidates) if candidates else None


# Running it: the flow and the CLI go through these.


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignRequest(RunRequest):
    """One run of a campaign, in a form a worker process can be given to take part in the same run."""

    spec: CampaignSpec

    def calendar(self) -> CampaignCalendar:
        """Build this run's calendar: the programme, the segment and the templates loaded."""
        programme = load_programme(self.settings.templates_dir)
        segment = load_segments(self.settings.templates_dir).get(self.spec.segment)
        return CampaignCalendar(
            self.settings, programme, self.at, self.spec, segment, dry_run=self.dry_run, run_id=self.run_id
        )


@dataclass(frozen=True, slots=True)
class Planned:
    """A campaign as it stands before a run: stored once started, else as asked; its segment's size."""

    spec: CampaignSpec
    started: bool
    audience: int  # as the profiles stand, before the run brings them up to date
    early_access: int
    profiles_as_of: dt.datetime | None


def plan(settings: Settings, asked: CampaignSpec, at: dt.datetime) -> Planned:
    """Check the touch, segment and channel asked for; give the campaign as stored or asked, and its size."""
    programme = load_programme(settings.templates_dir)
    segment = load_segments(settings.templates_dir).get(asked.segment)
    touch = campaign_touch(programme, asked)
    renderer = Renderer(programme.root, default_locale=programme.rules.default_locale)
    for channel in touch.channels:
        if not renderer.has(touch.name, channel, programme.rules.default_locale):
            raise CampaignError(
                f"the touch {touch.name} has no {channel} templates in the default locale"
                f" {programme.rules.default_locale}",
                campaign=asked.name,
            )
    engine = db.connect(settings)
    try:
        with db.session_factory(engine).begin() as session:
            spec = resolve(session, asked, segment, at)
            size, early = audience(session, spec, segment, at)
            started = stored(session, asked.name) is not None
            return Planned(spec, started, size, early, profiles.last_refreshed(session))
    finally:
        engine.dispose()


def begin(settings: Settings, spec: CampaignSpec, at: dt.datetime, *, approved: bool) -> CampaignSpec:
    """Record the campaign's options in the configured database (see ``start``)."""
    engine = db.connect(settings)
    try:
        with db.session_factory(engine).begin() as session:
            return start(session, spec, at=at, approved=approved)
    finally:
        engine.dispose()


@contextlib.contextmanager
def open_campaign(
    settings: Settings, spec: CampaignSpec, at: dt.datetime, *, dry_run: bool = False
) -> Iterator[Run]:
    """Open a run of the campaign: the database, the programme, the channels, the workers."""
    run = Run(CampaignRequest(settings=settings, at=at, dry_run=dry_run, spec=spec))
    try:
        yield run
    finally:
        run.close()


def run_campaign(
    settings: Settings,
    spec: CampaignSpec,
    at: dt.datetime,
    *,
    dry_run: bool = False,
    batch_size: int = 50_000,
    messengers: Mapping[Channel, Messenger] | None = None,
) -> CampaignSummary:
    """Run the campaign once for ``at`` in this process, without Prefect or approval (tests use it).

    ``messengers`` replace the configured channels; they need the run in one process
    (``NURTURE_CALENDAR_PROCESSES=1``).
    """
    with open_campaign(settings, spec, at, dry_run=dry_run) as run:
        run.calendar.messengers.update(messengers or {})
        summary, ranges = run.begin(batch_size)
        for low, high in ranges:
            summary.combine(run.send(low, high))
    assert isinstance(summary, CampaignSummary)
    return summary
