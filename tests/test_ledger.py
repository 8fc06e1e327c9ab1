"""Exactly once, whatever happens: a run killed mid-send, and two runs started for the same instant."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select

from histories import outbox_emails
from nurture.calendar import open_run, run_calendar
from nurture.models import Channel, Consent, ConsentStatus, Contact, Send, SendStatus, Visit
from nurture.settings import Settings

REPO = Path(__file__).resolve().parent.parent
AT = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)  # 11:00 in Madrid
CONTACTS = 4000

RUN = """
import datetime as dt, sys
from nurture.calendar import open_run, run_calendar
from nurture.settings import Settings
summary = run_calendar(Settings(), dt.datetime.fromisoformat(sys.argv[1]), touches=["welcome"])
print(summary.totals["sent"], summary.totals["taken_by_other_run"])
"""


@pytest.fixture
def settings(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates", root)
    programme = root / "programme.yaml"
    programme.write_text(programme.read_text().replace("holdout: 0.10", "holdout: 0"))
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(root))
    monkeypatch.setenv("NURTURE_SEND_BATCH_SIZE", "40")
    return settings.model_copy(update={"templates_dir": root, "send_batch_size": 40})


@pytest.fixture
def new_customers(engine: Engine) -> int:
    """Many contacts who all first visited yesterday: each is due exactly one welcome."""
    created = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    yesterday = AT - dt.timedelta(days=1)
    contacts = [
        {
            "external_id": f"k{i}",
            "first_name": "Nuno",
            "email": f"k{i}@example.com",
            "locale": ["es", "pt", "en"][i % 3],
            "timezone": "Europe/Madrid",
            "referral_code": f"K{i:06d}",
            "attributes": {},
            "created_at": created,
            "updated_at": created,
        }
        for i in range(CONTACTS)
    ]
    with engine.begin() as connection:
        connection.execute(insert(Contact), contacts)
        ids = list(connection.scalars(select(Contact.id).order_by(Contact.id)))
        connection.execute(
            insert(Consent),
            [
                {
                    "contact_id": i,
                    "channel": Channel.EMAIL,
                    "status": ConsentStatus.GRANTED,
                    "changed_at": created,
                    "source": "test",
                }
                for i in ids
            ],
        )
        connection.execute(
            insert(Visit),
            [
                {
                    "external_id": f"v{i}",
                    "contact_id": i,
                    "occurred_at": yesterday,
                    "amount": 30,
                    "currency": "EUR",
                    "created_at": created,
                }
                for i in ids
            ],
        )
    return len(ids)


def start_run() -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RUN, AT.isoformat()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def assert_each_sent_once(engine: Engine, settings: Settings, expected: int) -> None:
    with engine.connect() as connection:
        statuses = dict(connection.execute(select(Send.status, func.count()).group_by(Send.status)).all())
    assert statuses == {SendStatus.SENT: expected}
    recipients = Counter(m["To"].addresses[0].addr_spec for m in outbox_emails(settings))
    assert len(recipients) == expected and set(recipients.values()) == {1}


@pytest.mark.slow
def test_a_run_killed_mid_send_and_run_again_sends_each_message_once(
    engine: Engine, settings: Settings, new_customers: int
) -> None:
    process = start_run()
    folder = settings.outbox_dir / "email"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if folder.exists() and sum(1 for _ in folder.glob("*.eml")) >= 400:
            break
        time.sleep(0.002)
    if process.poll() is not None:
        _, stderr = process.communicate()
        pytest.fail("the run ended before it could be killed: " + stderr[-2000:])
    process.send_signal(signal.SIGKILL)
    process.communicate()

    with engine.connect() as connection:
        claimed = connection.scalar(select(func.count()).where(Send.status == SendStatus.CLAIMED))
        sent_before = connection.scalar(select(func.count()).where(Send.status == SendStatus.SENT))
    assert sent_before is not None and sent_before < new_customers  # it really died mid-run

    summary = run_calendar(settings, AT, touches=["welcome"])

    assert summary.totals["sent"] == new_customers - (sent_before or 0)
    assert claimed is not None
    assert_each_sent_once(engine, settings, new_customers)


@pytest.mark.slow
def test_two_runs_for_the_same_instant_send_each_message_once(
    engine: Engine, settings: Settings, new_customers: int
) -> None:
    first, second = start_run(), start_run()
    outputs = [process.communicate(timeout=300) for process in (first, second)]
    for process, (_, stderr) in zip((first, second), outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    sent = [int(out.split()[0]) for out, _ in outputs]
    assert sum(sent) == new_customers
    assert_each_sent_once(engine, settings, new_customers)


def test_a_claim_left_by_a_dead_run_and_never_taken_over_is_marked_unknown_not_resent(
    engine: Engine, settings: Settings, new_customers: int
) -> None:
    from nurture.db import session_factory
    from nurture.ledger import Entry, claim
    from nurture.models import SendCategory

    sessions = session_factory(engine)
    with sessions.begin() as session:
        contact_id = session.scalar(select(Contact.id).limit(1))
        assert contact_id is not None
        claim(
            session,
            [
                Entry(
                    key=f"welcome:{contact_id}:first",
                    contact_id=contact_id,
                    touch="welcome",
                    occurrence="first",
                    category=SendCategory.MARKETING,
                    status=SendStatus.CLAIMED,
                    due_at=AT,
                    channel=Channel.EMAIL,
                )
            ],
            at=AT - dt.timedelta(hours=3),
            run_id="dead",
        )

    summary = run_calendar(settings, AT, touches=["welcome"])

    assert summary.totals["unknown"] == 1
    assert summary.totals["sent"] == new_customers - 1
    with engine.connect() as connection:
        status = connection.scalar(select(Send.status).where(Send.contact_id == contact_id))
    assert status is SendStatus.UNKNOWN


@pytest.mark.slow
def test_a_run_spread_over_worker_processes_sends_each_message_once(
    engine: Engine, settings: Settings, new_customers: int
) -> None:
    settings = settings.model_copy(update={"calendar_processes": 2})
    with open_run(settings, AT, touches=["welcome"]) as run:
        summary, ranges = run.begin(batch_size=500)
        assert len(ranges) == 8 and run.processes == 2
        with ThreadPoolExecutor(2) as threads:
            for part in threads.map(run.send, *zip(*ranges, strict=True)):
                summary.combine(part)

    assert summary.totals["sent"] == new_customers
    assert summary.by_touch["welcome"]["sent"] == new_customers
    # Each worker wrote its ranges' profiles (the contacts had none) before planning them.
    assert summary.as_dict()["stages"]["new"] == new_customers
    assert_each_sent_once(engine, settings, new_customers)


def test_stale_claims_unknown_sends_and_twilio_callbacks_are_found_from_small_indexes(engine: Engine) -> None:
    """The ledger's partial indexes serve the queries meant to use them, on either database.

    They hold only the unsettled sends and the SMS; a query that no longer repeats their condition word
    for word would read the whole ledger (two million rows at a million contacts) at every run instead.
    """
    from sqlalchemy import event, text

    from nurture import events
    from nurture.db import session_factory
    from nurture.ledger import mark_unknown, unknown_sends

    statements: list[tuple[str, object]] = []

    def keep(connection: object, cursor: object, statement: str, parameters: object, *args: object) -> None:
        head = statement.split("WHERE")[0]
        if statement.lstrip().startswith(("SELECT", "UPDATE sends")) and "sends" in head:
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", keep)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        mark_unknown(session, claimed_before=AT, channels=[Channel.EMAIL], reason="stale")
        unknown_sends(session)
        events.record_sms_status(
            session, message_sid="SM1", status="delivered", error_code=None, payload={}, at=AT
        )
    event.remove(engine, "before_cursor_execute", keep)
    assert len(statements) == 3

    postgresql = engine.dialect.name == "postgresql"
    explain = "EXPLAIN " if postgresql else "EXPLAIN QUERY PLAN "
    expected = ["ix_sends_unsettled", "ix_sends_unsettled", "ix_sends_provider_message_id"]
    with engine.begin() as connection:
        if postgresql:  # an empty table: reading it whole would be cheaper, unless forbidden
            connection.execute(text("SET LOCAL enable_seqscan = off"))
        for (statement, parameters), index in zip(statements, expected, strict=True):
            rows = connection.exec_driver_sql(explain + statement, parameters)
            plan = " ".join(str(row[-1]) for row in rows)
            assert index in plan, (statement, plan)
