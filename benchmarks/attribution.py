"""How long `nurture report attribution` takes over 10 million sends and 10 million visits.

    .venv/bin/python benchmarks/attribution.py [--contacts 1000000] [--sends 10000000] [--visits 10000000]
        [--rebuild] [--postgres URL]

The business is written with bulk ``INSERT ... SELECT`` statements (a recursive CTE on SQLite,
``generate_series`` on PostgreSQL, an integer hash drawing each row, so the same sizes always give the same
rows): contacts, each with ten visits over the year before ``NOW`` (EUR, a third in BRL) and ten ledger
rows of the programme's touches (one in ten held out, one in five by SMS, the promotion in a campaign, the
incentive with its offer). The SQLite file is cached as
``benchmarks/.data/attribution-<contacts>-<sends>-<visits>-v<VERSION>.db``; with ``--postgres`` the same
rows go into that (emptied) database once, and stay there for the next time.

Then it runs the real command, ``nurture report attribution --json``, in a subprocess: over every send (a
year), and over the last 28 days' sends (``--since``), and prints each one's wall time, the child's CPU
time (its threads' summed) and peak memory, and the load average after it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import text

from nurture import db

VERSION = 1
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
YEAR = 365 * 86400
BENCHMARKS = Path(__file__).resolve().parent
DATA = BENCHMARKS / ".data"
TOUCHES = ["education", "incentive", "birthday", "winback", "promotion", "loyalty_milestone", "referral_ask",
           "appreciation_day", "welcome", "complaint_recovery"]  # fmt: skip


def h(expression: str, salt: int) -> str:
    """SQL for a well-mixed hash of an integer expression in [0, 2**32), the same on SQLite and PostgreSQL."""
    first = f"((({expression}) * 2654435761 + {salt * 40503 + 12345}) % 4294967296)"
    mixed = f"(({first} | ({first} >> 15)) - ({first} & ({first} >> 15)))"  # a XOR b, which SQLite lacks
    return f"((({mixed}) * 1540483477) % 4294967296)"


def _sqlite_instant(seconds: str) -> str:
    return f"(datetime({seconds}, 'unixepoch') || '.000000')"


def _postgres_instant(seconds: str) -> str:
    return f"to_timestamp({seconds})"


def _statements(dialect: str, contacts: int, sends: int, visits: int) -> list[str]:
    """The INSERT ... SELECT statements that write the business."""
    start = int(NOW.timestamp()) - YEAR
    if dialect == "sqlite":
        instant = _sqlite_instant

        def code(prefix: str, id_sql: str) -> str:
            return f"printf('{prefix}%09d', {id_sql})"

        def numbers(count: int) -> str:
            return f"WITH RECURSIVE n(id) AS (SELECT 1 UNION ALL SELECT id + 1 FROM n WHERE id < {count}) "

    else:
        instant = _postgres_instant

        def code(prefix: str, id_sql: str) -> str:
            return f"'{prefix}' || lpad(({id_sql})::text, 9, '0')"

        def numbers(count: int) -> str:
            return f"WITH n(id) AS (SELECT generate_series(1, {count})::bigint) "

    source = "n"

    touch_case = (
        "CASE "
        + " ".join(
            f"WHEN {h('id', 3)} % {len(TOUCHES)} = {number} THEN '{touch}'"
            for number, touch in enumerate(TOUCHES)
        )
        + " END"
    )
    created = instant(str(start - YEAR))
    contact = f"1 + (id - 1) % {contacts}"
    visited = instant(f"{start} + {h('id', 1)} % {YEAR}")
    ids = code("C", "id"), code("R", "id")
    return [
        numbers(contacts)
        + "INSERT INTO contacts (id, external_id, locale, timezone, referral_code, attributes, created_at,"
        " updated_at) "
        f"SELECT id, {ids[0]}, 'es', 'Europe/Madrid', {ids[1]}, '{{}}', {created}, {created}"
        f" FROM {source}",
        numbers(visits)
        + "INSERT INTO visits (id, external_id, contact_id, occurred_at, amount, currency, created_at) "
        f"SELECT id, {code('V', 'id')}, {contact}, {visited},"
        f" 20 + {h('id', 2)} % 80, CASE WHEN ({contact}) % 3 = 0 THEN 'BRL' ELSE 'EUR' END, {created}"
        f" FROM {source}",
        numbers(sends)
        + "INSERT INTO sends (id, key, contact_id, touch, occurrence, campaign, category, status, channel,"
        " incentive, due_at, claimed_at, sent_at) "
        f"SELECT id, 'bench:' || id, {contact}, touch, 'o' || id,"
        " CASE WHEN touch = 'promotion' THEN 'winter-2026' END, 'marketing',"
        " CASE WHEN held THEN 'held_out' ELSE 'sent' END,"
        f" CASE WHEN held THEN NULL WHEN {h('id', 5)} % 5 = 0 THEN 'sms' ELSE 'email' END,"
        " CASE WHEN touch = 'incentive' THEN 10 + 5 * (id % 3) END,"
        f" {instant('at')}, {instant('at')}, CASE WHEN held THEN NULL ELSE {instant('at')} END"
        f" FROM (SELECT id, {touch_case} AS touch, {h('id', 4)} % 10 = 0 AS held,"
        f" {start} + {h('id', 6)} % {YEAR} AS at FROM {source}) AS drawn",
    ]


def build_sqlite(path: Path, contacts: int, sends: int, visits: int) -> None:
    """Write the business to a new SQLite file."""
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    engine.dispose()
    connection = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-400000", "temp_store=MEMORY"):
        connection.execute(f"PRAGMA {pragma}")
    # The profile triggers note every changed contact; a bulk load of a fresh business has no use for that.
    triggers = connection.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
    connection.execute("BEGIN")
    for name, _ in triggers:
        connection.execute(f"DROP TRIGGER {name}")
    for statement in _statements("sqlite", contacts, sends, visits):
        started = time.perf_counter()
        connection.execute(statement)
        print(
            f"  {statement.split('INSERT INTO ')[1].split()[0]}: {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    for _, sql in triggers:
        connection.execute(sql)
    connection.execute("COMMIT")
    connection.execute("ANALYZE")
    connection.execute("PRAGMA journal_mode=WAL")
    connection.close()


def build_postgres(url: str, contacts: int, sends: int, visits: int) -> None:
    """Write the business into the PostgreSQL database at ``url``, emptied first."""
    engine = db.make_engine(url)
    db.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE contacts RESTART IDENTITY CASCADE"))
        for table in ("contacts", "visits"):
            connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
        for statement in _statements("postgresql", contacts, sends, visits):
            started = time.perf_counter()
            connection.execute(text(statement))
            print(
                f"  {statement.split('INSERT INTO ')[1].split()[0]}: {time.perf_counter() - started:.0f} s",
                flush=True,
            )
        for table in ("contacts", "visits"):
            connection.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))
        for table in ("contacts", "visits", "sends"):
            connection.execute(
                text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))")
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))
    engine.dispose()


def postgres_holds(url: str, contacts: int, sends: int, visits: int) -> bool:
    """Tell whether the PostgreSQL database already holds this business."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            counts = [
                connection.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
                for table in ("contacts", "sends", "visits")
            ]
    except Exception:  # no schema yet
        return False
    finally:
        engine.dispose()
    return counts == [contacts, sends, visits]


def run_report(url: str, *options: str) -> tuple[float, float, float, dict[str, object]]:
    """Run ``nurture report attribution --json`` in a child; give its wall and CPU s, peak MB and output."""
    command = [str(Path(sys.executable).parent / "nurture"), "report", "attribution", "--json", *options]
    environment = {
        **os.environ,
        "NURTURE_DATABASE_URL": url,
        "NURTURE_TEMPLATES_DIR": str(BENCHMARKS.parent / "templates"),
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return seconds, cpu, peak_mb, json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contacts", type=int, default=1_000_000)
    parser.add_argument("--sends", type=int, default=10_000_000)
    parser.add_argument("--visits", type=int, default=10_000_000)
    parser.add_argument("--rebuild", action="store_true", help="Write the business again.")
    parser.add_argument("--skip-sqlite", action="store_true", help="Time the reports on PostgreSQL only.")
    parser.add_argument(
        "--postgres", help="Also on this PostgreSQL database (emptied when it holds other data)."
    )
    arguments = parser.parse_args()
    sizes = (arguments.contacts, arguments.sends, arguments.visits)

    DATA.mkdir(exist_ok=True)
    path = DATA / f"attribution-{arguments.contacts}-{arguments.sends}-{arguments.visits}-v{VERSION}.db"
    if arguments.rebuild or not path.exists():
        path.unlink(missing_ok=True)
        print(f"writing {path.name}", flush=True)
        started = time.perf_counter()
        build_sqlite(path.with_suffix(".tmp"), *sizes)
        path.with_suffix(".tmp").rename(path)
        print(f"  written in {time.perf_counter() - started:.0f} s, {path.stat().st_size / 2**30:.1f} GiB")
    # A file built before a newer migration is brought up to date here, so that the command does not
    # spend the timed run migrating it.
    started = time.perf_counter()
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    engine.dispose()
    print(f"schema up to date in {time.perf_counter() - started:.0f} s", flush=True)
    databases = [] if arguments.skip_sqlite else [("SQLite", f"sqlite:///{path}")]
    if arguments.postgres:
        if arguments.rebuild or not postgres_holds(arguments.postgres, *sizes):
            print("writing the business into PostgreSQL", flush=True)
            started = time.perf_counter()
            build_postgres(arguments.postgres, *sizes)
            print(f"  written in {time.perf_counter() - started:.0f} s")
        databases.append(("PostgreSQL", arguments.postgres))

    since = (NOW - dt.timedelta(days=28)).date().isoformat()
    print(f"\n{arguments.sends:,} sends, {arguments.visits:,} visits, {arguments.contacts:,} contacts")
    print(
        "| database | report | wall s | CPU s | load | peak RSS | touches | sends counted"
        " | last-touch visits |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|")
    for name, url in databases:
        for label, options in (("every send (a year)", ()), (f"sends since {since}", ("--since", since))):
            seconds, cpu, peak, report = run_report(url, *options)
            load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
            touches = report["touches"]
            assert isinstance(touches, list)
            counted = sum(t["sent"] + t["held_out"] for t in touches)
            print(
                f"| {name} | {label} | {seconds:.1f} | {cpu:.1f} | {load} | {peak:.0f} MB | {len(touches)}"
                f" | {counted:,}"
                f" | {report['last_touch_visits']:,} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
