"""Measure `nurture import`: wall time, rows per second and peak memory, first import and re-import.

    .venv/bin/python benchmarks/imports.py [--contacts 50000] [--visits 1000000] [--postgres URL]

Writes its CSV files once into benchmarks/.data/ and runs the real command in a subprocess against a fresh
SQLite file (and a PostgreSQL database when a URL is given: its public schema is dropped first).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
NURTURE = Path(sys.executable).with_name("nurture")
COUNTRIES = [
    ("ES", "es", "Europe/Madrid", "EUR"),
    ("PT", "pt", "Europe/Lisbon", "EUR"),
    ("BR", "pt_BR", "America/Sao_Paulo", "BRL"),
    ("MX", "es_MX", "America/Mexico_City", "MXN"),
    ("US", "en", "America/New_York", "USD"),
]


def write_files(contacts: int, visits: int) -> tuple[Path, Path]:
    """Write a contacts file and a visits file of the asked sizes, unless they exist already."""
    DATA.mkdir(exist_ok=True)
    contacts_path = DATA / f"contacts-{contacts}.csv"
    visits_path = DATA / f"visits-{contacts}-{visits}.csv"
    rng = random.Random(1)
    if not contacts_path.exists():
        with contacts_path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["external_id", "first_name", "email", "country", "locale", "timezone", "tags"])
            for number in range(contacts):
                country, locale, timezone, _ = COUNTRIES[number % len(COUNTRIES)]
                tags = "|".join(rng.sample(["haircut", "color", "nails", "massage", "barber"], 2))
                writer.writerow(
                    [f"C{number}", "María", f"c{number}@example.com", country, locale, timezone, tags]
                )
    if not visits_path.exists():
        start = dt.datetime(2024, 1, 1)
        with visits_path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["external_id", "contact_external_id", "occurred_at", "amount", "currency"])
            for number in range(visits):
                contact = rng.randrange(contacts)
                when = start + dt.timedelta(minutes=rng.randrange(1_000_000))
                currency = COUNTRIES[contact % len(COUNTRIES)][3]
                writer.writerow(
                    [
                        f"V{number}",
                        f"C{contact}",
                        when.isoformat(),
                        f"{rng.randrange(1000, 20000) / 100:.2f}",
                        currency,
                    ]
                )
    return contacts_path, visits_path


def run(kind: str, path: Path, database_url: str) -> tuple[float, float, int, str]:
    """Run one import; return its wall time, CPU time, peak RSS in KiB and JSON summary."""
    environment = {**os.environ, "NURTURE_DATABASE_URL": database_url}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(
            [str(NURTURE), "import", kind, str(path), "--json"], env=environment, stdout=stdout, stderr=stderr
        )
        # wait4 gives this one child's resource usage, which getrusage(RUSAGE_CHILDREN) would mix up.
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        if process.returncode != 0:
            sys.exit(f"nurture import {kind} failed: {stderr.read().strip()}")
        return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, stdout.read().strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contacts", type=int, default=50_000)
    parser.add_argument("--visits", type=int, default=1_000_000)
    parser.add_argument("--postgres", help="A PostgreSQL URL to measure too; its public schema is dropped.")
    arguments = parser.parse_args()
    contacts_path, visits_path = write_files(arguments.contacts, arguments.visits)
    databases = {"sqlite": f"sqlite:///{DATA / 'bench.db'}"}
    if arguments.postgres:
        databases["postgresql"] = arguments.postgres
    heading = ("database", "step", "rows", "wall s", "CPU s", "rows/s", "peak RSS")
    print("{:<11} {:<13} {:>9} {:>7} {:>6} {:>8} {:>9}  summary".format(*heading))
    for name, url in databases.items():
        reset(name, url)
        for step, kind, path, rows in [
            ("contacts", "contacts", contacts_path, arguments.contacts),
            ("visits", "visits", visits_path, arguments.visits),
            ("visits again", "visits", visits_path, arguments.visits),
        ]:
            elapsed, cpu, peak_kib, summary = run(kind, path, url)
            print(
                f"{name:<11} {step:<13} {rows:>9,} {elapsed:>7.1f} {cpu:>6.1f} {rows / elapsed:>8,.0f}"
                f" {peak_kib / 1024:>6.0f} MB  {summary}",
                flush=True,
            )


def reset(name: str, url: str) -> None:
    """Start from an empty database."""
    if name == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{DATA / 'bench.db'}{suffix}").unlink(missing_ok=True)
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()


if __name__ == "__main__":
    if not NURTURE.exists():
        sys.exit("run `make .venv/.installed-dev` first: the nurture command is not installed")
    main()
