"""Imports: contacts, visits and feedback from CSV files, streamed in batches and upserted by their keys.

A file is read twice. The first pass decodes and parses all of it without touching the database, so that a
file which cannot be imported at all (unreadable, not UTF-8, broken quoting, a required column missing)
raises ``ImportFileError`` before anything is written. The second pass validates each row, rejects bad ones
to ``FILE.rejects.csv`` with their line and reason, and upserts the good ones ``settings.import_batch_size``
at a time: one transaction and a handful of set-based statements per batch.
"""

from __future__ import annotations

import csv
import datetime as dt
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from functools import cache, lru_cache
from itertools import islice
from pathlib import Path
from typing import Any, TextIO, TypeVar
from zoneinfo import ZoneInfo

from babel.numbers import list_currencies
from sqlalchemy import Connection, Table, bindparam, delete, exists, func, insert, literal, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler

from nurture import consent, contacts
from nurture.errors import ImportFileError, InvalidVisits
from nurture.models import (
    Base,
    Channel,
    Consent,
    ConsentStatus,
    Contact,
    ContactTag,
    Feedback,
    FeedbackKind,
    Referral,
    UTCDateTime,
    Visit,
)
from nurture.settings import Settings

T = TypeVar("T")
Progress = Callable[[int, int], None]
"""Told the rows done and the rows in the file after every batch."""


class ImportKind(StrEnum):
    CONTACTS = "contacts"
    VISITS = "visits"
    FEEDBACK = "feedback"


REQUIRED_COLUMNS: dict[ImportKind, tuple[str, ...]] = {
    ImportKind.CONTACTS: ("external_id",),
    ImportKind.VISITS: ("external_id", "contact_external_id", "occurred_at"),
    ImportKind.FEEDBACK: ("contact_external_id", "occurred_at", "kind"),
}
# The contacts file's columns, in the order the README documents and the synthetic business writes them.
CONTACT_COLUMNS = (
    "external_id",
    "first_name",
    "last_name",
    "email",
    "phone",
    "country",
    "locale",
    "timezone",
    "birthday",
    "tags",
    "referred_by",
    "email_consent",
    "sms_consent",
)
_KNOWN_CONTACT_COLUMNS = frozenset(CONTACT_COLUMNS)
CONSENT_COLUMNS = {"email_consent": Channel.EMAIL, "sms_consent": Channel.SMS}
# Stored as they come on the contact's row; the key, the tags and the consents are handled apart.
_CONTACT_FIELDS = tuple(c for c in CONTACT_COLUMNS if c not in {"external_id", "tags", *CONSENT_COLUMNS})
SCORE_RANGES = {FeedbackKind.NPS: range(0, 11), FeedbackKind.CSAT: range(1, 6)}
RESOLVABLE_KINDS = frozenset({FeedbackKind.COMPLAINT, FeedbackKind.CANCEL_REQUEST})
MAX_AMOUNT = Decimal("9999999999.99")
CENT = Decimal("0.01")
ZERO = Decimal("0.00")
CONTACT_CACHE_SIZE = 200_000  # contacts remembered across the batches of a visits or feedback file


@dataclass(frozen=True)
class ImportSummary:
    """What an import did with each data row of its file."""

    imported: int
    updated: int
    unchanged: int
    rejected: int
    rejects_file: Path | None

    def as_dict(self) -> dict[str, int | str | None]:
        """Return the summary as JSON-ready values."""
        return {
            "imported": self.imported,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "rejected": self.rejected,
            "rejects_file": str(self.rejects_file) if self.rejects_file else None,
        }


def import_file(
    session_factory: sessionmaker[Session],
    kind: ImportKind | str,
    path: Path,
    settings: Settings,
    *,
    progress: Progress | None = None,
) -> ImportSummary:
    """Import a CSV file of contacts, visits or feedback; upsert by key and reject bad rows with a reason.

    Raises ``ImportFileError`` (and writes nothing) when the file cannot be read, is not UTF-8, has broken
    CSV quoting or lacks a required column. Rows are written ``settings.import_batch_size`` at a time and
    committed ``settings.import_transaction_rows`` at a time, so an interrupted import keeps what it
    committed; running it again finishes the job.
    """
    kind = ImportKind(kind)
    source = CsvSource.open(path, REQUIRED_COLUMNS[kind])
    run = _Run(
        settings=settings,
        now=dt.datetime.now(dt.UTC),
        source=source,
        rejects=Rejects(path, source.header),
        seen=SeenKeys(),
    )
    write_batch = {
        ImportKind.CONTACTS: _write_contacts,
        ImportKind.VISITS: _write_visits,
        ImportKind.FEEDBACK: _write_feedback,
    }[kind]
    batches = _batched(source.records(), settings.import_batch_size)
    batches_per_transaction = max(1, settings.import_transaction_rows // settings.import_batch_size)
    done = 0
    try:
        while True:
            written = 0
            with session_factory.begin() as session:
                for batch in islice(batches, batches_per_transaction):
                    write_batch(session, [record for record in batch if run.well_formed(record)], run)
                    run.rejects.flush()
                    written += 1
                    done += len(batch)
                    if progress is not None:
                        progress(done, source.rows)
            if written < batches_per_transaction:
                break
        if kind is ImportKind.CONTACTS:
            with session_factory.begin() as session:
                resolve_referrals(session, run.now)
    finally:
        run.seen.close()
        rejects_file = run.rejects.close()
    return ImportSummary(
        imported=run.imported,
        updated=run.updated,
        unchanged=run.unchanged,
        rejected=run.rejects.count,
        rejects_file=rejects_file,
    )


def resolve_referrals(session: Session, now: dt.datetime) -> int:
    """Link every contact whose ``referred_by`` names another contact (external id, else referral code)."""
    referrer = aliased(Contact)
    by_external_id = select(referrer.id).where(referrer.external_id == Contact.referred_by).scalar_subquery()
    by_code = select(referrer.id).where(referrer.referral_code == Contact.referred_by).scalar_subquery()
    candidates = (
        select(
            func.coalesce(by_external_id, by_code).label("referrer_id"),
            Contact.id.label("referred_id"),
        )
        .where(Contact.referred_by.is_not(None))
        .where(~exists().where(Referral.referred_id == Contact.id))
        .subquery()
    )
    links = select(
        candidates.c.referrer_id, candidates.c.referred_id, literal(now, type_=UTCDateTime())
    ).where(candidates.c.referrer_id.is_not(None), candidates.c.referrer_id != candidates.c.referred_id)
    result = session.execute(
        insert(Referral).from_select(["referrer_id", "referred_id", "created_at"], links)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


# The database, at driver level -------------------------------------------------------------------------


class Driver:
    """Statements compiled once and run straight through the database driver, for million-row files.

    Rows are tuples of values in the database's own representation (what the column types' bind processors
    make of them), so a stored row and an incoming one compare with ``==`` and no ORM work is done per row.
    """

    _FIND_CHUNK = 1000  # parameters per lookup; far below every driver's limit

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.dialect = connection.dialect
        self._statements: dict[tuple[Any, ...], SQLCompiler] = {}

    @classmethod
    def of(cls, session: Session) -> Driver:
        """Return the driver of the session's connection, made once per transaction."""
        connection = session.connection()
        driver = session.info.get("nurture.driver")
        if not isinstance(driver, Driver) or driver.connection is not connection:
            driver = session.info["nurture.driver"] = cls(connection)
        return driver

    def storer(self, table: Table, columns: Sequence[str]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
        """Return a function that turns values of ``columns`` into the values the database stores."""
        processors = [
            table.c[name].type.dialect_impl(self.dialect).bind_processor(self.dialect) for name in columns
        ]

        def store(values: Sequence[Any]) -> tuple[Any, ...]:
            return tuple(
                value if process is None or value is None else process(value)
                for value, process in zip(values, processors, strict=True)
            )

        return store

    def find(
        self, table: Table, key: str, columns: Sequence[str], keys: Iterable[Any]
    ) -> dict[Any, tuple[Any, ...]]:
        """Return the stored ``columns`` of the rows whose ``key`` column is one of ``keys``."""
        found: dict[Any, tuple[Any, ...]] = {}
        for chunk in _batched(keys, self._FIND_CHUNK):
            statement = self._find_statement(table, key, columns, len(chunk))
            names = [f"keys_{number}" for number in range(1, len(chunk) + 1)]
            [parameters] = self._parameters(statement, names, [tuple(chunk)])
            for stored_key, *stored in self.connection.exec_driver_sql(str(statement), parameters).all():
                found[stored_key] = tuple(stored)
        return found

    def insert(self, table: Table, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        """Insert rows of stored values of ``columns``."""
        if not rows:
            return
        statement = self._compiled(
            ("insert", table.name, tuple(columns)),
            lambda: insert(table).values({name: bindparam(name) for name in columns}),
        )
        self.connection.exec_driver_sql(str(statement), self._parameters(statement, columns, rows))

    def update(self, table: Table, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        """Update ``columns`` from rows of stored values followed by the row's ``id``."""
        if not rows:
            return
        statement = self._compiled(
            ("update", table.name, tuple(columns)),
            lambda: (
                update(table)
                .where(table.c.id == bindparam("row_id"))
                .values({name: bindparam(name) for name in columns})
            ),
        )
        names = [*columns, "row_id"]
        self.connection.exec_driver_sql(str(statement), self._parameters(statement, names, rows))

    def _find_statement(self, table: Table, key: str, columns: Sequence[str], size: int) -> SQLCompiler:
        return self._compiled(
            ("find", table.name, key, tuple(columns), size),
            lambda: select(table.c[key], *(table.c[name] for name in columns)).where(
                table.c[key].in_(bindparam("keys", value=[None] * size, expanding=True))
            ),
            render_postcompile=True,
        )

    def _compiled(self, key: tuple[Any, ...], build: Callable[[], Any], **options: bool) -> SQLCompiler:
        if key not in self._statements:
            compiled = build().compile(dialect=self.dialect, compile_kwargs=options)
            assert isinstance(compiled, SQLCompiler)
            self._statements[key] = compiled
        return self._statements[key]

    @staticmethod
    def _parameters(statement: SQLCompiler, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
        order = statement.positiontup
        if order is None:  # named parameters, as psycopg takes them
            return [dict(zip(names, row, strict=True)) for row in rows]
        if list(order) == list(names):
            return rows
        where = [list(names).index(name) for name in order]
        return [tuple(row[index] for index in where) for row in rows]


def _table(model: type[Base]) -> Table:
    return Base.metadata.tables[model.__tablename__]


# The file -------------------------------------------------------------------------------------------------


class Record:
    """One CSV record: the physical line it starts on and its fields as written."""

    # A plain class with slots: a million of these are made per million-row file.
    __slots__ = ("line", "fields", "columns")

    def __init__(self, line: int, fields: list[str], columns: dict[str, int]) -> None:
        self.line = line
        self.fields = fields
        self.columns = columns  # column name -> field index, shared by every record of the file

    def value(self, column: str) -> str:
        """Return the field of ``column`` without surrounding spaces; empty when the file lacks it."""
        index = self.columns.get(column)
        return "" if index is None else self.fields[index].strip()

    def values(self) -> dict[str, str]:
        """Return every field by column name."""
        return {column: self.fields[index].strip() for column, index in self.columns.items()}


@dataclass(frozen=True)
class CsvSource:
    """A CSV file that has passed the first pass: decodable, well quoted, with the required columns."""

    path: Path
    delimiter: str
    header: list[str]
    columns: list[str]
    rows: int

    @classmethod
    def open(cls, path: Path, required: Sequence[str]) -> CsvSource:
        """Check the whole file once without keeping it: encoding, quoting, header; count its rows."""
        try:
            with _open_text(path) as file:
                delimiter = _delimiter(file.readline())
            with _open_text(path) as file:
                reader = csv.reader(file, delimiter=delimiter, strict=True)
                header = next(reader, None)
                rows = 0
                start = reader.line_num + 1
                for fields in reader:
                    rows += any(fields)
                    start = reader.line_num + 1
        except UnicodeDecodeError as exc:
            line = _undecodable_line(path)
            raise ImportFileError(f"is not UTF-8 text ({exc.reason})", path=path, line=line) from None
        except csv.Error as exc:
            raise ImportFileError(f"is not valid CSV: {exc}", path=path, line=start) from None
        except OSError as exc:
            raise ImportFileError(f"cannot be read: {exc.strerror or exc}", path=path) from None
        if not header or not any(name.strip() for name in header):
            raise ImportFileError("is empty: the first line must name the columns", path=path, line=1)
        columns = [_column_name(name) for name in header]
        repeated = sorted({name for name in columns if name and columns.count(name) > 1})
        if repeated:
            raise ImportFileError(f"names a column twice: {', '.join(repeated)}", path=path, line=1)
        missing = [name for name in required if name not in columns]
        if missing:
            raise ImportFileError(
                f"lacks the required column{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
                f" (its columns: {', '.join(name for name in columns if name)})",
                path=path,
                line=1,
            )
        return cls(path=path, delimiter=delimiter, header=header, columns=columns, rows=rows)

    def records(self) -> Iterator[Record]:
        """Stream the data records; lines with no value at all are not records."""
        with _open_text(self.path) as file:
            reader = csv.reader(file, delimiter=self.delimiter, strict=True)
            next(reader)
            index = {column: number for number, column in enumerate(self.columns) if column}
            start = reader.line_num + 1
            for fields in reader:
                if any(fields):
                    yield Record(line=start, fields=fields, columns=index)
                start = reader.line_num + 1


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _open_text(path: Path) -> TextIO:
    # utf-8-sig reads files with and without a byte-order mark alike.
    return path.open(encoding="utf-8-sig", newline="")


def _delimiter(header_line: str) -> str:
    # Spreadsheets in Spain, Portugal and Brazil save with ";" because "," is their decimal separator.
    return max((",", ";", "\t"), key=header_line.count)


def _column_name(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").split())


def _undecodable_line(path: Path) -> int | None:
    # UTF-8 never uses the byte of "\n" inside a character, so lines decode independently.
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            try:
                line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                return number
    return None


class Rejects:
    """``FILE.rejects.csv`` beside the input: ``line, reason`` and then the record's fields as written."""

    def __init__(self, source: Path, header: list[str]) -> None:
        self.path = source.with_suffix(".rejects.csv")
        self.header = header
        self.count = 0
        self._pending: list[tuple[int, str, list[str]]] = []
        self._file: TextIO | None = None
        self._writer: Any = None

    def add(self, record: Record, reason: str) -> None:
        """Reject one record; it is written, in line order with the batch's others, by ``flush``."""
        self._pending.append((record.line, reason, record.fields))
        self.count += 1

    def flush(self) -> None:
        """Write the batch's rejected records in the order of their lines."""
        if not self._pending:
            return
        if self._writer is None:
            self._file = self.path.open("w", encoding="utf-8", newline="")
            self._writer = csv.writer(self._file)
            self._writer.writerow(["line", "reason", *self.header])
        for line, reason, fields in sorted(self._pending, key=lambda pending: pending[0]):
            self._writer.writerow([line, reason, *fields])
        self._pending.clear()

    def close(self) -> Path | None:
        """Finish the file; remove one left by an earlier run when nothing was rejected this time."""
        self.flush()
        if self._file is not None:
            self._file.close()
            return self.path
        self.path.unlink(missing_ok=True)
        return None


class SeenKeys:
    """Keys already accepted from this file and their lines, on disk so that memory stays flat."""

    _CHUNK = 500

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="nurture-import-")
        self._db = sqlite3.connect(Path(self._directory.name) / "seen.db")
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE seen (key TEXT PRIMARY KEY, line INTEGER NOT NULL) WITHOUT ROWID;"
        )

    def lines(self, keys: Iterable[str]) -> dict[str, int]:
        """Return the line of each key seen before."""
        found: dict[str, int] = {}
        for chunk in _batched(keys, self._CHUNK):
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(f"SELECT key, line FROM seen WHERE key IN ({marks})", chunk))
        return found

    def add(self, items: Iterable[tuple[str, int]]) -> None:
        """Remember keys and the lines they were accepted from."""
        self._db.executemany("INSERT INTO seen (key, line) VALUES (?, ?)", items)

    def close(self) -> None:
        """Forget everything."""
        self._db.close()
        self._directory.cleanup()


@dataclass
class _Run:
    settings: Settings
    now: dt.datetime
    source: CsvSource
    rejects: Rejects
    seen: SeenKeys
    imported: int = 0
    updated: int = 0
    unchanged: int = 0
    contacts: dict[str, tuple[int, str]] = field(default_factory=dict)
    _zones: dict[str, ZoneInfo] = field(default_factory=dict)

    @property
    def consent_source(self) -> str:
        return f"import:{self.source.path.name}"[:255]

    def well_formed(self, record: Record) -> bool:
        """Reject a record whose field count differs from the header's."""
        if len(record.fields) != len(self.source.header):
            self.rejects.add(
                record, f"has {len(record.fields)} fields; the header has {len(self.source.header)}"
            )
            return False
        return True

    def zone(self, name: str) -> ZoneInfo:
        if name not in self._zones:
            self._zones[name] = ZoneInfo(name)
        return self._zones[name]

    def first_of_each_key(self, rows: list[tuple[Record, str, T]], key_name: str) -> list[T]:
        """Keep the first row of each key in the file; reject later ones naming the first one's line."""
        earlier = self.seen.lines({key for _, key, _ in rows})
        kept: list[T] = []
        for record, key, row in rows:
            if key in earlier:
                self.rejects.add(record, f"repeats the {key_name} of line {earlier[key]}")
                continue
            earlier[key] = record.line
            kept.append(row)
        self.seen.add((key, record.line) for record, key, _ in rows if earlier[key] == record.line)
        return kept


def _required(record: Record, column: str, max_length: int = 255) -> str:
    value = record.value(column)
    if not value:
        raise ValueError(f"{column}: is empty")
    return _limited(column, value, max_length)


def _limited(column: str, value: str, max_length: int = 255) -> str:
    if len(value) > max_length:
        raise ValueError(f"{column}: longer than {max_length} characters")
    return value


def _parse(column: str, parse: Callable[[str], T], raw: str) -> T:
    try:
        return parse(raw)
    except ValueError as exc:
        raise ValueError(f"{column}: {exc}") from None


def parse_instant(raw: str, zone: ZoneInfo) -> dt.datetime:
    """Read an ISO 8601 time; without an offset it is local time in ``zone``.

    A local time that happens twice (clocks going back) is the first; one that never happens (clocks going
    forward) is moved forward by the gap, as a clock on the wall would show it.
    """
    try:
        value = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not an ISO 8601 date and time") from None
    if value.tzinfo is None:
        # fold=0 takes the offset before a transition: the first of a repeated hour, and past a gap.
        value = value.replace(tzinfo=zone, fold=0)
    return value.astimezone(dt.UTC)


def _lookup_contacts(session: Session, records: list[Record], run: _Run) -> dict[str, tuple[int, str]]:
    """Return the id and timezone of the contacts the records name, from a cache kept across batches."""
    known = run.contacts
    wanted = {record.value("contact_external_id") for record in records} - known.keys() - {""}
    if len(known) + len(wanted) > CONTACT_CACHE_SIZE:
        known.clear()
    found = Driver.of(session).find(_table(Contact), "external_id", ("id", "timezone"), wanted)
    known.update(
        (external_id, (contact_id, timezone)) for external_id, (contact_id, timezone) in found.items()
    )
    return known


def _contact_of(record: Record, known: dict[str, tuple[int, str]]) -> tuple[int, str]:
    external_id = _required(record, "contact_external_id")
    if external_id not in known:
        raise ValueError(f"contact_external_id: no contact {external_id!r}; import the contacts first")
    return known[external_id]


# Contacts -------------------------------------------------------------------------------------------------


@dataclass
class _ContactRow:
    external_id: str
    fields: dict[str, Any]  # Contact columns the file speaks for, normalised
    implied_timezone: str
    tags: frozenset[str] | None
    consents: dict[Channel, bool]
    attributes: dict[str, str]  # unknown columns; an empty value removes the attribute


def _parse_contact(record: Record, settings: Settings, today: dt.date) -> _ContactRow:
    present = record.columns.keys()
    values = record.values()
    value = values.get
    fields: dict[str, Any] = {}
    for column in ("first_name", "last_name", "referred_by"):
        if column in present:
            fields[column] = _limited(column, value(column, "")) or None
    if "email" in present:
        fields["email"] = (
            _parse("email", contacts.parse_email, value("email", "")) if value("email") else None
        )
    country = _parse("country", contacts.parse_country, value("country", "")) if value("country") else None
    number = None
    if value("phone"):
        region = country or settings.default_country
        number = _parse("phone", lambda raw: contacts.parse_phone(raw, region), value("phone", ""))
    if "phone" in present:
        fields["phone"] = contacts.e164(number) if number is not None else None
    if country is None and number is not None:
        country = contacts.country_of(number)
    if "country" in present or number is not None:
        fields["country"] = country
    if "locale" in present:
        raw_locale = value("locale", "")
        fields["locale"] = (
            _parse("locale", contacts.parse_locale, raw_locale) if raw_locale else settings.default_locale
        )
    implied = contacts.implied_timezone(number, country, settings.default_timezone)
    if "timezone" in present:
        raw_zone = value("timezone", "")
        fields["timezone"] = _parse("timezone", contacts.parse_timezone, raw_zone) if raw_zone else implied
    if "birthday" in present:
        raw_birthday = value("birthday", "")
        fields["birthday"] = (
            _parse("birthday", lambda raw: contacts.parse_birthday(raw, today), raw_birthday)
            if raw_birthday
            else None
        )
    tags = _parse("tags", contacts.parse_tags, value("tags", "")) if "tags" in present else None
    consents: dict[Channel, bool] = {}
    for column, channel in CONSENT_COLUMNS.items():
        given = _parse(column, contacts.parse_consent, value(column, ""))
        if given is not None:
            consents[channel] = given
    attributes = {column: text for column, text in values.items() if column not in _KNOWN_CONTACT_COLUMNS}
    return _ContactRow(
        external_id=_required(record, "external_id"),
        fields=fields,
        implied_timezone=implied,
        tags=tags,
        consents=consents,
        attributes=attributes,
    )


def _merged_attributes(current: dict[str, Any], incoming: dict[str, str]) -> dict[str, Any]:
    merged = {**current, **incoming}
    return {key: text for key, text in merged.items() if text != ""}


def _write_contacts(session: Session, records: list[Record], run: _Run) -> None:
    parsed: list[tuple[Record, str, _ContactRow]] = []
    for record in records:
        try:
            row = _parse_contact(record, run.settings, run.now.date())
        except ValueError as exc:
            run.rejects.add(record, str(exc))
            continue
        parsed.append((record, row.external_id, row))
    rows = run.first_of_each_key(parsed, "external_id")

    columns = [Contact.id, Contact.external_id, *(getattr(Contact, name) for name in _CONTACT_FIELDS)]
    existing = {
        found.external_id: found
        for found in session.execute(
            select(*columns, Contact.attributes).where(
                Contact.external_id.in_([row.external_id for row in rows])
            )
        )
    }
    existing_ids = [found.id for found in existing.values()]
    tags: dict[int, set[str]] = {}
    for contact_id, tag in session.execute(
        select(ContactTag.contact_id, ContactTag.tag).where(ContactTag.contact_id.in_(existing_ids))
    ):
        tags.setdefault(contact_id, set()).add(tag)
    consents = {
        (contact_id, channel): status
        for contact_id, channel, status in session.execute(
            select(Consent.contact_id, Consent.channel, Consent.status).where(
                Consent.contact_id.in_(existing_ids)
            )
        )
    }

    # An address that bounced or reported spam gets no email consent back from a file.
    granting = {
        row.external_id: email
        for row in rows
        if row.consents.get(Channel.EMAIL)
        and (email := row.fields["email"] if "email" in row.fields else _stored_email(existing, row))
    }
    suppressed = consent.suppressed(session, granting.values())
    for row in rows:
        email = granting.get(row.external_id)
        if email is not None and email.lower() in suppressed:
            del row.consents[Channel.EMAIL]

    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    retagged: dict[int, frozenset[str]] = {}
    rereferred: list[int] = []
    consent_changes: list[tuple[str, Channel, bool]] = []  # (external id, channel, granted)
    for row in rows:
        current = existing.get(row.external_id)
        if current is None:
            inserts.append(
                {
                    **dict.fromkeys(_CONTACT_FIELDS),
                    "locale": run.settings.default_locale,
                    "timezone": row.implied_timezone,
                    **row.fields,
                    "external_id": row.external_id,
                    "attributes": _merged_attributes({}, row.attributes),
                    "created_at": run.now,
                    "updated_at": run.now,
                }
            )
            consent_changes += [
                (row.external_id, channel, granted) for channel, granted in row.consents.items()
            ]
            run.imported += 1
            continue
        changes = {name: new for name, new in row.fields.items() if getattr(current, name) != new}
        attributes = _merged_attributes(current.attributes or {}, row.attributes)
        if attributes != (current.attributes or {}):
            changes["attributes"] = attributes
        if "referred_by" in changes:
            rereferred.append(current.id)
        if changes:
            updates.append({"id": current.id, **changes, "updated_at": run.now})
        tags_changed = row.tags is not None and row.tags != tags.get(current.id, set())
        if tags_changed and row.tags is not None:
            retagged[current.id] = row.tags
        changed_consents = [
            (row.external_id, channel, granted)
            for channel, granted in row.consents.items()
            if consents.get((current.id, channel)) != _status(granted)
        ]
        consent_changes += changed_consents
        if changes or tags_changed or changed_consents:
            run.updated += 1
        else:
            run.unchanged += 1

    ids = {external_id: found.id for external_id, found in existing.items()}
    if inserts:
        for insert_row, code in zip(inserts, _unused_referral_codes(session, len(inserts)), strict=True):
            insert_row["referral_code"] = code
        returned = session.execute(insert(Contact).returning(Contact.external_id, Contact.id), inserts)
        ids |= {external_id: contact_id for external_id, contact_id in returned}
        retagged |= {
            ids[row.external_id]: row.tags for row in rows if row.tags and row.external_id not in existing
        }
    if updates:
        session.execute(update(Contact), updates)
    if rereferred:
        session.execute(delete(Referral).where(Referral.referred_id.in_(rereferred)))
    if retagged:
        session.execute(delete(ContactTag).where(ContactTag.contact_id.in_(retagged)))
        tag_rows = [{"contact_id": cid, "tag": tag} for cid, new_tags in retagged.items() for tag in new_tags]
        if tag_rows:
            session.execute(insert(ContactTag), tag_rows)
    _record_consents(session, run, ids, consents, consent_changes)


def _stored_email(existing: dict[str, Any], row: _ContactRow) -> str | None:
    found = existing.get(row.external_id)
    return found.email if found is not None else None


def _status(granted: bool) -> ConsentStatus:
    return ConsentStatus.GRANTED if granted else ConsentStatus.REVOKED


def _record_consents(
    session: Session,
    run: _Run,
    ids: dict[str, int],
    current: dict[tuple[int, Channel], ConsentStatus],
    changes: list[tuple[str, Channel, bool]],
) -> None:
    consent.record(
        session,
        [(ids[external_id], channel, _status(granted)) for external_id, channel, granted in changes],
        existing=current,
        at=run.now,
        source=run.consent_source,
    )


def _unused_referral_codes(session: Session, count: int) -> list[str]:
    codes: set[str] = set()
    while len(codes) < count:
        fresh = {contacts.new_referral_code() for _ in range(count - len(codes))} - codes
        taken = set(session.scalars(select(Contact.referral_code).where(Contact.referral_code.in_(fresh))))
        codes |= fresh - taken
    return list(codes)


# Visits ---------------------------------------------------------------------------------------------------


def _parse_visit(
    record: Record, known: dict[str, tuple[int, str]], zone: Callable[[str], ZoneInfo], default_currency: str
) -> tuple[Any, ...]:
    # Straight-line on purpose: this runs once per row of files with millions of rows.
    external_id = _required(record, "external_id")
    contact_id, timezone = _contact_of(record, known)
    raw_time = _required(record, "occurred_at")
    raw_amount = record.value("amount")
    raw_currency = record.value("currency")
    try:
        occurred_at = parse_instant(raw_time, zone(timezone))
    except ValueError as exc:
        raise ValueError(f"occurred_at: {exc}") from None
    try:
        amount = parse_amount(raw_amount) if raw_amount else ZERO
    except ValueError as exc:
        raise ValueError(f"amount: {exc}") from None
    try:
        currency = parse_currency(raw_currency) if raw_currency else default_currency
    except ValueError as exc:
        raise ValueError(f"currency: {exc}") from None
    return (external_id, contact_id, occurred_at, amount, currency)


def parse_amount(raw: str) -> Decimal:
    """Read a non-negative amount with at most two decimals; a lone comma is a decimal separator."""
    text = raw.replace(",", ".") if "." not in raw and raw.count(",") == 1 else raw
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{raw!r} is not a number") from None
    if not amount.is_finite():
        raise ValueError(f"{raw!r} is not a number")
    if amount < 0:
        raise ValueError(f"{raw!r} is negative")
    if amount > MAX_AMOUNT:
        raise ValueError(f"{raw!r} is too large")
    cents = amount.quantize(CENT)
    if cents != amount:
        raise ValueError(f"{raw!r} has more than two decimals")
    return cents


@lru_cache(maxsize=1024)
def parse_currency(raw: str) -> str:
    """Return an ISO 4217 currency code in upper case."""
    code = raw.strip().upper()
    if code not in _currencies():
        raise ValueError(f"{raw!r} is not an ISO 4217 currency code (e.g. EUR, BRL, MXN, USD)")
    return code


@cache
def _currencies() -> frozenset[str]:
    return frozenset(list_currencies())


_VISIT_COLUMNS = ("external_id", "contact_id", "occurred_at", "amount", "currency")


def _write_visits(session: Session, records: list[Record], run: _Run) -> None:
    known = _lookup_contacts(session, records, run)
    parsed: list[tuple[Record, str, tuple[Any, ...]]] = []
    for record in records:
        try:
            row = _parse_visit(record, known, run.zone, run.settings.default_currency)
        except ValueError as exc:
            run.rejects.add(record, str(exc))
            continue
        parsed.append((record, row[0], row))
    rows = run.first_of_each_key(parsed, "external_id")
    imported, updated = _upsert_visits(session, rows, run.now)
    run.imported += imported
    run.updated += updated
    run.unchanged += len(rows) - imported - updated


def _upsert_visits(session: Session, rows: list[tuple[Any, ...]], now: dt.datetime) -> tuple[int, int]:
    """Insert new visits and update changed ones by external id; give how many of each."""
    driver = Driver.of(session)
    table = _table(Visit)
    store = driver.storer(table, _VISIT_COLUMNS)
    existing = driver.find(table, "external_id", ("id", *_VISIT_COLUMNS[1:]), [row[0] for row in rows])
    [created_at] = driver.storer(table, ["created_at"])([now])
    inserts: list[tuple[Any, ...]] = []
    updates: list[tuple[Any, ...]] = []
    for row in rows:
        stored = store(row)
        current = existing.get(row[0])
        if current is None:
            inserts.append((*stored, created_at))
        elif stored[1:] != current[1:]:
            updates.append((*stored[1:], current[0]))
    driver.insert(table, (*_VISIT_COLUMNS, "created_at"), inserts)
    driver.update(table, _VISIT_COLUMNS[1:], updates)
    return len(inserts), len(updates)


# Visits posted to `nurture serve` (POST /api/visits): the file's rules, all of a request or nothing.

VISIT_FIELDS = ("external_id", "contact_external_id", "occurred_at", "amount", "currency")
_VISIT_FIELD_INDEX = {name: number for number, name in enumerate(VISIT_FIELDS)}


@dataclass(frozen=True)
class RecordedVisits:
    """What a request's visits did: new, changed, or already recorded as they are."""

    imported: int
    updated: int
    unchanged: int

    def as_dict(self) -> dict[str, int]:
        """Return the counts as JSON-ready values."""
        return {"imported": self.imported, "updated": self.updated, "unchanged": self.unchanged}


def record_visits(
    session: Session, items: Sequence[object], settings: Settings, *, now: dt.datetime
) -> RecordedVisits:
    """Check visits given as JSON objects by the visits import's rules, then upsert them by external id.

    Every item is checked before anything is written: one bad item raises ``InvalidVisits`` listing every
    problem by item (0-based) and field, and nothing is written. Posting the same visits again changes
    nothing; an edited one is updated.
    """
    problems: list[tuple[int, str]] = []
    records: list[tuple[int, Record]] = []
    for index, item in enumerate(items):
        record = _visit_record(index, item, problems)
        if record is not None:
            records.append((index, record))
    wanted = {record.value("contact_external_id") for _, record in records} - {""}
    found = Driver.of(session).find(_table(Contact), "external_id", ("id", "timezone"), wanted)
    known = {external_id: (contact_id, timezone) for external_id, (contact_id, timezone) in found.items()}
    zones: dict[str, ZoneInfo] = {}

    def zone(name: str) -> ZoneInfo:
        return zones.setdefault(name, ZoneInfo(name))

    rows: list[tuple[Any, ...]] = []
    first_item: dict[str, int] = {}
    for index, record in records:
        try:
            row = _parse_visit(record, known, zone, settings.default_currency)
        except ValueError as exc:
            problems.append((index, f"item {index}: {exc}"))
            continue
        if row[0] in first_item:
            problems.append(
                (index, f"item {index}: external_id: {row[0]!r} repeats item {first_item[row[0]]}")
            )
            continue
        first_item[row[0]] = index
        rows.append(row)
    if problems:
        raise InvalidVisits([problem for _, problem in sorted(problems, key=lambda pair: pair[0])])
    imported, updated = _upsert_visits(session, rows, now)
    return RecordedVisits(imported=imported, updated=updated, unchanged=len(rows) - imported - updated)


def _visit_record(index: int, item: object, problems: list[tuple[int, str]]) -> Record | None:
    """Give a JSON visit as a record of the visits file, or note why it cannot be one."""
    if not isinstance(item, dict):
        problems.append((index, f"item {index}: is not an object with the fields {', '.join(VISIT_FIELDS)}"))
        return None
    fields: list[str] = [""] * len(VISIT_FIELDS)
    ok = True
    for name, value in item.items():
        if name not in _VISIT_FIELD_INDEX:
            problems.append(
                (index, f"item {index}: {name}: unknown field (the fields: {', '.join(VISIT_FIELDS)})")
            )
            ok = False
        elif value is None:
            continue
        elif isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
            problems.append((index, f"item {index}: {name}: must be a string or a number"))
            ok = False
        else:
            fields[_VISIT_FIELD_INDEX[name]] = str(value)
    return Record(line=index, fields=fields, columns=_VISIT_FIELD_INDEX) if ok else None


# Feedback -------------------------------------------------------------------------------------------------


def _parse_feedback(record: Record, known: dict[str, tuple[int, str]], run: _Run) -> dict[str, Any]:
    contact_id, timezone = _contact_of(record, known)
    zone = run.zone(timezone)
    occurred_at = _parse(
        "occurred_at", lambda raw: parse_instant(raw, zone), _required(record, "occurred_at")
    )
    raw_kind = _required(record, "kind").lower()
    try:
        kind = FeedbackKind(raw_kind)
    except ValueError:
        choices = ", ".join(member.value for member in FeedbackKind)
        raise ValueError(f"kind: {raw_kind!r} is not one of {choices}") from None
    raw_score = record.value("score")
    score: int | None = None
    if kind in SCORE_RANGES:
        allowed = SCORE_RANGES[kind]
        if not raw_score:
            raise ValueError(f"score: a {kind.value} needs a score")
        if not raw_score.isdigit() or int(raw_score) not in allowed:
            raise ValueError(f"score: {raw_score!r} is not a {kind.value} score ({allowed[0]}-{allowed[-1]})")
        score = int(raw_score)
    elif raw_score:
        raise ValueError(f"score: a {kind.value} has no score")
    row: dict[str, Any] = {
        "contact_id": contact_id,
        "kind": kind,
        "occurred_at": occurred_at,
        "score": score,
        "comment": record.value("comment") or None,
    }
    raw_resolved = record.value("resolved_at")
    if raw_resolved:
        if kind not in RESOLVABLE_KINDS:
            raise ValueError(f"resolved_at: a {kind.value} is not something to resolve")
        resolved_at = _parse("resolved_at", lambda raw: parse_instant(raw, zone), raw_resolved)
        if resolved_at < occurred_at:
            raise ValueError("resolved_at: is before occurred_at")
        row["resolved_at"] = resolved_at
    return row


def _write_feedback(session: Session, records: list[Record], run: _Run) -> None:
    known = _lookup_contacts(session, records, run)
    parsed: list[tuple[Record, str, dict[str, Any]]] = []
    for record in records:
        try:
            row = _parse_feedback(record, known, run)
        except ValueError as exc:
            run.rejects.add(record, str(exc))
            continue
        key = f"{row['contact_id']}|{row['kind']}|{row['occurred_at'].isoformat()}"
        parsed.append((record, key, row))
    rows = run.first_of_each_key(parsed, "contact, kind and occurred_at")
    existing = {
        (found.contact_id, found.kind, found.occurred_at): found
        for found in session.execute(
            select(
                Feedback.id,
                Feedback.contact_id,
                Feedback.kind,
                Feedback.occurred_at,
                Feedback.score,
                Feedback.comment,
                Feedback.resolved_at,
            ).where(Feedback.contact_id.in_({row["contact_id"] for row in rows}))
        )
    }
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for row in rows:
        current = existing.get((row["contact_id"], row["kind"], row["occurred_at"]))
        if current is None:
            inserts.append({"resolved_at": None, **row, "created_at": run.now})
            continue
        # An empty resolved_at leaves a resolved complaint resolved: exports rarely carry the resolution.
        changes: dict[str, Any] = {
            name: row[name]
            for name in ("score", "comment", "resolved_at")
            if name in row and getattr(current, name) != row[name]
        }
        if changes:
            updates.append({"id": current.id, **changes})
    if inserts:
        session.execute(insert(Feedback), inserts)
    if updates:
        session.execute(update(Feedback), updates)
    run.imported += len(inserts)
    run.updated += len(updates)
    run.unchanged += len(rows) - len(inserts) - len(updates)
