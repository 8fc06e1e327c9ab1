"""Fixtures for the provider channels: fake providers on 127.0.0.1 and settings pointing at them."""

from __future__ import annotations

from collections.abc import Iterator

import fake_providers
import pytest
from fake_providers import FakeProvider


@pytest.fixture
def sendgrid_api() -> Iterator[FakeProvider]:
    with fake_providers.sendgrid().running() as server:
        yield server


@pytest.fixture
def twilio_api() -> Iterator[FakeProvider]:
    with fake_providers.twilio().running() as server:
        yield server
