"""The outbox: the embedded channel that writes each message as a file instead of sending it.

Under ``NURTURE_OUTBOX_DIR``, ``email/<send id>.eml`` is an RFC 5322 message (multipart/alternative, a
text/plain then a text/html part, UTF-8 in base64) and ``sms/<send id>.json`` holds an SMS with its
encoding and segment count. A file is written to a temporary name and renamed over the final one, so a
reader never sees half a message and pushing the same send again replaces its file: the outbox is
idempotent. Files are not fsynced; a message lost to a power cut is still claimed in the ledger.

The bytes are built by hand rather than with ``email.message.EmailMessage``, which costs about 5 ms a
message; the tests check the result with the standard library's parser.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from binascii import b2a_base64
from collections.abc import Sequence
from email.utils import format_datetime, parseaddr
from pathlib import Path

from nurture.channels import Delivery, OutgoingMessage, register
from nurture.errors import ConfigurationError
from nurture.models import Channel, SendStatus
from nurture.settings import Settings

_FOLDER = {Channel.EMAIL: "email", Channel.SMS: "sms"}
_SUFFIX = {Channel.EMAIL: ".eml", Channel.SMS: ".json"}
# 42 bytes of UTF-8 make 56 base64 characters: an encoded word of 68, a header line under 78.
_WORD_BYTES = 42
_BODY_LINE = re.compile(rb".{1,76}", re.DOTALL)  # RFC 2045: base64 lines of at most 76
_ADDRESS = re.compile(r"[^\s<>()\[\],;:\\\"@]+@[A-Za-z0-9.-]+")
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,8}(?:[_-][A-Za-z0-9]{1,8})*")
_UNSAFE_IN_HEADER = re.compile(r"[\r\n]")
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def message_path(settings: Settings, channel: Channel, send_id: int) -> Path:
    """Where the outbox writes send ``send_id`` on ``channel``."""
    return Path(settings.outbox_dir) / _FOLDER[channel] / f"{send_id}{_SUFFIX[channel]}"


class _Outbox:
    name = "outbox"
    channel: Channel
    idempotent = True

    def __init__(self, settings: Settings) -> None:
        self._directory = Path(settings.outbox_dir) / _FOLDER[self.channel]
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create {self._directory}: {exc.strerror}", setting="outbox_dir"
            ) from exc
        self._suffix = _SUFFIX[self.channel]
        self._temporary_suffix = f".{os.getpid()}.tmp"
        # Paths relative to an open folder save the kernel a full lookup per file.
        self._folder = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY)

    def push(self, messages: Sequence[OutgoingMessage]) -> list[Delivery]:
        """Write each message to its file; a message that cannot be written is a failed delivery."""
        now = dt.datetime.now(dt.UTC)
        deliveries = []
        for message in messages:
            file_name = f"{message.send_id}{self._suffix}"
            try:
                if message.channel is not self.channel:
                    raise ValueError(f"a {message.channel} message was given to the {self.channel} outbox")
                self._write(file_name, self._build(message, now))
            except (ValueError, OSError) as exc:
                deliveries.append(Delivery(message.send_id, SendStatus.FAILED, error=str(exc)))
            else:
                deliveries.append(Delivery(message.send_id, SendStatus.SENT, provider_message_id=file_name))
        return deliveries

    def stop(self) -> None:
        """Do nothing: a batch of files is written in moments, and writing one again overwrites it."""

    def close(self) -> None:
        """Release the outbox folder."""
        if self._folder >= 0:
            os.close(self._folder)
            self._folder = -1

    def _build(self, message: OutgoingMessage, now: dt.datetime) -> bytes:
        raise NotImplementedError

    def _write(self, file_name: str, data: bytes) -> None:
        temporary = f".{file_name}{self._temporary_suffix}"
        folder = self._folder
        descriptor = os.open(temporary, _CREATE, 0o644, dir_fd=folder)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
        finally:
            os.close(descriptor)
        os.replace(temporary, file_name, src_dir_fd=folder, dst_dir_fd=folder)


@register("outbox", Channel.EMAIL)
class EmailOutbox(_Outbox):
    """Email as ``.eml`` files under ``<outbox_dir>/email/``."""

    channel = Channel.EMAIL

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        sender_name, sender = parseaddr(settings.email_from)
        self._from = f"From: {_mailbox(sender_name, sender)}\r\n"
        if settings.email_reply_to is not None:
            reply_name, reply_to = parseaddr(settings.email_reply_to)
            self._from += f"Reply-To: {_mailbox(reply_name, reply_to)}\r\n"
        self._domain = sender.rpartition("@")[2]
        self._now: dt.datetime | None = None
        self._date = ""

    def _build(self, message: OutgoingMessage, now: dt.datetime) -> bytes:
        to = message.to
        if not to.isascii() or _ADDRESS.fullmatch(to) is None:
            raise ValueError(f"not an email address the outbox can write: {to!r}")
        locale = message.locale
        if _LANGUAGE_TAG.fullmatch(locale) is None:
            raise ValueError(f"not a locale: {locale!r}")
        send_id = message.send_id
        digest = hashlib.blake2b(message.key.encode(), digest_size=6).hexdigest()
        # "=_" cannot occur in base64, so the boundary never collides with a part's content.
        boundary = f"=_nurture_{send_id}_{digest}"
        head = [
            self._from,
            f"To: {_mailbox(message.to_name, to)}\r\n",
        ]
        if message.subject is not None:
            head.append(f"Subject: {_encoded_text(message.subject)}\r\n")
        # A batch's messages share one Date, formatted once rather than per message.
        if now is not self._now:
            self._now, self._date = now, format_datetime(now)
        head.append(
            f"Date: {self._date}\r\n"
            f"Message-ID: <{send_id}.{digest}@{self._domain}>\r\n"
            "MIME-Version: 1.0\r\n"
            f"Content-Language: {locale.replace('_', '-')}\r\n"
        )
        url = message.unsubscribe_url
        if url is not None:
            if not url.isascii() or any(character in url for character in " <>\r\n\t"):
                raise ValueError(f"not an unsubscribe URL the outbox can write: {url!r}")
            head.append(f"List-Unsubscribe: <{url}>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
        head.append(f"X-Nurture-Send-Id: {send_id}\r\nX-Nurture-Touch: {_encoded_text(message.touch)}\r\n")
        if message.html is None:
            head.append(_TEXT_PART)
            return "".join(head).encode("ascii") + _base64_body(message.text) + b"\r\n"
        head.append(f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n')
        delimiter = f"--{boundary}\r\n".encode("ascii")
        return b"".join(
            (
                "".join(head).encode("ascii"),
                delimiter,
                _TEXT_PART_BYTES,
                _base64_body(message.text),
                b"\r\n",
                delimiter,
                _HTML_PART_BYTES,
                _base64_body(message.html),
                f"\r\n--{boundary}--\r\n".encode("ascii"),
            )
        )


@register("outbox", Channel.SMS)
class SmsOutbox(_Outbox):
    """SMS as ``.json`` files under ``<outbox_dir>/sms/``."""

    channel = Channel.SMS

    def _build(self, message: OutgoingMessage, now: dt.datetime) -> bytes:
        if _E164.fullmatch(message.to) is None:
            raise ValueError(f"not a phone number in E.164: {message.to!r}")
        record = {
            "send_id": message.send_id,
            "key": message.key,
            "to": message.to,
            "to_name": message.to_name,
            "body": message.text,
            "encoding": message.encoding,
            "segments": message.segments,
            "touch": message.touch,
            "locale": message.locale,
            "unsubscribe_url": message.unsubscribe_url,
            "written_at": now.isoformat(),
        }
        return json.dumps(record, ensure_ascii=False, indent=1).encode() + b"\n"


_TEXT_PART = 'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
_TEXT_PART_BYTES = _TEXT_PART.encode("ascii")
_HTML_PART_BYTES = b'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: base64\r\n\r\n'


def _encoded_text(value: str) -> str:
    """A header value as is when plain ASCII, else as RFC 2047 encoded words folded under 78 columns."""
    # A line break in a value would start a new header: it becomes a space.
    value = _UNSAFE_IN_HEADER.sub(" ", value)
    if value.isascii() and "=?" not in value and len(value) <= 900:
        return value
    data = value.encode()
    words = []
    start, size = 0, len(data)
    while start < size:
        end = min(start + _WORD_BYTES, size)
        while end < size and data[end] & 0xC0 == 0x80:  # never split a character's bytes
            end -= 1
        words.append(f"=?utf-8?b?{b2a_base64(data[start:end], newline=False).decode('ascii')}?=")
        start = end
    return "\r\n ".join(words)


def _mailbox(name: str | None, address: str) -> str:
    """``name <address>``; the name quoted when ASCII, encoded words otherwise."""
    if not name:
        return address
    name = _UNSAFE_IN_HEADER.sub(" ", name)
    if name.isascii() and "=?" not in name:
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{address}>'
    return f"{_encoded_text(name)} <{address}>"


def _base64_body(text: str) -> bytes:
    return b"\r\n".join(_BODY_LINE.findall(b2a_base64(text.encode(), newline=False)))
