"""Test sends through SendGrid and Twilio: the seed gets the message, the ledger gets nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_providers import FakeProvider
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from nurture.cli import app
from nurture.models import Send
from nurture.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_a_test_email_goes_through_sendgrid_to_the_seed_only(
    settings: Settings,
    sessions: sessionmaker[Session],
    sendgrid_api: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NURTURE_EMAIL_CHANNEL", "sendgrid")
    monkeypatch.setenv("NURTURE_SENDGRID_API_KEY", "SG.test-key")
    monkeypatch.setenv("NURTURE_SENDGRID_BASE_URL", sendgrid_api.url)
    result = CliRunner().invoke(
        app, ["templates", "test-send", "promotion", "--persona", "lucia", "--to", "seed@luma.example"]
    )
    assert result.exit_code == 0, result.output
    assert "through sendgrid, message id sg-1" in result.output
    [request] = sendgrid_api.requests
    assert sendgrid_api.invalid == []
    [personalization] = request.body["personalizations"]
    assert personalization["to"] == [{"email": "seed@luma.example", "name": "Lucía Fernández"}]
    assert "Lucía" in request.body["subject"]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Send)) == 0


def test_a_test_sms_goes_through_twilio(
    settings: Settings, twilio_api: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NURTURE_SMS_CHANNEL", "twilio")
    monkeypatch.setenv("NURTURE_TWILIO_ACCOUNT_SID", "AC" + "0" * 32)
    monkeypatch.setenv("NURTURE_TWILIO_AUTH_TOKEN", "secret")
    monkeypatch.setenv("NURTURE_TWILIO_FROM", "+15005550006")
    monkeypatch.setenv("NURTURE_TWILIO_BASE_URL", twilio_api.url)
    result = CliRunner().invoke(app, ["templates", "test-send", "welcome", "--to", "+1 212 555 0123"])
    assert result.exit_code == 0, result.output
    [request] = twilio_api.requests
    assert twilio_api.invalid == []
    assert request.body["To"] == "+12125550123"
    assert request.body["Body"].startswith("Luma Studio: thanks for your first visit, Emma!")
