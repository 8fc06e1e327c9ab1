"""nurture templates preview and test-send: a touch as a persona or a real contact gets it, sent to a seed."""

from __future__ import annotations

import datetime as dt
import email
import json
import shutil
from email.policy import default
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from histories import Business, local, outbox_emails, run
from nurture import profiles
from nurture.cli import app
from nurture.settings import Settings
from nurture.tokens import read_unsubscribe_token

REPO = Path(__file__).resolve().parent.parent
MADRID = "Europe/Madrid"


@pytest.fixture
def settings(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The shipped programme without its holdout, so that every due message goes out."""
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates", root)
    programme = root / "programme.yaml"
    programme.write_text(programme.read_text().replace("holdout: 0.10", "holdout: 0"))
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(root))
    return settings.model_copy(update={"templates_dir": root})


@pytest.fixture
def business(sessions: sessionmaker[Session]) -> Business:
    return Business(sessions)


def nurture(*args: str) -> Result:
    return CliRunner().invoke(app, ["templates", *args])


def refreshed(settings: Settings, sessions: sessionmaker[Session], at: dt.datetime) -> None:
    with sessions.begin() as session:
        profiles.refresh(session, settings, at)


def test_preview_shows_a_persona_in_another_locale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(REPO / "templates"))
    result = nurture("preview", "birthday", "--persona", "lucia", "--locale", "pt_BR", "--channel", "sms")
    assert result.exit_code == 0, result.output
    assert "birthday · sms · persona lucia · pt_BR · messages/birthday/pt/sms.txt" in result.output
    assert "Lucía" in result.output and "UCS-2" in result.output


def test_preview_picks_a_persona_speaking_the_locale_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(REPO / "templates"))
    result = nurture("preview", "welcome", "--locale", "pt_BR", "--channel", "email")
    assert result.exit_code == 0, result.output
    assert "persona joao" in result.output and "Olá, João" in result.output


def test_preview_writes_the_html_part_to_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(REPO / "templates"))
    out = tmp_path / "incentive.html"
    result = nurture("preview", "incentive", "--persona", "maria_guadalupe", "--out", str(out))
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert html.startswith("<!doctype html>") and "María Guadalupe" in html
    assert 'style="' in html  # styles inlined, as sent


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["preview", "welcome", "--persona", "nobody"],
            "unknown persona 'nobody'; personas.yaml has: emma, lucia",
        ),
        (["preview", "no_such_touch"], "unknown touch no_such_touch; the programme has: appreciation_day"),
        (
            ["preview", "welcome", "--persona", "emma", "--contact", "c1"],
            "give --contact or --persona, not both",
        ),
        (["test-send", "welcome", "--to", "not-an-address"], "--to 'not-an-address': not a phone number"),
        (["test-send", "welcome", "--to", "me@", "--channel", "email"], "--to 'me@': not an email address"),
    ],
)
def test_mistakes_are_one_error_line(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(REPO / "templates"))
    result = nurture(*args)
    assert result.exit_code == 1
    assert message in result.output


def test_preview_of_a_real_contact_renders_what_the_next_run_would_send(
    settings: Settings, business: Business, sessions: sessionmaker[Session]
) -> None:
    ines = business.contact(first_name="Inés", tags=["color"], visits=[local(MADRID, 2026, 10, 2, 11, 0)])
    refreshed(settings, sessions, dt.datetime.now(dt.UTC))
    result = nurture("preview", "education", "--contact", "c1")
    assert result.exit_code == 0, result.output
    assert "education · email · contact c1 · es" in result.output
    assert "Inés" in result.output
    # The content item her next education email would carry: the one for her interest, in Spanish.
    assert "Haz que tu color dure más" in result.output
    assert ines == 1


def test_preview_of_an_unknown_or_unrefreshed_contact_says_what_to_do(
    settings: Settings, business: Business, sessions: sessionmaker[Session]
) -> None:
    assert "no contact with external id 'c9'" in nurture("preview", "welcome", "--contact", "c9").output
    business.contact()
    result = nurture("preview", "welcome", "--contact", "c1")
    assert result.exit_code == 1
    assert "no profile yet: run `nurture contacts refresh` first" in result.output


def test_a_test_send_goes_to_the_seed_and_is_never_a_marketing_send(
    settings: Settings, business: Business, sessions: sessionmaker[Session]
) -> None:
    business.contact(first_name="Inés", visits=[local(MADRID, 2026, 11, 22, 18, 0)])
    refreshed(settings, sessions, local(MADRID, 2026, 11, 23, 9, 0))
    result = nurture("test-send", "welcome", "--contact", "c1", "--to", "Marketing <seed@luma.example>")
    assert result.exit_code == 1  # a display name is not an address
    result = nurture("test-send", "welcome", "--contact", "c1", "--to", "seed@luma.example")
    assert result.exit_code == 0, result.output
    assert "not recorded in the ledger" in result.output
    [path] = (settings.outbox_dir / "test-sends" / "email").glob("*.eml")
    sent = email.message_from_bytes(path.read_bytes(), policy=default)
    assert sent["To"] == "Inés García <seed@luma.example>"
    assert "Inés" in sent["Subject"] or "Inés" in sent.get_body(("plain",)).get_content()
    # Its unsubscribe link names no contact: clicking it in the seed inbox unsubscribes nobody.
    link = sent["List-Unsubscribe"].strip("<>")
    assert read_unsubscribe_token(settings, link.rsplit("/", 1)[1]).contact_id == 0
    # Nothing in the ledger, so the real welcome still goes out, uncapped, once.
    assert business.sends() == []
    summary = run(settings, local(MADRID, 2026, 11, 23, 10, 0), touches=["welcome"])
    assert summary.as_dict()["sent"] == 1
    assert [m["To"] for m in outbox_emails(settings)] == ["Inés García <c1@example.com>"]


def test_a_test_sms_goes_to_the_seed_number_in_e164(settings: Settings) -> None:
    result = nurture("test-send", "incentive", "--persona", "lucia", "--to", "+34 612 345 999")
    assert result.exit_code == 0, result.output
    [path] = (settings.outbox_dir / "test-sends" / "sms").glob("*.json")
    sms = json.loads(path.read_text())
    assert sms["to"] == "+34612345999"
    assert sms["body"].startswith("Luma Studio") and "Lucía" in sms["body"]
    assert sms["segments"] >= 1 and sms["encoding"] == "UCS-2"
