"""The database: engines, sessions, migrations, and the few SQL functions that differ between dialects."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Select,
    Table,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Executable
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import Float, Integer, String

from nurture.models import UTCDateTime
from nurture.settings import Settings


def make_engine(url: str) -> Engine:
    """Create an engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout for concurrent runs."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # 64 MiB of page cache (the default is 2 MiB): large imports touch index pages all over the file.
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for ``engine``; callers own the transaction (``with factory.begin() as session:``)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for the migrations shipped inside the package."""
    config = Config()
    config.set_main_option("script_location", str(files("nurture") / "migrations"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine) -> None:
    """Bring the schema up to the newest migration, keeping SQLite's planner statistics if it had them."""
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "head")
        # A migration that rebuilds a table (SQLite's way to add a constraint) drops that table's
        # statistics, and the planner then guesses. Gathered again here, once, where a database had them
        # (11.6 s at a million contacts).
        if connection.dialect.name == "sqlite" and connection.scalar(
            text("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'")
        ):
            connection.execute(text("ANALYZE"))


def is_current(engine: Engine) -> bool:
    """Tell whether the schema is at the newest migration."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision() == head


def connect(settings: Settings) -> Engine:
    """An engine for the configured database, migrated to the newest schema if it was not."""
    engine = make_engine(settings.database_url)
    if not is_current(engine):
        upgrade(engine)
    return engine


class epoch_seconds(FunctionElement[float]):
    """Seconds since 1970-01-01 UTC of a stored instant, on every supported dialect."""

    type = Float()
    inherit_cache = True


@compiles(epoch_seconds, "sqlite")
def _epoch_sqlite(element: epoch_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    # julianday keeps fractions of a second but carries ~20 µs of float noise; rounding to the millisecond
    # makes whole-second instants exact, so that "exactly three intervals late" compares equal.
    return f"round((julianday({compiler.process(element.clauses, **kw)}) - 2440587.5) * 86400.0, 3)"


@compiles(epoch_seconds, "postgresql")
def _epoch_postgresql(element: epoch_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST(EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)}) AS DOUBLE PRECISION)"


class month_day(FunctionElement[str]):
    """The ``MM-DD`` of a stored date, on every supported dialect."""

    type = String()
    inherit_cache = True


@compiles(month_day, "sqlite")
def _month_day_sqlite(element: month_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"strftime('%m-%d', {compiler.process(element.clauses, **kw)})"


@compiles(month_day, "postgresql")
def _month_day_postgresql(element: month_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"to_char({compiler.process(element.clauses, **kw)}, 'MM-DD')"


class utc_day(FunctionElement[int]):
    """Whole days since 1970-01-01 of a stored instant's UTC date, on every supported dialect."""

    type = Integer()
    inherit_cache = True


@compiles(utc_day, "sqlite")
def _utc_day_sqlite(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    # Stored instants are naive UTC text; julianday(date(x)) is that UTC midnight, a whole day number.
    return f"CAST(julianday(date({compiler.process(element.clauses, **kw)})) - 2440587.5 AS INTEGER)"


@compiles(utc_day, "postgresql")
def _utc_day_postgresql(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    instant = compiler.process(element.clauses, **kw)
    return f"(CAST(({instant}) AT TIME ZONE 'UTC' AS DATE) - DATE '1970-01-01')"


class floor_integer(FunctionElement[int]):
    """The largest integer not above a number (SQLite's CAST truncates, PostgreSQL's rounds)."""

    type = Integer()
    inherit_cache = True


@compiles(floor_integer, "sqlite")
def _floor_sqlite(element: floor_integer, compiler: SQLCompiler, **kw: Any) -> str:
    value = compiler.process(element.clauses, **kw)
    return f"(CAST({value} AS INTEGER) - (({value}) < CAST({value} AS INTEGER)))"


@compiles(floor_integer, "postgresql")
def _floor_postgresql(element: floor_integer, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST(FLOOR({compiler.process(element.clauses, **kw)}) AS INTEGER)"


class instant_from_epoch(FunctionElement[dt.datetime]):
    """The stored instant that is a number of seconds after 1970-01-01 UTC, rounded to the second."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(instant_from_epoch, "sqlite")
def _instant_sqlite(element: instant_from_epoch, compiler: SQLCompiler, **kw: Any) -> str:
    # The exact text SQLAlchemy writes for a datetime, so that stored instants keep comparing as text.
    seconds = compiler.process(element.clauses, **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%S', CAST(round({seconds}) AS INTEGER), 'unixepoch') || '.000000')"


@compiles(instant_from_epoch, "postgresql")
def _instant_postgresql(element: instant_from_epoch, compiler: SQLCompiler, **kw: Any) -> str:
    return f"to_timestamp(round(CAST({compiler.process(element.clauses, **kw)} AS DOUBLE PRECISION)))"


class greatest(FunctionElement[float]):
    """The largest of several numbers, none of them NULL (SQLite's many-argument ``max``, ``GREATEST``)."""

    type = Float()
    inherit_cache = True


@compiles(greatest, "sqlite")
def _greatest_sqlite(element: greatest, compiler: SQLCompiler, **kw: Any) -> str:
    return f"max({compiler.process(element.clauses, **kw)})"


@compiles(greatest, "postgresql")
def _greatest_postgresql(element: greatest, compiler: SQLCompiler, **kw: Any) -> str:
    return f"GREATEST({compiler.process(element.clauses, **kw)})"


def exclusive(session: Session, name: str) -> None:
    """Take the lock called ``name`` until the session's transaction ends, so that two runs never interleave.

    On PostgreSQL this is a transaction-level advisory lock. SQLite has one writer at a time: taking the
    write lock now, before anything is read, makes a second run wait instead of failing half-way.
    """
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    else:
        session.execute(text("UPDATE alembic_version SET version_num = version_num WHERE 0 = 1"))


def insert_new(session: Session, table: Any, *, unique: Sequence[str]) -> Any:
    """An INSERT into ``table`` that skips rows whose ``unique`` columns are taken (ON CONFLICT DO NOTHING).

    So that two requests writing the same row at once both succeed and the row is written once.
    """
    dialect = session.get_bind().dialect.name
    make = postgresql_insert if dialect == "postgresql" else sqlite_insert
    return make(table).on_conflict_do_nothing(index_elements=list(unique))


def insert_summed(
    session: Session, table: Table, rows: Select[*tuple[Any, ...]], keys: Sequence[str]
) -> None:
    """Insert ``rows`` into ``table`` added up per ``keys``: one row per key, each other column summed.

    ``rows`` selects the table's columns by name, none of the summed ones NULL. PostgreSQL groups by hashing.
    SQLite groups by sorting every row first; adding each row to its key's row as it comes instead (an upsert
    on the table's primary key, ``keys``) takes half the time, and reads only pages in cache when the rows
    come in key order.
    """
    names = [column.name for column in rows.selected_columns]
    if session.get_bind().dialect.name != "sqlite":
        session.execute(insert(table).from_select(names, _grouped(rows, keys)))
        return
    statement = sqlite_insert(table).from_select(names, rows.where(true()))
    added = {name: table.c[name] + statement.excluded[name] for name in names if name not in keys}
    session.execute(statement.on_conflict_do_update(index_elements=list(keys), set_=added))


def summed(
    session: Session, rows: Select[*tuple[Any, ...]], keys: Sequence[str], scratch: Table
) -> Sequence[Row[*tuple[Any, ...]]]:
    """``rows`` added up per ``keys``, as ``insert_summed`` adds them, for a few keys.

    On SQLite through ``scratch``, an empty table of the same columns keyed by ``keys``. PostgreSQL selects
    them directly: an INSERT would keep it from reading the rows with parallel workers.
    """
    if session.get_bind().dialect.name != "sqlite":
        return session.execute(_grouped(rows, keys)).all()
    insert_summed(session, scratch, rows, keys)
    return session.execute(select(scratch)).all()


class create_table_as(Executable, ClauseElement):
    """``CREATE TABLE table AS rows``, with the table's prefixes (``TEMPORARY``) and the columns of ``rows``.

    PostgreSQL reads the rows with parallel workers, which an ``INSERT ... SELECT`` cannot use.
    """

    inherit_cache = False

    def __init__(self, table: Table, rows: Select[*tuple[Any, ...]]) -> None:
        self.table = table
        self.rows = rows


@compiles(create_table_as)
def _create_table_as(element: create_table_as, compiler: SQLCompiler, **kw: Any) -> str:
    prefixes = "".join(f"{prefix} " for prefix in element.table._prefixes)
    name = compiler.preparer.format_table(element.table)
    return f"CREATE {prefixes}TABLE {name} AS {compiler.process(element.rows, **kw)}"


def _grouped(rows: Select[*tuple[Any, ...]], keys: Sequence[str]) -> Select[*tuple[Any, ...]]:
    each = rows.subquery()
    return select(
        *(column if column.name in keys else func.sum(column).label(column.name) for column in each.c)
    ).group_by(*(each.c[key] for key in keys))


class month_number(FunctionElement[int]):
    """Months since the year 0 of a stored instant's UTC date (year x 12 + month - 1), on every dialect."""

    type = Integer()
    inherit_cache = True


@compiles(month_number, "sqlite")
def _month_number_sqlite(element: month_number, compiler: SQLCompiler, **kw: Any) -> str:
    # Stored instants are naive UTC text, 'YYYY-MM-DD HH:MM:SS...': slicing it is much faster than strftime.
    instant = compiler.process(element.clauses, **kw)
    return f"(CAST(substr({instant}, 1, 4) AS INTEGER) * 12 + CAST(substr({instant}, 6, 2) AS INTEGER) - 1)"


@compiles(month_number, "postgresql")
def _month_number_postgresql(element: month_number, compiler: SQLCompiler, **kw: Any) -> str:
    # date_part's double precision rather than EXTRACT's numeric: 2.6 times faster over a million visits.
    instant = compiler.process(element.clauses, **kw)
    return (
        f"CAST(date_part('year', ({instant}) AT TIME ZONE 'UTC') * 12"
        f" + date_part('month', ({instant}) AT TIME ZONE 'UTC') - 1 AS INTEGER)"
    )


class unindexed(FunctionElement[Any]):
    """A column that SQLite must not look up by an index in this comparison; of the column's own type.

    SQLite's documented way is a unary ``+``, which leaves the value as it is; PostgreSQL plans by itself.
    """

    inherit_cache = True

    def __init__(self, column: Any) -> None:
        super().__init__(column)
        self.type = column.type


@compiles(unindexed, "sqlite")
def _unindexed_sqlite(element: unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return f"+{compiler.process(element.clauses, **kw)}"


@compiles(unindexed, "postgresql")
def _unindexed_postgresql(element: unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)
