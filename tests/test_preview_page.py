"""The /preview page of nurture serve: behind the API key, every message for the personas, lint included."""

from __future__ import annotations

import datetime as dt
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
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from browser import browser
from nurture.settings import Settings
from nurture.sms import encode_info
from nurture.web import create_app

REPO = Path(__file__).resolve().parent.parent
KEY = "preview-test-key"
TOUCHES = 11
NOW = dt.datetime(2026, 11, 23, 12, tzinfo=dt.UTC)


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates", root)
    return root


@pytest.fixture
def client(settings: Settings, sessions: sessionmaker[Session], templates: Path) -> Iterator[TestClient]:
    keyed = settings.model_copy(update={"api_key": SecretStr(KEY), "templates_dir": templates})
    with TestClient(create_app(keyed, sessions, clock=lambda: NOW)) as client:
        yield client


BEARER = {"Authorization": f"Bearer {KEY}"}


def test_without_an_api_key_the_page_is_off(settings: Settings, sessions: sessionmaker[Session]) -> None:
    with TestClient(create_app(settings, sessions)) as client:
        answer = client.get("/preview", headers=BEARER)
    assert answer.status_code == 503
    assert "NURTURE_API_KEY is not set" in answer.text


def test_without_the_key_only_the_login_form_shows(client: TestClient) -> None:
    for answer in (
        client.get("/preview"),
        client.get("/preview/welcome"),
        client.get("/preview", headers={"Authorization": "Bearer wrong"}),
    ):
        assert answer.status_code == 401
        assert '<input type="password" name="key"' in answer.text
        assert "Luma Studio" not in answer.text
    wrong = client.post("/preview/login", data={"key": "wrong"})
    assert wrong.status_code == 401 and "That is not the API key." in wrong.text
    assert "nurture_preview" not in client.cookies


def test_the_login_cookie_opens_the_page_until_the_key_changes(
    settings: Settings, sessions: sessionmaker[Session], client: TestClient
) -> None:
    answer = client.post("/preview/login", data={"key": KEY}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/preview"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/preview" in cookie
    assert client.get("/preview/birthday?persona=lucia&locale=es").status_code == 200
    rotated = settings.model_copy(update={"api_key": SecretStr("a-new-key")})
    with TestClient(create_app(rotated, sessions)) as other:
        other.cookies.update(client.cookies)
        assert other.get("/preview/birthday").status_code == 401


def test_one_message_in_full(client: TestClient) -> None:
    answer = client.get("/preview/winback?persona=lucia&locale=es&channel=sms&step=3", headers=BEARER)
    assert answer.status_code == 200
    assert "Lucía, un último mensaje" in answer.text
    assert 'id="template">messages/winback/es/sms.txt' in answer.text
    email = client.get("/preview/promotion?persona=joao&channel=email", headers=BEARER)
    assert 'sandbox srcdoc="&lt;!doctype html&gt;' in email.text  # the HTML part, escaped into the frame
    assert email.headers["content-security-policy"].startswith("default-src 'none'")
    assert client.get("/preview/welcome", headers={"X-API-Key": KEY}).status_code == 200  # as the API
    assert client.get("/preview/nothing", headers=BEARER).status_code == 404
    assert client.get("/preview/welcome?persona=nobody", headers=BEARER).status_code == 404


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
def test_the_preview_page_in_chromium(tmp_path: Path, templates: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    environment = {
        **os.environ,
        "NURTURE_API_KEY": KEY,
        "NURTURE_TEMPLATES_DIR": str(templates),
        "NURTURE_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "NURTURE_PUBLIC_URL": base,
    }
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("nurture")), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=environment,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/preview")
                break
            except httpx.ConnectError:
                assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
                assert time.monotonic() < deadline, "nurture serve did not start within 60 s"
                time.sleep(0.1)
        with browser(timeout=180) as page:
            page.goto(f"{base}/preview")
            assert page.evaluate("document.querySelectorAll('#messages').length") == 0
            page.submit("form", key="not the key")
            assert page.text("#wrong-key") == "That is not the API key."
            page.submit("form", key=KEY)

            # Every touch, in every locale, on both channels, for the first persona.
            assert page.evaluate("location.pathname") == "/preview"
            assert page.text("#lint h2") == "Lint: 0 errors, 0 warnings"
            assert page.evaluate("document.querySelectorAll('#personas a').length") == 5
            assert page.evaluate("document.querySelectorAll('#messages tbody tr').length") == TOUCHES
            headings = page.evaluate(
                "[...document.querySelectorAll('#messages thead th')].map(t => t.innerText)"
            )
            assert headings == [
                "touch",
                *[f"{locale} · {c}" for locale in ("en", "es", "pt") for c in ("email", "sms")],
            ]
            cells = page.evaluate(
                "[...document.querySelectorAll('td.cell.sms')].map(c => [c.closest('tr').dataset.touch,"
                " c.dataset.locale, c.querySelector('a.sms').innerText, c.dataset.encoding,"
                " c.dataset.segments])"
            )
            assert len(cells) == 8 * 3  # eight touches send SMS
            for touch, locale, text, encoding, segments in cells:
                info = encode_info(text)
                assert (encoding, int(segments)) == (info.encoding, info.segments), (touch, locale)
            assert page.evaluate("document.querySelectorAll('td.cell.error').length") == 0

            # Another persona, then one message in full.
            page.click("#personas a[data-persona=joao]")
            assert page.evaluate("location.search") == "?persona=joao"
            assert "São Paulo" in page.text("#description")
            page.goto(f"{base}/preview/birthday?persona=joao&locale=pt&channel=email")
            assert "João" in page.text("#subject")
            assert "João" in page.evaluate("document.querySelector('#html').getAttribute('srcdoc')")

            # A marketer's edit shows on the next reload, with what lint says about it.
            sms = templates / "messages/welcome/en/sms.txt"
            sms.write_text(sms.read_text().replace("How did it go?", "How\u2019d it go?"))
            page.goto(f"{base}/preview?persona=emma")
            assert page.text("#lint h2").startswith("Lint: 1 error")
            finding = page.text("#lint li.error")
            assert finding.startswith(f"{sms}:3 '\u2019' (RIGHT SINGLE QUOTATION MARK) makes this SMS UCS-2")
            cell = "tr[data-touch=welcome] td.cell.sms[data-locale=en]"
            assert page.evaluate(f"document.querySelector('{cell}').dataset.encoding") == "UCS-2"
    finally:
        server.terminate()
        server.wait(timeout=10)
        if server.stdout:
            server.stdout.close()
