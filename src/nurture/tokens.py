"""Unsubscribe tokens: a contact and a scope, signed (HMAC-SHA256) with ``NURTURE_SECRET_KEY``.

A token is ``<payload>.<signature>``, both URL-safe base64, where the payload is ``<contact id>:<scope>``.
It does not expire, so that the link in an old email still unsubscribes; it cannot be forged or
enumerated without the secret key. Changing the key invalidates every link already sent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

from itsdangerous import BadData, Signer
from itsdangerous.encoding import base64_decode, base64_encode

from nurture.errors import BadToken
from nurture.models import Channel
from nurture.settings import Settings

_SALT = "nurture.unsubscribe"
_CHANNEL_SCOPES = frozenset(channel.value for channel in Channel)
_TOPIC = "topic:"


@dataclass(frozen=True, slots=True)
class UnsubscribeToken:
    """Who asked to unsubscribe, and from what: ``"email"``, ``"sms"`` or ``"topic:<name>"``."""

    contact_id: int
    scope: str

    @property
    def channel(self) -> Channel | None:
        """The channel to revoke consent on, when the scope is a whole channel."""
        return Channel(self.scope) if self.scope in _CHANNEL_SCOPES else None

    @property
    def topic(self) -> str | None:
        """The topic to unsubscribe from, when the scope is one topic."""
        return self.scope.removeprefix(_TOPIC) if self.scope.startswith(_TOPIC) else None


def unsubscribe_token(settings: Settings, contact_id: int, scope: str = "email") -> str:
    """A signed, URL-safe token that unsubscribes ``contact_id`` from ``scope``."""
    if not _valid_scope(scope):
        raise ValueError(f"unsubscribe scope must be 'email', 'sms' or 'topic:<name>', not {scope!r}")
    payload = base64_encode(f"{contact_id}:{scope}".encode())
    return _signer(settings.secret_key.get_secret_value()).sign(payload).decode("ascii")


def unsubscribe_url(settings: Settings, contact_id: int, scope: str = "email") -> str:
    """The link that unsubscribes ``contact_id`` from ``scope``: ``<public_url>/u/<token>``."""
    return f"{settings.public_url}/u/{unsubscribe_token(settings, contact_id, scope)}"


def read_unsubscribe_token(settings: Settings, token: str) -> UnsubscribeToken:
    """Check a token's signature and read it; raise ``BadToken`` for anything this key did not sign."""
    try:
        payload = _signer(settings.secret_key.get_secret_value()).unsign(token)
        contact, _, scope = base64_decode(payload).decode().partition(":")
    except (BadData, UnicodeError) as exc:
        raise BadToken() from exc
    if not (contact.isascii() and contact.isdigit()) or not _valid_scope(scope):
        # Signed by us yet unreadable: only a token from a future version of this format.
        raise BadToken("unreadable token")
    return UnsubscribeToken(int(contact), scope)


def _valid_scope(scope: str) -> bool:
    return scope in _CHANNEL_SCOPES or (scope.startswith(_TOPIC) and len(scope) > len(_TOPIC))


class _Signer(Signer):
    """A signer that derives its key once instead of on every signature."""

    def __init__(self, secret_key: str) -> None:
        super().__init__(secret_key, salt=_SALT, digest_method=hashlib.sha256)
        self._key = super().derive_key()

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        if secret_key is None or secret_key == self.secret_keys[-1]:
            return self._key
        return super().derive_key(secret_key)


@lru_cache(maxsize=4)
def _signer(secret_key: str) -> _Signer:
    return _Signer(secret_key)
