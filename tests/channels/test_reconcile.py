"""`nurture sends reconcile`: a person settles the sends whose outcome nobody knows."""

from __future__ import annotations

import json

import pytest
from fake_providers import Answer, FakeProvider
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from histories import Business, local, run
from nurture.cli import app
from nurture.models import SendStatus
from nurture.settings import Settings

MADRID = "Europe/Madrid"


def reconcile(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["sends", "reconcile", *args])
    return result.exit_code, result.output


@pytest.fixture
def unknown(
    sendgrid_calendar: Settings, sessions: sessionmaker[Session], sendgrid_api: FakeProvider
) -> list[int]:
    """Two welcomes SendGrid took without answering in time, and one it answered: two unknown sends."""
    business = Business(sessions)
    for _ in range(3):
        business.contact(visits=[local(MADRID, 2026, 11, 22, 18, 0)])
    sendgrid_api.answer(Answer(202, delay=1.0), Answer(202, delay=1.0))
    settings = sendgrid_calendar.model_copy(update={"send_timeout_seconds": 0.3, "sendgrid_concurrency": 2})
    summary = run(settings, local(MADRID, 2026, 11, 23, 10, 0), touches=["welcome"])
    assert summary.totals["unknown"] == 2 and summary.totals["sent"] == 1
    return sorted(summary.unknown_sends)


def test_reconcile_lists_the_unknown_sends_with_who_what_and_why(unknown: list[int]) -> None:
    code, output = reconcile("--json")

    assert code == 0
    rows = json.loads(output)["unknown"]
    assert [row["id"] for row in rows] == unknown
    contacts = {row["contact"] for row in rows}
    assert contacts <= {"c1", "c2", "c3"} and len(contacts) == 2
    assert {row["touch"] for row in rows} == {"welcome"} and {row["channel"] for row in rows} == {"email"}
    assert all("no answer from SendGrid" in row["error"] for row in rows)
    assert all(row["claimed_at"].startswith("2026-11-23T09:00:00") for row in rows)

    code, output = reconcile()
    assert code == 0 and "welcome" in output and "nurture sends reconcile --sent ID" in output


def test_marking_a_send_sent_records_the_message_id_and_it_is_never_sent_again(
    unknown: list[int],
    sendgrid_calendar: Settings,
    sessions: sessionmaker[Session],
    sendgrid_api: FakeProvider,
) -> None:
    first, second = unknown

    code, output = reconcile("--sent", str(first), "--message-id", "sg-found-in-activity-feed", "--json")

    assert code == 0 and json.loads(output) == {"sent": [first], "released": []}
    [send] = [s for s in Business(sessions).sends() if s.id == first]
    assert send.status is SendStatus.SENT and send.provider_message_id == "sg-found-in-activity-feed"
    assert send.sent_at == send.claimed_at and "confirmed sent by a person" in (send.error or "")
    assert [row["id"] for row in json.loads(reconcile("--json")[1])["unknown"]] == [second]
    requests_before = len(sendgrid_api.requests)
    again = run(sendgrid_calendar, local(MADRID, 2026, 11, 23, 14, 0), touches=["welcome"])
    assert again.totals["sent"] == 0 and len(sendgrid_api.requests) == requests_before


def test_a_released_send_is_tried_once_more_by_the_next_run_and_keeps_its_history(
    unknown: list[int],
    sendgrid_calendar: Settings,
    sessions: sessionmaker[Session],
    sendgrid_api: FakeProvider,
) -> None:
    first, second = unknown
    [old] = [s for s in Business(sessions).sends() if s.id == first]

    code, output = reconcile("--release", str(first))

    assert code == 0 and f"released: {first}" in output
    again = run(sendgrid_calendar, local(MADRID, 2026, 11, 23, 14, 0), touches=["welcome"])
    once_more = run(sendgrid_calendar, local(MADRID, 2026, 11, 23, 16, 0), touches=["welcome"])

    assert again.totals["sent"] == 1 and once_more.totals["sent"] == 0
    to = [r.body["personalizations"][0]["to"][0]["email"] for r in sendgrid_api.requests]
    recipient = f"c{old.contact_id}@example.com"
    assert to.count(recipient) == 2  # the unknown attempt and the one more try, nothing else
    rows = Business(sessions).sends(old.contact_id)
    assert [(r.id, r.status) for r in rows] == [(first, SendStatus.FAILED), (rows[1].id, SendStatus.SENT)]
    assert rows[0].key == f"{old.key}:released:{first}" and rows[1].key == old.key
    assert (rows[0].error or "").startswith("released for one more try by a person")
    assert "no answer from SendGrid" in (rows[0].error or "")
    assert [row["id"] for row in json.loads(reconcile("--json")[1])["unknown"]] == [second]


def test_a_send_that_is_not_unknown_is_refused_and_nothing_changes(
    unknown: list[int], sessions: sessionmaker[Session]
) -> None:
    first, second = unknown
    sent = next(s.id for s in Business(sessions).sends() if s.status is SendStatus.SENT)

    for args in (
        ["--release", str(first), "--release", str(sent)],
        ["--sent", str(second), "--sent", "999999"],
        ["--sent", str(first), "--release", str(first)],
        ["--sent", str(first), "--sent", str(second), "--message-id", "x"],
    ):
        code, output = reconcile(*args)
        assert code == 1, args
    assert f"send {sent} is sent, not unknown" in reconcile("--release", str(sent))[1]
    assert "send 999999 does not exist" in reconcile("--sent", "999999")[1]
    assert [row["id"] for row in json.loads(reconcile("--json")[1])["unknown"]] == unknown

    assert reconcile("--release", str(first))[0] == 0
    code, output = reconcile("--release", str(first))  # twice: the second finds nothing unknown
    assert code == 1 and f"send {first} is failed, not unknown" in output
