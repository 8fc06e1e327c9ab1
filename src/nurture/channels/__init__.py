"""Channels: the senders a rendered message leaves nurture through, registered by name.

A channel ("messenger", after listmonk) takes a batch of channel-neutral ``OutgoingMessage`` records and
answers one ``Delivery`` per message. The calendar claims each send in the ledger before calling ``push``
and records the deliveries after it, so a channel never decides what is sent, only how.

Built in: ``outbox`` (both channels; files on disk, see ``nurture.channels.outbox``), ``sendgrid`` (email)
and ``twilio`` (SMS), the last two sending through ``nurture.channels.sending``. A new channel is a
factory registered for a name and a channel::

    @register("sendgrid", Channel.EMAIL)
    class SendGridMessenger:
        def __init__(self, settings: Settings) -> None: ...

and chosen with ``NURTURE_EMAIL_CHANNEL=sendgrid``. A channel in another package registers itself when
imported; an ``nurture.channels`` entry point naming that module gets it imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from typing import Protocol, TypeVar

from nurture.errors import ConfigurationError
from nurture.models import Channel, SendStatus
from nurture.settings import Settings

__all__ = [
    "Delivery",
    "Messenger",
    "MessengerFactory",
    "OutgoingMessage",
    "known_channels",
    "messenger_for",
    "register",
]


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One rendered message for one contact, claimed in the ledger as ``send_id`` and ready to go out."""

    send_id: int
    key: str  # the ledger's idempotency key
    channel: Channel
    to: str  # an email address, or a phone number in E.164
    to_name: str | None
    subject: str | None  # email only
    html: str | None  # email only
    text: str  # the plain-text part of an email, or the body of an SMS
    locale: str
    touch: str
    unsubscribe_url: str | None
    encoding: str | None  # SMS: "GSM-7" or "UCS-2"
    segments: int | None  # SMS: parts the carrier bills


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of one pushed message: sent (with the provider's id), failed, or unknown.

    ``UNKNOWN`` means the provider may have the message (a timeout after the request went out); the
    calendar records it and never resends it by itself. ``CLAIMED`` means the provider was never asked
    for it (the messenger was stopped first): the calendar gives its claim up, for a later run to send.
    """

    send_id: int
    status: SendStatus
    provider_message_id: str | None = None
    error: str | None = None
    # Set when the provider says the contact withdrew consent on this channel (Twilio's 21610): the
    # calendar revokes it, with this as the recorded source, where it records the outcome.
    revoke_consent: str | None = None


class Messenger(Protocol):
    """A channel nurture sends through; one instance serves one run and is closed after it."""

    name: str
    channel: Channel
    # True when pushing the same send_id again cannot deliver a second message (the outbox overwrites
    # its file); False for providers that would send it twice, so that the calendar never re-pushes
    # a send whose outcome it does not know.
    idempotent: bool

    def push(self, messages: Sequence[OutgoingMessage]) -> list[Delivery]:
        """Send a batch; one ``Delivery`` per message, in order; a message's own problem is ``FAILED``."""
        ...

    def stop(self) -> None:
        """Send no more (the run is cancelled): finish what is in flight, answer ``CLAIMED`` for the rest.

        Called from another thread while ``push`` runs. A channel that writes quickly may finish its batch.
        """
        ...

    def close(self) -> None:
        """Release connections and files; the messenger is not used again."""
        ...


MessengerFactory = Callable[[Settings], Messenger]
_Factory = TypeVar("_Factory", bound=MessengerFactory)

# Built-in channels are imported only when chosen, so that a provider's library loads only when used.
_BUILT_IN = {
    "outbox": "nurture.channels.outbox",
    "sendgrid": "nurture.channels.sendgrid",
    "twilio": "nurture.channels.twilio",
}
_ENTRY_POINT_GROUP = "nurture.channels"
_SETTING = {Channel.EMAIL: "email_channel", Channel.SMS: "sms_channel"}
_registry: dict[tuple[Channel, str], MessengerFactory] = {}


def register(name: str, channel: Channel) -> Callable[[_Factory], _Factory]:
    """Register a messenger factory ``(settings) -> Messenger`` as channel ``name`` for ``channel``."""

    def decorate(factory: _Factory) -> _Factory:
        _registry[(channel, name)] = factory
        return factory

    return decorate


def known_channels(channel: Channel) -> list[str]:
    """Names that ``NURTURE_EMAIL_CHANNEL`` or ``NURTURE_SMS_CHANNEL`` can take for ``channel``."""
    _load_all()
    return sorted(name for kind, name in _registry if kind is channel)


def messenger_for(channel: Channel, settings: Settings) -> Messenger:
    """The messenger the settings choose for ``channel``; the caller closes it."""
    setting = _SETTING[channel]
    name: str = getattr(settings, setting)
    if (channel, name) not in _registry:
        _load(name)
    factory = _registry.get((channel, name))
    if factory is None:
        known = ", ".join(known_channels(channel))
        raise ConfigurationError(f"no {channel} channel named {name!r} (known: {known})", setting=setting)
    return factory(settings)


def _load(name: str) -> None:
    if name in _BUILT_IN:
        import_module(_BUILT_IN[name])
        return
    for entry_point in entry_points(group=_ENTRY_POINT_GROUP, name=name):
        entry_point.load()


def _load_all() -> None:
    for module in _BUILT_IN.values():
        import_module(module)
    for entry_point in entry_points(group=_ENTRY_POINT_GROUP):
        entry_point.load()
