"""Previews: a touch rendered for a persona or a real contact as a run would, and test sends of it.

A preview goes through the calendar's own context (``Calendar.preview_context``), so it shows what
that customer would be sent now. A test send pushes a preview through the configured channel to a seed
address: nothing is written to the database, so it is never in the ledger, never counted by the caps or
by attribution, and its unsubscribe link unsubscribes nobody (it names no contact).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email

from nurture.calendar import Calendar, ContactPreview, Recipient
from nurture.channels import Delivery, OutgoingMessage, messenger_for
from nurture.errors import BadAddress, UnknownPersona, UnknownTouch
from nurture.models import Channel, SendCategory
from nurture.personas import Persona, load_personas
from nurture.programme import Lapsed, Programme, Touch, load_programme
from nurture.rendering import RenderedMessage, Renderer
from nurture.settings import Settings

TEST_SENDS = "test-sends"  # the outbox's folder for test sends, beside email/ and sms/


@dataclass(frozen=True, slots=True)
class Preview:
    """One touch rendered for one recipient on one channel."""

    touch: Touch
    channel: Channel
    who: str  # "persona lucia" or "contact C-1042"
    recipient: Recipient
    message: RenderedMessage
    context: dict[str, Any]


class Previewer:
    """Render the programme's touches for personas and contacts as a run at ``at`` would."""

    def __init__(self, settings: Settings, at: dt.datetime) -> None:
        self.settings = settings
        self.at = at
        self.programme: Programme = load_programme(settings.templates_dir)
        self.calendar = Calendar(settings, self.programme, at, dry_run=True)
        self.renderer: Renderer = self.calendar.renderer
        self._personas: dict[str, Persona] | None = None

    @property
    def personas(self) -> dict[str, Persona]:
        """The personas of ``personas.yaml``, loaded once."""
        if self._personas is None:
            self._personas = load_personas(self.settings.templates_dir)
        return self._personas

    def touch(self, name: str) -> Touch:
        """Give the programme's touch called ``name``."""
        try:
            return self.programme.touch(name)
        except KeyError:
            raise UnknownTouch([name], known=[t.name for t in self.programme.touches]) from None

    def steps(self, touch: Touch) -> list[int | None]:
        """The steps a touch has: 1 to 3 for a win-back, none otherwise."""
        if isinstance(touch.trigger, Lapsed):
            return list(range(1, len(touch.trigger.steps) + 1))
        return [None]

    def persona(self, name: str) -> Persona:
        """Give the persona called ``name``."""
        if name not in self.personas:
            raise UnknownPersona(name, known=list(self.personas))
        return self.personas[name]

    def for_persona(
        self,
        touch_name: str,
        channel: Channel,
        name: str,
        *,
        locale: str | None = None,
        step: int | None = None,
    ) -> Preview:
        """Render ``touch_name`` on ``channel`` for the persona ``name`` (in ``locale`` if given)."""
        persona = self.persona(name)
        recipient = persona.recipient(name, self.at, locale=locale)
        return self._render(
            touch_name,
            channel,
            recipient,
            f"persona {name}",
            tags=persona.tags,
            friend=persona.friend,
            step=step,
        )

    def for_contact(
        self,
        touch_name: str,
        channel: Channel,
        contact: ContactPreview,
        *,
        locale: str | None = None,
        step: int | None = None,
        anonymous: bool = False,
    ) -> Preview:
        """Render ``touch_name`` on ``channel`` for a real contact, as the next run would send it.

        ``anonymous`` renders it for no contact id, so that its unsubscribe link unsubscribes nobody:
        what a test send to a seed address needs.
        """
        recipient = contact.recipient
        if locale is not None:
            recipient = dataclasses.replace(recipient, locale=locale)
        if anonymous:
            recipient = dataclasses.replace(recipient, id=0)
        return self._render(
            touch_name,
            channel,
            recipient,
            f"contact {recipient.external_id}",
            tags=contact.tags,
            friend=contact.friend,
            step=step,
            had=contact.had.get(touch_name, set()),
        )

    def _render(
        self,
        touch_name: str,
        channel: Channel,
        recipient: Recipient,
        who: str,
        *,
        tags: list[str],
        friend: str | None,
        step: int | None,
        had: set[str] | None = None,
    ) -> Preview:
        touch = self.touch(touch_name)
        context = self.calendar.preview_context(
            recipient, touch, channel, tags=tags, step=step, friend=friend, had=had or set()
        )
        message = self.renderer.render(touch.name, channel, recipient.locale, context)
        return Preview(touch, channel, who, recipient, message, context)


def seed_address(channel: Channel, to: str) -> str:
    """Check a test send's seed address for ``channel``; give it normalised (E.164 for a phone)."""
    if channel is Channel.EMAIL:
        try:
            return str(validate_email(to, check_deliverability=False).normalized)
        except EmailNotValidError as exc:
            raise BadAddress(f"not an email address: {exc}", address=to) from None
    try:
        number = phonenumbers.parse(to, None)
    except phonenumbers.NumberParseException:
        raise BadAddress("not a phone number in international format (+34 612 345 678)", address=to) from None
    if not phonenumbers.is_valid_number(number):
        raise BadAddress("not a valid phone number", address=to)
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def send_test(settings: Settings, preview: Preview, to: str) -> Delivery:
    """Send ``preview`` to the seed address ``to`` through the configured channel; record nothing."""
    if preview.recipient.id != 0:
        # Its unsubscribe link would unsubscribe the real contact from a seed inbox.
        raise ValueError("a test send is rendered for no contact: Previewer.for_contact(..., anonymous=True)")
    address = seed_address(preview.channel, to)
    recipient, message = preview.recipient, preview.message
    name = " ".join(part for part in (recipient.first_name, recipient.last_name) if part) or None
    # A send id no ledger row has: the outbox names the file by it; SendGrid's events bring it back
    # and find no send to attach to.
    send_id = time.time_ns() // 1_000_000
    outgoing = OutgoingMessage(
        send_id=send_id,
        key=f"test:{preview.touch.name}:{send_id}",
        channel=preview.channel,
        to=address,
        to_name=name,
        subject=message.subject,
        html=message.html,
        text=message.text,
        locale=message.locale,
        touch=preview.touch.name,
        unsubscribe_url=preview.context["links"]["unsubscribe"]
        if preview.touch.category is SendCategory.MARKETING
        else None,
        encoding=message.encoding,
        segments=message.segments,
    )
    channel_settings = settings.model_copy(update={"outbox_dir": Path(settings.outbox_dir) / TEST_SENDS})
    messenger = messenger_for(preview.channel, channel_settings)
    try:
        return messenger.push([outgoing])[0]
    finally:
        messenger.close()
