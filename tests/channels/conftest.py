"""Fixtures for the provider channels: fake providers on 127.0.0.1 and settings pointing at them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import fake_providers
import pytest
from fake_providers import FakeProvider, sendgrid_settings

from nurture.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sendgrid_api() -> Iterator[FakeProvider]:
    with fake_providers.sendgrid().running() as server:
        yield server


@pytest.fixture
def twilio_api() -> Iterator[FakeProvider]:
    with fake_providers.twilio().running() as server:
        yield server


@pytest.fixture
def sendgrid_calendar(settings: Settings, tmp_path: Path, sendgrid_api: FakeProvider) -> Settings:
    """Settings for calendar runs emailing through the fake SendGrid: batches of two, no holdout."""
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates", root)
    programme = root / "programme.yaml"
    programme.write_text(programme.read_text().replace("holdout: 0.10", "holdout: 0"))
    return settings.model_copy(
        update=sendgrid_settings(sendgrid_api.url).model_dump(
            include={
                "email_channel",
                "sendgrid_api_key",
                "sendgrid_base_url",
                "email_from",
                "send_backoff_seconds",
                "send_timeout_seconds",
            }
        )
        | {"templates_dir": root, "send_batch_size": 2}
    )
