"""Measure the ledger's share of a calendar run: µs of CPU a message to claim it and to record its outcome.

    .venv/bin/python benchmarks/ledger.py [--messages 20000] [--batch 1000] [--from CALENDAR_DB]

The ledger is the one a million-contact business has after a year (2.1 million sends): the calendar
benchmark's file (``benchmarks/calendar --contacts 1000000`` builds it) is copied once, its sends and
contact ids only, to ``benchmarks/.data/ledger-<N>.db``. Each measurement first gives that copy the
indexes ``models.Send`` declares now (so that it measures the code as it is), then claims and records
``--messages`` new sends in batches, as ``calendar._send_chunk`` does: a claim's transaction, then a
record's, per batch, the contacts of a batch spread over a range of ids as a run's ranges are. The new
sends stay (each measurement adds its own keys); the copy grows by a percent a measurement.

CPU time is the process's (user and system), so that it means the same on a busy machine; the wall time
also counts waiting for the disk at each commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import sqlite3
import time
import uuid
from pathlib import Path

from sqlalchemy import Index
from sqlalchemy.schema import CreateIndex

from nurture import ledger
from nurture.db import make_engine, session_factory
from nurture.models import Channel, Send, SendCategory, SendStatus

DATA = Path(__file__).resolve().parent / ".data"
AT = dt.datetime(2026, 11, 24, 9, tzinfo=dt.UTC)


def build(source: Path, target: Path) -> None:
    """Copy the sends and the contact ids of the calendar benchmark's file, with the sends' schema."""
    temporary = target.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)
    connection = sqlite3.connect(temporary)
    connection.execute("ATTACH DATABASE ? AS source", (f"file:{source}?mode=ro",))
    schema = connection.execute("SELECT sql FROM source.sqlite_master WHERE name = 'sends'").fetchone()[0]
    connection.execute("CREATE TABLE contacts (id INTEGER NOT NULL PRIMARY KEY)")
    connection.execute("INSERT INTO contacts SELECT id FROM source.contacts ORDER BY id")
    connection.execute(schema)
    connection.execute("INSERT INTO sends SELECT * FROM source.sends ORDER BY id")
    connection.commit()
    connection.execute("DETACH DATABASE source")
    connection.close()
    temporary.rename(target)


def sync_indexes(path: Path) -> list[str]:
    """Give the copy exactly the indexes ``Send`` declares (dropping others), then gather statistics."""
    engine = make_engine(f"sqlite:///{path}")
    wanted: dict[str, Index] = {str(index.name): index for index in Send.__table__.indexes}  # type: ignore[attr-defined]
    with engine.begin() as connection:
        have = {
            name: sql
            for name, sql in connection.exec_driver_sql(
                "SELECT name, sql FROM sqlite_master"
                " WHERE type = 'index' AND tbl_name = 'sends' AND sql IS NOT NULL"
            )
        }
        for name, index in wanted.items():
            sql = str(CreateIndex(index).compile(dialect=engine.dialect))
            if have.get(name) is not None and " ".join(have[name].split()) != " ".join(sql.split()):
                connection.exec_driver_sql(f"DROP INDEX {name}")
                del have[name]
            if name not in have:
                connection.exec_driver_sql(sql)
        for name in set(have) - set(wanted):
            connection.exec_driver_sql(f"DROP INDEX {name}")
        connection.exec_driver_sql("ANALYZE sends")
    engine.dispose()
    return sorted(wanted)


def entries(contacts: list[int], count: int, tag: str) -> list[ledger.Entry]:
    """``count`` new emails to contacts spread over a range of ids, 1 in 18 as at a million contacts."""
    start = random.randrange(0, max(1, len(contacts) - 18 * count))
    chosen = contacts[start : start + 18 * count : 18]
    return [
        ledger.Entry(
            key=f"bench-{tag}:{contact_id}:2026-11-24",
            contact_id=contact_id,
            touch="bench",
            occurrence="2026-11-24",
            category=SendCategory.MARKETING,
            status=SendStatus.CLAIMED,
            due_at=AT.replace(hour=0),
            channel=Channel.EMAIL,
            locale="pt_BR",
            template="bench/email.html.j2",
            subject="Olá, a sua visita espera por si",
            segments=None,
        )
        for contact_id in chosen
    ]


def measure(path: Path, messages: int, batch: int) -> tuple[float, float, float, float]:
    """Claim and record ``messages`` in batches; µs of CPU a message for each, then wall µs for each."""
    engine = make_engine(f"sqlite:///{path}")
    sessions = session_factory(engine)
    with engine.connect() as connection:
        contacts = [row[0] for row in connection.exec_driver_sql("SELECT id FROM contacts ORDER BY id")]
    claim_cpu = record_cpu = claim_wall = record_wall = 0.0
    run_id = uuid.uuid4().hex
    for number in range(0, messages, batch):
        chunk = entries(contacts, min(batch, messages - number), f"{run_id[:8]}-{number}")
        cpu, wall = _cpu(), time.perf_counter()
        with sessions.begin() as session:
            ids = ledger.claim(session, chunk, at=AT, run_id=run_id)
        claim_cpu += _cpu() - cpu
        claim_wall += time.perf_counter() - wall
        assert len(ids) == len(chunk)
        outcomes = [ledger.Outcome(send_id, SendStatus.SENT, f"{send_id}.eml") for send_id in ids.values()]
        cpu, wall = _cpu(), time.perf_counter()
        with sessions.begin() as session:
            ledger.record(session, outcomes, at=AT)
        record_cpu += _cpu() - cpu
        record_wall += time.perf_counter() - wall
    engine.dispose()
    micros = 1e6 / messages
    return claim_cpu * micros, record_cpu * micros, claim_wall * micros, record_wall * micros


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--from", dest="source", type=Path, default=DATA / "calendar-1000000-v3.db")
    parser.add_argument(
        "--fresh", action="store_true", help="Copy the ledger again (drop earlier runs' sends)."
    )
    arguments = parser.parse_args()
    target = DATA / f"ledger-{arguments.source.stem}.db"
    if arguments.fresh or not target.exists():
        started = time.perf_counter()
        build(arguments.source, target)
        print(f"copied the ledger to {target} in {time.perf_counter() - started:.0f} s")
    indexes = sync_indexes(target)
    with sqlite3.connect(target) as connection:
        rows = connection.execute("SELECT COUNT(*) FROM sends").fetchone()[0]
    print(f"{rows:,} sends; indexes: {', '.join(indexes)}")
    claim, record, claim_wall, record_wall = measure(target, arguments.messages, arguments.batch)
    print(
        f"{arguments.messages:,} messages in batches of {arguments.batch:,}:"
        f" claim {claim:.1f} µs CPU a message ({claim_wall:.1f} wall),"
        f" record {record:.1f} µs CPU ({record_wall:.1f} wall)"
    )


if __name__ == "__main__":
    main()
