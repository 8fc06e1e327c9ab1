from __future__ import annotations

import re

import pytest
from pydantic import SecretStr

from nurture.errors import BadToken
from nurture.models import Channel
from nurture.settings import Settings
from nurture.tokens import UnsubscribeToken, read_unsubscribe_token, unsubscribe_token, unsubscribe_url


@pytest.fixture
def settings() -> Settings:
    return Settings(_env_file=None, secret_key=SecretStr("a" * 40))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("scope", "channel", "topic"),
    [("email", Channel.EMAIL, None), ("sms", Channel.SMS, None), ("topic:promociones", None, "promociones")],
)
def test_a_token_reads_back_as_its_contact_and_scope(
    settings: Settings, scope: str, channel: Channel | None, topic: str | None
) -> None:
    token = unsubscribe_token(settings, 123456, scope)

    read = read_unsubscribe_token(settings, token)

    assert read == UnsubscribeToken(123456, scope)
    assert (read.channel, read.topic) == (channel, topic)


def test_the_link_is_the_public_url_and_a_url_safe_token(settings: Settings) -> None:
    settings = settings.model_copy(update={"public_url": "https://mail.salon.example"})

    url = unsubscribe_url(settings, 42)

    prefix = "https://mail.salon.example/u/"
    assert url.startswith(prefix)
    token = url.removeprefix(prefix)
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", token)
    assert read_unsubscribe_token(settings, token) == UnsubscribeToken(42, "email")


def test_a_public_url_with_a_trailing_slash_makes_no_double_slash() -> None:
    settings = Settings(_env_file=None, public_url="https://example.com/nurture/")  # type: ignore[call-arg]

    assert unsubscribe_url(settings, 1).startswith("https://example.com/nurture/u/")


def test_a_tampered_token_is_refused(settings: Settings) -> None:
    token = unsubscribe_token(settings, 7)
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")

    with pytest.raises(BadToken):
        read_unsubscribe_token(settings, flipped)


def test_the_next_contact_cannot_be_reached_by_editing_a_token(settings: Settings) -> None:
    mine = unsubscribe_token(settings, 7)
    neighbour = unsubscribe_token(settings, 8)
    forged = neighbour.split(".")[0] + "." + mine.split(".")[1]

    with pytest.raises(BadToken):
        read_unsubscribe_token(settings, forged)


def test_a_token_signed_with_another_key_is_refused(settings: Settings) -> None:
    other = settings.model_copy(update={"secret_key": SecretStr("b" * 40)})
    token = unsubscribe_token(other, 7)

    with pytest.raises(BadToken):
        read_unsubscribe_token(settings, token)


@pytest.mark.parametrize("garbage", ["", "abc", "a.b", "!!!.???", "7", "Nw.", "ñ.ñ"])
def test_garbage_is_refused(settings: Settings, garbage: str) -> None:
    with pytest.raises(BadToken):
        read_unsubscribe_token(settings, garbage)


@pytest.mark.parametrize("scope", ["mail", "topic:", "", "EMAIL"])
def test_an_unknown_scope_cannot_be_signed(settings: Settings, scope: str) -> None:
    with pytest.raises(ValueError, match="scope"):
        unsubscribe_token(settings, 1, scope)
