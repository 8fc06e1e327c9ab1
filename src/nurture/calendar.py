"""The contact calendar: which message, if any, each contact is due now, and sending it exactly once.

A run plans for one instant (``at``). It refreshes every profile, then walks the contacts in ranges of ids;
for each range it asks SQL, one query per touch, which contacts the touch is due for (leaving out those who
unsubscribed from that touch's topic), and then applies the rules every send obeys, in this order:

1. the exact local due date (each contact's own timezone, DST included) and how long the message stays valid;
2. the ledger: a message whose key is already recorded is done;
3. consent: the first channel of the touch's channel order that the contact agreed to and can be reached on;
4. no marketing while a complaint is open;
5. the local send window: outside it the message waits for the first run inside that day's window;
6. frequency caps across channels, highest priority first; a capped message waits while it is still valid;
7. the holdout: a deterministic share of contacts per touch is recorded as held out and never sent;
8. render, claim the key in the ledger, call the channel, record what it said.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import hashlib
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import lru_cache
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ColumnElement,
    Engine,
    Select,
    and_,
    exists,
    func,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session, aliased, sessionmaker

from nurture import consent, db, ledger, profiles
from nurture.channels import Delivery, Messenger, OutgoingMessage, messenger_for
from nurture.channels.sending import shared_by
from nurture.errors import ContactNotFound, ProfileNotRefreshed, TemplateError, UnknownTouch
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
    Referral,
    Send,
    SendCategory,
    SendStatus,
    Stage,
    TopicUnsubscribe,
    ValueTier,
)
from nurture.programme import (
    AfterFirstVisit,
    Annual,
    Audience,
    BeforeExpectedVisit,
    Birthday,
    Campaign,
    Complaint,
    ContentItem,
    Every,
    Lapsed,
    Offer,
    OfferKind,
    PointsThreshold,
    Programme,
    PunchCard,
    ReferredFriendVisited,
    Touch,
    load_programme,
)
from nurture.rendering import Renderer
from nurture.settings import Settings
from nurture.tokens import unsubscribe_url

P = ContactProfile
C = Contact
DAY = dt.timedelta(days=1)
# Every timezone's local date at an instant lies within this many days of the UTC date.
TZ_MARGIN = dt.timedelta(days=2)


@lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def local_date(instant: dt.datetime, timezone: str) -> dt.date:
    """Give the calendar date of ``instant`` where the contact lives."""
    return instant.astimezone(_zone(timezone)).date()


def _same_day_this_year(month: int, day: int, year: int) -> dt.date:
    """Give month/day in ``year``; 29 February is kept on the 28th in other years."""
    try:
        return dt.date(year, month, day)
    except ValueError:
        return dt.date(year, month, day - 1)


STALE_CLAIM = "claimed by a run that did not finish, and not taken over since: it may have gone out"

# The summary of a run.

COUNTS = (
    "planned",
    "sent",
    "held_out",
    "deferred_window",
    "deferred_cap",
    "suppressed_consent",
    "held_complaint",
    "skipped_margin",
    "failed",
    "unknown",
    "consent_revoked",
    "template_errors",
    "taken_by_other_run",
)


# The steps of a run, timed: the run's own process sums the history up (``prepare``); each range then
# writes its profiles, plans, and takes each message along the message path: render, claim, push, record.
STEPS = ("prepare", "profiles", "plan", "render", "claim", "push", "record")
MESSAGE_PATH = ("render", "claim", "push", "record")
# What went along the message path: the holdout is claimed (as held out) too.
HANDLED = ("sent", "held_out", "failed", "unknown", "taken_by_other_run")


@dataclass
class RunSummary:
    """What a run did: totals, the same counts per touch, and every error worth a person's attention."""

    at: dt.datetime
    dry_run: bool = False
    totals: Counter[str] = field(default_factory=Counter)
    by_touch: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    by_channel: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    unknown_sends: list[int] = field(default_factory=list)
    stages: Counter[str] = field(default_factory=Counter)
    # Seconds each step took (``STEPS``), CPU and wall, summed over the processes that took part; left
    # out of ``as_dict``, so that the same run gives the same JSON.
    cpu: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    wall: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))

    def count(self, touch: str, outcome: str, n: int = 1) -> None:
        """Count ``n`` messages of ``touch`` with ``outcome``."""
        self.totals[outcome] += n
        self.by_touch[touch][outcome] += n

    def combine(self, other: RunSummary) -> RunSummary:
        """Add another part of the same run into this summary."""
        self.totals.update(other.totals)
        for touch, counts in other.by_touch.items():
            self.by_touch[touch].update(counts)
        self.by_channel.update(other.by_channel)
        self.errors.extend(other.errors)
        self.unknown_sends.extend(other.unknown_sends)
        self.stages.update(other.stages)
        for step, seconds in other.cpu.items():
            self.cpu[step] += seconds
        for step, seconds in other.wall.items():
            self.wall[step] += seconds
        return self

    @contextlib.contextmanager
    def timed(self, step: str) -> Iterator[None]:
        """Add the CPU (this thread's) and wall seconds the block takes to ``step``."""
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            yield
        finally:
            self.cpu[step] += time.thread_time() - cpu
            self.wall[step] += time.perf_counter() - wall

    def speed(self) -> str:
        """Say where the run's time went, step by step, and how fast the message path went per core."""
        steps = ", ".join(
            f"{step} {self.cpu[step]:.1f} s CPU ({self.wall[step]:.1f} s wall)"
            for step in STEPS
            if step in self.wall
        )
        messages = sum(self.totals[name] for name in HANDLED)
        path = sum(self.cpu.get(step, 0.0) for step in MESSAGE_PATH)
        rate = f"{messages / path:,.0f} messages a second per core" if path else "no message sent"
        return (
            f"{steps}. Message path ({' + '.join(MESSAGE_PATH)}): {messages:,} messages in {path:.2f} s CPU,"
            f" {rate}"
        )

    def as_dict(self) -> dict[str, Any]:
        """Give the summary as plain JSON-ready data."""
        return {
            "at": self.at.isoformat(),
            "dry_run": self.dry_run,
            **{name: self.totals[name] for name in COUNTS},
            "by_touch": {
                touch: {name: counts[name] for name in COUNTS}
                for touch, counts in sorted(self.by_touch.items())
            },
            "by_channel": dict(sorted(self.by_channel.items())),
            "errors": list(self.errors),
            "unknown_sends": list(self.unknown_sends),
            "stages": {str(stage): self.stages[str(stage)] for stage in Stage},
        }

    def markdown(self) -> str:
        """Give the summary as a Markdown report (the flow's artifact)."""
        mode = " (dry run: nothing claimed or sent)" if self.dry_run else ""
        shown = [name for name in COUNTS if self.totals[name] or name in ("planned", "sent")]
        lines = [
            f"# Contact calendar at {self.at.isoformat()}{mode}",
            "",
            "| touch | " + " | ".join(shown) + " |",
            "|---|" + "---:|" * len(shown),
        ]
        for touch, counts in sorted(self.by_touch.items()):
            lines.append(f"| {touch} | " + " | ".join(str(counts[name]) for name in shown) + " |")
        lines.append("| **total** | " + " | ".join(f"**{self.totals[name]}**" for name in shown) + " |")
        if self.by_channel:
            lines += [
                "",
                "Sent by channel: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_channel.items())),
            ]
        if self.unknown_sends:
            ids = ", ".join(str(send_id) for send_id in self.unknown_sends[:50])
            more = f" and {len(self.unknown_sends) - 50} more" if len(self.unknown_sends) > 50 else ""
            lines += [
                "",
                f"{len(self.unknown_sends)} sends have an unknown outcome (the provider may have them) and"
                f" will not be resent by themselves: {ids}{more}. `nurture sends reconcile` settles them.",
            ]
        if self.errors:
            lines += ["", "## Errors", ""] + [f"- {error}" for error in self.errors[:50]]
            if len(self.errors) > 50:
                lines.append(f"- ... and {len(self.errors) - 50} more")
        return "\n".join(lines) + "\n"


# What SQL finds due; the rules then decide what happens to it.


@dataclass(frozen=True, slots=True)
class Due:
    """One message SQL found due: for whom, which occurrence, and the local date it became due."""

    contact_id: int
    touch: Touch
    occurrence: str
    due: dt.date
    until: dt.date | None  # the last local date it is worth sending; None: no end
    step: int | None = None
    friend_id: int | None = None
    content: ContentItem | None = None
    early: bool = False
    timezone: str | None = None  # the contact's, when the query that found the message read it


@dataclass(frozen=True, slots=True)
class Recipient:
    """What a run knows about one contact while planning and rendering."""

    id: int
    external_id: str
    first_name: str | None
    last_name: str | None
    email: str | None
    phone: str | None
    locale: str
    timezone: str
    referral_code: str
    stage: Stage
    value_tier: str
    satisfaction: str
    complaint_open: bool
    visits: int
    last_visit: dt.datetime | None
    expected_next_visit: dt.datetime | None
    total_spend: Decimal
    currency: str | None
    points: int
    stamps: int
    email_consent: bool
    sms_consent: bool

    def reachable(self, channel: Channel) -> bool:
        """Tell whether the contact agreed to ``channel`` and has an address on it."""
        if channel is Channel.EMAIL:
            return self.email_consent and bool(self.email)
        return self.sms_consent and bool(self.phone)


class Calendar:
    """One run of the contact calendar for one instant; plans and sends range by range."""

    def __init__(
        self,
        settings: Settings,
        programme: Programme,
        at: dt.datetime,
        *,
        dry_run: bool = False,
        touches: Sequence[str] | None = None,
        run_id: str | None = None,
        messengers: Mapping[Channel, Messenger] | None = None,
    ) -> None:
        if at.tzinfo is None:
            raise ValueError("the instant to plan for must be timezone-aware")
        self.settings = settings
        self.programme = programme
        self.at = at.astimezone(dt.UTC)
        self.dry_run = dry_run
        if touches:
            unknown = sorted(set(touches) - {t.name for t in programme.touches})
            if unknown:
                raise UnknownTouch(unknown, known=[t.name for t in programme.touches])
        self.touches = tuple(t for t in programme.touches if not touches or t.name in touches)
        self.run_id = run_id or uuid.uuid4().hex
        self.renderer = Renderer(programme.root, default_locale=programme.rules.default_locale)
        self.messengers = dict(messengers or {})
        self.stopping = threading.Event()

    def stop(self) -> None:
        """Claim and send nothing more (the run is cancelled); what is in flight finishes and is recorded.

        Called from another thread than the ranges': each range stops before its next batch, and each
        channel before its next request, giving up the claims of the messages it never sent.
        """
        self.stopping.set()
        for messenger in list(self.messengers.values()):
            _stop(messenger)

    # Before the ranges: profiles as of now, and what earlier runs left unsettled.

    def prepare(self, session: Session) -> tuple[RunSummary, profiles.Basis]:
        """Sum up what changed in the history as of the run's instant and settle earlier runs' loose ends.

        The profiles themselves are written range by range, by ``run_range`` (see ``profiles.Basis``).
        """
        basis = profiles.sum_up(session, self.settings, self.at)
        summary = RunSummary(at=self.at, dry_run=self.dry_run)
        if not self.dry_run:
            # A claim a dead run left and no later run took over: it may have gone out; a person decides.
            stale = self.at - dt.timedelta(minutes=self.settings.stale_claim_minutes)
            settled = ledger.mark_unknown(
                session, claimed_before=stale, channels=list(Channel), reason=STALE_CLAIM
            )
            summary.totals["unknown"] += settled
        return summary, basis

    def _profile_range(self, session: Session, basis: profiles.Basis, low: int, high: int) -> Counter[str]:
        """Write the range's profiles as of the run's instant; give how many contacts are in each stage."""
        profiles.write_profiles(session, self.settings, basis, low, high)
        in_range = and_(P.contact_id >= low, P.contact_id < high)
        # Lapsed contacts whose win-back messages are all spent count as lost.
        for touch in self.programme.touches:
            if not isinstance(touch.trigger, Lapsed):
                continue
            spent = _since_last_visit(touch, func.count())
            session.execute(
                update(P)
                .where(in_range, P.stage == Stage.LAPSED, spent >= len(touch.trigger.steps))
                .values(stage=Stage.LOST)
            )
        stages = session.execute(select(P.stage, func.count()).where(in_range).group_by(P.stage))
        return Counter({str(stage): n for stage, n in stages})

    def ranges(self, session: Session, size: int) -> list[tuple[int, int]]:
        """Split the contacts into ranges of ids holding about ``size`` contacts each."""
        bounds = session.execute(select(func.min(C.id), func.max(C.id), func.count(C.id))).one()
        low, high, count = bounds
        if not count:
            return []
        numbered = select(C.id, func.row_number().over(order_by=C.id).label("n")).subquery()
        starts = [
            row[0]
            for row in session.execute(
                select(numbered.c.id).where((numbered.c.n - 1) % size == 0).order_by(numbered.c.id)
            )
        ]
        ends = [*starts[1:], high + 1]
        return list(zip(starts, ends, strict=True))

    # One range: plan, apply the rules, render, claim, send, record.

    def run_range(
        self, sessions: sessionmaker[Session], basis: profiles.Basis, low: int, high: int
    ) -> RunSummary:
        """Write the profiles of the contacts with ids in [low, high), then plan and send what is due."""
        summary = RunSummary(at=self.at, dry_run=self.dry_run)
        if self.stopping.is_set():
            return summary
        with summary.timed("profiles"), sessions.begin() as session:
            summary.stages = self._profile_range(session, basis, low, high)
        with summary.timed("plan"):
            with sessions.begin() as session:
                dues = [due for touch in self.touches for due in self._due(session, touch, low, high)]
                # Most win-back steps and incentives found are not due yet today where the contact lives:
                # dropped before what rendering needs about their contacts is read.
                dues = [d for d in dues if d.timezone is None or self._due_today(d, d.timezone)]
                if not dues:
                    return summary
                recipients = _recipients(session, {d.contact_id for d in dues})
                dues = self._still_due(session, dues, recipients, summary)
                keys = {ledger.send_key(d.touch.name, d.contact_id, d.occurrence): d for d in dues}
                taken = ledger.existing(session, keys.keys())
                # The week's history and the tags of only the contacts the rules and the templates look at.
                recent = _recent_marketing(session, {d.contact_id for d in dues}, self.at)
                plans = self._apply_rules(keys, taken, recipients, recent, summary)
                friends = _first_names(session, _friends([plan.due for plan in plans]))
                tags = _tags(session, {plan.recipient.id for plan in plans})
        self._deliver(sessions, plans, friends, tags, summary)
        return summary

    def _still_due(
        self, session: Session, dues: list[Due], recipients: Mapping[int, Recipient], summary: RunSummary
    ) -> list[Due]:
        """Keep what is due on the contact's own local date today and still worth sending."""
        kept = []
        for due in dues:
            recipient = recipients.get(due.contact_id)
            if recipient is not None and self._due_today(due, recipient.timezone):
                kept.append(due)
        return kept

    def _due_today(self, due: Due, timezone: str) -> bool:
        """Tell whether ``due`` is due on the local date in ``timezone`` now and still worth sending."""
        today = local_date(self.at, timezone)
        return due.due <= today and (due.until is None or today <= due.until)

    def _apply_rules(
        self,
        keys: Mapping[str, Due],
        taken: Mapping[str, ledger.Existing],
        recipients: Mapping[int, Recipient],
        recent: Mapping[int, list[dt.datetime]],
        summary: RunSummary,
    ) -> list[Plan]:
        rules = self.programme.rules
        candidates: list[Plan] = []
        for key, due in keys.items():
            previous = taken.get(key)
            resume = False
            if previous is not None:
                if previous.status is not SendStatus.CLAIMED or previous.channel is None:
                    continue
                messenger = self._messenger(previous.channel)
                if not messenger.idempotent:
                    continue  # settled later as unknown: it may have gone out
                resume = True
            touch, recipient = due.touch, recipients[due.contact_id]
            summary.count(touch.name, "planned")
            channel = next((c for c in touch.channels if recipient.reachable(c)), None)
            if channel is None:
                summary.count(touch.name, "suppressed_consent")
                continue
            marketing = touch.category is SendCategory.MARKETING
            if marketing and rules.hold_marketing_while_complaint_open and recipient.complaint_open:
                summary.count(touch.name, "held_complaint")
                continue
            local = self.at.astimezone(_zone(recipient.timezone))
            if local.time() not in rules.send_window:
                summary.count(touch.name, "deferred_window")
                continue
            offer_value = None
            if touch.offer is not None:
                offer_value = touch.offer.value_for(ValueTier(recipient.value_tier))
                if touch.offer.check_margin and not _worth_it(
                    touch.offer, offer_value, recipient, rules.margin_rate
                ):
                    summary.count(touch.name, "skipped_margin")
                    continue
            candidates.append(Plan(key, due, recipient, channel, offer_value, local.date(), resume))
        return self._cap(candidates, recent, summary)

    def _cap(
        self, candidates: list[Plan], recent: Mapping[int, list[dt.datetime]], summary: RunSummary
    ) -> list[Plan]:
        """Keep, per contact and by priority, what the frequency caps allow; the rest waits."""
        caps = self.programme.rules.caps
        week_ago = self.at - dt.timedelta(days=7)
        by_contact: dict[int, list[Plan]] = defaultdict(list)
        for plan in candidates:
            by_contact[plan.recipient.id].append(plan)
        kept: list[Plan] = []
        for contact_id, plans in by_contact.items():
            history = recent.get(contact_id, [])
            tz = plans[0].recipient.timezone
            today = plans[0].today
            week = sum(1 for moment in history if moment > week_ago)
            day = sum(1 for moment in history if local_date(moment, tz) == today)
            for plan in sorted(plans, key=lambda p: (-p.due.touch.priority, p.due.touch.name)):
                if plan.due.touch.category in caps.exempt or plan.resume:
                    kept.append(plan)
                elif day < caps.per_local_day and week < caps.per_rolling_7_days:
                    kept.append(plan)
                    day += 1
                    week += 1
                else:
                    summary.count(plan.due.touch.name, "deferred_cap")
        return kept

    def _deliver(
        self,
        sessions: sessionmaker[Session],
        plans: list[Plan],
        friends: Mapping[int, str | None],
        tags: Mapping[int, list[str]],
        summary: RunSummary,
    ) -> None:
        held, rendered = [], []
        with summary.timed("render"):
            for plan in plans:
                touch = plan.due.touch
                if not plan.resume and _held_out(self.programme, touch, plan.recipient.external_id):
                    held.append(plan)
                    continue
                try:
                    message = self._render(plan, friends, tags)
                except TemplateError as error:
                    summary.count(touch.name, "template_errors")
                    summary.errors.append(f"{touch.name} for contact {plan.recipient.external_id}: {error}")
                    continue
                rendered.append((plan, message))
        if self.dry_run:
            for plan in held:
                summary.count(plan.due.touch.name, "held_out")
            for plan, _ in rendered:
                summary.count(plan.due.touch.name, "sent")
                summary.by_channel[plan.channel] += 1
            return
        size = max(1, self.settings.send_batch_size)
        for start in range(0, len(held), size):
            if self.stopping.is_set():
                return
            chunk = held[start : start + size]
            with summary.timed("claim"), sessions.begin() as session:
                got = ledger.claim(
                    session,
                    [self._entry(p, None, SendStatus.HELD_OUT) for p in chunk],
                    at=self.at,
                    run_id=self.run_id,
                )
            for plan in chunk:
                outcome = "held_out" if plan.key in got else "taken_by_other_run"
                summary.count(plan.due.touch.name, outcome)
        for start in range(0, len(rendered), size):
            if self.stopping.is_set():
                return
            self._send_chunk(sessions, rendered[start : start + size], summary)

    def _send_chunk(
        self, sessions: sessionmaker[Session], chunk: list[tuple[Plan, Rendered]], summary: RunSummary
    ) -> None:
        fresh = [(p, m) for p, m in chunk if not p.resume]
        resumed = [(p, m) for p, m in chunk if p.resume]
        with summary.timed("claim"), sessions.begin() as session:
            ids = ledger.claim(
                session,
                [self._entry(p, m, SendStatus.CLAIMED) for p, m in fresh],
                at=self.at,
                run_id=self.run_id,
            )
            ids.update(ledger.reclaim(session, [p.key for p, _ in resumed], run_id=self.run_id))
        with summary.timed("push"):
            by_channel: dict[Channel, list[tuple[Plan, OutgoingMessage]]] = defaultdict(list)
            for plan, message in chunk:
                send_id = ids.get(plan.key)
                if send_id is None:
                    summary.count(plan.due.touch.name, "taken_by_other_run")
                    continue
                by_channel[plan.channel].append((plan, message.outgoing(send_id, plan)))
            outcomes: list[ledger.Outcome] = []
            untried: list[int] = []
            revoked: dict[str, set[tuple[int, Channel]]] = defaultdict(set)
            for channel, items in by_channel.items():
                deliveries = self._messenger(channel).push([message for _, message in items])
                for (plan, _), delivery in zip(items, deliveries, strict=True):
                    if delivery.status is SendStatus.CLAIMED:
                        # Never sent: a fresh claim is given up; a resumed one stays, as it was.
                        if not plan.resume:
                            untried.append(delivery.send_id)
                        continue
                    outcomes.append(_outcome(delivery))
                    if delivery.revoke_consent:
                        revoked[delivery.revoke_consent].add((plan.recipient.id, channel))
                        summary.count(plan.due.touch.name, "consent_revoked")
                    status = {SendStatus.SENT: "sent", SendStatus.FAILED: "failed"}.get(
                        delivery.status, "unknown"
                    )
                    summary.count(plan.due.touch.name, status)
                    if delivery.status is SendStatus.SENT:
                        summary.by_channel[channel] += 1
                    elif delivery.status is SendStatus.UNKNOWN:
                        summary.unknown_sends.append(delivery.send_id)
                    else:
                        who = plan.recipient.external_id
                        summary.errors.append(
                            f"{plan.due.touch.name} to contact {who} failed: {delivery.error}"
                        )
        with summary.timed("record"), sessions.begin() as session:
            ledger.record(session, outcomes, at=self.at)
            ledger.unclaim(session, untried)
            for source, pairs in revoked.items():
                consent.revoke(session, pairs, at=self.at, source=source)

    def _entry(self, plan: Plan, message: Rendered | None, status: SendStatus) -> ledger.Entry:
        touch = plan.due.touch
        return ledger.Entry(
            key=plan.key,
            contact_id=plan.recipient.id,
            touch=touch.name,
            occurrence=plan.due.occurrence,
            category=touch.category,
            status=status,
            due_at=dt.datetime.combine(plan.due.due, dt.time(), tzinfo=dt.UTC),
            channel=plan.channel if message is not None else None,
            locale=message.locale if message is not None else None,
            template=message.template if message is not None else None,
            subject=message.subject if message is not None else None,
            segments=message.segments if message is not None else None,
            incentive=plan.offer_value if touch.offer is not None else None,
            campaign=touch.name if isinstance(touch.trigger, Campaign) else None,
        )

    def _messenger(self, channel: Channel) -> Messenger:
        if channel not in self.messengers:
            self.messengers[channel] = messenger_for(channel, self.settings)
            if self.stopping.is_set():
                _stop(self.messengers[channel])
        return self.messengers[channel]

    def close(self) -> None:
        """Close the channels this run opened."""
        for messenger in self.messengers.values():
            messenger.close()

    # Rendering.

    def _render(
        self, plan: Plan, friends: Mapping[int, str | None], tags: Mapping[int, list[str]]
    ) -> Rendered:
        recipient, due = plan.recipient, plan.due
        context = self._context(plan, friends, tags)
        message = self.renderer.render(due.touch.name, plan.channel, recipient.locale, context)
        return Rendered(
            subject=message.subject,
            html=message.html,
            text=message.text,
            template=message.template,
            locale=message.locale,
            encoding=message.encoding,
            segments=message.segments,
            unsubscribe=context["links"]["unsubscribe"],
        )

    def _context(
        self, plan: Plan, friends: Mapping[int, str | None], tags: Mapping[int, list[str]]
    ) -> dict[str, Any]:
        r, due, settings = plan.recipient, plan.due, self.settings
        tz = _zone(r.timezone)
        size = settings.punch_card_size
        offer = None
        if due.touch.offer is not None and plan.offer_value is not None:
            offer = {
                "kind": str(due.touch.offer.kind),
                "value": plan.offer_value,
                "currency": r.currency,
                "code": _offer_code(plan.key),
                "expires_on": plan.today + dt.timedelta(days=due.touch.offer.valid_days),
                "description": due.touch.offer.description,
            }
        friend = None
        if due.friend_id is not None and due.friend_id in friends:
            friend = {"first_name": friends[due.friend_id]}
        website = settings.business_website.rstrip("/")
        return {
            "touch": due.touch.name,
            "today": plan.today,
            "step": due.step,
            "contact": {
                "first_name": r.first_name,
                "last_name": r.last_name,
                "email": r.email,
                "phone": r.phone,
                "locale": r.locale,
                "timezone": r.timezone,
                "referral_code": r.referral_code,
                "tags": tags.get(r.id, []),
            },
            "profile": {
                "stage": str(r.stage),
                "value_tier": r.value_tier,
                "satisfaction": r.satisfaction,
                "visits": r.visits,
                "last_visit": r.last_visit.astimezone(tz).date() if r.last_visit else None,
                "expected_next_visit": r.expected_next_visit.astimezone(tz).date()
                if r.expected_next_visit
                else None,
                "points": r.points,
                "stamps": r.stamps,
                "punch_card_size": size,
                "stamps_to_go": size - r.stamps,
            },
            "offer": offer,
            "content": due.content.localized(r.locale, self.programme.rules.default_locale)
            if due.content
            else None,
            "friend": friend,
            "business": {
                "name": settings.business_name,
                "website": settings.business_website,
                "booking_url": settings.business_booking_url,
                "address": settings.business_address,
                "phone": settings.business_phone,
            },
            "links": {
                "unsubscribe": unsubscribe_url(
                    settings, r.id, "email" if plan.channel is Channel.EMAIL else "sms"
                ),
                "booking": settings.business_booking_url,
                "survey": f"{website}/survey?ref={r.referral_code}",
                "referral": f"{website}/r/{r.referral_code}",
            },
        }

    def preview_context(
        self,
        recipient: Recipient,
        touch: Touch,
        channel: Channel,
        *,
        tags: Sequence[str] = (),
        step: int | None = None,
        friend: str | None = None,
        had: Collection[str] = (),
    ) -> dict[str, Any]:
        """Give the context ``touch`` would be rendered with for ``recipient`` on ``channel`` now.

        For previews and test sends: the same context a run builds, with the content item the next
        send would carry (``had``: the items already sent), the win-back ``step`` (1 by default) and
        the referred ``friend``'s first name.
        """
        today = local_date(self.at, recipient.timezone)
        content = None
        if isinstance(touch.trigger, Every) and touch.trigger.content and self.programme.content:
            content = _pick_content(self.programme.content, tags, set(had)) or self.programme.content[0]
        if isinstance(touch.trigger, Lapsed):
            step = step or 1
        # No contact has id -1: the friend is known here by first name only, handed to _context below.
        friend_id = None if friend is None else -1
        due = Due(
            recipient.id, touch, "preview", today, None, step=step, friend_id=friend_id, content=content
        )
        offer_value = None if touch.offer is None else touch.offer.value_for(ValueTier(recipient.value_tier))
        plan = Plan(f"preview:{touch.name}", due, recipient, channel, offer_value, today, False)
        return self._context(plan, {-1: friend}, {recipient.id: list(tags)})

    # What is due: one query per touch over a range of contacts.

    def _due(self, session: Session, touch: Touch, low: int, high: int) -> Iterator[Due]:
        trigger = touch.trigger
        base = (
            select(P.contact_id)
            .join(C, C.id == P.contact_id)
            .where(P.contact_id >= low, P.contact_id < high, _audience(touch.audience), _subscribed(touch))
        )
        if touch.cooldown_days:
            since = self.at - dt.timedelta(days=touch.cooldown_days)
            base = base.where(
                ~exists().where(
                    Send.contact_id == P.contact_id,
                    Send.touch == touch.name,
                    Send.status != SendStatus.FAILED,
                    Send.claimed_at > since,
                )
            )
        at, valid = self.at, touch.valid_days
        if isinstance(trigger, AfterFirstVisit):
            lead = dt.timedelta(days=trigger.days)
            query = base.add_columns(C.timezone, P.first_visit).where(
                P.first_visit > at - lead - valid * DAY - TZ_MARGIN, P.first_visit <= at - lead + TZ_MARGIN
            )
            for row in session.execute(query):
                due = local_date(row.first_visit, row.timezone) + lead
                yield Due(row.contact_id, touch, "first", due, due + (valid - 1) * DAY, timezone=row.timezone)
        elif isinstance(trigger, Every):
            yield from self._due_every(session, touch, trigger, base, low, high)
        elif isinstance(trigger, BeforeExpectedVisit):
            lead = dt.timedelta(days=trigger.days)
            query = base.add_columns(C.timezone, P.expected_next_visit, P.last_visit).where(
                P.expected_next_visit > at + lead - valid * DAY - TZ_MARGIN,
                P.expected_next_visit <= at + lead + TZ_MARGIN,
            )
            for row in session.execute(query):
                due = local_date(row.expected_next_visit, row.timezone) - lead
                occurrence = f"after:{local_date(row.last_visit, row.timezone).isoformat()}"
                yield Due(
                    row.contact_id, touch, occurrence, due, due + (valid - 1) * DAY, timezone=row.timezone
                )
        elif isinstance(trigger, PunchCard):
            size = self.settings.punch_card_size
            query = base.add_columns(C.timezone, P.last_visit, P.visits).where(
                P.stamps == size - trigger.stamps_to_go,
                P.visits > 0,
                P.last_visit > at - valid * DAY - TZ_MARGIN,
            )
            for row in session.execute(query):
                due = local_date(row.last_visit, row.timezone)
                occurrence = f"card:{(row.visits + trigger.stamps_to_go) // size}"
                yield Due(
                    row.contact_id, touch, occurrence, due, due + (valid - 1) * DAY, timezone=row.timezone
                )
        elif isinstance(trigger, PointsThreshold):
            query = base.add_columns(C.timezone, P.last_visit, P.points).where(
                P.points >= trigger.points, P.last_visit > at - valid * DAY - TZ_MARGIN
            )
            for row in session.execute(query):
                due = local_date(row.last_visit, row.timezone)
                occurrence = f"points:{trigger.points}:{row.points // trigger.points}"
                yield Due(
                    row.contact_id, touch, occurrence, due, due + (valid - 1) * DAY, timezone=row.timezone
                )
        elif isinstance(trigger, Campaign):
            first = dt.datetime.combine(trigger.starts, dt.time(), tzinfo=dt.UTC) - TZ_MARGIN
            last = dt.datetime.combine(trigger.ends, dt.time(), tzinfo=dt.UTC) + TZ_MARGIN
            if not first <= at <= last:
                return
            early = _audience(trigger.early_access).label("early")
            for row in session.execute(base.add_columns(early)):
                lag = 0 if row.early else trigger.early_access_days
                due = trigger.starts + dt.timedelta(days=lag)
                yield Due(
                    row.contact_id,
                    touch,
                    trigger.starts.isoformat(),
                    due,
                    trigger.ends,
                    early=bool(row.early),
                )
        elif isinstance(trigger, Birthday):
            days = [(at + offset * DAY).date() for offset in (-1, 0, 1)]
            month_days = {d.strftime("%m-%d") for d in days}
            if any(d.month == 2 and d.day == 28 for d in days):
                month_days.add("02-29")
            query = base.add_columns(C.timezone, C.birthday).where(
                C.birthday.is_not(None), db.month_day(C.birthday).in_(sorted(month_days))
            )
            for row in session.execute(query):
                today = local_date(at, row.timezone)
                due = _same_day_this_year(row.birthday.month, row.birthday.day, today.year)
                yield Due(
                    row.contact_id, touch, str(due.year), due, due + (valid - 1) * DAY, timezone=row.timezone
                )
        elif isinstance(trigger, ReferredFriendVisited):
            yield from self._due_referral(session, touch, low, high)
        elif isinstance(trigger, Complaint):
            query = (
                base.add_columns(C.timezone, Feedback.id.label("feedback_id"), Feedback.occurred_at)
                .join(Feedback, Feedback.contact_id == P.contact_id)
                .where(
                    Feedback.occurred_at > at - dt.timedelta(hours=trigger.within_hours),
                    Feedback.occurred_at <= at,
                    Feedback.resolved_at.is_(None),
                    or_(
                        Feedback.kind == FeedbackKind.COMPLAINT,
                        and_(
                            Feedback.kind == FeedbackKind.NPS, Feedback.score <= trigger.detractor_nps_at_most
                        ),
                        and_(
                            Feedback.kind == FeedbackKind.CSAT,
                            Feedback.score <= trigger.detractor_csat_at_most,
                        ),
                    ),
                )
            )
            for row in session.execute(query):
                due = local_date(row.occurred_at, row.timezone)
                yield Due(
                    row.contact_id, touch, f"feedback:{row.feedback_id}", due, None, timezone=row.timezone
                )
        elif isinstance(trigger, Lapsed):
            yield from self._due_lapsed(session, touch, trigger, base)
        elif isinstance(trigger, Annual):
            days = [(at + offset * DAY).date() for offset in (-1, 0, 1)]
            if not any(_same_day_this_year(trigger.month, trigger.day, d.year) == d for d in days):
                return
            for row in session.execute(base.add_columns(C.timezone)):
                today = local_date(at, row.timezone)
                due = _same_day_this_year(trigger.month, trigger.day, today.year)
                yield Due(
                    row.contact_id, touch, str(due.year), due, due + (valid - 1) * DAY, timezone=row.timezone
                )

    def _due_every(
        self, session: Session, touch: Touch, trigger: Every, base: Select[Any], low: int, high: int
    ) -> Iterator[Due]:
        last = (
            select(Send.contact_id, func.max(Send.due_at).label("last_due"))
            .where(
                Send.contact_id >= low,
                Send.contact_id < high,
                Send.touch == touch.name,
                Send.status != SendStatus.FAILED,
            )
            .group_by(Send.contact_id)
            .subquery()
        )
        every = dt.timedelta(days=trigger.days)
        first = dt.timedelta(days=trigger.days if trigger.first_after is None else trigger.first_after)
        # The next send is due ``every`` days after the last one's due date: read only the contacts for
        # whom that is today or earlier where they live, timezone by timezone, rather than every contact
        # due within the two days' margin any timezone could need (three times the rows to read and drop).
        repeat = [
            and_(
                C.timezone.in_(zones) if zones is not None else true(),
                last.c.last_due < dt.datetime.combine(today - every + DAY, dt.time(), tzinfo=dt.UTC),
            )
            for today, zones in self._local_dates(session, low, high)
        ]
        query = (
            base.add_columns(C.timezone, last.c.last_due, P.first_visit, C.created_at)
            .outerjoin(last, last.c.contact_id == P.contact_id)
            .where(
                or_(
                    *repeat,
                    and_(
                        last.c.last_due.is_(None),
                        func.coalesce(P.first_visit, C.created_at) <= self.at - first + TZ_MARGIN,
                    ),
                )
            )
        )
        rows = session.execute(query).all()
        had: dict[int, set[str]] = defaultdict(set)
        if trigger.content and rows:
            ids = [row.contact_id for row in rows]
            for contact_id, occurrence in session.execute(
                select(Send.contact_id, Send.occurrence).where(
                    Send.touch == touch.name, Send.contact_id.in_(ids), Send.status != SendStatus.FAILED
                )
            ):
                had[contact_id].add(occurrence)
            tags = _tags(session, set(ids))
        for row in rows:
            if row.last_due is not None:
                due = row.last_due.date() + every
            else:
                due = local_date(row.first_visit or row.created_at, row.timezone) + first
            if not trigger.content:
                yield Due(row.contact_id, touch, due.isoformat(), due, None, timezone=row.timezone)
                continue
            item = _pick_content(self.programme.content, tags.get(row.contact_id, []), had[row.contact_id])
            if item is not None:
                yield Due(row.contact_id, touch, item.id, due, None, content=item, timezone=row.timezone)

    def _local_dates(
        self, session: Session, low: int, high: int
    ) -> list[tuple[dt.date, Collection[str] | None]]:
        """Give the local dates the contacts with ids in [low, high) are on now, with their timezones.

        A timezone no date can be found for (not a known zone) goes under the latest date any contact can
        be on, with ``None`` for every timezone: the rules later judge each such contact as before.
        """
        dates: dict[dt.date, list[str]] = defaultdict(list)
        unknown = False
        for zone in session.scalars(select(C.timezone).where(C.id >= low, C.id < high).distinct()):
            try:
                dates[local_date(self.at, zone)].append(zone)
            except (ValueError, KeyError):  # ZoneInfoNotFoundError is a KeyError
                unknown = True
        found: list[tuple[dt.date, Collection[str] | None]] = sorted(dates.items())
        if unknown:
            found.append(((self.at + TZ_MARGIN).date(), None))
        return found

    def _due_referral(self, session: Session, touch: Touch, low: int, high: int) -> Iterator[Due]:
        friend = ContactFacts
        since = self.at - touch.valid_days * DAY - TZ_MARGIN
        for side, other in (
            (Referral.referrer_id, Referral.referred_id),
            (Referral.referred_id, Referral.referrer_id),
        ):
            query = (
                select(
                    Referral.id,
                    side.label("contact_id"),
                    other.label("friend_id"),
                    C.timezone,
                    friend.first_visit,
                )
                .join(friend, friend.contact_id == Referral.referred_id)
                .join(P, P.contact_id == side)
                .join(C, C.id == side)
                .where(
                    side >= low,
                    side < high,
                    friend.first_visit > since,
                    _audience(touch.audience),
                    _subscribed(touch, side),
                )
            )
            for row in session.execute(query):
                due = local_date(row.first_visit, row.timezone)
                yield Due(
                    row.contact_id,
                    touch,
                    f"referral:{row.id}",
                    due,
                    due + (touch.valid_days - 1) * DAY,
                    friend_id=row.friend_id,
                    timezone=row.timezone,
                )

    def _due_lapsed(
        self, session: Session, touch: Touch, trigger: Lapsed, base: Select[Any]
    ) -> Iterator[Due]:
        spent = _since_last_visit(touch, func.count())
        latest = _since_last_visit(touch, func.max(Send.claimed_at))
        query = base.add_columns(
            C.timezone, P.last_visit, P.expected_interval_days, spent.label("spent"), latest.label("latest")
        ).where(P.stage == Stage.LAPSED, P.last_visit.is_not(None), P.expected_interval_days.is_not(None))
        for row in session.execute(query):
            n = row.spent
            if n >= len(trigger.steps):
                continue
            rhythm = dt.timedelta(days=self.settings.lapsed_after * row.expected_interval_days)
            due = local_date(row.last_visit + rhythm, row.timezone) + dt.timedelta(days=trigger.steps[n])
            if n and row.latest is not None:
                # Spaced from the previous message as it went out, even when that one went out late.
                gap = dt.timedelta(days=trigger.steps[n] - trigger.steps[n - 1])
                due = max(due, local_date(row.latest, row.timezone) + gap)
            occurrence = f"{local_date(row.last_visit, row.timezone).isoformat()}:step{n + 1}"
            yield Due(row.contact_id, touch, occurrence, due, None, step=n + 1, timezone=row.timezone)


@dataclass(frozen=True, slots=True)
class Plan:
    """A message that passed the rules and will be held out or rendered, claimed and sent."""

    key: str
    due: Due
    recipient: Recipient
    channel: Channel
    offer_value: Decimal | None
    today: dt.date
    resume: bool  # re-sending a claim a dead run left, on a channel that cannot send it twice


@dataclass(frozen=True, slots=True)
class Rendered:
    """A rendered message before it has a send id."""

    subject: str | None
    html: str | None
    text: str
    template: str
    locale: str
    encoding: str | None
    segments: int | None
    unsubscribe: str | None

    def outgoing(self, send_id: int, plan: Plan) -> OutgoingMessage:
        """Give the channel-neutral message for ``plan`` under ``send_id``."""
        r = plan.recipient
        name = " ".join(part for part in (r.first_name, r.last_name) if part) or None
        return OutgoingMessage(
            send_id=send_id,
            key=plan.key,
            channel=plan.channel,
            to=(r.email if plan.channel is Channel.EMAIL else r.phone) or "",
            to_name=name,
            subject=self.subject,
            html=self.html,
            text=self.text,
            locale=self.locale,
            touch=plan.due.touch.name,
            unsubscribe_url=self.unsubscribe if plan.due.touch.category is SendCategory.MARKETING else None,
            encoding=self.encoding,
            segments=self.segments,
        )


def _stop(messenger: Messenger) -> None:
    """Stop a channel; one written before ``Messenger.stop`` existed finishes its batch instead."""
    stop = getattr(messenger, "stop", None)
    if stop is not None:
        stop()


def _outcome(delivery: Delivery) -> ledger.Outcome:
    return ledger.Outcome(delivery.send_id, delivery.status, delivery.provider_message_id, delivery.error)


def _audience(audience: Audience) -> ColumnElement[bool]:
    """Give the SQL condition selecting ``audience`` over profiles (P) and contacts (C)."""
    conditions = profiles.matching(audience)
    if audience.any_of:
        conditions.append(or_(*(_audience(sub) for sub in audience.any_of)))
    return and_(true(), *conditions)


def _subscribed(touch: Touch, contact_id: Any = P.contact_id) -> ColumnElement[bool]:
    """Give the SQL condition leaving out contacts who unsubscribed from the touch's topic (its name)."""
    return ~exists().where(TopicUnsubscribe.contact_id == contact_id, TopicUnsubscribe.topic == touch.name)


def _since_last_visit(touch: Touch, aggregate: Any) -> Any:
    """Give, per profile, ``aggregate`` over the touch's ledger rows since the contact's last visit."""
    return (
        select(aggregate)
        .where(
            Send.contact_id == P.contact_id,
            Send.touch == touch.name,
            Send.status != SendStatus.FAILED,
            Send.claimed_at > P.last_visit,
        )
        .scalar_subquery()
    )


def _recipients(session: Session, ids: set[int]) -> dict[int, Recipient]:
    """Load what rendering and the rules need about ``ids``, consent included, in one query per chunk."""
    email = aliased(Consent)
    sms = aliased(Consent)
    found: dict[int, Recipient] = {}
    ordered = sorted(ids)
    for start in range(0, len(ordered), 20_000):
        chunk = ordered[start : start + 20_000]
        query = (
            select(
                C.id,
                C.external_id,
                C.first_name,
                C.last_name,
                C.email,
                C.phone,
                C.locale,
                C.timezone,
                C.referral_code,
                P.stage,
                P.value_tier,
                P.satisfaction,
                P.complaint_open,
                P.visits,
                P.last_visit,
                P.expected_next_visit,
                P.total_spend,
                P.currency,
                P.points,
                P.stamps,
                func.coalesce(email.status == ConsentStatus.GRANTED, False).label("email_consent"),
                func.coalesce(sms.status == ConsentStatus.GRANTED, False).label("sms_consent"),
            )
            .join(P, P.contact_id == C.id)
            .outerjoin(email, and_(email.contact_id == C.id, email.channel == Channel.EMAIL))
            .outerjoin(sms, and_(sms.contact_id == C.id, sms.channel == Channel.SMS))
            .where(C.id.in_(chunk))
        )
        # The columns are Recipient's fields, in order.
        for row in session.execute(query):
            found[row.id] = Recipient(*cast(tuple[Any, ...], row))
    return found


def _friends(dues: Sequence[Due]) -> set[int]:
    return {d.friend_id for d in dues if d.friend_id is not None}


def _first_names(session: Session, ids: set[int]) -> dict[int, str | None]:
    """Give the first names of ``ids`` (the friends a referral message names)."""
    if not ids:
        return {}
    return {
        row.id: row.first_name for row in session.execute(select(C.id, C.first_name).where(C.id.in_(ids)))
    }


def _tags(session: Session, ids: set[int]) -> dict[int, list[str]]:
    tags: dict[int, list[str]] = defaultdict(list)
    ordered = sorted(ids)
    for start in range(0, len(ordered), 20_000):
        chunk = ordered[start : start + 20_000]
        query = select(ContactTag.contact_id, ContactTag.tag).where(ContactTag.contact_id.in_(chunk))
        for contact_id, tag in session.execute(query.order_by(ContactTag.contact_id, ContactTag.tag)):
            tags[contact_id].append(tag)
    return tags


def _recent_marketing(session: Session, ids: set[int], at: dt.datetime) -> dict[int, list[dt.datetime]]:
    """Give, per contact of ``ids``, when each marketing message of the last week was claimed."""
    recent: dict[int, list[dt.datetime]] = defaultdict(list)
    ordered = sorted(ids)
    for start in range(0, len(ordered), 20_000):
        query = select(Send.contact_id, Send.claimed_at).where(
            Send.contact_id.in_(ordered[start : start + 20_000]),
            Send.category == SendCategory.MARKETING,
            Send.status != SendStatus.FAILED,
            Send.claimed_at > at - dt.timedelta(days=8),
            Send.claimed_at <= at,
        )
        for contact_id, claimed_at in session.execute(query):
            recent[contact_id].append(claimed_at)
    return recent


def _worth_it(offer: Offer, value: Decimal, recipient: Recipient, margin_rate: Decimal) -> bool:
    """Tell whether the offer costs no more than the expected margin of the contact's next visit."""
    if recipient.visits == 0:
        return True
    visit = recipient.total_spend / recipient.visits
    cost = {
        OfferKind.PERCENT: visit * value / 100,
        OfferKind.AMOUNT: value,
        OfferKind.FREE_SERVICE: visit,
        OfferKind.POINTS: Decimal(0),
    }[offer.kind]
    return cost <= visit * margin_rate


def _held_out(programme: Programme, touch: Touch, external_id: str) -> bool:
    """Tell, the same way every run, whether the contact is in the touch's holdout."""
    share = programme.holdout_for(touch)
    if share <= 0:
        return False
    digest = hashlib.blake2b(
        f"{programme.rules.holdout_salt}:{touch.name}:{external_id}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def _offer_code(key: str) -> str:
    digest = hashlib.blake2b(key.encode(), digest_size=5).hexdigest().upper()
    return f"N-{digest}"


def _pick_content(items: Sequence[ContentItem], tags: Sequence[str], had: set[str]) -> ContentItem | None:
    """Give the first item matching the contact's interests that they have not had; then general ones."""
    fresh = [item for item in items if item.id not in had]
    for item in fresh:
        if item.tags and set(item.tags) & set(tags):
            return item
    return next((item for item in fresh if not item.tags), None)


# Running it: the flow and the CLI go through these.


@dataclass(frozen=True, slots=True)
class RunRequest:
    """What defines one run, in a form a worker process can be given to take part in the same run."""

    settings: Settings
    at: dt.datetime
    dry_run: bool = False
    touches: tuple[str, ...] | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def calendar(self) -> Calendar:
        """Build this run's calendar: the programme loaded and its templates compiled."""
        programme = load_programme(self.settings.templates_dir)
        return Calendar(
            self.settings, programme, self.at, dry_run=self.dry_run, touches=self.touches, run_id=self.run_id
        )


class Run:
    """One open run: its calendar, its database, and the worker processes its ranges may go to.

    A run over more than one range spreads the ranges over worker processes (``NURTURE_CALENDAR_PROCESSES``,
    one per CPU core by default), each with its own calendar and database connection: planning and
    rendering are CPU-bound Python, and a process is the only way onto a second core. The ledger keeps
    them apart as it keeps concurrent runs apart. ``send`` may be called from several threads at once.

    Closed while ranges are still sending (the flow run was cancelled), it stops them first: every range,
    in this process or a worker, stops before its next batch and request and records what went out.
    """

    def __init__(self, request: RunRequest) -> None:
        self.request = request
        self.engine: Engine = db.connect(request.settings)
        self.sessions = db.session_factory(self.engine)
        self.calendar = request.calendar()
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._one_at_a_time = threading.Lock()
        self.processes = 1
        self.basis: profiles.Basis | None = None
        self._stop_workers: Any = None  # a multiprocessing Event, made with the workers

    def begin(self, batch_size: int) -> tuple[RunSummary, list[tuple[int, int]]]:
        """Sum up what changed in the history, settle earlier runs' loose ends, give the ranges to send."""
        with self.sessions.begin() as session:
            ranges = self.calendar.ranges(session, batch_size)
        wanted = self.request.settings.calendar_processes or os.cpu_count() or 1
        self.processes = max(1, min(wanted, len(ranges)))
        if self.processes > 1:
            # Started now, the workers load the programme and compile its templates while this process
            # sums up the history (SQLite keeps that to one core).
            workers = self._workers()
            for _ in range(self.processes):
                workers.submit(_ready)
        cpu, wall = time.thread_time(), time.perf_counter()
        with self.sessions.begin() as session:
            summary, self.basis = self.calendar.prepare(session)
        summary.cpu["prepare"] += time.thread_time() - cpu
        summary.wall["prepare"] += time.perf_counter() - wall
        _release_free_memory()
        return summary, ranges

    def send(self, low: int, high: int) -> RunSummary:
        """Plan and send what is due to the contacts with ids in [low, high), in a worker if there are any."""
        if self.basis is None:
            raise RuntimeError("begin the run before sending its ranges")
        if self.calendar.stopping.is_set():
            return RunSummary(at=self.calendar.at, dry_run=self.calendar.dry_run)
        if self.processes == 1:
            # One range at a time, even when the flow's threads ask for several at once.
            with self._one_at_a_time:
                return self.calendar.run_range(self.sessions, self.basis, low, high)
        return self._workers().submit(_send_in_worker, self.basis, low, high).result()

    def _workers(self) -> ProcessPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                # Each worker sends with its share of the providers' rates: together, the configured ones.
                request = replace(self.request, settings=shared_by(self.request.settings, self.processes))
                context = multiprocessing.get_context("spawn")
                self._stop_workers = context.Event()
                if self.calendar.stopping.is_set():
                    self._stop_workers.set()
                # spawn, not fork: the run's own process has threads (Prefect's, the pool's) and open
                # connections that a forked child must not inherit.
                self._pool = ProcessPoolExecutor(
                    self.processes,
                    mp_context=context,
                    initializer=_start_worker,
                    initargs=(request, self._stop_workers),
                )
            return self._pool

    def stop(self) -> None:
        """Send nothing more, here and in the workers; what is in flight finishes and is recorded."""
        self.calendar.stop()
        with self._pool_lock:
            if self._stop_workers is not None:
                self._stop_workers.set()

    def close(self) -> None:
        """Stop what still sends and wait for it; stop the workers, close the channels and the database."""
        self.stop()
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        with self._one_at_a_time:
            self.calendar.close()
        self.engine.dispose()


_worker: Run | None = None


def _start_worker(request: RunRequest, stopping: Any) -> None:
    global _worker
    _worker = Run(request)
    # While the run's own process sums the history up, not in the first range's message path.
    _worker.calendar.renderer.compile_all()
    multiprocessing.util.Finalize(_worker, _worker.close, exitpriority=10)
    threading.Thread(target=_stop_when, args=(stopping, _worker), name="stop", daemon=True).start()
    # A cancelled flow run's process group is sent SIGTERM: a worker stops, records what went out and
    # leaves when the run closes its pool, instead of dying with claims whose outcome nobody knows.
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())


def _stop_when(stopping: Any, worker: Run) -> None:
    """Stop the worker's calendar when the run that started the worker is stopped."""
    stopping.wait()
    worker.calendar.stop()


def _ready() -> None:
    """Do nothing: submitted to make the pool start its workers."""


def _send_in_worker(basis: profiles.Basis, low: int, high: int) -> RunSummary:
    assert _worker is not None, "a calendar worker process was not started with its run"
    try:
        return _worker.calendar.run_range(_worker.sessions, basis, low, high)
    finally:
        _release_free_memory()


@lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None).malloc_trim
    return None


def _release_free_memory() -> None:
    """Hand the memory Python freed back to the system, where the C library allows it (glibc does).

    glibc keeps freed heap memory for the process: after the sum-up of a million contacts, about 70 MiB of
    the run's own process; after each range, the range's rendered messages in a worker. Given back, it
    stays out of the run's peak while the ranges are sent.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def open_run(
    settings: Settings,
    at: dt.datetime,
    *,
    dry_run: bool = False,
    touches: Sequence[str] | None = None,
) -> Iterator[Run]:
    """Open a run: the database, the programme, the channels, the workers; closed when the block ends."""
    run = Run(RunRequest(settings, at, dry_run, tuple(touches) if touches else None))
    try:
        yield run
    finally:
        run.close()


def send_range(
    request: RunRequest, basis: profiles.Basis, low: int, high: int, *, sharing: int = 1
) -> RunSummary:
    """Send one range of a run that ``Run.begin`` began elsewhere: another flow run, on any machine.

    The run's basis is all this process needs of the beginning; the ledger keeps it and the run's other
    ranges apart as it keeps concurrent runs apart, so a range sent twice sends nothing twice. It is one of
    ``sharing`` ranges sent at once, and sends with that share of the providers' rates.
    """
    request = replace(request, settings=shared_by(request.settings, sharing))
    with contextlib.closing(Run(request)) as run:
        run.basis = basis
        return run.send(low, high)


def run_calendar(
    settings: Settings,
    at: dt.datetime,
    *,
    dry_run: bool = False,
    touches: Sequence[str] | None = None,
    batch_size: int = 50_000,
) -> RunSummary:
    """Run the contact calendar for ``at`` in this process, without Prefect (the demo and tests use it)."""
    with open_run(settings, at, dry_run=dry_run, touches=touches) as run:
        summary, ranges = run.begin(batch_size)
        with ThreadPoolExecutor(run.processes) as threads:
            for part in threads.map(run.send, *zip(*ranges, strict=True)):
                summary.combine(part)
        return summary


# Previews and test sends of one real contact.


@dataclass(frozen=True, slots=True)
class ContactPreview:
    """What a preview of one contact's messages needs beyond its ``Recipient``."""

    recipient: Recipient
    tags: list[str]
    friend: str | None  # the first name of the last friend they referred
    had: dict[str, set[str]]  # by touch: the occurrences already in the ledger (content items sent)


def contact_preview(session: Session, external_id: str) -> ContactPreview:
    """Load what rendering one contact's messages needs; the profile must have been refreshed."""
    contact_id = session.scalar(select(C.id).where(C.external_id == external_id))
    if contact_id is None:
        raise ContactNotFound(external_id=external_id)
    recipient = _recipients(session, {contact_id}).get(contact_id)
    if recipient is None:
        raise ProfileNotRefreshed(external_id=external_id)
    friend = session.scalar(
        select(C.first_name)
        .join(Referral, Referral.referred_id == C.id)
        .where(Referral.referrer_id == contact_id)
        .order_by(Referral.created_at.desc(), Referral.id.desc())
        .limit(1)
    )
    had: dict[str, set[str]] = defaultdict(set)
    for touch, occurrence in session.execute(
        select(Send.touch, Send.occurrence).where(Send.contact_id == contact_id)
    ):
        had[touch].add(occurrence)
    return ContactPreview(recipient, _tags(session, {contact_id}).get(contact_id, []), friend, dict(had))
