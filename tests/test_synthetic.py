"""The synthetic business: believable, deterministic, and bad in exactly the ways it says."""

from __future__ import annotations

import csv
import datetime as dt
from collections import Counter
from pathlib import Path
from zoneinfo import ZoneInfo

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from nurture.cli import app
from nurture.imports import CONTACT_COLUMNS, import_file
from nurture.models import Contact, Referral
from nurture.settings import Settings
from nurture.synthetic import (
    FEEDBACK_COLUMNS,
    SERVICES,
    TAG_SEPARATOR,
    VISIT_COLUMNS,
    generate,
)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", contacts=300, seed=11)
    again = generate(tmp_path / "b", contacts=300, seed=11)
    other = generate(tmp_path / "c", contacts=300, seed=12)
    for name in ("contacts.csv", "visits.csv", "feedback.csv"):
        assert (first.directory / name).read_bytes() == (again.directory / name).read_bytes()
        assert (first.directory / name).read_bytes() != (other.directory / name).read_bytes()


def test_files_carry_the_import_columns_and_the_latent_traits(tmp_path: Path) -> None:
    files = generate(tmp_path, contacts=200, seed=3)
    contacts = _rows(files.contacts)
    assert tuple(contacts[0])[: len(CONTACT_COLUMNS)] == CONTACT_COLUMNS
    assert {"sim_interval_days", "sim_churn_per_day", "sim_responsiveness"} <= set(contacts[0])
    assert tuple(_rows(files.visits)[0]) == VISIT_COLUMNS
    assert tuple(_rows(files.feedback)[0]) == FEEDBACK_COLUMNS
    assert len(contacts) == files.rows["contacts"]


def test_customers_look_like_a_salon_chain_in_five_countries(tmp_path: Path) -> None:
    files = generate(tmp_path, contacts=2000, seed=5)
    contacts = _rows(files.contacts)
    visits = _rows(files.visits)
    assert {row["country"] for row in contacts} >= {"ES", "PT", "BR", "MX", "US"}
    assert {row["locale"] for row in contacts} == {"es", "pt", "en"}
    zones = {row["timezone"] for row in contacts}
    assert {"America/Sao_Paulo", "Pacific/Honolulu", "Europe/Lisbon", "Atlantic/Canary"} <= zones
    assert any(ch in "áéíóúãõçñ" for row in contacts for ch in row["last_name"])
    tags = {tag for row in contacts for tag in row["tags"].split(TAG_SEPARATOR) if tag}
    assert tags <= set(SERVICES) and len(tags) >= 6
    assert {row["currency"] for row in visits} == {"EUR", "BRL", "MXN", "USD"}
    phones = [row["phone"] for row in contacts if row["phone"]]
    assert any(p.startswith("+") for p in phones) and any(not p.startswith("+") for p in phones)
    assert sum(1 for row in contacts if row["referred_by"]) > 50
    visited = Counter(row["contact_external_id"] for row in visits)
    assert sum(1 for row in contacts if row["external_id"] not in visited) > 100  # prospects
    assert max(visited.values()) >= 10 and min(visited.values()) == 1
    assert sum(1 for row in contacts if row["sim_churned_on"]) > 200


def test_good_rows_are_valid_and_bad_rows_are_a_few_percent(tmp_path: Path) -> None:
    files = generate(tmp_path, contacts=3000, seed=7)
    total = sum(files.rows.values())
    bad = sum(files.bad_rows(name) for name in ("contacts", "visits", "feedback"))
    assert 0.015 * total < bad < 0.035 * total
    assert set(files.bad["contacts"]) == {
        "malformed_email",
        "invalid_phone",
        "unknown_timezone",
        "impossible_birthday",
        "duplicate_id",
    }
    assert set(files.bad["visits"]) == {"negative_amount", "unknown_contact", "duplicate_id"}
    # Every other row passes the checks the importer makes, so the bad ones are the only rejects.
    seen: set[str] = set()
    invalid = 0
    for row in _rows(files.contacts):
        try:
            if row["email"]:
                validate_email(row["email"], check_deliverability=False)
            if row["phone"]:
                number = phonenumbers.parse(row["phone"], row["country"] or None)
                assert phonenumbers.is_valid_number(number)
            ZoneInfo(row["timezone"])
            if row["birthday"]:
                dt.date.fromisoformat(row["birthday"])
            assert row["external_id"] not in seen
        except (EmailNotValidError, phonenumbers.NumberParseException, AssertionError, ValueError, KeyError):
            invalid += 1
        seen.add(row["external_id"])
    assert invalid == files.bad_rows("contacts")


def test_cli_writes_the_files_and_counts_the_rows(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["synthetic", "generate", str(tmp_path / "biz"), "--contacts", "50"])
    assert result.exit_code == 0, result.output
    assert "contacts.csv" in result.output
    assert len(_rows(tmp_path / "biz" / "contacts.csv")) >= 50


def test_files_import_with_exactly_the_bad_rows_rejected(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    files = generate(settings.outbox_dir.parent / "biz", contacts=400, seed=9)
    for kind in ("contacts", "visits", "feedback"):
        summary = import_file(sessions, kind, getattr(files, kind), settings)
        assert summary.rejected == files.bad_rows(kind), kind
        assert summary.imported == files.rows[kind] - files.bad_rows(kind), kind
    with sessions() as session:
        contact = session.execute(select(Contact).where(Contact.external_id == "C0000001")).scalar_one()
        assert float(contact.attributes["sim_interval_days"]) > 0
        assert "sim_responsiveness" in contact.attributes
        referrals = session.execute(select(func.count()).select_from(Referral)).scalar_one()
        assert referrals == sum(1 for row in _rows(files.contacts) if row["referred_by"])
