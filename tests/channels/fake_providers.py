"""Local HTTP servers standing in for SendGrid and Twilio, checking requests against each one's OpenAPI."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from jsonschema import Draft4Validator, Draft202012Validator
from jsonschema.protocols import Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4, DRAFT202012

from nurture.settings import Settings

SPECS = Path(__file__).parent / "specs"


def request_validator(spec_file: str, pointer: str) -> Validator:
    """Give a validator for the schema at ``pointer`` (a JSON pointer) in one of the copied OpenAPI files."""
    spec = json.loads((SPECS / spec_file).read_text())
    uri = f"urn:{spec_file}"
    # OpenAPI 3.1 schemas are JSON Schema 2020-12; 3.0 ones are close to draft 4 (``nullable`` only loosens).
    modern = spec["openapi"].startswith("3.1")
    validator = Draft202012Validator if modern else Draft4Validator
    resource = Resource.from_contents(spec, DRAFT202012 if modern else DRAFT4)
    registry: Registry[Any] = Registry().with_resource(uri, resource)
    return validator({"$ref": f"{uri}#{pointer}"}, registry=registry, format_checker=validator.FORMAT_CHECKER)


@dataclass
class Answer:
    """What the fake provider does with one request."""

    status: int = 200
    body: Any = None  # JSON-ready, or None for an empty body
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to sit on the request after reading it (a client timeout is smaller)
    drop: bool = False  # close the connection without answering, after reading the request
    close: bool = False  # answer, then close the connection, as a server does with one it keeps no more


@dataclass
class Received:
    """One request the fake provider read in full."""

    at: float  # time.monotonic() when it arrived
    path: str
    headers: dict[str, str]
    body: Any  # JSON for SendGrid, a dict of form fields for Twilio
    errors: list[str]  # where the body breaks the provider's OpenAPI description
    peer: tuple[str, int]  # the client's end of the connection it came on


Script = Callable[[Received, int], Answer]  # (the request, how many came before it) -> the answer


class FakeProvider:
    """A provider on 127.0.0.1: records each request, validates its body, answers as the test says."""

    def __init__(
        self, validate: Callable[[Any], list[str]], parse: Callable[[bytes], Any], default: Script
    ) -> None:
        self.requests: list[Received] = []
        self.script: Script = default
        # Set, the next request's connection is reset as soon as its headers are in: the body never read.
        self.reset_next_before_body = False
        self.closed = threading.Semaphore(0)  # released each time an answer's ``close`` closed a connection
        self._default = default
        self._validate = validate
        self._parse = parse
        self._lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                with provider._lock:
                    reset, provider.reset_next_before_body = provider.reset_next_before_body, False
                if reset:
                    # SO_LINGER 0: closing sends a RST, while the client is still writing the body.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = provider._parse(raw)
                received = Received(
                    time.monotonic(),
                    self.path,
                    dict(self.headers),
                    body,
                    provider._validate(body),
                    self.client_address,
                )
                with provider._lock:
                    before = len(provider.requests)
                    provider.requests.append(received)
                answer = provider.script(received, before)
                if answer.delay:
                    time.sleep(answer.delay)
                if answer.drop:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                payload = b"" if answer.body is None else json.dumps(answer.body).encode()
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    if payload:
                        self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up waiting, as it may with a real provider
                    return
                if answer.close:
                    self.connection.shutdown(socket.SHUT_WR)
                    self.close_connection = True
                    provider.closed.release()
                    # Over a real network, a request can still be on its way as the server closes: a while
                    # longer here, it reaches an open socket that will never answer it.
                    time.sleep(1.0)

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass  # a connection this server reset on purpose

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def answer(self, *answers: Answer) -> None:
        """Answer the next requests with ``answers`` in turn, then as by default."""
        queue = list(answers)
        lock = threading.Lock()

        def script(received: Received, before: int) -> Answer:
            with lock:
                if queue:
                    return queue.pop(0)
            return self._default(received, before)

        self.script = script

    @property
    def invalid(self) -> list[str]:
        """Every way a received body broke the provider's contract."""
        return [error for request in self.requests for error in request.errors]

    @contextmanager
    def running(self) -> Iterator[FakeProvider]:
        thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join()


def _messages(validator: Validator) -> Callable[[Any], list[str]]:
    def validate(body: Any) -> list[str]:
        return [
            f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
            for e in validator.iter_errors(body)
        ]

    return validate


def sendgrid_contract() -> Callable[[Any], list[str]]:
    """Give the check of a Mail Send body against SendGrid's OpenAPI description: the ways it breaks it."""
    return _messages(
        request_validator(
            "sendgrid_mail_v3.openapi.json",
            "/components/requestBodies/PostMailSend/content/application~1json/schema",
        )
    )


def sendgrid() -> FakeProvider:
    """Stand in for SendGrid's v3 Mail Send: 202 with an ``X-Message-Id`` unless the script says otherwise."""

    def accept(received: Received, before: int) -> Answer:
        return Answer(202, headers={"X-Message-Id": f"sg-{before + 1}"})

    return FakeProvider(sendgrid_contract(), lambda raw: json.loads(raw), accept)


def sendgrid_settings(url: str, **values: Any) -> Settings:
    """Give settings that send email through the fake SendGrid at ``url``, retrying quickly."""
    defaults: dict[str, Any] = {
        "email_channel": "sendgrid",
        "sendgrid_api_key": "SG.test-key",
        "sendgrid_base_url": url,
        "email_from": "Luma Studio <hola@luma.example>",
        "email_reply_to": "Front desk <desk@luma.example>",
        "send_backoff_seconds": 0.01,
        "send_timeout_seconds": 0.5,
    }
    return Settings(_env_file=None, **(defaults | values))  # type: ignore[call-arg]


def sendgrid_error(status: int, message: str, field: str | None = None, **headers: str) -> Answer:
    """Give SendGrid's error answer, shaped as its OpenAPI description says."""
    return Answer(status, {"errors": [{"message": message, "field": field}]}, headers=headers)


def twilio_contract() -> Callable[[Any], list[str]]:
    """Give the check of a Messages create form against Twilio's OpenAPI description."""
    return _messages(
        request_validator(
            "twilio_messages_v2010.openapi.json",
            "/paths/~12010-04-01~1Accounts~1{AccountSid}~1Messages.json/post/requestBody/content"
            "/application~1x-www-form-urlencoded/schema",
        )
    )


def twilio() -> FakeProvider:
    """Stand in for Twilio's Messages create: 201 with a new message SID unless the script says otherwise."""

    def accept(received: Received, before: int) -> Answer:
        return twilio_created(received, before + 1)

    def form(raw: bytes) -> dict[str, str]:
        return dict(parse_qsl(raw.decode(), keep_blank_values=True))

    return FakeProvider(twilio_contract(), form, accept)


def twilio_created(received: Received, n: int) -> Answer:
    """Give Twilio's 201 for a created message, shaped as the example in its OpenAPI description."""
    form = received.body
    return Answer(
        201,
        {
            "account_sid": received.path.split("/")[3],
            "api_version": "2010-04-01",
            "body": form.get("Body"),
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": form.get("From"),
            "messaging_service_sid": form.get("MessagingServiceSid"),
            "num_segments": "1",
            "sid": f"SM{n:032x}",
            "status": "queued",
            "to": form.get("To"),
        },
    )


def twilio_error(status: int, code: int, message: str, **headers: str) -> Answer:
    """Give Twilio's error answer: its code, message and the page that explains it."""
    body = {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}"}
    return Answer(status, body | {"status": status}, headers=headers)
