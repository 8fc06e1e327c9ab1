from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from nurture.channels import Delivery, OutgoingMessage, known_channels, messenger_for, register
from nurture.channels.outbox import EmailOutbox, SmsOutbox
from nurture.errors import ConfigurationError
from nurture.models import Channel, SendStatus
from nurture.settings import Settings


def settings_with(tmp_path: Path, **values: str) -> Settings:
    return Settings(_env_file=None, outbox_dir=tmp_path / "outbox", **values)  # type: ignore[call-arg]


def test_the_outbox_sends_both_channels_by_default(tmp_path: Path) -> None:
    settings = settings_with(tmp_path)

    email = messenger_for(Channel.EMAIL, settings)
    sms = messenger_for(Channel.SMS, settings)

    assert isinstance(email, EmailOutbox) and isinstance(sms, SmsOutbox)
    assert (email.name, email.channel, sms.name, sms.channel) == ("outbox", "email", "outbox", "sms")


def test_an_unknown_channel_name_names_the_setting_and_the_known_ones(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, sms_channel="carrier-pigeon")

    with pytest.raises(ConfigurationError) as raised:
        messenger_for(Channel.SMS, settings)

    assert "NURTURE_SMS_CHANNEL" in str(raised.value)
    assert "carrier-pigeon" in str(raised.value)
    assert "outbox" in str(raised.value)


def test_the_environment_chooses_the_channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NURTURE_EMAIL_CHANNEL", "nowhere")

    with pytest.raises(ConfigurationError, match="NURTURE_EMAIL_CHANNEL"):
        messenger_for(Channel.EMAIL, Settings(_env_file=None))  # type: ignore[call-arg]


@register("test-recorder", Channel.EMAIL)
class Recorder:
    """A channel registered the way a new provider would be."""

    name = "test-recorder"
    channel = Channel.EMAIL
    idempotent = False

    def __init__(self, settings: Settings) -> None:
        self.sender = settings.email_from
        self.pushed: list[OutgoingMessage] = []

    def push(self, messages: Sequence[OutgoingMessage]) -> list[Delivery]:
        self.pushed.extend(messages)
        return [Delivery(message.send_id, SendStatus.SENT, f"rec-{message.send_id}") for message in messages]

    def close(self) -> None:
        pass


def test_a_registered_channel_is_chosen_by_its_name_for_its_channel_only(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, email_channel="test-recorder", sms_channel="test-recorder")

    messenger = messenger_for(Channel.EMAIL, settings)

    assert isinstance(messenger, Recorder)
    assert messenger.sender == settings.email_from
    assert "test-recorder" in known_channels(Channel.EMAIL)
    assert "test-recorder" not in known_channels(Channel.SMS)
    with pytest.raises(ConfigurationError, match="NURTURE_SMS_CHANNEL"):
        messenger_for(Channel.SMS, settings)
