"""The web app `nurture serve` runs: unsubscribe pages and the providers' webhooks.

    GET  /u/{token}               a page confirming the unsubscribe, with a button
    POST /u/{token}               the button, and RFC 8058 one-click (``List-Unsubscribe=One-Click``)
    POST /webhooks/sendgrid       SendGrid's Signed Event Webhook: delivery, opens, bounces, unsubscribes
    POST /webhooks/twilio/status  Twilio's status callbacks for the SMS nurture sent
    POST /webhooks/twilio/inbound SMS contacts send: STOP and the other opt-out words, START, HELP, replies
    POST /api/visits              visits from a booking or till system (API key): one or a list
    GET  /preview                 every message for the sample personas, behind NURTURE_API_KEY (preview_page)

Every request is checked before anything is written (its size, then its signature or token, then its
body) and then written in one short transaction: all of it or nothing. Database work runs in Starlette's
thread pool, so that a slow query never stalls the event loop.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from jinja2 import Environment
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nurture import consent, events, imports, preview_page
from nurture.errors import BadToken, ConfigurationError, InvalidVisits
from nurture.models import Contact, InboundKind
from nurture.settings import Settings
from nurture.tokens import UnsubscribeToken, read_unsubscribe_token

Clock = Callable[[], dt.datetime]

SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
TWILIO_SIGNATURE = "X-Twilio-Signature"

# The token is in the URL: keep it out of Referer headers, caches and search engines.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex",
}

_TOKEN_PATH = re.compile(r"^/u/[^/?#]+")


class HideTokens(logging.Filter):
    """Keep unsubscribe tokens out of the access log: ``/u/<token>`` is logged as ``/u/…``.

    Each token is a contact's standing permission to change their consent; a log is read by more people
    than the contact. Installed on uvicorn's access logger by ``nurture serve`` (``log_config``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access records carry (client, method, path with query, HTTP version, status).
        if isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, version, status = record.args
            if isinstance(path, str):
                record.args = (client, method, _TOKEN_PATH.sub("/u/…", path), version, status)
        return True


_WORDS: dict[str, dict[str, str]] = {
    "en": {
        "title": "Unsubscribe",
        "email": "emails",
        "sms": "text messages",
        "topic": "“{topic}” messages",
        "ask": "Stop receiving {what} from {business}?",
        "button": "Unsubscribe",
        "done": "You are unsubscribed: no more {what} from {business}.",
    },
    "es": {
        "title": "Darse de baja",
        "email": "correos",
        "sms": "SMS",
        "topic": "mensajes «{topic}»",
        "ask": "¿Dejar de recibir {what} de {business}?",
        "button": "Darme de baja",
        "done": "Te has dado de baja: no recibirás más {what} de {business}.",
    },
    "pt": {
        "title": "Cancelar inscrição",
        "email": "e-mails",
        "sms": "SMS",
        "topic": "mensagens “{topic}”",
        "ask": "Deixar de receber {what} de {business}?",
        "button": "Cancelar inscrição",
        "done": "Inscrição cancelada: você não receberá mais {what} de {business}.",
    },
}

_PAGE = Environment(autoescape=True).from_string(
    """<!doctype html>
<html lang="{{ lang }}">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>body{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#222}
button{font-size:1rem;padding:.6rem 1.2rem;border:0;border-radius:4px;background:#222;color:#fff}
</style></head>
<body>
<h1>{{ title }}</h1>
{% if done %}<p>{{ done }}</p>{% else %}<p>{{ ask }}</p>
<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">{{ button }}</button></form>{% endif %}
</body>
</html>
"""
)


def create_app(settings: Settings, sessions: sessionmaker[Session], *, clock: Clock | None = None) -> ASGIApp:
    """Build the ASGI app `nurture serve` runs, on ``sessions`` of the configured database."""
    now = clock or (lambda: dt.datetime.now(dt.UTC))

    def contact_locale(token: UnsubscribeToken) -> str | None:
        with sessions() as session:
            return session.scalar(select(Contact.locale).where(Contact.id == token.contact_id))

    def unsubscribe(token: UnsubscribeToken) -> str | None:
        with sessions.begin() as session:
            locale = session.scalar(select(Contact.locale).where(Contact.id == token.contact_id))
            if locale is not None:
                consent.unsubscribe(session, token, at=now(), source="unsubscribe link")
            return locale

    def read_token(request: Request) -> UnsubscribeToken:
        try:
            return read_unsubscribe_token(settings, request.path_params["token"])
        except BadToken:
            raise HTTPException(404) from None

    async def unsubscribe_page(request: Request) -> Response:
        token = read_token(request)
        locale = await run_in_threadpool(contact_locale, token)
        if locale is None:
            raise HTTPException(404)
        return _page(settings, token, locale, done=False)

    async def unsubscribe_post(request: Request) -> Response:
        token = read_token(request)
        form = await request.form()
        if form.get("List-Unsubscribe") != "One-Click":
            raise HTTPException(400, "expected the form field List-Unsubscribe=One-Click (RFC 8058)")
        locale = await run_in_threadpool(unsubscribe, token)
        if locale is None:
            raise HTTPException(404)
        return _page(settings, token, locale, done=True)

    sendgrid_verifier = _sendgrid_verifier(settings)

    def record_email_events(parsed: list[events.EmailEvent]) -> events.Recorded:
        with sessions.begin() as session:
            return events.record_email_events(session, parsed, at=now())

    async def sendgrid_webhook(request: Request) -> Response:
        if sendgrid_verifier is None:
            raise HTTPException(
                503, "NURTURE_SENDGRID_WEBHOOK_PUBLIC_KEY is not set: events cannot be verified"
            )
        body = await request.body()
        signature = request.headers.get(SENDGRID_SIGNATURE)
        timestamp = request.headers.get(SENDGRID_TIMESTAMP)
        if not signature or not timestamp:
            raise HTTPException(403, f"{SENDGRID_SIGNATURE} and {SENDGRID_TIMESTAMP} are required")
        if (
            not (timestamp.isascii() and timestamp.isdigit())
            or abs(now().timestamp() - int(timestamp)) > settings.webhook_tolerance_seconds
        ):
            raise HTTPException(403, f"{SENDGRID_TIMESTAMP} is not within the tolerance of now")
        try:
            payload = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPException(400, "body is not UTF-8") from None
        try:
            verified = sendgrid_verifier.verify_signature(payload, signature, timestamp)
        except ValueError:  # a signature that is not base64 at all
            verified = False
        if not verified:
            raise HTTPException(403, "signature does not match the body and timestamp")
        try:
            parsed = events.parse_sendgrid(payload)
        except events.MalformedEvents as exc:
            raise HTTPException(400, str(exc)) from None
        recorded = await run_in_threadpool(record_email_events, parsed)
        return JSONResponse(recorded.as_dict())

    twilio_validator = _twilio_validator(settings)
    help_text = settings.sms_help_text or (
        f"{settings.business_name}: appointment news and offers. Reply STOP to unsubscribe."
        f" Help: {settings.business_phone}"
    )

    async def twilio_form(request: Request, required: tuple[str, ...]) -> FormData:
        """Read a Twilio webhook's form and check its signature against the public URL."""
        if twilio_validator is None:
            raise HTTPException(
                503, "NURTURE_TWILIO_AUTH_TOKEN is not set: Twilio's requests cannot be verified"
            )
        form = await request.form()
        signature = request.headers.get(TWILIO_SIGNATURE)
        # Twilio signs the URL it was given, which is the public one, not what the proxy forwards to us.
        url = settings.public_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if not signature or not twilio_validator.validate(url, form, signature):
            raise HTTPException(403, f"{TWILIO_SIGNATURE} does not match {url} and the form")
        for name in required:
            value = form.get(name)
            if not isinstance(value, str) or (not value and name != "Body"):
                raise HTTPException(400, f"{name}: missing")
        return form

    def record_status(form: FormData) -> events.Recorded:
        with sessions.begin() as session:
            return events.record_sms_status(
                session,
                message_sid=str(form["MessageSid"]),
                status=str(form["MessageStatus"]),
                error_code=str(form.get("ErrorCode") or "") or None,
                payload={key: str(value) for key, value in form.multi_items()},
                at=now(),
            )

    def record_inbound(form: FormData) -> InboundKind:
        with sessions.begin() as session:
            to = form.get("To")
            return events.record_inbound(
                session,
                message_sid=str(form["MessageSid"]),
                from_number=str(form["From"]),
                to_number=to if isinstance(to, str) else None,
                body=str(form["Body"]),
                at=now(),
            )

    async def twilio_status(request: Request) -> Response:
        form = await twilio_form(request, ("MessageSid", "MessageStatus"))
        recorded = await run_in_threadpool(record_status, form)
        return JSONResponse(recorded.as_dict())

    async def twilio_inbound(request: Request) -> Response:
        form = await twilio_form(request, ("MessageSid", "From", "Body"))
        kind = await run_in_threadpool(record_inbound, form)
        from twilio.twiml.messaging_response import MessagingResponse

        reply = MessagingResponse()
        if kind is InboundKind.HELP:
            reply.message(help_text)
        return Response(str(reply), media_type="application/xml")

    def record_visits(items: list[object]) -> imports.RecordedVisits:
        with sessions.begin() as session:
            return imports.record_visits(session, items, settings, now=now())

    async def post_visits(request: Request) -> Response:
        _check_api_key(settings, request)
        body = await request.body()
        try:
            # Decimal keeps an amount as written: 12.50 stays two decimals, 0.1 never becomes 0.1000000001.
            payload = json.loads(body, parse_float=Decimal)
        except (UnicodeDecodeError, ValueError) as exc:
            raise HTTPException(400, f"body is not JSON: {exc}") from None
        items = payload if isinstance(payload, list) else [payload]
        if not items:
            raise HTTPException(400, "no visits: send one visit object or a non-empty list of them")
        try:
            recorded = await run_in_threadpool(record_visits, items)
        except InvalidVisits as exc:
            return JSONResponse({"error": "nothing was recorded", "problems": exc.problems}, status_code=400)
        return JSONResponse(recorded.as_dict())

    routes = [
        Route("/u/{token}", unsubscribe_page, methods=["GET"]),
        Route("/u/{token}", unsubscribe_post, methods=["POST"]),
        Route("/webhooks/sendgrid", sendgrid_webhook, methods=["POST"]),
        Route("/webhooks/twilio/status", twilio_status, methods=["POST"]),
        Route("/webhooks/twilio/inbound", twilio_inbound, methods=["POST"]),
        Route("/api/visits", post_visits, methods=["POST"]),
    ]
    routes += preview_page.routes(settings, now)
    app = Starlette(routes=routes, exception_handlers={HTTPException: _plain_error})
    return BodyLimit(app, settings.max_body_bytes)


def _check_api_key(settings: Settings, request: Request) -> None:
    """Let a request through only with the configured API key, as a bearer token or in X-API-Key."""
    key = settings.api_key.get_secret_value() if settings.api_key is not None else ""
    if not key:
        raise HTTPException(503, "NURTURE_API_KEY is not set: the API refuses every request")
    given = request.headers.get("X-API-Key")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if given is None and scheme.lower() == "bearer":
        given = token.strip()
    if not given:
        raise HTTPException(
            401, "an API key is required: Authorization: Bearer KEY", headers={"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise HTTPException(403, "the API key is not the one configured")


def _sendgrid_verifier(settings: Settings) -> Any:
    """SendGrid's own verifier for the configured key, or None when no key is set."""
    key = settings.sendgrid_webhook_public_key
    if not key:
        return None
    from sendgrid.helpers.eventwebhook import EventWebhook

    try:
        return EventWebhook(key.strip())
    except ValueError as exc:
        raise ConfigurationError(
            f"not a SendGrid verification key (base64 of an ECDSA public key): {exc}",
            setting="sendgrid_webhook_public_key",
        ) from None


def _twilio_validator(settings: Settings) -> Any:
    """Twilio's own request validator for the configured auth token, or None when no token is set."""
    token = settings.twilio_auth_token
    if token is None or not token.get_secret_value():
        return None
    from twilio.request_validator import RequestValidator

    return RequestValidator(token.get_secret_value())


def _page(settings: Settings, token: UnsubscribeToken, locale: str, *, done: bool) -> HTMLResponse:
    lang = locale.split("_")[0]
    words = _WORDS.get(lang) or _WORDS["en"]
    if token.topic is not None:
        what = words["topic"].format(topic=token.topic)
    else:
        what = words[token.scope]
    text = {"what": what, "business": settings.business_name}
    html = _PAGE.render(
        lang=lang if lang in _WORDS else "en",
        title=words["title"],
        ask=words["ask"].format(**text),
        button=words["button"],
        done=words["done"].format(**text) if done else None,
    )
    return HTMLResponse(html, headers=_PAGE_HEADERS)


async def _plain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return PlainTextResponse(f"{exc.detail}\n", status_code=exc.status_code, headers=exc.headers)


class BodyTooLarge(HTTPException):
    """Raised inside a request whose body grows past the limit while it is read: answered 413."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodyLimit:
    """Answer 413 to a request whose body is larger than ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            status = 413 if declared.isdigit() else 400
            await _answer(send, status, b"request body too large\n" if status == 413 else b"bad length\n")
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send)


async def _answer(send: Send, status: int, body: bytes) -> None:
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
