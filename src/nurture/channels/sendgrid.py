"""SendGrid: each email is one v3 Mail Send request, made with the ``sendgrid`` library's client.

The request carries the sender (``NURTURE_EMAIL_FROM``) and reply-to, the subject, the text and HTML parts,
``custom_args`` with the send id under ``nurture_send_id`` (SendGrid's event webhook hands it back), the touch
as a category, the unsubscribe group when ``NURTURE_SENDGRID_UNSUBSCRIBE_GROUP`` is set, and for marketing
the ``List-Unsubscribe`` and ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` headers (RFC 8058). The
``X-Message-Id`` SendGrid answers with goes into the ledger.

How an answer is read: 2xx is sent; 429 and 5xx are retried (``nurture.channels.sending``); any other 4xx
fails the message with SendGrid's own error. A connection that never opened, or broke while the request was
being written, is retried; a request that went out and got no answer in ``NURTURE_SEND_TIMEOUT_SECONDS`` is
unknown: SendGrid may have it.

Each sending thread keeps its connection to SendGrid open from one request to the next (``_KeepAlive``): the
library's own client opens a new one, and builds a new ``urllib`` opener, for every request, which took the
client from about 400 to 720 µs of CPU an email (``benchmarks/sendgrid_channel.py``).
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from email.utils import parseaddr
from typing import Any
from urllib.error import URLError
from urllib.parse import urlsplit

import python_http_client
from python_http_client.exceptions import HTTPError, handle_error
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
from urllib3.util.wait import wait_for_read

from nurture.channels import Delivery, OutgoingMessage, register
from nurture.channels.sending import Retry, Sender, retry_after
from nurture.errors import ConfigurationError
from nurture.models import Channel, SendStatus
from nurture.settings import Settings

SEND_ID_ARG = "nurture_send_id"
# A kept-alive connection idle longer than this is not reused: servers close idle connections after a
# while (often 60 s), and a request written as the server closes it is lost without a word.
IDLE_REUSE_SECONDS = 20.0


class _KeepAlive:
    """One open HTTP connection to SendGrid per sending thread, reused from one request to the next."""

    def __init__(self, base_url: str, *, connect_timeout: float) -> None:
        url = urlsplit(base_url)
        self._host, self._port = url.hostname or "", url.port
        self._https = url.scheme == "https"
        self._context = ssl.create_default_context() if self._https else None
        self._connect_timeout = connect_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()
        self.opened = 0  # connections made, for the benchmark and the tests
        self.dropped = 0  # kept-alive connections found closed by the server before a request

    def send(self, request: urllib.request.Request, timeout: float) -> http.client.HTTPResponse:
        """Make ``request``; raise ``URLError`` if it certainly did not reach SendGrid, as ``urllib`` does."""
        connection = self._connection()
        try:
            if connection.sock is None:
                connection.connect()
                with self._lock:
                    self.opened += 1
            assert connection.sock is not None
            connection.sock.settimeout(timeout)  # the connect timeout was for connecting
            headers = dict(request.header_items())
            connection.request(request.get_method(), request.selector, body=request.data, headers=headers)
        except OSError as error:
            # Not connected, or broken while the request was being written: SendGrid cannot have taken
            # a request it did not get whole.
            connection.close()
            raise URLError(error) from None
        try:
            response = connection.getresponse()
        except BaseException:
            connection.close()
            raise
        self._local.response, self._local.used = response, time.monotonic()
        if not 200 <= response.status < 300:
            answer = urllib.error.HTTPError(
                request.full_url, response.status, response.reason, response.headers, response
            )
            raise handle_error(answer)  # the library's own error types, with the body read
        return response

    def _connection(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            if self._https:
                connection = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._connect_timeout, context=self._context
                )
            else:
                connection = http.client.HTTPConnection(self._host, self._port, timeout=self._connect_timeout)
            self._local.connection, self._local.response = connection, None
            with self._lock:
                self._open.add(connection)
        elif connection.sock is not None and not self._reusable(connection):
            connection.close()
        return connection

    def _reusable(self, connection: http.client.HTTPConnection) -> bool:
        """Tell whether the thread's open connection can carry the next request."""
        response: http.client.HTTPResponse | None = self._local.response
        if response is not None and not response.isclosed():
            return False  # the last answer was not read to the end
        if time.monotonic() - self._local.used > IDLE_REUSE_SECONDS:
            return False
        assert connection.sock is not None
        if wait_for_read(connection.sock, timeout=0.0):
            # Readable while idle: the server closed it (or broke the protocol). A request written
            # now would be lost; a new connection is safe.
            with self._lock:
                self.dropped += 1
            return False
        return True

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for connection in self._open:
                connection.close()
            self._open.clear()


class _Client(python_http_client.Client):  # type: ignore[misc]
    """The sendgrid library's HTTP client (URLs, headers, errors), sending over kept-alive connections."""

    def __init__(self, keep_alive: _KeepAlive, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._keep_alive = keep_alive

    def _build_client(self, name: str | None = None) -> _Client:
        url_path = [*self._url_path, name] if name else self._url_path
        return _Client(
            self._keep_alive,
            host=self.host,
            version=self._version,
            request_headers=self.request_headers,
            url_path=url_path,
            append_slash=self.append_slash,
            timeout=self.timeout,
        )

    def __getattr__(self, name: str) -> Any:
        if name not in self.methods:
            return super().__getattr__(name)  # a segment of the URL
        method = name.upper()

        def http_request(
            request_body: Any = None,
            query_params: dict[str, Any] | None = None,
            request_headers: dict[str, str] | None = None,
            timeout: float | None = None,
            **_: Any,
        ) -> python_http_client.client.Response:
            # The library's own request method, less the urllib opener it builds for every request
            # (a quarter of a millisecond, most of it reading proxy settings from the environment)
            # only to hand it to ``_make_request``, which has no use for it here.
            if request_headers:
                self._update_headers(request_headers)
            data: bytes | None = None
            if request_body is not None:
                if self.request_headers.get("Content-Type", "application/json") != "application/json":
                    data = request_body.encode("utf-8")
                else:
                    self.request_headers.setdefault("Content-Type", "application/json")
                    data = json.dumps(request_body).encode("utf-8")
            request = urllib.request.Request(
                self._build_url(query_params), headers=self.request_headers, data=data, method=method
            )
            return python_http_client.client.Response(self._make_request(None, request, timeout=timeout))

        return http_request

    def _make_request(
        self, opener: Any, request: urllib.request.Request, timeout: float | None = None
    ) -> http.client.HTTPResponse:
        return self._keep_alive.send(request, timeout or self.timeout)


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
        self._keep_alive = _KeepAlive(
            settings.sendgrid_base_url, connect_timeout=settings.send_connect_timeout_seconds
        )
        library = self._client.client
        # Set once here: the library adds it on the first request, to the dict every thread reads.
        headers = {**library.request_headers, "Content-Type": "application/json"}
        self._client.client = _Client(
            self._keep_alive, host=library.host, request_headers=headers, version=library._version
        )
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

    def stop(self) -> None:
        """Start no more requests; the ones in flight finish (see ``Sender.stop``)."""
        self._sender.stop()

    def close(self) -> None:
        """Finish the requests in flight and close the connections."""
        self._sender.close()
        self._keep_alive.close()


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
