from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from nurture import db
from nurture.cli import app
from nurture.models import Contact, Delivery, Send, SendCategory, SendStatus
from nurture.settings import Settings


def _contact(external_id: str, now: dt.datetime) -> Contact:
    return Contact(
        external_id=external_id,
        locale="es",
        timezone="Europe/Madrid",
        referral_code=f"R{external_id}",
        created_at=now,
        updated_at=now,
    )


def test_instants_come_back_timezone_aware_utc(sessions: sessionmaker[Session]) -> None:
    madrid = dt.datetime(2026, 3, 29, 3, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with sessions.begin() as session:
        session.add(_contact("c1", madrid))
    with sessions() as session:
        stored = session.scalars(select(Contact.created_at)).one()
    assert stored == madrid
    assert stored.utcoffset() == dt.timedelta(0)


def test_naive_instants_are_refused(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(StatementError, match="naive datetime"), sessions.begin() as session:
        session.add(_contact("c1", dt.datetime(2026, 1, 1)))
        session.flush()


def test_the_ledger_refuses_a_second_row_for_the_same_key(sessions: sessionmaker[Session]) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with sessions.begin() as session:
        contact = _contact("c1", now)
        session.add(contact)
        session.flush()
        contact_id = contact.id

    def claim() -> Send:
        return Send(
            key="welcome:1:first",
            contact_id=contact_id,
            touch="welcome",
            occurrence="first",
            category=SendCategory.MARKETING,
            status=SendStatus.CLAIMED,
            due_at=now,
            claimed_at=now,
        )

    with sessions.begin() as session:
        session.add(claim())
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(claim())


def test_db_upgrade_command_creates_the_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("NURTURE_DATABASE_URL", url)
    result = CliRunner().invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert db.is_current(db.make_engine(url))


def test_connect_migrates_a_new_database_by_itself(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'new.db'}", _env_file=None)  # type: ignore[call-arg]
    assert db.is_current(db.connect(settings))


def test_a_second_holder_of_an_exclusive_lock_waits_for_the_first(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as first:
        db.exclusive(first, "nurture.profiles.refresh")
        with sessions.begin() as second:
            # Wait a moment only, so that "would wait" shows as an error instead of a hang.
            if second.get_bind().dialect.name == "postgresql":
                second.execute(text("SET LOCAL lock_timeout = '50ms'"))
            else:
                second.execute(text("PRAGMA busy_timeout = 50"))
            with pytest.raises(OperationalError):
                db.exclusive(second, "nurture.profiles.refresh")
    with sessions.begin() as third:
        db.exclusive(third, "nurture.profiles.refresh")


def test_migration_0004_goes_down_and_up_again_keeping_the_ledger(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with sessions.begin() as session:
        contact = _contact("c1", now)
        session.add(contact)
        session.flush()
        session.add(
            Send(
                key="welcome:1:first",
                contact_id=contact.id,
                touch="welcome",
                occurrence="first",
                category=SendCategory.MARKETING,
                status=SendStatus.SENT,
                due_at=now,
                claimed_at=now,
                provider_message_id="SM1",
            )
        )

    with engine.begin() as connection:
        command.downgrade(db.alembic_config(connection), "0003")
    assert "send_events" not in inspect(engine).get_table_names()
    assert "delivery" not in {column["name"] for column in inspect(engine).get_columns("sends")}
    with engine.begin() as connection:
        command.upgrade(db.alembic_config(connection), "head")

    assert db.is_current(engine)
    with sessions.begin() as session:
        send = session.scalars(select(Send)).one()
        assert (send.key, send.provider_message_id, send.delivery) == ("welcome:1:first", "SM1", None)
        send.delivery = Delivery.DELIVERED
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(text("UPDATE sends SET delivery = 'lost in the post'"))
