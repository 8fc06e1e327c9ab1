"""The end-to-end demo: a synthetic salon and spa chain, imported, profiled and shown in the terminal.

``nurture demo`` works in its own folder (``demo/`` by default), emptied at the start of every run: the
generated CSV files, their rejects, a SQLite database and the outbox. It uses ``NURTURE_DATABASE_URL``
instead of its SQLite file only when that variable is set in the environment (not merely in ``.env``),
and then only on a database that holds no contacts yet, so it never mixes into real data.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import random
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from nurture import db, profiles, simulation, synthetic
from nurture.errors import DemoError
from nurture.imports import ImportSummary, import_file
from nurture.models import Contact, ContactProfile, Satisfaction, Stage, ValueTier
from nurture.settings import Settings

MARKER = ".nurture-demo"
HISTORY_START = dt.date(2025, 6, 1)
HISTORY_END = dt.date(2026, 11, 1)


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
    return Settings(database_url=url, outbox_dir=directory / "outbox")


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
    prepare(options.directory)
    settings = demo_settings(options.directory)
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
            days = simulate(sessions, settings, options, console)
            show_days(console, days)
            at = dt.datetime.combine(HISTORY_END + dt.timedelta(days=options.days), dt.time(), tzinfo=dt.UTC)
            with sessions.begin() as session:
                profiles.refresh(session, settings, at)
            with sessions() as session:
                show_stage_change(console, before, stage_counts(session))
    finally:
        engine.dispose()
    console.print(f"\nEverything the demo wrote is in {options.directory}/")


def simulate(
    sessions: sessionmaker[Session], settings: Settings, options: DemoOptions, console: Console
) -> list[simulation.DaySummary]:
    """Play the days after the history: customers visit, churn, complain and refer friends."""
    rng = random.Random(options.seed + 1)
    summaries: list[simulation.DaySummary] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("simulating", total=options.days)
        for offset in range(options.days):
            day = HISTORY_END + dt.timedelta(days=offset)
            progress.update(task, description=f"{day:%a %d %b}")
            summaries.append(
                simulation.simulate_day(sessions, settings, day, rng, directory=options.directory / "days")
            )
            progress.advance(task)
    return summaries


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
