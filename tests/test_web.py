"""nurture serve: unsubscribe pages and one-click, request limits, and the real server under uvicorn."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient
from twilio.request_validator import RequestValidator
from typer.testing import CliRunner

from histories import Business, local, run
from nurture.cli import app
from nurture.models import Channel, Consent, ConsentEvent, ConsentStatus, SendStatus, TopicUnsubscribe
from nurture.settings import Settings
from nurture.tokens import unsubscribe_token
from nurture.web import create_app

MADRID = "Europe/Madrid"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def settings(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The shipped programme without its holdout, so that every due message goes out."""
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    programme = templates / "programme.yaml"
    programme.write_text(programme.read_text().replace("holdout: 0.10", "holdout: 0"))
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(templates))
    return settings.model_copy(update={"templates_dir": templates})


@pytest.fixture
def business(sessions: sessionmaker[Session]) -> Business:
    return Business(sessions)


@pytest.fixture
def client(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(settings, sessions)) as client:
        yield client


def consents(sessions: sessionmaker[Session], contact_id: int) -> dict[Channel, ConsentStatus]:
    with sessions() as session:
        rows = session.execute(
            select(Consent.channel, Consent.status).where(Consent.contact_id == contact_id)
        ).all()
    return {channel: status for channel, status in rows}


def consent_history(sessions: sessionmaker[Session]) -> list[tuple[int, Channel, ConsentStatus, str]]:
    with sessions() as session:
        rows = session.execute(
            select(
                ConsentEvent.contact_id, ConsentEvent.channel, ConsentEvent.status, ConsentEvent.source
            ).order_by(ConsentEvent.id)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def topics(sessions: sessionmaker[Session]) -> list[tuple[int, str]]:
    with sessions() as session:
        rows = session.execute(select(TopicUnsubscribe.contact_id, TopicUnsubscribe.topic)).all()
    return sorted((contact_id, topic) for contact_id, topic in rows)


ONE_CLICK = {"List-Unsubscribe": "One-Click"}


@pytest.mark.parametrize(
    ("locale", "question", "button"),
    [
        ("es", "¿Dejar de recibir correos de Luma Studio?", "Darme de baja"),
        ("pt_BR", "Deixar de receber e-mails de Luma Studio?", "Cancelar inscrição"),
        ("en", "Stop receiving emails from Luma Studio?", "Unsubscribe"),
        ("fr", "Stop receiving emails from Luma Studio?", "Unsubscribe"),
    ],
)
def test_the_link_shows_a_page_in_the_contacts_language_and_changes_nothing_yet(
    client: TestClient,
    settings: Settings,
    sessions: sessionmaker[Session],
    business: Business,
    locale: str,
    question: str,
    button: str,
) -> None:
    lucia = business.contact(locale=locale, consent=[Channel.EMAIL])

    page = client.get(f"/u/{unsubscribe_token(settings, lucia, 'email')}")

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert question in page.text
    assert f'<button type="submit">{button}</button>' in page.text
    assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in page.text
    assert page.headers["referrer-policy"] == "no-referrer"  # the token must not leak to other sites
    assert consents(sessions, lucia) == {Channel.EMAIL: ConsentStatus.GRANTED}


def test_one_click_revokes_email_consent_once_and_a_second_click_changes_nothing(
    client: TestClient, settings: Settings, sessions: sessionmaker[Session], business: Business
) -> None:
    lucia = business.contact(locale="es", consent=[Channel.EMAIL, Channel.SMS])
    url = f"/u/{unsubscribe_token(settings, lucia, 'email')}"

    # RFC 8058: mailbox providers POST this form, as multipart/form-data or urlencoded.
    first = client.post(url, files={"List-Unsubscribe": (None, "One-Click")})
    second = client.post(url, data=ONE_CLICK)

    assert first.status_code == second.status_code == 200
    assert "Te has dado de baja: no recibirás más correos de Luma Studio." in first.text
    assert consents(sessions, lucia) == {
        Channel.EMAIL: ConsentStatus.REVOKED,
        Channel.SMS: ConsentStatus.GRANTED,
    }
    assert consent_history(sessions) == [(lucia, Channel.EMAIL, ConsentStatus.REVOKED, "unsubscribe link")]


def test_the_pages_button_unsubscribes_from_sms_when_the_link_says_sms(
    client: TestClient, settings: Settings, sessions: sessionmaker[Session], business: Business
) -> None:
    lucia = business.contact(locale="pt", consent=[Channel.EMAIL, Channel.SMS])
    url = f"/u/{unsubscribe_token(settings, lucia, 'sms')}"
    page = client.get(url)
    assert "Deixar de receber SMS de Luma Studio?" in page.text

    # What the browser posts when the button is pressed: the page's form, urlencoded.
    done = client.post(
        url,
        content=b"List-Unsubscribe=One-Click",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )

    assert done.status_code == 200
    assert consents(sessions, lucia) == {
        Channel.EMAIL: ConsentStatus.GRANTED,
        Channel.SMS: ConsentStatus.REVOKED,
    }


def test_a_topic_link_unsubscribes_from_that_touch_only_and_escapes_what_it_shows(
    client: TestClient, settings: Settings, sessions: sessionmaker[Session], business: Business
) -> None:
    lucia = business.contact(locale="en", consent=[Channel.EMAIL])
    url = f"/u/{unsubscribe_token(settings, lucia, 'topic:<b>birthday</b>')}"

    page = client.get(url)
    assert "“&lt;b&gt;birthday&lt;/b&gt;” messages" in page.text
    assert "<b>" not in page.text

    assert client.post(url, data=ONE_CLICK).status_code == 200
    assert client.post(url, data=ONE_CLICK).status_code == 200
    assert topics(sessions) == [(lucia, "<b>birthday</b>")]
    assert consents(sessions, lucia) == {Channel.EMAIL: ConsentStatus.GRANTED}


def test_forged_garbled_foreign_or_orphan_tokens_get_404_and_change_nothing(
    client: TestClient, settings: Settings, sessions: sessionmaker[Session], business: Business
) -> None:
    lucia = business.contact(consent=[Channel.EMAIL])
    good = unsubscribe_token(settings, lucia, "email")
    payload, signature = good.split(".")
    neighbour = unsubscribe_token(settings, lucia + 1, "email").split(".")[0]
    other_key = settings.model_copy(update={"secret_key": SecretStr("another installation's key")})
    bad = [
        f"{neighbour}.{signature}",  # someone else's contact id under Lucía's signature
        f"{payload}.{signature[:-2]}xx",
        "not-a-token",
        unsubscribe_token(other_key, lucia, "email"),
        unsubscribe_token(settings, lucia + 1000, "email"),  # well signed, but no such contact
    ]

    for token in bad:
        assert client.get(f"/u/{token}").status_code == 404, token
        assert client.post(f"/u/{token}", data=ONE_CLICK).status_code == 404, token

    assert consents(sessions, lucia) == {Channel.EMAIL: ConsentStatus.GRANTED}
    assert consent_history(sessions) == []


def test_a_post_without_the_one_click_field_or_with_a_broken_body_gets_400(
    client: TestClient, settings: Settings, sessions: sessionmaker[Session], business: Business
) -> None:
    lucia = business.contact(consent=[Channel.EMAIL])
    url = f"/u/{unsubscribe_token(settings, lucia, 'email')}"

    assert client.post(url, data={"List-Unsubscribe": "yes"}).status_code == 400
    assert client.post(url).status_code == 400
    broken = client.post(
        url,
        content=b'--xyz\r\nContent-Disposition: form-data; name="List-Unsub',
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert broken.status_code == 400

    assert consents(sessions, lucia) == {Channel.EMAIL: ConsentStatus.GRANTED}


def test_a_body_over_the_limit_gets_413_whether_declared_or_streamed(
    settings: Settings, sessions: sessionmaker[Session], business: Business
) -> None:
    lucia = business.contact(consent=[Channel.EMAIL])
    url = f"/u/{unsubscribe_token(settings, lucia, 'email')}"
    limited = settings.model_copy(update={"max_body_bytes": 2048})
    big = b"List-Unsubscribe=One-Click&pad=" + b"x" * 4096
    form = {"content-type": "application/x-www-form-urlencoded"}

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for start in range(0, len(big), 512):
            yield big[start : start + 512]

    with TestClient(create_app(limited, sessions)) as client:
        assert client.post(url, content=big, headers=form).status_code == 413
        assert client.post(url, content=chunks(), headers=form).status_code == 413
        assert consents(sessions, lucia) == {Channel.EMAIL: ConsentStatus.GRANTED}
        assert client.post(url, data=ONE_CLICK).status_code == 200


def test_the_next_calendar_run_honours_an_unsubscribe_from_email_and_from_a_topic(
    client: TestClient, settings: Settings, sessions: sessionmaker[Session], business: Business
) -> None:
    yesterday = local(MADRID, 2026, 11, 22, 12, 0)
    by_email = business.contact(visits=[yesterday], consent=[Channel.EMAIL])
    by_topic = business.contact(
        visits=[yesterday], consent=[Channel.EMAIL, Channel.SMS], phone="+34612345678"
    )
    control = business.contact(visits=[yesterday], consent=[Channel.EMAIL])
    client.post(f"/u/{unsubscribe_token(settings, by_email, 'email')}", data=ONE_CLICK)
    client.post(f"/u/{unsubscribe_token(settings, by_topic, 'topic:welcome')}", data=ONE_CLICK)

    summary = run(settings, local(MADRID, 2026, 11, 23, 10, 0), touches=["welcome"]).as_dict()

    assert [(s.contact_id, s.status) for s in business.sends()] == [(control, SendStatus.SENT)]
    assert (summary["planned"], summary["sent"], summary["suppressed_consent"]) == (2, 1, 1)


def test_serve_refuses_to_start_with_a_sendgrid_key_that_is_not_one(settings: Settings) -> None:
    result = CliRunner().invoke(app, ["serve"], env={"NURTURE_SENDGRID_WEBHOOK_PUBLIC_KEY": "not a key"})

    assert result.exit_code == 1
    assert "NURTURE_SENDGRID_WEBHOOK_PUBLIC_KEY: not a SendGrid verification key" in result.output


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
def test_nurture_serve_answers_unsubscribe_links_and_twilio_on_its_port(
    settings: Settings, sessions: sessionmaker[Session], business: Business, tmp_path: Path
) -> None:
    lucia = business.contact(locale="es", consent=[Channel.EMAIL, Channel.SMS], phone="+34612345678")
    port = _free_port()
    public = f"http://127.0.0.1:{port}"
    environment = {
        **os.environ,
        "NURTURE_SECRET_KEY": "serve-test-key",
        "NURTURE_PUBLIC_URL": public,
        "NURTURE_TWILIO_AUTH_TOKEN": "serve-test-twilio-token",
    }
    signed = settings.model_copy(update={"secret_key": SecretStr("serve-test-key")})
    url = f"http://127.0.0.1:{port}/u/{unsubscribe_token(signed, lucia, 'email')}"
    nurture = Path(sys.executable).with_name("nurture")
    server = subprocess.Popen(
        [str(nurture), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=environment,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                page = httpx.get(url)
                break
            except httpx.ConnectError:
                assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
                assert time.monotonic() < deadline, "nurture serve did not start within 30 s"
                time.sleep(0.1)
        assert page.status_code == 200
        assert "¿Dejar de recibir correos de Luma Studio?" in page.text
        done = httpx.post(url, data=ONE_CLICK)
        assert done.status_code == 200
        stop = {"MessageSid": "SM" + "1" * 32, "From": "+34612345678", "To": "+34900000000", "Body": " Stop "}
        inbound = f"{public}/webhooks/twilio/inbound"
        signature = RequestValidator("serve-test-twilio-token").compute_signature(inbound, stop)
        assert httpx.post(inbound, data=stop, headers={"X-Twilio-Signature": signature}).status_code == 200
        assert consents(sessions, lucia) == {
            Channel.EMAIL: ConsentStatus.REVOKED,
            Channel.SMS: ConsentStatus.REVOKED,
        }
    finally:
        server.terminate()
        server.wait(timeout=10)
        log = server.stdout.read().decode() if server.stdout else ""
        if server.stdout:
            server.stdout.close()
    # The access log shows the requests, and not the token that would let anyone who reads it change
    # Lucía's consent.
    assert '"GET /u/… HTTP/1.1" 200' in log, log
    assert '"POST /u/… HTTP/1.1" 200' in log, log
    assert url.rsplit("/", 1)[1] not in log, log
