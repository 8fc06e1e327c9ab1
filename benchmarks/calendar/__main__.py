"""Build the business the calendar benchmark runs over: N contacts in steady state, cached as a SQLite file.

    .venv/bin/python benchmarks/calendar [--contacts 1000000] [--rebuild] [--run] [--prefect-server]
        [--in-process]

With ``--run`` it then times one real calendar run over a fresh copy: ``nurture calendar run --json`` (the
Prefect flow, its temporary server, the profile refresh, rendering and the outbox), its wall time and peak
memory (the run's processes summed: it spreads its ranges over one worker process per core). With
``--prefect-server`` the same run talks to a Prefect server started beforehand, as a scheduled deployment's
run does; ``--in-process`` runs ``run_calendar`` in the benchmark's own process, without Prefect.

(A folder, not ``calendar.py``: a ``calendar.py`` in ``benchmarks/`` would shadow the standard library's
``calendar`` for every script run from there, and break them.)

Contacts, interest tags, about eight visits each over the past year, consents, NPS scores and a few
complaints are written with bulk ``INSERT ... SELECT`` statements (a recursive CTE numbers the contacts,
an integer hash draws their traits, so the same N always gives the same rows); profiles and loyalty are
then computed by the real ``profiles.refresh`` as of the benchmark instant. The ledger holds the sends a
business running nurture daily would already have made (each contact's last education item and referral
ask, incentives, welcomes, win-back steps and milestones that fell due before today), so that the run
plans only what is new today: about 5-10% of the contacts are due a touch at ``AT``. The contacts with a
visit or feedback in the last day are noted as changed since the previous run, so the run's profile
refresh sums them up again, as it would after a day's imports.

The file is ``benchmarks/.data/calendar-<N>-v<VERSION>.db``, built once; ``fresh_copy`` gives a copy to
run against (a run writes to the ledger). This script prints the file's size, its build time and how many
contacts each touch should find due.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

from nurture import calendar, db, profiles
from nurture.settings import Settings

VERSION = 3
# A Wednesday afternoon in Europe, late morning in the Americas: inside most contacts' send window, far
# from the appreciation day (26 November) and the December promotion.
AT = dt.datetime(2026, 10, 14, 14, 0, tzinfo=dt.UTC)
BENCHMARKS = Path(__file__).resolve().parent.parent
DATA = BENCHMARKS / ".data"
DAY = 86400

REGIONS = [  # share (%), country, timezone, locale, currency, phone prefix, digits after it
    (30, "ES", "Europe/Madrid", "es", "EUR", "+346", 8),
    (5, "ES", "Atlantic/Canary", "es", "EUR", "+346", 8),
    (15, "PT", "Europe/Lisbon", "pt", "EUR", "+3519", 8),
    (20, "BR", "America/Sao_Paulo", "pt", "BRL", "+55119", 8),
    (12, "MX", "America/Mexico_City", "es", "MXN", "+5255", 8),
    (12, "US", "America/New_York", "en", "USD", "+1212", 7),
    (6, "US", "America/Los_Angeles", "en", "USD", "+1213", 7),
]
FIRST_NAMES = ["María", "João", "Begoña", "Lucía", "José", "Ana", "Conceição", "Zoë", "Carmen", "Íñigo",
               "Sofía", "Thiago", "Emily", "Michael", "Renée", "Gonçalo"]  # fmt: skip
LAST_NAMES = ["García", "Fernández", "Gonçalves", "Muñoz", "Souza", "López", "Martín", "Smith", "Pérez",
              "Rodríguez", "Araújo", "Sánchez", "Brown", "Núñez", "Oliveira", "Castaño"]  # fmt: skip
TAGS = ["haircut", "color", "nails", "skincare", "barber", "brows", "massage", "bridal"]


def h(expression: str, salt: int) -> str:
    """SQL for a well-mixed hash of an integer expression in [0, 2**32): the same inputs, the same value."""
    first = f"((({expression}) * 2654435761 + {salt * 40503 + 12345}) % 4294967296)"
    # SQLite has no XOR: a ^ b = (a | b) - (a & b). Products stay under 2**63.
    mixed = f"(({first} | ({first} >> 15)) - ({first} & ({first} >> 15)))"
    return f"((({mixed}) * 1540483477) % 4294967296)"


def timestamp(seconds: str) -> str:
    """SQL for an epoch-seconds expression as SQLAlchemy stores instants in SQLite (naive UTC)."""
    return f"(datetime({seconds}, 'unixepoch') || '.000000')"


def build(path: Path, contacts: int) -> None:
    """Write the steady-state business of ``contacts`` contacts to a new SQLite file at ``path``."""
    clock = _Clock()
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    engine.dispose()
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=OFF")
    connection.execute("PRAGMA synchronous=OFF")
    connection.execute("PRAGMA cache_size=-400000")
    connection.execute("PRAGMA temp_store=MEMORY")
    connection.execute("BEGIN")
    clock.lap("schema")
    _people(connection, contacts)
    clock.lap("contacts and tags")
    _visits(connection)
    clock.lap("visits")
    _consents_and_feedback(connection)
    connection.execute("COMMIT")
    connection.close()
    clock.lap("consents and feedback")

    engine = db.make_engine(f"sqlite:///{path}")
    settings = Settings(_env_file=None, database_url=f"sqlite:///{path}")  # type: ignore[call-arg]
    with db.session_factory(engine).begin() as session:
        profiles.refresh(session, settings, AT, full=True)
    engine.dispose()
    clock.lap("profiles and loyalty (profiles.refresh --full)")

    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=OFF")
    connection.execute("BEGIN")
    _history(connection, settings)
    # The last day's visits and feedback arrived since the previous run: the run sums those contacts up again.
    connection.execute("DELETE FROM profile_changes")
    since = (AT - dt.timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S")
    for table in ("visits", "feedback"):
        noted = f"INSERT OR IGNORE INTO profile_changes SELECT contact_id FROM {table} WHERE occurred_at > ?"
        connection.execute(noted, (since,))
    connection.execute("COMMIT")
    clock.lap("ledger history")
    connection.execute("ANALYZE")
    connection.execute("PRAGMA journal_mode=WAL")
    connection.close()
    clock.lap("analyze")


class _Clock:
    """Prints how long each step of a build took."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        print(f"  {step}: {now - self.last:.1f} s", flush=True)
        self.last = now


def _people(connection: sqlite3.Connection, contacts: int) -> None:
    epoch = int(AT.timestamp())
    connection.execute(
        "CREATE TEMP TABLE regions(low, high, country, timezone, locale, currency, prefix, digits)"
    )
    low = 0
    for share, *region in REGIONS:
        connection.execute("INSERT INTO regions VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (low, low + share, *region))
        low += share
    connection.execute("CREATE TEMP TABLE first_names(i INTEGER PRIMARY KEY, name)")
    connection.executemany("INSERT INTO first_names VALUES (?, ?)", enumerate(FIRST_NAMES))
    connection.execute("CREATE TEMP TABLE last_names(i INTEGER PRIMARY KEY, name)")
    connection.executemany("INSERT INTO last_names VALUES (?, ?)", enumerate(LAST_NAMES))
    connection.execute("CREATE TEMP TABLE tags(i INTEGER PRIMARY KEY, tag)")
    connection.executemany("INSERT INTO tags VALUES (?, ?)", enumerate(TAGS))

    # Who each contact is as a customer: kind, rhythm in days, visits, days since the last visit.
    #   kind 0 (2%): new, one visit in the last fortnight      kind 1 (12%): came once, months ago
    #   kind 2 (61%): regular, last visit within one interval   kind 3 (25%): drifting away
    connection.execute(
        f"""
        CREATE TEMP TABLE traits AS
        WITH RECURSIVE ids(id) AS (SELECT 1 UNION ALL SELECT id + 1 FROM ids WHERE id < {contacts}),
        drawn AS (
            SELECT id, {h("id", 1)} % 100 AS r1, 12 + {h("id", 2)} % 48 AS interval,
                   {h("id", 3)} AS r3, {h("id", 4)} AS r4, {h("id", 5)} AS r5, {h("id", 6)} AS r6,
                   {h("id", 7)} AS r7, {h("id", 8)} AS r8, {h("id", 9)} AS r9, {h("id", 10)} AS r10
            FROM ids
        ),
        shaped AS (
            SELECT *, MIN(16, 365 / interval) AS most,
                   CASE WHEN r1 < 2 THEN 0 WHEN r1 < 14 THEN 1 WHEN r1 < 75 THEN 2 ELSE 3 END AS kind
            FROM drawn
        )
        SELECT id, kind, interval, r5, r6, r7, r8, r9, r10,
               CASE WHEN kind < 2 THEN 1 ELSE most - r3 % (most / 3 + 1) END AS visits,
               CASE kind WHEN 0 THEN r4 % 14 WHEN 1 THEN 60 + r4 % 300 WHEN 2 THEN r4 % interval
                         ELSE interval + r4 % (5 * interval) END AS last_days
        FROM shaped
        """
    )
    connection.execute("CREATE UNIQUE INDEX temp.traits_id ON traits(id)")
    first_visit = f"{epoch} - (last_days + (visits - 1) * interval) * {DAY} - 3 * {DAY}"
    connection.execute(
        f"""
        INSERT INTO contacts (id, external_id, first_name, last_name, email, phone, country, locale, timezone,
                              birthday, referral_code, referred_by, attributes, created_at, updated_at)
        SELECT t.id, printf('C%08d', t.id), f.name, l.name, 'c' || t.id || '@example.com',
               r.prefix || substr(printf('%09d', t.r6), 1, r.digits), r.country, r.locale, r.timezone,
               CASE WHEN t.r7 % 10 < 9
                    THEN date((1960 + t.r7 % 46) || '-01-01', '+' || (t.r8 % 365) || ' days') END,
               printf('R%08d', t.id), NULL, '{{}}', {timestamp(first_visit)}, {timestamp(first_visit)}
        FROM traits t
        JOIN regions r ON t.r5 % 100 >= r.low AND t.r5 % 100 < r.high
        JOIN first_names f ON f.i = t.r6 % {len(FIRST_NAMES)}
        JOIN last_names l ON l.i = t.r7 % {len(LAST_NAMES)}
        """
    )
    connection.execute(
        f"""
        INSERT INTO contact_tags (contact_id, tag)
        SELECT t.id, g.tag FROM traits t JOIN tags g ON g.i = t.r8 % {len(TAGS)}
        UNION
        SELECT t.id, g.tag FROM traits t JOIN tags g ON g.i = (t.r8 / 8) % {len(TAGS)} WHERE t.r9 % 2 = 0
        """
    )


def _visits(connection: sqlite3.Connection) -> None:
    epoch = int(AT.timestamp())
    connection.execute(
        "CREATE TEMP TABLE seq AS "
        "WITH RECURSIVE s(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM s WHERE k < 31) SELECT k FROM s"
    )
    # The latest visit is k = 0; earlier ones one interval apart, each up to two days earlier than due.
    occurred = (
        f"{epoch} - 3600 - t.r10 % 32400 - (t.last_days + s.k * t.interval) * {DAY}"
        f" - CASE WHEN s.k > 0 THEN {h('t.id * 32 + s.k', 11)} % (2 * {DAY}) ELSE 0 END"
    )
    # Indexes are built once after the rows rather than kept up to date row by row.
    indexes = [
        sql
        for (sql,) in connection.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'visits' AND sql IS NOT NULL"
        )
    ]
    for (name,) in connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'visits' AND sql IS NOT NULL"
    ).fetchall():
        connection.execute(f"DROP INDEX {name}")
    connection.execute(
        f"""
        INSERT INTO visits (id, external_id, contact_id, occurred_at, amount, currency, created_at)
        SELECT t.id * 32 + s.k, printf('V%08d-%02d', t.id, s.k), t.id, {timestamp(occurred)},
               round(15 + {h("t.id * 32 + s.k", 12)} % 12000 / 100.0, 2), r.currency, {timestamp(occurred)}
        FROM traits t JOIN seq s ON s.k < t.visits
        JOIN regions r ON t.r5 % 100 >= r.low AND t.r5 % 100 < r.high
        ORDER BY t.id, s.k
        """
    )
    for sql in indexes:
        connection.execute(sql)


def _consents_and_feedback(connection: sqlite3.Connection) -> None:
    epoch = int(AT.timestamp())
    created = timestamp(f"{epoch} - 400 * {DAY}")
    for channel, share, salt in (("email", 85, 21), ("sms", 45, 22)):
        connection.execute(
            f"""
            INSERT INTO consents (contact_id, channel, status, changed_at, source)
            SELECT id, '{channel}',
                   CASE WHEN {h("id", salt)} % 100 < {share} THEN 'granted' ELSE 'revoked' END,
                   {created}, 'import'
            FROM traits WHERE {h("id", salt)} % 100 < {share + 5}
            """
        )
    # An NPS answer the day after the latest visit from three customers in ten, mostly promoters.
    answered = f"{epoch} - t.last_days * {DAY} + {DAY} - t.r10 % 32400"
    connection.execute(
        f"""
        INSERT INTO feedback (contact_id, occurred_at, kind, score, comment, resolved_at, created_at)
        SELECT t.id, {timestamp(answered)}, 'nps',
               CASE WHEN t.r9 / 100 % 100 < 55 THEN 9 + t.r9 % 2 WHEN t.r9 / 100 % 100 < 80 THEN 7 + t.r9 % 2
                    ELSE t.r9 / 10000 % 7 END,
               NULL, NULL, {timestamp(answered)}
        FROM traits t WHERE t.r9 % 100 < 30 AND {answered} < {epoch}
        """
    )
    # Three complaints in a thousand customers over the last ten days; half of them settled.
    complained = f"{epoch} - t.r10 % (10 * {DAY})"
    connection.execute(
        f"""
        INSERT INTO feedback (contact_id, occurred_at, kind, score, comment, resolved_at, created_at)
        SELECT t.id, {timestamp(complained)}, 'complaint', NULL, 'Waited too long',
               CASE WHEN t.r10 % 2 = 0 AND {complained} + 2 * {DAY} < {epoch}
                    THEN {timestamp(f"{complained} + 2 * {DAY}")} END,
               {timestamp(complained)}
        FROM traits t WHERE t.r9 % 1000 >= 500 AND t.r9 % 1000 < 503
        """
    )


def _history(connection: sqlite3.Connection, settings: Settings) -> None:
    """Record the sends a daily-running calendar would already have made before ``AT``'s day."""
    epoch = int(AT.timestamp())
    today = f"{epoch - epoch % DAY}"  # the benchmark day's UTC midnight
    lapsed_after = settings.lapsed_after
    sends: list[tuple[str, str, str]] = [
        # touch; a SELECT of contact_id, due (epoch seconds) and occurrence (NULL: the due date); a filter
        (
            "education",
            f"SELECT contact_id, {epoch} - (1 + {h('contact_id', 31)} % 21) * {DAY} AS due, "
            "'seasonal-care' AS occurrence FROM contact_profiles WHERE visits >= 1",
            "",
        ),
        (
            "referral_ask",
            f"SELECT contact_id, {epoch} - (1 + {h('contact_id', 32)} % 120) * {DAY} AS due, "
            "NULL AS occurrence FROM contact_profiles WHERE stage IN ('returning', 'loyal') "
            "AND (satisfaction = 'promoter' OR stage = 'loyal')",
            "",
        ),
        (
            "incentive",
            f"SELECT contact_id, CAST(strftime('%s', expected_next_visit) AS INTEGER) - 3 * {DAY} AS due, "
            "'after:' || date(last_visit) AS occurrence FROM contact_profiles "
            "WHERE stage IN ('new', 'returning', 'loyal') AND expected_next_visit IS NOT NULL",
            f"due >= {epoch} - 21 * {DAY} AND due < {today}",
        ),
        (
            "welcome",
            f"SELECT contact_id, CAST(strftime('%s', first_visit) AS INTEGER) + {DAY} AS due, "
            "'first' AS occurrence FROM contact_profiles WHERE first_visit IS NOT NULL",
            f"due >= {epoch} - 30 * {DAY} AND due < {today}",
        ),
        (
            "loyalty_milestone",
            "SELECT contact_id, CAST(strftime('%s', last_visit) AS INTEGER) AS due, "
            f"'card:' || ((visits + 1) / {settings.punch_card_size}) AS occurrence FROM contact_profiles "
            f"WHERE stamps = {settings.punch_card_size - 1} AND last_visit IS NOT NULL",
            f"due >= {epoch} - 5 * {DAY} AND due < {today}",
        ),
    ]
    for step, offset in enumerate((0, 14, 35), start=1):
        sends.append(
            (
                "winback",
                f"SELECT contact_id, CAST(strftime('%s', last_visit) AS INTEGER) + {offset * DAY} "
                f"+ CAST({lapsed_after} * expected_interval_days * {DAY} AS INTEGER) AS due, "
                f"date(last_visit) || ':step{step}' AS occurrence FROM contact_profiles "
                "WHERE stage = 'lapsed' AND expected_interval_days IS NOT NULL",
                f"due < {today}",
            )
        )
    for touch, due, where in sends:
        occurrence = "coalesce(occurrence, date(due, 'unixepoch'))"
        connection.execute(
            f"""
            INSERT INTO sends (key, contact_id, touch, occurrence, campaign, category, status, channel,
                               locale, template, subject, segments, incentive, due_at, claimed_at,
                               sent_at, provider_message_id, error, run_id)
            SELECT '{touch}:' || contact_id || ':' || {occurrence}, contact_id, '{touch}', {occurrence}, NULL,
                   'marketing', 'sent', 'email', NULL, NULL, NULL, NULL, NULL,
                   {timestamp("due")}, {timestamp("due")}, {timestamp("due + 60")}, NULL, NULL, 'history'
            FROM ({due}) {"WHERE " + where if where else ""}
            """
        )


def cached(contacts: int, *, rebuild: bool = False) -> tuple[Path, float | None]:
    """The cached business of ``contacts`` contacts, built first if needed; with the build's seconds."""
    path = DATA / f"calendar-{contacts}-v{VERSION}.db"
    if path.exists() and not rebuild:
        _migrated(path)
        return path, None
    DATA.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    started = time.perf_counter()
    build(partial, contacts)
    elapsed = time.perf_counter() - started
    os.replace(partial, path)
    return path, elapsed


def _migrated(path: Path) -> None:
    """Bring a business cached by an older nurture to the newest schema once, so that no run times that."""
    engine = db.make_engine(f"sqlite:///{path}")
    try:
        if not db.is_current(engine):
            started = time.perf_counter()
            db.upgrade(engine)
            print(f"{path.name}: migrated to the newest schema in {time.perf_counter() - started:.1f} s")
    finally:
        engine.dispose()


def fresh_copy(contacts: int) -> Path:
    """A copy of the cached business to run the calendar against, replacing the previous copy."""
    source, _ = cached(contacts)
    target = DATA / f"calendar-{contacts}-run.db"
    for stale in (target, Path(f"{target}-wal"), Path(f"{target}-shm")):
        stale.unlink(missing_ok=True)
    shutil.copyfile(source, target)
    return target


def describe(path: Path) -> dict[str, int]:
    """Rows per table, and how many contacts each touch should find due at ``AT`` (before caps)."""
    connection = sqlite3.connect(path)
    counts = {
        table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        for table in (
            "contacts",
            "visits",
            "consents",
            "feedback",
            "contact_profiles",
            "loyalty_entries",
            "sends",
        )
    }
    epoch = int(AT.timestamp())
    sent = "SELECT contact_id FROM sends WHERE touch = '{}' AND claimed_at > {}"
    due = {
        "due education": f"""SELECT count(*) FROM contact_profiles p WHERE visits >= 1 AND NOT EXISTS (
            SELECT 1 FROM sends s WHERE s.contact_id = p.contact_id AND s.touch = 'education'
            AND s.due_at > {timestamp(f"{epoch} - 21 * {DAY}")})""",
        "due incentive": f"""SELECT count(*) FROM contact_profiles
            WHERE stage IN ('new', 'returning', 'loyal') AND expected_next_visit > {timestamp(f"{epoch}")}
            AND expected_next_visit <= {timestamp(f"{epoch} + 3 * {DAY}")}
            AND contact_id NOT IN ({sent.format("incentive", timestamp(f"{epoch} - 21 * {DAY}"))})""",
        "due welcome": f"""SELECT count(*) FROM contact_profiles
            WHERE first_visit > {timestamp(f"{epoch} - 3 * {DAY}")}
            AND first_visit <= {timestamp(f"{epoch} - {DAY}")}
            AND contact_id NOT IN ({sent.format("welcome", timestamp(f"{epoch} - 30 * {DAY}"))})""",
        "due birthday": f"""SELECT count(*) FROM contacts c JOIN contact_profiles p ON p.contact_id = c.id
            WHERE p.visits >= 1 AND strftime('%m-%d', c.birthday) = '{AT:%m-%d}'""",
        "lapsed contacts": "SELECT count(*) FROM contact_profiles WHERE stage = 'lapsed'",
    }
    counts.update({label: connection.execute(query).fetchone()[0] for label, query in due.items()})
    connection.close()
    return counts


class PeakMemory:
    """Sample the memory of a process and all its descendants, summed; keep the highest of each measure.

    A run spreads its ranges over worker processes, so one process's own peak (``ru_maxrss``) would
    understate it. Two sums: of resident sets, which counts the pages the processes share (the interpreter,
    the libraries, the pages a spawned worker maps from the same files) once per process, an upper bound;
    and of proportional sets (PSS), which splits each shared page between the processes sharing it: what
    the run occupies. ``at_peak`` gives each process's PSS at the moment of the highest PSS sum.
    """

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self._root = psutil.Process(pid)
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.mib = 0.0
        self.pss_mib = 0.0
        self.at_peak: list[tuple[str, float]] = []

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss, pss, each = 0, 0, []
            with contextlib.suppress(psutil.Error):
                for process in [self._root, *self._root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        memory = process.memory_full_info()
                        rss += memory.rss
                        pss += memory.pss
                        each.append((_role(process), memory.pss / 2**20))
            self.mib = max(self.mib, rss / 2**20)
            if pss / 2**20 > self.pss_mib:
                self.pss_mib, self.at_peak = pss / 2**20, each
            self._stop.wait(self._every)

    def report(self) -> str:
        """Both peaks, and what each process held at the higher PSS sum."""
        each = ", ".join(f"{role} {mib:,.0f}" for role, mib in sorted(self.at_peak, key=lambda p: -p[1]))
        return (
            f"{self.pss_mib:,.0f} MiB proportional (PSS; {each}); {self.mib:,.0f} MiB resident sets summed,"
            " shared pages counted in every process"
        )


def _role(process: psutil.Process) -> str:
    """A short name for one of the run's processes."""
    command = " ".join(process.cmdline())
    if "spawn_main" in command:
        return "worker"
    if "uvicorn" in command or "prefect server" in command:
        return "Prefect server"
    return "run"


@contextlib.contextmanager
def prefect_server() -> Iterator[str]:
    """Run ``prefect server start`` on a free loopback port until the block ends; give its API URL.

    A scheduled deployment's flow runs talk to a server that is already up; this measures that case,
    without the few seconds (tens on a busy machine) a temporary server takes to start.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(DATA / "prefect-server"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    prefect = Path(sys.executable).parent / "prefect"
    log = (DATA / "prefect-server.log").open("w")
    server = subprocess.Popen([str(prefect), "server", "start"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"prefect server did not start; see {DATA / 'prefect-server.log'}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def run(contacts: int, batch_size: int, api_url: str | None = None) -> None:
    """Time one real calendar run (the CLI, the Prefect flow, the outbox) over a fresh copy."""
    database = fresh_copy(contacts)
    outbox = DATA / f"calendar-{contacts}-outbox"
    shutil.rmtree(outbox, ignore_errors=True)
    env = {
        **os.environ,
        "NURTURE_DATABASE_URL": f"sqlite:///{database}",
        "NURTURE_OUTBOX_DIR": str(outbox),
        "NURTURE_TEMPLATES_DIR": str(BENCHMARKS.parent / "templates"),
        "PREFECT_HOME": str(DATA / "prefect"),
    }
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    nurture = Path(sys.executable).parent / "nurture"
    command = [
        str(nurture),
        "calendar",
        "run",
        "--at",
        AT.isoformat(),
        "--batch-size",
        str(batch_size),
        "--json",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        with PeakMemory(child.pid) as peak:
            stdout, stderr = child.communicate()
    wall = time.perf_counter() - started
    # The run's processes, each waited for by its parent: the run, its workers, a temporary Prefect server.
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if child.returncode != 0:
        raise SystemExit(f"the calendar run failed:\n{stderr[-4000:]}")
    summary = json.loads(stdout)
    # Kept to compare runs: the same business and instant give the same JSON, whatever the code's speed.
    (DATA / f"calendar-{contacts}-run.json").write_text(stdout)
    files = sum(1 for path in outbox.rglob("*") if path.is_file())
    handled = summary["sent"] + summary["held_out"]
    print(f"calendar run over {contacts:,} contacts at {AT.isoformat()} (batch size {batch_size:,}):")
    for name in ("planned", "sent", "held_out", "deferred_window", "deferred_cap", "suppressed_consent"):
        print(f"  {name}: {summary[name]:,}")
    print(f"  outbox files: {files:,}")
    server = "a Prefect server already running" if api_url else "Prefect's temporary server started"
    print(f"  wall time: {wall:.1f} s (the flow, with {server}, profile refresh included)")
    load = os.getloadavg()[0]
    print(f"  CPU time of all the run's processes: {cpu:.1f} s (load average at the end {load:.1f})")
    print(f"  messages sent or held out per second, whole run: {handled / wall:,.0f}")
    print(f"  peak memory of the run, all its processes together: {peak.report()}")
    for line in stderr.splitlines():
        if "where the time went: " in line:
            print("  " + line.partition("where the time went: ")[2])


def run_in_process(contacts: int, batch_size: int) -> None:
    """Time the same run in this process, without Prefect: ``nurture.calendar.run_calendar``."""
    database = fresh_copy(contacts)
    outbox = DATA / f"calendar-{contacts}-outbox"
    shutil.rmtree(outbox, ignore_errors=True)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=f"sqlite:///{database}",
        outbox_dir=outbox,
        templates_dir=BENCHMARKS.parent / "templates",
    )
    started = time.perf_counter()
    with PeakMemory(os.getpid()) as peak:
        summary = calendar.run_calendar(settings, AT, batch_size=batch_size)
    wall = time.perf_counter() - started
    totals = summary.as_dict()
    print(f"calendar run in this process, without Prefect, over {contacts:,} contacts:")
    print(f"  planned: {totals['planned']:,}, sent: {totals['sent']:,}, held_out: {totals['held_out']:,}")
    print(f"  wall time: {wall:.1f} s; peak memory of this process and its workers: {peak.report()}")
    print(f"  {summary.speed()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--contacts", type=int, default=1_000_000)
    parser.add_argument("--rebuild", action="store_true", help="Build again even if the file is cached.")
    parser.add_argument("--run", action="store_true", help="Then time one calendar run over a fresh copy.")
    parser.add_argument("--batch-size", type=int, default=50_000, help="Contacts per flow task in the run.")
    parser.add_argument(
        "--prefect-server",
        action="store_true",
        help="Then time the same run through the flow against a Prefect server already up, as a deployment.",
    )
    parser.add_argument(
        "--in-process", action="store_true", help="Then time the same run in this process, without Prefect."
    )
    arguments = parser.parse_args()
    path, elapsed = cached(arguments.contacts, rebuild=arguments.rebuild)
    built = f"built in {elapsed:.1f} s" if elapsed is not None else "cached"
    size = path.stat().st_size / 1e6
    print(f"{path.relative_to(BENCHMARKS.parent)}: {size:,.0f} MB, {built}, instant {AT.isoformat()}")
    for label, count in describe(path).items():
        share = f" ({count / arguments.contacts:.1%} of contacts)" if label.startswith("due") else ""
        print(f"  {label}: {count:,}{share}")
    if arguments.run:
        run(arguments.contacts, arguments.batch_size)
    if arguments.prefect_server:
        with prefect_server() as url:
            run(arguments.contacts, arguments.batch_size, api_url=url)
    if arguments.in_process:
        run_in_process(arguments.contacts, arguments.batch_size)


if __name__ == "__main__":
    main()
