"""SendGrid: each email is one v3 Mail Send request, made with the ``sendgrid`` library's client.

The request carries the sender (``NURTURE_EMAIL_FROM``) and reply-to, the subject, the text and HTML parts,
``custom_args`` with the send id under ``nurture_send_id`` (SendGrid's event webhook hands it back), the touch
as a category, the unsubscribe group when ``NURTURE_SENDGRID_UNSUBSCRIBE_GROUP`` is set, and for marketing
the ``List-Unsubscribe`` and ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` headers (RFC 8058). The
``X-Message-Id`` SendGrid answers with goes into the ledger.

How an answer is read: 2xx is sent; 429 and 5xx are retried (``nurture.channels.sending``); any other 4xx
fails the message with SendGrid's own error. A connection that never opened is retried; a request that went
out and got no answer in ``NURTURE_SEND_TIMEOUT_SECONDS`` is unknown: SendGrid may have it.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Sequence
from email.utils import parseaddr
from typing import Any
from urllib.error import URLError

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import (
    Asm,
    Category,
    CustomArg,
    From,
    GroupId,
    Header,
    Mail,
    ReplyTo,
    To,
)

from nurture.channels import Delivery, OutgoingMessage, register
from nurture.channels.sending import Retry, Sender, retry_after
from nurture.errors import ConfigurationError
from nurture.models import Channel, SendStatus
from nurture.settings import Settings

SEND_ID_ARG = "nurture_send_id"


@register("sendgrid", Channel.EMAIL)
class SendGridMessenger:
    """Send email through SendGrid's v3 Mail Send API."""

    name = "sendgrid"
    channel = Channel.EMAIL
    idempotent = False  # a second request is a second email

    def __init__(self, settings: Settings) -> None:
        key = settings.sendgrid_api_key
        if key is None or not key.get_secret_value().strip():
            raise ConfigurationError(
                "is required when NURTURE_EMAIL_CHANNEL=sendgrid", setting="sendgrid_api_key"
            )
        self._client = SendGridAPIClient(api_key=key.get_secret_value(), host=settings.sendgrid_base_url)
        name, address = parseaddr(settings.email_from)
        self._from = (address, name or None)
        self._reply_to = parseaddr(settings.email_reply_to) if settings.email_reply_to else None
        self._group = settings.sendgrid_unsubscribe_group
        self._timeout = settings.send_timeout_seconds
        self._sender = Sender(
            "SendGrid", settings, rate=settings.sendgrid_rate, concurrency=settings.sendgrid_concurrency
        )

    def push(self, messages: Sequence[OutgoingMessage]) -> list[Delivery]:
        """Send each email with its own request, several in flight, at the configured rate."""
        return self._sender.push(messages, self._attempt)

    def request_body(self, message: OutgoingMessage) -> dict[str, Any]:
        """Give the Mail Send request body for ``message``."""
        if message.channel is not Channel.EMAIL:
            raise ValueError(f"a {message.channel} message was given to SendGrid")
        if not message.to:
            raise ValueError("the contact has no email address")
        mail = Mail(
            from_email=From(*self._from),
            to_emails=To(message.to, message.to_name),
            subject=message.subject,
            plain_text_content=message.text,
            html_content=message.html,
        )
        if self._reply_to is not None:
            name, address = self._reply_to
            mail.reply_to = ReplyTo(address, name or None)
        # On the personalization: the contract types a message-level ``custom_args`` as a string.
        mail.custom_arg = CustomArg(SEND_ID_ARG, str(message.send_id), p=0)
        mail.category = Category(message.touch)
        if message.unsubscribe_url is not None:
            # Marketing only: service messages carry no unsubscribe link.
            mail.header = Header("List-Unsubscribe", f"<{message.unsubscribe_url}>")
            mail.header = Header("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")
            if self._group is not None:
                mail.asm = Asm(GroupId(self._group))
        body: dict[str, Any] = mail.get()
        return body

    def _attempt(self, message: OutgoingMessage) -> Delivery:
        try:
            body = self.request_body(message)
        except ValueError as exc:
            return Delivery(message.send_id, SendStatus.FAILED, error=str(exc))
        try:
            response = self._client.client.mail.send.post(request_body=body, timeout=self._timeout)
        except HTTPError as error:
            status = int(error.status_code)
            said = f"SendGrid answered {status}: {_errors(error.body)}"
            if status == 429 or status >= 500:
                headers = error.headers
                raise Retry(
                    said, retry_after=retry_after(headers.get("Retry-After") if headers else None)
                ) from None
            return Delivery(message.send_id, SendStatus.FAILED, error=said)
        except URLError as error:
            # urllib raises URLError only while connecting and writing the request: it was not taken.
            raise Retry(f"could not reach SendGrid: {error.reason}") from None
        except (OSError, http.client.HTTPException) as error:
            said = f"no answer from SendGrid after the request went out ({type(error).__name__}: {error})"
            return Delivery(message.send_id, SendStatus.UNKNOWN, error=said)
        return Delivery(
            message.send_id, SendStatus.SENT, provider_message_id=response.headers.get("X-Message-Id")
        )

    def close(self) -> None:
        """Finish the requests in flight."""
        self._sender.close()


def _errors(body: bytes | str | None) -> str:
    """Give SendGrid's error messages from a response body, with the field each names."""
    if not body:
        return "(no body)"
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        errors = json.loads(text)["errors"]
        return "; ".join(
            f"{e.get('field')}: {e.get('message')}" if e.get("field") else str(e.get("message"))
            for e in errors
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return text[:500]
