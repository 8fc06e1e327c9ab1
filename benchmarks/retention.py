"""Time the retention reports at scale: by default 1,000,000 contacts, 10,000,000 visits, 10,000,000 sends.

The business is generated inside the database (a cross join of a ten-row table with itself), in seconds
to minutes rather than the import's hours, and cached: SQLite in ``benchmarks/.data/retention-<N>.db``, a
PostgreSQL database given with ``--postgres`` is filled once and reused while it holds the same counts.
Each contact visits ten times on their own rhythm over two years (one in ten pays in BRL, the rest in
EUR), is sent ten messages over the last year (one in ten held out; a quarter by SMS; incentives, promotions
and win-backs carry offers), one in ten answered NPS and one in a hundred asked to cancel. Profiles are
written directly (the report reads each contact's average visit and currency from them).

Then it times the real commands in a subprocess, each once: ``nurture report retention --json`` and
``nurture report html``, over the twelve months to 31 October 2026.

    .venv/bin/python benchmarks/retention.py [--contacts 1000000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import (
    JSON,
    Engine,
    Integer,
    String,
    case,
    cast,
    func,
    insert,
    literal,
    null,
    select,
    table,
    text,
    true,
)
from sqlalchemy import column as sql_column

from nurture import db
from nurture.models import Base, Contact, ContactProfile, Feedback, Send, Visit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
START = dt.datetime(2024, 11, 1, tzinfo=dt.UTC)  # two years of visits, to 31 October 2026
UNTIL = "2026-10-31"
TOUCHES = [
    "welcome",
    "incentive",
    "education",
    "winback",
    "birthday",
    "promotion",
    "incentive",
    "referral_ask",
    "loyalty_milestone",
    "appreciation_day",
]
OFFERS = {1: 10, 3: 20, 5: 15, 6: 10}  # message number: offer value (percent)


def _day(days: object) -> object:
    return db.instant_from_epoch(START.timestamp() + days * 86400.0)  # type: ignore[operator]


def generate(engine: Engine, contacts: int) -> None:
    """Fill an empty database with ``contacts`` contacts and ten visits and ten sends each."""
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
                ["id", "external_id", "first_name", "locale", "timezone", "referral_code", "attributes"]
                + ["created_at", "updated_at"],
                select(
                    n + 1,
                    literal("c") + cast(n, String),
                    literal("Ana"),
                    literal("es"),
                    literal("Europe/Madrid"),
                    literal("R") + cast(n, String),
                    cast(literal("{}"), JSON),
                    literal(START, Contact.created_at.type),
                    literal(START, Contact.created_at.type),
                ).where(n < contacts),
            )
        )
        k = digits.alias("k")
        # (id x 7919) mod 400, without a product that overflows PostgreSQL's integers.
        first = (Contact.id % 400) * (7919 % 400) % 400
        gap = 7 + Contact.id % 30
        currency = case((Contact.id % 10 == 0, "BRL"), else_="EUR")
        amount = 20 + Contact.id % 80
        connection.execute(
            insert(Visit).from_select(
                ["external_id", "contact_id", "occurred_at", "amount", "currency", "created_at"],
                select(
                    cast(Contact.id, String) + literal("-") + cast(k.c.d, String),
                    Contact.id,
                    _day(first + k.c.d * gap),
                    amount,
                    currency,
                    literal(START, Visit.created_at.type),
                )
                .select_from(Contact)
                .join(k, true()),
            )
        )
        touch = case(*((k.c.d == i, name) for i, name in enumerate(TOUCHES)))
        held_out = (Contact.id + k.c.d) % 10 == 0
        sms = (Contact.id + k.c.d) % 4 == 0
        moment = _day(365 + (Contact.id * 31 + k.c.d * 37) % 365)
        connection.execute(
            insert(Send).from_select(
                ["key", "contact_id", "touch", "occurrence", "category", "status", "channel", "segments"]
                + ["incentive", "due_at", "claimed_at", "sent_at"],
                select(
                    touch + literal(":") + cast(Contact.id, String) + literal(":") + cast(k.c.d, String),
                    Contact.id,
                    touch,
                    cast(k.c.d, String),
                    literal("marketing"),
                    case((held_out, "held_out"), else_="sent"),
                    case((sms, "sms"), else_="email"),
                    case((sms, 1), else_=null()),
                    case(*((k.c.d == i, value) for i, value in OFFERS.items()), else_=null()),
                    moment,
                    moment,
                    case((held_out, null()), else_=moment),
                )
                .select_from(Contact)
                .join(k, true()),
            )
        )
        connection.execute(
            insert(Feedback).from_select(
                ["contact_id", "occurred_at", "kind", "score", "created_at"],
                select(
                    Contact.id,
                    _day(first + 2 * gap + 1),
                    case((Contact.id % 100 == 0, "cancel_request"), else_="nps"),
                    case((Contact.id % 100 == 0, null()), else_=Contact.id % 11),
                    literal(START, Feedback.created_at.type),
                ).where(Contact.id % 10 == 0),
            )
        )
        connection.execute(
            insert(ContactProfile).from_select(
                ["contact_id", "stage", "value_tier", "satisfaction", "complaint_open", "visits"]
                + ["total_spend", "currency", "expected_value", "points", "stamps"],
                select(
                    Contact.id,
                    literal("returning"),
                    literal("medium"),
                    literal("unknown"),
                    literal(False),
                    literal(10),
                    cast(amount * 10, Integer),
                    currency,
                    literal(0),
                    literal(0),
                    literal(0),
                ),
            )
        )
        connection.execute(text("DROP TABLE bench_digits"))
        connection.execute(text("DELETE FROM profile_changes"))
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE"))
    else:
        with engine.begin() as connection:
            connection.execute(text("ANALYZE"))


def counts(engine: Engine) -> tuple[int, int, int]:
    """Contacts, visits and sends in the database (zeros when it has no schema yet)."""
    try:
        with engine.connect() as connection:
            return tuple(  # type: ignore[return-value]
                connection.scalar(select(func.count()).select_from(model)) or 0
                for model in (Contact, Visit, Send)
            )
    except Exception:
        return (0, 0, 0)


def prepare(url: str, contacts: int) -> None:
    """Generate the business in ``url`` unless it already holds it."""
    engine = db.make_engine(url)
    try:
        if counts(engine) == (contacts, 10 * contacts, 10 * contacts) and db.is_current(engine):
            print(f"{engine.dialect.name}: reusing the business already in {engine.url.database}")
            return
        Base.metadata.drop_all(engine)
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
        db.upgrade(engine)
        started = time.perf_counter()
        generate(engine, contacts)
        print(f"{engine.dialect.name}: {counts(engine)} contacts, visits, sends generated in "
              f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    finally:
        engine.dispose()


def timed(url: str, *arguments: str) -> tuple[float, float, float, str]:
    """Run ``nurture ARGUMENTS`` on ``url``: wall and CPU seconds, the peak memory in MiB, the output."""
    environment = {
        **os.environ,
        "NURTURE_DATABASE_URL": url,
        "NURTURE_TEMPLATES_DIR": str(REPO / "templates"),
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(
        [str(Path(sys.executable).parent / "nurture"), *arguments],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"nurture {' '.join(arguments)} failed:\n{result.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu, max(before.ru_maxrss, after.ru_maxrss) / 1024, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=1_000_000)
    parser.add_argument("--postgres", help="an EMPTY PostgreSQL database to fill (or holding this business)")
    args = parser.parse_args()
    data = HERE / ".data"
    data.mkdir(exist_ok=True)
    url = args.postgres or f"sqlite:///{data / f'retention-{args.contacts}.db'}"
    prepare(url, args.contacts)
    with tempfile.TemporaryDirectory() as scratch:
        seconds, cpu, peak, output = timed(url, "report", "retention", "--until", UNTIL, "--json")
        report = json.loads(output)
        print(
            f"nurture report retention --json: {seconds:.1f} s wall, {cpu:.1f} s CPU, peak {peak:.0f} MiB; "
            f"{report['customers']:,} customers, churn per month {report['churn_rate_per_period']:.1%}, "
            f"{report['messages']['email'] + report['messages']['sms']:,} messages, "
            f"{report['slipping_count']:,} slipping"
        )
        page = Path(scratch) / "report.html"
        seconds, cpu, peak, _ = timed(url, "report", "html", "--out", str(page), "--until", UNTIL)
        print(
            f"nurture report html: {seconds:.1f} s wall, {cpu:.1f} s CPU, peak {peak:.0f} MiB;"
            f" {page.stat().st_size / 1024:.0f} KiB"
        )


if __name__ == "__main__":
    main()
