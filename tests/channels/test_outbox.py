from __future__ import annotations

import dataclasses
import email
import json
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from nurture.channels import Delivery, OutgoingMessage, messenger_for
from nurture.channels.outbox import EmailOutbox, SmsOutbox, message_path
from nurture.errors import ConfigurationError
from nurture.models import Channel, SendStatus
from nurture.settings import Settings
from nurture.tokens import unsubscribe_url


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(_env_file=None, outbox_dir=tmp_path / "outbox")  # type: ignore[call-arg]


def an_email(settings: Settings, send_id: int = 41, **changes: object) -> OutgoingMessage:
    message = OutgoingMessage(
        send_id=send_id,
        key=f"c{send_id}:welcome:1",
        channel=Channel.EMAIL,
        to=f"ana{send_id}@example.com",
        to_name="Ana Souza",
        subject="Thanks for your visit",
        html="<p>Hello Ana,</p><p>thanks for coming by.</p>",
        text="Hello Ana,\nthanks for coming by.\n",
        locale="en",
        touch="welcome",
        unsubscribe_url=unsubscribe_url(settings, send_id),
        encoding=None,
        segments=None,
    )
    return dataclasses.replace(message, **changes)  # type: ignore[arg-type]


def an_sms(send_id: int = 7, **changes: object) -> OutgoingMessage:
    message = OutgoingMessage(
        send_id=send_id,
        key=f"c{send_id}:incentive:1",
        channel=Channel.SMS,
        to="+34612345678",
        to_name="Begoña",
        subject=None,
        html=None,
        text="Begoña, tu próxima cita tiene un 15% de descuento.",
        locale="es",
        touch="incentive",
        unsubscribe_url=None,
        encoding="UCS-2",
        segments=1,
    )
    return dataclasses.replace(message, **changes)  # type: ignore[arg-type]


def read_email(settings: Settings, send_id: int) -> EmailMessage:
    raw = message_path(settings, Channel.EMAIL, send_id).read_bytes()
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert not parsed.defects
    return parsed


def test_an_email_is_a_multipart_alternative_message_with_text_then_html(settings: Settings) -> None:
    message = an_email(settings)
    outbox = EmailOutbox(settings)

    [delivery] = outbox.push([message])

    assert delivery == Delivery(41, SendStatus.SENT, provider_message_id="41.eml")
    parsed = read_email(settings, 41)
    assert parsed.get_content_type() == "multipart/alternative"
    text, html = parsed.iter_parts()
    assert isinstance(text, EmailMessage) and isinstance(html, EmailMessage)
    assert (text.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert not text.defects and not html.defects
    assert text.get_content() == message.text
    assert html.get_content() == message.html
    assert text.get_content_charset() == html.get_content_charset() == "utf-8"


def test_an_email_carries_the_headers_mail_providers_and_nurture_need(settings: Settings) -> None:
    message = an_email(settings)
    EmailOutbox(settings).push([message])

    parsed = read_email(settings, 41)
    assert parsed["From"] == "nurture demo <hello@example.com>"
    assert parsed["To"] == "Ana Souza <ana41@example.com>"
    assert parsed["Subject"] == "Thanks for your visit"
    assert parsed["List-Unsubscribe"] == f"<{message.unsubscribe_url}>"
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parsed["X-Nurture-Send-Id"] == "41"
    assert parsed["X-Nurture-Touch"] == "welcome"
    assert parsed["Message-ID"].endswith("@example.com>")
    assert parsed["Date"].datetime is not None
    assert parsed["Reply-To"] is None


def test_the_sender_and_reply_to_come_from_the_settings(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        outbox_dir=tmp_path,
        email_from="Salão Bela <ola@bela.pt>",
        email_reply_to="recepcao@bela.pt",
    )
    EmailOutbox(settings).push([an_email(settings)])

    parsed = read_email(settings, 41)
    assert parsed["From"].addresses[0].display_name == "Salão Bela"
    assert parsed["From"].addresses[0].addr_spec == "ola@bela.pt"
    assert parsed["Reply-To"] == "recepcao@bela.pt"
    assert parsed["Message-ID"].endswith("@bela.pt>")


@pytest.mark.parametrize(
    ("name", "subject"),
    [
        ("Begoña Muñoz", "¡Feliz cumpleaños, Begoña!"),
        ("João Gonçalves", "Sentimos a sua falta, João: volte com 20% de desconto"),
        ("Ana 🌸", "Your gift is waiting 🎁✨"),
        ('O\'Brien, "Pat" Jr.', "Ready for your next visit?"),
        (
            "Zoë Łukasiewicz-Çelik",
            "Un asunto largo con acentos: ¿cuándo volverás a visitarnos en la peluquería de la esquina? 💇‍♀️",
        ),
    ],
)
def test_names_and_subjects_in_any_script_reach_the_reader_unchanged(
    settings: Settings, name: str, subject: str
) -> None:
    EmailOutbox(settings).push([an_email(settings, to_name=name, subject=subject)])

    raw = message_path(settings, Channel.EMAIL, 41).read_bytes()
    assert raw.isascii()
    head = raw.split(b"\r\n\r\n")[0].decode("ascii")
    folded = head[head.index("\r\nTo:") : head.index("\r\nDate:")]
    assert all(len(line) <= 78 for line in folded.split("\r\n"))
    parsed = read_email(settings, 41)
    assert parsed["Subject"] == subject
    assert parsed["To"].addresses[0].display_name == name
    assert parsed["To"].addresses[0].addr_spec == "ana41@example.com"


def test_non_ascii_bodies_decode_to_the_rendered_text(settings: Settings) -> None:
    html = "<p>Olá João, a sua próxima visita tem 15% de desconto 🎁</p>" * 40
    EmailOutbox(settings).push([an_email(settings, html=html, text="Olá João ção ñ 🎁\n" * 40)])

    _, html_part = read_email(settings, 41).iter_parts()
    assert isinstance(html_part, EmailMessage)
    assert html_part.get_content() == html


def test_a_line_break_in_a_subject_cannot_add_a_header(settings: Settings) -> None:
    EmailOutbox(settings).push([an_email(settings, subject="Hi\r\nBcc: everyone@example.com")])

    parsed = read_email(settings, 41)
    assert parsed["Bcc"] is None
    assert "Bcc: everyone@example.com" in parsed["Subject"]


def test_an_email_without_html_is_plain_text(settings: Settings) -> None:
    EmailOutbox(settings).push([an_email(settings, html=None)])

    parsed = read_email(settings, 41)
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content() == "Hello Ana,\nthanks for coming by.\n"
    assert parsed["X-Nurture-Send-Id"] == "41"


def test_an_sms_is_a_json_file_with_its_encoding_and_segments(settings: Settings) -> None:
    message = an_sms()

    [delivery] = SmsOutbox(settings).push([message])

    assert delivery == Delivery(7, SendStatus.SENT, provider_message_id="7.json")
    path = message_path(settings, Channel.SMS, 7)
    assert path == settings.outbox_dir / "sms" / "7.json"
    written = json.loads(path.read_text(encoding="utf-8"))
    assert written["to"] == "+34612345678"
    assert written["body"] == "Begoña, tu próxima cita tiene un 15% de descuento."
    assert (written["encoding"], written["segments"]) == ("UCS-2", 1)
    assert (written["send_id"], written["touch"]) == (7, "incentive")


@pytest.mark.parametrize("channel", [Channel.EMAIL, Channel.SMS])
def test_pushing_the_same_send_again_replaces_its_one_file(settings: Settings, channel: Channel) -> None:
    outbox = messenger_for(channel, settings)
    first = an_email(settings) if channel is Channel.EMAIL else an_sms(41)
    second = dataclasses.replace(first, text="The second rendering.")

    outbox.push([first])
    [delivery] = outbox.push([second])
    outbox.close()

    assert outbox.idempotent
    assert delivery.status is SendStatus.SENT
    folder = message_path(settings, channel, 41).parent
    assert [path.name for path in folder.iterdir()] == [delivery.provider_message_id]
    content = message_path(settings, channel, 41).read_bytes()
    if channel is Channel.EMAIL:
        text, _ = read_email(settings, 41).iter_parts()
        assert isinstance(text, EmailMessage)
        assert text.get_content() == "The second rendering."
    else:
        assert json.loads(content)["body"] == "The second rendering."


def test_a_message_that_cannot_be_written_fails_alone(settings: Settings) -> None:
    batch = [
        an_email(settings, 1),
        an_email(settings, 2, to="not an address"),
        an_sms(3),
        an_email(settings, 4),
    ]

    deliveries = EmailOutbox(settings).push(batch)

    assert [delivery.send_id for delivery in deliveries] == [1, 2, 3, 4]
    assert [delivery.status for delivery in deliveries] == [
        SendStatus.SENT,
        SendStatus.FAILED,
        SendStatus.FAILED,
        SendStatus.SENT,
    ]
    assert "not an address" in (deliveries[1].error or "")
    assert "sms" in (deliveries[2].error or "")
    assert sorted(path.name for path in (settings.outbox_dir / "email").iterdir()) == ["1.eml", "4.eml"]


def test_an_sms_to_a_number_not_in_e164_fails(settings: Settings) -> None:
    [delivery] = SmsOutbox(settings).push([an_sms(to="612 345 678")])

    assert delivery.status is SendStatus.FAILED
    assert "E.164" in (delivery.error or "")


def test_an_outbox_folder_that_cannot_be_made_names_the_setting(tmp_path: Path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    settings = Settings(_env_file=None, outbox_dir=blocker)  # type: ignore[call-arg]

    with pytest.raises(ConfigurationError, match="NURTURE_OUTBOX_DIR"):
        EmailOutbox(settings)
