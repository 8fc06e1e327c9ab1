"""The end-to-end demo: a synthetic salon and spa chain, imported, profiled, messaged and shown.

``nurture demo`` works in its own folder (``demo/`` by default), emptied at the start of every run: the
generated CSV files, their rejects, a SQLite database and the outbox. It uses ``NURTURE_DATABASE_URL``
instead of its SQLite file only when that variable is set in the environment (not merely in ``.env``),
and then only on a database that holds no contacts yet, so it never mixes into real data. Messages always
go to the outbox, whatever channels are configured: the synthetic customers' addresses are made up.

Each simulated day, the contact calendar runs in this process at ``RUN_HOURS`` and then the simulated
customers live the day, answering the messages they were sent.
"""

from __future__ import annotations

import csv
import datetime as dt
import email
import json
import os
import random
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from pathlib import Path

from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from nurture import attribution, db, profiles, retention, simulation, synthetic
from nurture.calendar import RunSummary, run_calendar
from nurture.channels.outbox import message_path
from nurture.errors import DemoError
from nurture.imports import ImportSummary, import_file
from nurture.models import Channel, Contact, ContactProfile, Satisfaction, Send, SendStatus, Stage, ValueTier
from nurture.programme import Programme, load_programme
from nurture.reports import html as html_report
from nurture.settings import Settings

MARKER = ".nurture-demo"
HISTORY_START = dt.date(2025, 6, 1)
HISTORY_END = dt.date(2026, 11, 1)
# Hours (UTC) the calendar runs on each simulated day, the last one early the next morning: each run falls
# in the 09:00-20:00 send window somewhere between Madrid (UTC+1) and Honolulu (UTC-10), and every
# customer's window holds at least one run. The day's events are imported after its last run, so a run
# never sees events later than its own instant.
RUN_HOURS = (9, 15, 21, 27)


@dataclass(frozen=True)
class DemoOptions:
    """What the demo is asked to do."""

    directory: Path = Path("demo")
    contacts: int = 3000
    days: int = 21
    seed: int = 7


def prepare(directory: Path) -> None:
    """Empty the demo folder, refusing a non-empty folder that an earlier demo did not create."""
    if directory.exists():
        if any(directory.iterdir()) and not (directory / MARKER).exists():
            raise DemoError(f"{directory} is not empty and was not made by the demo; choose another --dir")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("made by `nurture demo`; emptied at the start of every demo run\n")


def demo_settings(directory: Path) -> Settings:
    """Settings for the demo: its own SQLite file and outbox, unless NURTURE_DATABASE_URL is exported."""
    url = os.environ.get("NURTURE_DATABASE_URL") or f"sqlite:///{directory / 'nurture.db'}"
    return Settings(
        database_url=url,
        outbox_dir=directory.absolute() / "outbox",
        email_channel="outbox",
        sms_channel="outbox",
    )


def open_empty_database(settings: Settings) -> Engine:
    """The demo's database, migrated; refuse one that already holds contacts."""
    engine = db.connect(settings)
    with engine.connect() as connection:
        contacts = connection.execute(select(func.count()).select_from(Contact)).scalar_one()
    if contacts:
        engine.dispose()
        shown = engine.url.render_as_string(hide_password=True)
        raise DemoError(f"{shown} already holds {contacts:,} contacts; the demo needs an empty database")
    return engine


def run(options: DemoOptions, console: Console) -> None:
    """Run the demo from an empty folder to the tables it prints."""
    settings = demo_settings(options.directory)
    if not (settings.templates_dir / "programme.yaml").exists():
        raise DemoError(
            f"the demo sends the programme in {settings.templates_dir}/, which has no programme.yaml: "
            "run it from the nurture repository or set NURTURE_TEMPLATES_DIR"
        )
    programme = load_programme(settings.templates_dir)
    prepare(options.directory)
    engine = open_empty_database(settings)
    sessions = db.session_factory(engine)
    try:
        console.rule("[bold]1. A synthetic salon and spa chain")
        files = synthetic.generate(
            options.directory / "data",
            contacts=options.contacts,
            seed=options.seed,
            start=HISTORY_START,
            end=HISTORY_END,
        )
        console.print(
            f"{options.contacts:,} customers in Spain, Portugal, Brazil, Mexico and the US, "
            f"{HISTORY_START:%d %b %Y} to {HISTORY_END:%d %b %Y}, written to {files.directory}/"
        )
        console.rule("[bold]2. Import, bad rows and all")
        show_imports(console, import_all(sessions, settings, files, console))
        console.rule(f"[bold]3. What nurture knows about each customer on {HISTORY_END:%d %b %Y}")
        at = dt.datetime.combine(HISTORY_END, dt.time(), tzinfo=dt.UTC)
        with sessions.begin() as session:
            profiles.refresh(session, settings, at)
        with sessions() as session:
            show_profiles(console, session)
            before = stage_counts(session)
        if options.days:
            last_day = HISTORY_END + dt.timedelta(days=options.days - 1)
            console.rule(
                f"[bold]4. {options.days} simulated days, {HISTORY_END:%d %b} to {last_day:%d %b %Y}"
            )
            played = play(sessions, settings, options, console)
            show_days(console, played.days)
            at = dt.datetime.combine(HISTORY_END + dt.timedelta(days=options.days), dt.time(), tzinfo=dt.UTC)
            with sessions.begin() as session:
                profiles.refresh(session, settings, at)
            with sessions() as session:
                show_stage_change(console, before, stage_counts(session))
            console.rule("[bold]5. What the contact calendar sent")
            with sessions() as session:
                show_sends(console, session, programme, played)
                show_messages(console, session, settings)
            show_outbox(console, settings)
        console.rule("[bold]6. The retention report")
        write_report(sessions, settings, programme, options, console)
        if options.days:
            console.rule("[bold]7. What the messages brought")
            with sessions() as session:
                report = attribution.report(session, settings, programme, now=at)
            for renderable in report.tables():
                console.print(renderable)
            console.print(
                "Over a few weeks the groups are small and the intervals wide; the held-out share is"
                f" {programme.rules.holdout:.0%}. `nurture report attribution` shows the same on any"
                " database.",
                highlight=False,
            )
    finally:
        engine.dispose()
    console.print(f"\nEverything the demo wrote is in {options.directory}/", soft_wrap=True)


def write_report(
    sessions: sessionmaker[Session],
    settings: Settings,
    programme: Programme,
    options: DemoOptions,
    console: Console,
) -> Path:
    """Write the HTML retention report of the year up to the demo's last day, and say where it is."""
    last_day = HISTORY_END + dt.timedelta(days=options.days) - dt.timedelta(days=1)
    window = retention.Window.of(last_day)
    at = dt.datetime.combine(last_day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    with sessions() as session:
        page = html_report.build(session, window, settings, programme, now=at)
    path = options.directory / "report.html"
    path.write_text(page, encoding="utf-8")
    console.print(
        f"The retention report, {window.start:%b %Y} to {last_day:%d %b %Y}, with its charts, is one file"
        f" that opens in any browser without a network:\n{path.absolute()}",
        soft_wrap=True,
    )
    return path


@dataclass
class Played:
    """What happened over the simulated days: the customers' days and the calendar runs, combined."""

    calendar: RunSummary
    runs: int = 0
    days: list[simulation.DaySummary] = field(default_factory=list)


def play(
    sessions: sessionmaker[Session], settings: Settings, options: DemoOptions, console: Console
) -> Played:
    """Play the days after the history: the calendar sends; customers visit, churn, complain, refer."""
    rng = random.Random(options.seed + 1)
    played = Played(calendar=RunSummary(at=dt.datetime.combine(HISTORY_END, dt.time(), tzinfo=dt.UTC)))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("simulating", total=options.days * (len(RUN_HOURS) + 1))
        for offset in range(options.days):
            day = HISTORY_END + dt.timedelta(days=offset)
            midnight = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
            for hour in RUN_HOURS:
                at = midnight + dt.timedelta(hours=hour)
                progress.update(task, description=f"{day:%a %d %b}: the calendar runs at {at:%H:%M} UTC")
                played.calendar.combine(run_calendar(settings, at))
                played.runs += 1
                progress.advance(task)
            progress.update(task, description=f"{day:%a %d %b}: the customers' day")
            played.days.append(
                simulation.simulate_day(sessions, settings, day, rng, directory=options.directory / "days")
            )
            progress.advance(task)
    return played


def show_days(console: Console, days: list[simulation.DaySummary]) -> None:
    """Print what the simulated customers did, a week to a row."""
    labels = {
        "visits": "visits",
        "first_visits": "first",
        "came_back": "back",
        "churned": "churned",
        "referrals": "friends",
        "nps": "NPS",
        "complaints": "complaints",
        "resolved": "settled",
    }
    names = tuple(labels)
    table = Table("week of", *labels.values(), title="What the customers did")
    for first in range(0, len(days), 7):
        week = days[first : first + 7]
        table.add_row(f"{week[0].day:%d %b}", *(f"{sum(getattr(d, name) for d in week):,}" for name in names))
    console.print(table)
    rejected = sum(day.rejected for day in days)
    console.print(
        f"each day's events were imported from {len(days)} folders of CSV files; rows rejected: {rejected}"
    )


OUTCOMES = {"held_out": "held out", "failed": "failed"}
WAITS = {
    "deferred_window": "outside send window",
    "deferred_cap": "over a cap",
    "suppressed_consent": "no consent",
    "held_complaint": "complaint open",
}


def show_sends(console: Console, session: Session, programme: Programme, played: Played) -> None:
    """Print what the calendar runs did per touch: sent per channel, held out and failed, then waits."""
    summary = played.calendar
    sent: Counter[tuple[str, Channel | None]] = Counter()
    for touch, channel, count in session.execute(
        select(Send.touch, Send.channel, func.count())
        .where(Send.status == SendStatus.SENT)
        .group_by(Send.touch, Send.channel)
    ):
        sent[(touch, channel)] += count
    touches = [touch.name for touch in programme.touches]
    touches += sorted({touch for touch, _ in sent} - set(touches))
    table = Table(
        "touch",
        "email",
        "SMS",
        *OUTCOMES.values(),
        title=f"Messages over {len(played.days)} days, {played.runs} calendar runs",
    )
    for touch in touches:
        counts = summary.by_touch.get(touch, Counter())
        table.add_row(
            touch,
            f"{sent[(touch, Channel.EMAIL)]:,}",
            f"{sent[(touch, Channel.SMS)]:,}",
            *(f"{counts[name]:,}" for name in OUTCOMES),
            end_section=touch == touches[-1],
        )
    table.add_row(
        "total",
        *(f"{sum(n for (_, c), n in sent.items() if c is channel):,}" for channel in Channel),
        *(f"{summary.totals[name]:,}" for name in OUTCOMES),
        style="bold",
    )
    console.print(table)
    waits = Table(
        Column("touch", no_wrap=True),
        *WAITS.values(),
        title="Due but not sent when a run found them",
        caption="Counted again at every run: a message that waits at 09:00 and goes out at 15:00 is "
        "counted once here and once as sent.",
    )
    for touch in touches:
        counts = summary.by_touch.get(touch, Counter())
        if any(counts[name] for name in WAITS):
            waits.add_row(touch, *(f"{counts[name]:,}" for name in WAITS))
    console.print(waits)
    if summary.errors:
        console.print(f"[yellow]{len(summary.errors):,} errors[/], the first ones:")
        for error in summary.errors[:3]:
            console.print(Text(f"  {error}"))


def show_messages(console: Console, session: Session, settings: Settings) -> None:
    """Print a few messages as the outbox wrote them: two emails and an SMS, in different languages."""
    first = func.min(Send.id).label("send_id")
    first_of_each = session.execute(
        select(first, Send.channel, Send.touch, Send.locale)
        .where(Send.status == SendStatus.SENT)
        .group_by(Send.channel, Send.touch, Send.locale)
        .order_by(first)
    ).all()
    chosen: list[int] = []
    touches: set[str] = set()
    languages: set[str] = set()
    for channel in (Channel.EMAIL, Channel.EMAIL, Channel.SMS):
        candidates = [row for row in first_of_each if row.channel is channel and row.send_id not in chosen]
        other_language = [row for row in candidates if _language(row.locale) not in languages]
        other_touch = [row for row in other_language if row.touch not in touches]
        if candidates:
            pick = (other_touch or other_language or candidates)[0]
            chosen.append(pick.send_id)
            touches.add(pick.touch)
            languages.add(_language(pick.locale))
    for send in session.scalars(select(Send).where(Send.id.in_(chosen)).order_by(Send.channel, Send.id)):
        console.print(_message_panel(settings, send))


def _language(locale: str | None) -> str:
    return (locale or "").split("_")[0]


def _message_panel(settings: Settings, send: Send) -> Panel:
    """One message read back from its outbox file, in a box titled with what it is."""
    assert send.channel is not None and send.sent_at is not None
    path = message_path(settings, send.channel, send.id)
    title = f"{send.channel}: {send.touch}, {send.locale}, sent {send.sent_at:%a %d %b %H:%M} UTC"
    if send.channel is Channel.EMAIL:
        parsed = email.message_from_bytes(path.read_bytes(), policy=policy.default)
        plain = parsed.get_body(preferencelist=("plain",))
        text = plain.get_content().strip() if plain is not None else ""
        body = Group(
            Text(f"To: {parsed['To']}"),
            Text(f"Subject: {parsed['Subject']}", style="bold"),
            Text(),
            Text(text),
        )
    else:
        sms = json.loads(path.read_text(encoding="utf-8"))
        segments = f"{sms['segments']} segment{'' if sms['segments'] == 1 else 's'}"
        body = Group(
            Text(f"To: {sms['to']}"),
            Text(),
            Text(sms["body"]),
            Text(),
            Text(f"{sms['encoding']}, {segments}", style="dim"),
        )
    return Panel(body, title=title, subtitle=str(path.relative_to(settings.outbox_dir)), title_align="left")


def show_outbox(console: Console, settings: Settings) -> None:
    """Print where the outbox is and how many messages it holds."""
    folder = Path(settings.outbox_dir)
    emails = sum(1 for _ in folder.glob("email/*.eml"))
    texts = sum(1 for _ in folder.glob("sms/*.json"))
    console.print(
        f"The outbox holds {emails:,} emails (email/*.eml, open one in any mail client) "
        f"and {texts:,} SMS (sms/*.json), one file per message sent:"
    )
    console.print(f"{folder}/", soft_wrap=True)


def stage_counts(session: Session) -> dict[Stage, int]:
    """How many contacts are in each lifecycle stage."""
    column = ContactProfile.stage
    return {stage: count for stage, count in session.execute(select(column, func.count()).group_by(column))}


def show_stage_change(console: Console, before: dict[Stage, int], after: dict[Stage, int]) -> None:
    """Print the lifecycle stages before and after the simulated days."""
    table = Table(
        "lifecycle stage", "before", "after", "change", title="Lifecycle stages after the simulated days"
    )
    for stage in Stage:
        old, new = before.get(stage, 0), after.get(stage, 0)
        table.add_row(str(stage), f"{old:,}", f"{new:,}", f"{new - old:+,}")
    console.print(table)


def import_all(
    sessions: sessionmaker[Session], settings: Settings, files: synthetic.SyntheticFiles, console: Console
) -> dict[str, ImportSummary]:
    """Import the three files through the real import path, with a progress bar each."""
    summaries: dict[str, ImportSummary] = {}
    columns = (TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        for kind in ("contacts", "visits", "feedback"):
            task = progress.add_task(kind, total=files.rows[kind])
            summaries[kind] = import_file(
                sessions, kind, getattr(files, kind), settings, progress=_advance(progress, task)
            )
    return summaries


def _advance(progress: Progress, task: TaskID) -> Callable[[int, int], None]:
    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return update


def show_imports(console: Console, summaries: dict[str, ImportSummary]) -> None:
    """Print what each import did, and why rows were rejected."""
    table = Table("file", "imported", "updated", "unchanged", "rejected", title="Imports")
    reasons: Counter[tuple[str, str]] = Counter()
    for kind, summary in summaries.items():
        rejects = summary.rejects_file
        table.add_row(
            f"{kind}.csv",
            f"{summary.imported:,}",
            f"{summary.updated:,}",
            f"{summary.unchanged:,}",
            f"{summary.rejected:,}",
        )
        if rejects:
            with Path(rejects).open(encoding="utf-8", newline="") as handle:
                for row in csv.DictReader(handle):
                    reasons[(kind, _reason_kind(row["reason"]))] += 1
    console.print(table)
    folders = {
        str(Path(summary.rejects_file).parent) for summary in summaries.values() if summary.rejects_file
    }
    for folder in sorted(folders):
        console.print(f"each rejected row is in {folder}/*.rejects.csv with its line number and reason")
    if reasons:
        why = Table("file", "rejected because", "rows", title="Why rows were rejected")
        for (kind, reason), count in sorted(reasons.items()):
            why.add_row(f"{kind}.csv", reason, f"{count:,}")
        console.print(why)


def _reason_kind(reason: str) -> str:
    """The gist of a reject reason: without the row's own values, line numbers and details."""
    gist = re.sub(r"'[^']*'|\"[^\"]*\"|\b\d+\b", "", reason).replace(" ;", ";")
    gist = gist.replace("of line", "of an earlier line")
    field, _, problem = gist.partition(": ")
    return " ".join(f"{field}: {problem.partition(': ')[0]}".split()) if problem else " ".join(field.split())


def show_profiles(console: Console, session: Session) -> None:
    """Print stage counts, value tiers, satisfaction and a few example customers."""
    for title, column, order in (
        ("Lifecycle stage", ContactProfile.stage, list(Stage)),
        ("Value tier", ContactProfile.value_tier, list(ValueTier)),
        ("Satisfaction", ContactProfile.satisfaction, list(Satisfaction)),
    ):
        counts = {
            value: count for value, count in session.execute(select(column, func.count()).group_by(column))
        }
        total = sum(counts.values()) or 1
        table = Table(title.lower(), "contacts", "share", title=title)
        for value in order:
            count = counts.get(value, 0)
            table.add_row(str(value), f"{count:,}", f"{count / total:.0%}")
        console.print(table)
    open_complaints = session.execute(
        select(func.count()).select_from(ContactProfile).where(ContactProfile.complaint_open)
    ).scalar_one()
    console.print(f"open complaints: {open_complaints:,}")
    show_examples(console, session)


def show_examples(console: Console, session: Session) -> None:
    """Print one customer of each of a few telling stages, each from another country."""
    table = Table("customer", "stage", "value", "satisfaction", "last → next visit", title="A few customers")
    countries: set[str | None] = set()
    for stage in (Stage.LOYAL, Stage.NEW, Stage.AT_RISK, Stage.LAPSED, Stage.PROSPECT):
        rows = session.execute(
            select(Contact, ContactProfile)
            .join(ContactProfile, ContactProfile.contact_id == Contact.id)
            .where(ContactProfile.stage == stage)
            .order_by(Contact.id)
            .limit(50)
        ).all()
        fresh = [row for row in rows if row[0].country not in countries]
        if not rows:
            continue
        contact, profile = (fresh or rows)[0]
        countries.add(contact.country)
        name = f"{contact.first_name} {contact.last_name}"
        table.add_row(
            f"{name}\n{contact.external_id} {contact.country or ''} {contact.locale}",
            f"{profile.stage}\n{profile.visits} visit{'' if profile.visits == 1 else 's'}",
            f"{profile.value_tier}\n{profile.total_spend:,} {profile.currency or ''}".rstrip(),
            f"{profile.satisfaction}" + ("\ncomplaint open" if profile.complaint_open else ""),
            f"{_day(profile.last_visit)}\n{_day(profile.expected_next_visit)}",
        )
    console.print(table)


def _day(instant: dt.datetime | None) -> str:
    return f"{instant:%Y-%m-%d}" if instant else "-"
