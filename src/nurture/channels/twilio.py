"""Twilio: each SMS is one Messages create request, made with the ``twilio`` library's client.

The request carries the number, the body, the Messaging Service (``NURTURE_TWILIO_MESSAGING_SERVICE_SID``) or
the sender number (``NURTURE_TWILIO_FROM``), and a ``StatusCallback`` to nurture's webhook
(``NURTURE_PUBLIC_URL/webhooks/twilio/status``). The message SID Twilio answers with goes into the ledger.
The rate is in segments a second, as Twilio counts them: a three-segment message takes three.

How an answer is read: 2xx is sent; 429 and 5xx are retried (``nurture.channels.sending``); error 21610 (the
recipient replied STOP to this sender) fails the message and withdraws the contact's SMS consent; any other
4xx fails the message with Twilio's code and message. A connection that never opened is retried; a request
that went out and got no answer in ``NURTURE_SEND_TIMEOUT_SECONDS`` is unknown: Twilio may have it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import requests
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from nurture.channels import Delivery, OutgoingMessage, register
from nurture.channels.sending import Retry, Sender, retry_after
from nurture.errors import ConfigurationError
from nurture.models import Channel, SendStatus
from nurture.settings import Settings

OPTED_OUT = 21610  # "Attempt to send to unsubscribed recipient": the contact replied STOP
OPTED_OUT_SOURCE = "twilio 21610"


class _HttpClient(TwilioHttpClient):  # type: ignore[misc]
    """Twilio's own HTTP client, keeping the last answer's headers (for ``Retry-After``)."""

    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        super().__init__()
        # requests takes (connect, read); the base class's check accepts only one number.
        self.timeout = (connect_timeout, read_timeout)
        self.last_headers: Mapping[str, str] = {}

    def request(self, *args: Any, **kwargs: Any) -> Any:
        self.last_headers = {}
        response = super().request(*args, **kwargs)
        self.last_headers = response.headers or {}
        return response


@register("twilio", Channel.SMS)
class TwilioMessenger:
    """Send SMS through Twilio's Messages API."""

    name = "twilio"
    channel = Channel.SMS
    idempotent = False  # a second request is a second SMS

    def __init__(self, settings: Settings) -> None:
        for setting in ("twilio_account_sid", "twilio_auth_token"):
            if not getattr(settings, setting):
                raise ConfigurationError("is required when NURTURE_SMS_CHANNEL=twilio", setting=setting)
        service, number = settings.twilio_messaging_service_sid, settings.twilio_from
        if (service is None) == (number is None):
            raise ConfigurationError(
                "set exactly one of it and NURTURE_TWILIO_FROM", setting="twilio_messaging_service_sid"
            )
        assert settings.twilio_account_sid is not None and settings.twilio_auth_token is not None
        self._account = settings.twilio_account_sid
        self._token = settings.twilio_auth_token.get_secret_value()
        self._sender_params: dict[str, str] = (
            {"messaging_service_sid": service} if service else {"from_": number or ""}
        )
        self._callback = f"{settings.public_url}/webhooks/twilio/status"
        self._base_url = settings.twilio_base_url
        self._timeouts = (settings.send_connect_timeout_seconds, settings.send_timeout_seconds)
        # One client per thread: each keeps its own connection pool and last answer.
        self._local = threading.local()
        self._sender = Sender(
            "Twilio", settings, rate=settings.twilio_rate, concurrency=settings.twilio_concurrency
        )

    def push(self, messages: Sequence[OutgoingMessage]) -> list[Delivery]:
        """Send each SMS with its own request, several in flight, at the configured segments a second."""
        return self._sender.push(messages, self._attempt, units=lambda message: message.segments or 1)

    def request_params(self, message: OutgoingMessage) -> dict[str, str]:
        """Give the arguments of ``messages.create`` for ``message``."""
        if message.channel is not Channel.SMS:
            raise ValueError(f"a {message.channel} message was given to Twilio")
        if not message.to:
            raise ValueError("the contact has no phone number")
        return {
            "to": message.to,
            "body": message.text,
            "status_callback": self._callback,
            **self._sender_params,
        }

    def _client(self) -> tuple[Any, _HttpClient]:
        if not hasattr(self._local, "client"):
            http = _HttpClient(connect_timeout=self._timeouts[0], read_timeout=self._timeouts[1])
            client = Client(self._account, self._token, http_client=http)
            client.api.base_url = self._base_url
            self._local.client, self._local.http = client, http
        return self._local.client, self._local.http

    def _attempt(self, message: OutgoingMessage) -> Delivery:
        try:
            params = self.request_params(message)
        except ValueError as exc:
            return Delivery(message.send_id, SendStatus.FAILED, error=str(exc))
        client, http = self._client()
        try:
            created = client.messages.create(**params)
        except (TwilioRestException, TwilioServiceException) as error:
            status, code = int(error.status), error.code
            detail = (
                getattr(error, "msg", None) or getattr(error, "detail", None) or getattr(error, "title", "")
            )
            said = f"Twilio answered {status}, error {code}: {detail}"
            if status == 429 or status >= 500:
                raise Retry(said, retry_after=retry_after(http.last_headers.get("Retry-After"))) from None
            if code == OPTED_OUT:
                return Delivery(
                    message.send_id, SendStatus.FAILED, error=said, revoke_consent=OPTED_OUT_SOURCE
                )
            return Delivery(message.send_id, SendStatus.FAILED, error=said)
        except requests.RequestException as error:
            if _never_sent(error):
                raise Retry(f"could not reach Twilio: {error}") from None
            said = f"no answer from Twilio after the request went out ({type(error).__name__}: {error})"
            return Delivery(message.send_id, SendStatus.UNKNOWN, error=said)
        return Delivery(message.send_id, SendStatus.SENT, provider_message_id=created.sid)

    def stop(self) -> None:
        """Start no more requests; the ones in flight finish (see ``Sender.stop``)."""
        self._sender.stop()

    def close(self) -> None:
        """Finish the requests in flight."""
        self._sender.close()


def _never_sent(error: requests.RequestException) -> bool:
    """Tell whether the request certainly never reached Twilio: the connection itself could not be made."""
    if isinstance(error, requests.ConnectTimeout):
        return True
    if not isinstance(error, requests.ConnectionError):
        return False
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return isinstance(reason, NewConnectionError | ConnectTimeoutError)
