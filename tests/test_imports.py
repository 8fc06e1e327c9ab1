from __future__ import annotations

import csv
import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from nurture import consent
from nurture.cli import app
from nurture.contacts import REFERRAL_ALPHABET
from nurture.errors import ImportFileError
from nurture.imports import ImportSummary, import_file
from nurture.models import (
    Channel,
    Consent,
    ConsentEvent,
    ConsentStatus,
    Contact,
    ContactTag,
    Feedback,
    FeedbackKind,
    Referral,
    Visit,
)
from nurture.settings import Settings

Sessions = sessionmaker[Session]

CONTACTS_HEADER = (
    "external_id,first_name,last_name,email,phone,country,locale,timezone,birthday,tags,referred_by,"
    "email_consent,sms_consent"
)


def write(path: Path, text: str, *, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def rejects(summary: ImportSummary) -> list[dict[str, str]]:
    assert summary.rejects_file is not None
    with summary.rejects_file.open(encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


def contact(sessions: Sessions, external_id: str) -> Contact:
    with sessions() as session:
        return session.scalars(select(Contact).where(Contact.external_id == external_id)).one()


def count(sessions: Sessions, model: type[object]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def import_contacts(sessions: Sessions, settings: Settings, tmp_path: Path, rows: str) -> ImportSummary:
    path = write(tmp_path / "contacts.csv", f"{CONTACTS_HEADER}\n{rows}")
    return import_file(sessions, "contacts", path, settings)


def test_a_good_contacts_file_imports_every_field(
    sessions: Sessions, settings: Settings, tmp_path: Path
) -> None:
    path = write(
        tmp_path / "contacts.csv",
        "external_id,first_name,last_name,email,phone,country,locale,timezone,birthday,tags,"
        "email_consent,sms_consent,loyalty_card\n"
        "c1,José,Núñez,Jose.Nunez@EXAMPLE.com,612 345 678,es,es,Europe/Madrid,1985-04-02,Corte|Color,"
        "yes,,A-77\n"
        'c2,João,Conceição,joao@example.com,+55 11 98765-4321,,pt-br,,,"manicure, Color",0,1,\n',
    )

    summary = import_file(sessions, "contacts", path, settings)

    assert summary == ImportSummary(imported=2, updated=0, unchanged=0, rejected=0, rejects_file=None)
    spaniard, brazilian = contact(sessions, "c1"), contact(sessions, "c2")
    assert (spaniard.first_name, spaniard.last_name) == ("José", "Núñez")
    assert spaniard.email == "Jose.Nunez@example.com"
    assert spaniard.phone == "+34612345678"
    assert (spaniard.country, spaniard.locale, spaniard.timezone) == ("ES", "es", "Europe/Madrid")
    assert spaniard.birthday == dt.date(1985, 4, 2)
    assert spaniard.attributes == {"loyalty_card": "A-77"}
    assert brazilian.attributes == {}
    assert (brazilian.phone, brazilian.country, brazilian.locale) == ("+5511987654321", "BR", "pt_BR")
    assert brazilian.timezone == "America/Sao_Paulo"  # the only zone of a São Paulo number
    assert len({spaniard.referral_code, brazilian.referral_code}) == 2
    assert set(spaniard.referral_code) <= set(REFERRAL_ALPHABET)
    with sessions() as session:
        tags = set(session.execute(select(Contact.external_id, ContactTag.tag).join(ContactTag)))
        consents = set(
            session.execute(select(Contact.external_id, Consent.channel, Consent.status).join(Consent))
        )
    assert tags == {("c1", "corte"), ("c1", "color"), ("c2", "manicure"), ("c2", "color")}
    assert consents == {
        ("c1", Channel.EMAIL, ConsentStatus.GRANTED),
        ("c2", Channel.EMAIL, ConsentStatus.REVOKED),
        ("c2", Channel.SMS, ConsentStatus.GRANTED),
    }


def test_empty_optional_fields_take_the_defaults(
    sessions: Sessions, settings: Settings, tmp_path: Path
) -> None:
    summary = import_contacts(sessions, settings, tmp_path, "c1,,,,,,,,,,,,\n")

    assert summary.imported == 1
    only = contact(sessions, "c1")
    assert (only.email, only.phone, only.birthday) == (None, None, None)
    assert (only.locale, only.timezone) == (settings.default_locale, settings.default_timezone)
    assert count(sessions, Consent) == 0  # not given: nobody is messaged on a channel they did not agree to


def test_local_phones_use_the_default_country_when_the_row_has_none(
    sessions: Sessions, settings: Settings, tmp_path: Path
) -> None:
    rows = "us1,,,,(212) 555-0123,,,,,,,,\n"
    refused = import_contacts(sessions, settings, tmp_path, rows)
    assert refused.rejected == 1
    assert "NURTURE_DEFAULT_COUNTRY" in rejects(refused)[0]["reason"]

    summary = import_contacts(sessions, settings.model_copy(update={"default_country": "US"}), tmp_path, rows)

    assert summary.imported == 1
    assert summary.rejects_file is None
    imported = contact(sessions, "us1")
    assert (imported.phone, imported.country, imported.timezone) == ("+12125550123", "US", "America/New_York")


def test_each_bad_contact_row_is_rejected_with_its_line_and_reason(
    sessions: Sessions, settings: Settings, tmp_path: Path
) -> None:
    summary = import_contacts(
        sessions,
        settings,
        tmp_path,
        "good,Ana,,,,,,,,,,,\n"
        "c2,,,ana@@example,,,,,,,,,\n"
        "c3,,,,12345,ES,,,,,,,\n"
        "c4,,,,,,,Europe/Atlantis,,,,,\n"
        "c5,,,,,,klingon,,,,,,\n"
        "c6,,,,,,,,1990-02-30,,,,\n"
        "c7,,,,,,,,,,,maybe,\n"
        ",nobody,,,,,,,,,,,\n"
        "good,Again,,,,,,,,,,,\n"
        "c9,,,,,XX,,,,,,,\n"
        "c10,too,few\n",
    )

    assert (summary.imported, summary.rejected) == (1, 10)
    assert summary.rejects_file == tmp_path / "contacts.rejects.csv"
    found = [(int(row["line"]), row["reason"].split(":")[0]) for row in rejects(summary)]
    assert found == [
        (3, "email"),
        (4, "phone"),
        (5, "timezone"),
        (6, "locale"),
        (7, "birthday"),
        (8, "email_consent"),
        (9, "external_id"),
        (10, "repeats the external_id of line 2"),
        (11, "country"),
        (12, "has 3 fields; the header has 13"),
    ]
    by_line = {int(row["line"]): row for row in rejects(summary)}
    assert "not a valid number for ES" in by_line[4]["reason"]
    assert by_line[3]["email"] == "ana@@example"  # the original columns follow, as written
    assert contact(sessions, "good").first_name == "Ana"


def test_awkward_but_valid_files_import(sessions: Sessions, settings: Settings, tmp_path: Path) -> None:
    path = write(
        tmp_path / "clientes.csv",
        "\ufeffExternal ID ; First Name;Last-Name ;Phone;Country;Notas\r\n"
        'e1;María José;"Peña; de la";612345678;ES;"primera línea\r\nsegunda línea"\r\n'
        "e2;Conceição;;912345678;PT;\r\n"
        "\r\n"
        "e3;Bad;;12;ES;\r\n",
    )

    summary = import_file(sessions, "contacts", path, settings)

    assert (summary.imported, summary.rejected) == (2, 1)
    assert [row["line"] for row in rejects(summary)] == ["6"]  # the quoted line break counts as a line
    first = contact(sessions, "e1")
    assert (first.first_name, first.last_name, first.phone) == ("María José", "Peña; de la", "+34612345678")
    assert first.attributes == {"notas": "primera línea\r\nsegunda línea"}
    assert contact(sessions, "e2").phone == "+351912345678"


def test_importing_the_same_file_twice_changes_nothing(
    sessions: Sessions, settings: Settings, tmp_path: Path
) -> None:
    rows = "c1,Ana,,ana@example.com,+34612345678,,es,,1990-01-01,a|b,c2,yes,no\nc2,Bea,,,,,,,,,,,\n"
    import_contacts(sessions, settings, tmp_path, rows)
    before = contact(sessions, "c1")

    again = import_contacts(sessions, settings, tmp_path, rows)

    assert again == ImportSummary(imported=0, updated=0, unchanged=2, rejected=0, rejects_file=None)
    after = contact(sessions, "c1")
    assert (after.updated_at, after.referral_code) == (before.updated_at, before.referral_code)
    assert count(sessions, ConsentEvent) == 2
    assert count(sessions, Referral) == 1


def test_an_edited_row_updates_its_contact(sessions: Sessions, settings: Settings, tmp_path: Path) -> None:
    import_contacts(sessions, settings, tmp_path, "c1,Ana,,ana@example.com,,,,,,a|b,,,\nc2,Bea,,,,,,,,,,,\n")

    summary = import_contacts(
        sessions, settings, tmp_path, "c1,Ana,,ana.new@example.com,,,,,,b|c,,,\nc2,Bea,,,,,,,,,,,\n"
    )

    assert (summary.imported, summary.updated, summary.unchanged) == (0, 1, 1)
    assert contact(sessions, "c1").email == "ana.new@example.com"
    with sessions() as session:
        assert set(session.scalars(select(ContactTag.tag))) == {"b", "c"}


def test_a_consent_change_is_recorded_with_its_source(
    sessions: Sessions, settings: Settings, tmp_path: Path
) -> None:
    import_contacts(sessions, settings, tmp_path, "c1,,,,,,,,,,,yes,\n")
    unchanged = import_contacts(sessions, settings, tmp_path, "c1,,,,,,,,,,,TRUE,\n")
    summary = import_contacts(sessions, settings, tmp_path, "c1,,,,,,,,,,,No,\n")

    assert unchanged.unchanged == 1
    assert summary.updated == 1
    with sessions() as session:
        current = session.scalars(select(Consent)).one()
        history = session.execute(
            select(ConsentEvent.channel, ConsentEvent.status, ConsentEvent.source).order_by(ConsentEvent.id)
        ).all()
    assert current.status is ConsentStatus.REVOKED
    assert history == [
        (Channel.EMAIL, ConsentStatus.GRANTED, "import:contacts.csv"),
        (Channel.EMAIL, ConsentStatus.REVOKED, "import:contacts.csv"),
    ]


def test_an_import_grants_no_email_consent_to_a_suppressed_address(
    sessions: Sessions, settings: Settings, tmp_path: Path
) -> None:
    import_contacts(sessions, settings, tmp_path, "c1,,,old@example.com,,,,,,,,yes,\n")
    with sessions.begin() as session:
        # What a SendGrid bounce leaves behind: the address suppressed, the consent revoked.
        at = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)
        consent.suppress(session, {"gone@example.com": "bounce"}, at=at)
        consent.revoke(
            session, [(contact(sessions, "c1").id, Channel.EMAIL)], at=at, source="sendgrid bounce"
        )

    summary = import_contacts(
        sessions,
        settings,
        tmp_path,
        "c1,,,Gone@example.com,,,,,,,,yes,\nc2,,,gone@example.com,,,,,,,,true,yes\nc3,,,new@example.com,,,,,,,,yes,\n",
    )

    assert (summary.imported, summary.updated, summary.rejected) == (2, 1, 0)
    with sessions() as session:
        current = {
            (external_id, channel): status
            for external_id, channel, status in session.execute(
                select(Contact.external_id, Consent.channel, Consent.status).join(Consent)
            )
        }
    assert current == {
        ("c1", Channel.EMAIL): ConsentStatus.REVOKED,
        ("c2", Channel.SMS): ConsentStatus.GRANTED,
        ("c3", Channel.EMAIL): ConsentStatus.GRANTED,
    }
    assert contact(sessions, "c2").email == "gone@example.com"  # the rest of the row is imported


def test_referrals_resolve_whatever_the_order(sessions: Sessions, settings: Settings, tmp_path: Path) -> None:
    import_contacts(sessions, settings, tmp_path, "child,,,,,,,,,,parent,,\nparent,,,,,,,,,,,,\n")
    code = contact(sessions, "parent").referral_code
    import_contacts(sessions, settings, tmp_path, f"grandchild,,,,,,,,,,{code},,\norphan,,,,,,,,,,nobody,,\n")
    import_contacts(sessions, settings, tmp_path, "nobody,,,,,,,,,,,,\n")

    with sessions() as session:
        referrer = Contact.__table__.alias("referrer")
        links = set(
            session.execute(
                select(referrer.c.external_id, Contact.external_id)
                .join(Referral, Referral.referred_id == Contact.id)
                .join(referrer, referrer.c.id == Referral.referrer_id)
            )
        )
    assert links == {("parent", "child"), ("parent", "grandchild"), ("nobody", "orphan")}
    assert contact(sessions, "grandchild").referred_by == code


def test_duplicates_are_found_across_batches(sessions: Sessions, settings: Settings, tmp_path: Path) -> None:
    rows = "".join(f"c{number},,,,,,,,,,,,\n" for number in range(250)) + "c7,,,,,,,,,,,,\n"

    summary = import_contacts(
        sessions, settings.model_copy(update={"import_batch_size": 100}), tmp_path, rows
    )

    assert (summary.imported, summary.rejected) == (250, 1)
    assert rejects(summary)[0]["reason"] == "repeats the external_id of line 9"


@pytest.fixture
def madrid(sessions: Sessions, settings: Settings, tmp_path: Path) -> None:
    import_contacts(sessions, settings, tmp_path, "m1,,,,,,es,Europe/Madrid,,,,,\n")


@pytest.mark.usefixtures("madrid")
def test_visits_import_in_the_contacts_timezone(
    sessions: Sessions, settings: Settings, tmp_path: Path
) -> None:
    path = write(
        tmp_path / "visits.csv",
        "external_id,contact_external_id,occurred_at,amount,currency\n"
        "summer,m1,2026-07-01T10:00:00,25.50,\n"
        'offset,m1,2026-07-01T10:00:00+00:00,"12,5",usd\n'
        "gap,m1,2026-03-29T02:30:00,,\n"
        "twice,m1,2026-10-25T02:30:00,0,\n",
    )

    summary = import_file(sessions, "visits", path, settings)

    assert summary == ImportSummary(imported=4, updated=0, unchanged=0, rejected=0, rejects_file=None)
    with sessions() as session:
        visits = {visit.external_id: visit for visit in session.scalars(select(Visit))}
    utc = dt.UTC
    assert visits["summer"].occurred_at == dt.datetime(2026, 7, 1, 8, 0, tzinfo=utc)  # CEST is UTC+2
    assert (visits["summer"].amount, visits["summer"].currency) == (Decimal("25.50"), "EUR")
    assert visits["offset"].occurred_at == dt.datetime(2026, 7, 1, 10, 0, tzinfo=utc)
    assert (visits["offset"].amount, visits["offset"].currency) == (Decimal("12.50"), "USD")
    # 02:30 never happened that night in Madrid: the clock read 03:30 CEST.
    assert visits["gap"].occurred_at == dt.datetime(2026, 3, 29, 1, 30, tzinfo=utc)
    assert visits["gap"].amount == Decimal("0")
    # 02:30 happened twice: the first one, still in summer time.
    assert visits["twice"].occurred_at == dt.datetime(2026, 10, 25, 0, 30, tzinfo=utc)


@pytest.mark.usefixtures("madrid")
def test_visits_upsert_by_external_id_and_reject_bad_rows(
    sessions: Sessions, settings: Settings, tmp_path: Path
) -> None:
    header = "contact_external_id,external_id,occurred_at,amount,currency\n"
    good = "m1,v1,2026-07-01T10:00:00,10,\nm1,v2,2026-07-02T10:00:00,10,\n"
    bad = (
        "nobody,v3,2026-07-01T10:00:00,10,\n"
        "m1,v4,2026-07-01T10:00:00,-5,\n"
        "m1,v5,2026-07-01T10:00:00,10,EURO\n"
        "m1,v6,yesterday,10,\n"
        "m1,v1,2026-07-09T10:00:00,10,\n"
        "m1,,2026-07-01T10:00:00,10,\n"
    )
    first = import_file(sessions, "visits", write(tmp_path / "visits.csv", header + good + bad), settings)
    edited = good.replace("v2,2026-07-02T10:00:00,10", "v2,2026-07-02T10:00:00,12")
    second = import_file(sessions, "visits", write(tmp_path / "visits.csv", header + edited + bad), settings)

    assert (first.imported, first.rejected) == (2, 6)
    assert (second.imported, second.updated, second.unchanged, second.rejected) == (0, 1, 1, 6)
    assert [(row["line"], row["reason"].split(":")[0]) for row in rejects(second)] == [
        ("4", "contact_external_id"),
        ("5", "amount"),
        ("6", "currency"),
        ("7", "occurred_at"),
        ("8", "repeats the external_id of line 2"),
        ("9", "external_id"),
    ]
    assert "negative" in rejects(second)[1]["reason"]
    with sessions() as session:
        assert session.scalar(select(Visit.amount).where(Visit.external_id == "v2")) == Decimal("12")
    assert count(sessions, Visit) == 2


@pytest.mark.usefixtures("madrid")
def test_feedback_upserts_and_a_complaint_stays_open_until_resolved(
    sessions: Sessions, settings: Settings, tmp_path: Path
) -> None:
    header = "contact_external_id,occurred_at,kind,score,comment,resolved_at\n"
    rows = (
        "m1,2026-07-01T10:00:00,nps,9,great,\n"
        "m1,2026-07-02T10:00:00,complaint,,slow service,\n"
        "m1,2026-07-03T10:00:00,csat,6,,\n"
        "m1,2026-07-03T10:00:00,nps,,,\n"
        "m1,2026-07-03T10:00:00,complaint,3,,\n"
        "m1,2026-07-03T10:00:00,praise,,,\n"
        "nobody,2026-07-03T10:00:00,nps,5,,\n"
        "m1,2026-07-01T08:00:00Z,nps,9,great,\n"
    )
    first = import_file(sessions, "feedback", write(tmp_path / "feedback.csv", header + rows), settings)
    resolved = rows.replace("slow service,", "slow service,2026-07-04T09:00:00")
    second = import_file(sessions, "feedback", write(tmp_path / "feedback.csv", header + resolved), settings)

    assert (first.imported, first.rejected) == (2, 6)
    assert (second.imported, second.updated, second.unchanged) == (0, 1, 1)
    reasons = [row["reason"] for row in rejects(second)]
    assert reasons[:5] == [
        "score: '6' is not a csat score (1-5)",
        "score: a nps needs a score",
        "score: a complaint has no score",
        "kind: 'praise' is not one of nps, csat, complaint, cancel_request",
        "contact_external_id: no contact 'nobody'; import the contacts first",
    ]
    assert reasons[5] == "repeats the contact, kind and occurred_at of line 2"  # 08:00Z is 10:00 in Madrid
    with sessions() as session:
        complaint = session.scalars(select(Feedback).where(Feedback.kind == FeedbackKind.COMPLAINT)).one()
    assert complaint.resolved_at == dt.datetime(2026, 7, 4, 7, 0, tzinfo=dt.UTC)


def _undecodable(tmp_path: Path) -> Path:
    return write(
        tmp_path / "contacts.csv", "external_id,first_name\nc1,Ana\nc2,Mar\xeda\n", encoding="latin-1"
    )


@pytest.mark.parametrize(
    ("make_file", "message"),
    [
        (
            lambda tmp: write(tmp / "contacts.csv", "id,first_name\nc1,Ana\n"),
            "contacts.csv:1: lacks the required",
        ),
        (_undecodable, "contacts.csv:3: is not UTF-8 text"),
        (lambda tmp: tmp / "missing.csv", "missing.csv: cannot be read"),
        (
            lambda tmp: write(tmp / "contacts.csv", 'external_id,first_name\nc1,"Ana\nc2,Bea\n'),
            "contacts.csv:2: ",
        ),
        (lambda tmp: write(tmp / "contacts.csv", ""), "contacts.csv:1: is empty"),
    ],
    ids=["missing column", "not utf-8", "unreadable", "unclosed quote", "empty"],
)
def test_a_file_that_cannot_be_imported_writes_nothing(
    sessions: Sessions, settings: Settings, tmp_path: Path, make_file: object, message: str
) -> None:
    path = make_file(tmp_path)  # type: ignore[operator]

    with pytest.raises(ImportFileError) as raised:
        import_file(sessions, "contacts", path, settings)

    assert message in str(raised.value)
    assert count(sessions, Contact) == 0
    assert not (tmp_path / "contacts.rejects.csv").exists()


def test_the_command_prints_one_json_object(settings: Settings, tmp_path: Path) -> None:
    path = write(tmp_path / "contacts.csv", f"{CONTACTS_HEADER}\nc1,,,,,,,,,,,,\nc2,,,bad,,,,,,,,,\n")

    result = CliRunner().invoke(app, ["import", "contacts", str(path), "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "imported": 1,
        "updated": 0,
        "unchanged": 0,
        "rejected": 1,
        "rejects_file": str(tmp_path / "contacts.rejects.csv"),
    }


def test_the_command_fails_with_one_line_naming_the_file(settings: Settings, tmp_path: Path) -> None:
    path = write(tmp_path / "visits.csv", "external_id,occurred_at\nv1,2026-01-01\n")

    result = CliRunner().invoke(app, ["import", "visits", str(path)])

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {path}:1: lacks the required column contact_external_id"
        " (its columns: external_id, occurred_at)"
    ]


def test_progress_is_told_the_rows_done_and_a_clean_run_removes_old_rejects(
    sessions: Sessions, settings: Settings, tmp_path: Path
) -> None:
    rows = "".join(f"c{number},,,,,,,,,,,,\n" for number in range(250))
    first = import_contacts(sessions, settings, tmp_path, rows + "bad,,,nope,,,,,,,,,\n")
    assert first.rejects_file is not None and first.rejects_file.exists()
    told: list[tuple[int, int]] = []

    summary = import_file(
        sessions,
        "contacts",
        write(tmp_path / "contacts.csv", f"{CONTACTS_HEADER}\n{rows}"),
        settings.model_copy(update={"import_batch_size": 100}),
        progress=lambda done, total: told.append((done, total)),
    )

    assert told == [(100, 250), (200, 250), (250, 250)]
    assert summary.rejects_file is None
    assert not first.rejects_file.exists()
