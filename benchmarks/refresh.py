"""Time a profile refresh at scale: by default 1,000,000 contacts and 10,000,000 visits.

The history is generated inside the database (a cross join of a ten-row table with itself), so that
setting it up takes seconds rather than the import's minutes; each contact gets its own rhythm, spend and
one of five interest tags, and one in ten an NPS score. The first refresh also accrues a loyalty entry per
visit; the second is the steady state a calendar run pays (nothing new to accrue).

    .venv/bin/python benchmarks/refresh.py [--contacts 1000000] [--visits-each 10] [--database-url URL]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import resource
import tempfile
import time
from pathlib import Path

from sqlalchemy import JSON, Engine, String, cast, func, insert, literal, select, table, text, true
from sqlalchemy import column as sql_column

from nurture import db, profiles
from nurture.models import Base, Contact, ContactTag, Feedback, Visit
from nurture.settings import Settings

START = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
AT = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def generate(engine: Engine, contacts: int, visits_each: int) -> None:
    """Fill an empty database with ``contacts`` contacts and ``visits_each`` visits per contact."""
    digits = table("bench_digits", sql_column("d"))
    places = len(str(contacts - 1))
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE bench_digits (d INTEGER NOT NULL)"))
        connection.execute(
            text("INSERT INTO bench_digits (d) VALUES " + ", ".join(f"({d})" for d in range(10)))
        )
        copies = [digits.alias(f"p{place}") for place in range(places)]
        number = sum((copy.c.d * 10**place for place, copy in enumerate(copies)), literal(0))
        cross = functools.reduce(lambda left, right: left.join(right, true()), copies[1:], copies[0])
        numbers = select(number.label("n")).select_from(cross).subquery()
        n = numbers.c.n
        connection.execute(
            insert(Contact).from_select(
                [
                    "id",
                    "external_id",
                    "locale",
                    "timezone",
                    "referral_code",
                    "attributes",
                    "created_at",
                    "updated_at",
                ],
                select(
                    n + 1,
                    literal("c") + cast(n, String),
                    literal("en"),
                    literal("UTC"),
                    literal("R") + cast(n, String),
                    cast(literal("{}"), JSON),
                    literal(START, Contact.created_at.type),
                    literal(START, Contact.created_at.type),
                ).where(n < contacts),
            )
        )
        connection.execute(
            insert(ContactTag).from_select(
                ["contact_id", "tag"],
                select(Contact.id, literal("tag") + cast(Contact.id % 5, String)),
            )
        )
        visit = digits.alias("visit")
        # Each contact visits every (5 + id % 60) days from a start spread over the first year.
        day = (Contact.id * 7919) % 365 + visit.c.d * (5 + Contact.id % 60)
        connection.execute(
            insert(Visit).from_select(
                ["external_id", "contact_id", "occurred_at", "amount", "currency", "created_at"],
                select(
                    cast(Contact.id, String) + literal("-") + cast(visit.c.d, String),
                    Contact.id,
                    db.instant_from_epoch(START.timestamp() + day * 86400.0),
                    5 + Contact.id % 50,
                    literal("EUR"),
                    literal(START, Visit.created_at.type),
                )
                .select_from(Contact)
                .join(visit, visit.c.d < visits_each),
            )
        )
        connection.execute(
            insert(Feedback).from_select(
                ["contact_id", "occurred_at", "kind", "score", "created_at"],
                select(
                    Contact.id,
                    literal(START + dt.timedelta(days=200), Feedback.occurred_at.type),
                    literal("nps"),
                    Contact.id % 11,
                    literal(START, Feedback.created_at.type),
                ).where(Contact.id % 10 == 0),
            )
        )
        connection.execute(text("DROP TABLE bench_digits"))
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE"))
    else:
        with engine.begin() as connection:
            connection.execute(text("ANALYZE"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=1_000_000)
    parser.add_argument("--visits-each", type=int, default=10, choices=range(1, 11))
    parser.add_argument(
        "--database-url",
        help="an EMPTY database to fill (its tables are dropped); default a temporary SQLite file",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        url = args.database_url or f"sqlite:///{Path(scratch) / 'refresh.db'}"
        engine = db.make_engine(url)
        Base.metadata.drop_all(engine)
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
        db.upgrade(engine)
        started = time.perf_counter()
        generate(engine, args.contacts, args.visits_each)
        with engine.connect() as connection:
            visits = connection.scalar(select(func.count()).select_from(Visit))
        print(
            f"{engine.dialect.name}: {args.contacts:,} contacts, {visits:,} visits generated in "
            f"{time.perf_counter() - started:.0f} s"
        )
        settings = Settings(database_url=url, _env_file=None)  # type: ignore[call-arg]
        sessions = db.session_factory(engine)
        for attempt in (
            "first refresh (accrues every visit's loyalty entry)",
            "second refresh (steady state)",
        ):
            started = time.perf_counter()
            with sessions.begin() as session:
                summary = profiles.refresh(session, settings, AT)
            seconds = time.perf_counter() - started
            print(
                f"{attempt}: {seconds:.1f} s, {summary.contacts:,} profiles, "
                f"{summary.loyalty_entries_added:,} loyalty entries added"
            )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak memory of this process: {peak:.0f} MiB")
        engine.dispose()


if __name__ == "__main__":
    main()
