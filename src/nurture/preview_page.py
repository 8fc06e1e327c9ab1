"""The /preview page of `nurture serve`: every touch, locale and channel rendered live for the personas.

    GET  /preview                 the overview for one persona (``?persona=``): every touch in every locale
                                  on each channel, each SMS with its encoding and segments, and the lint
    GET  /preview/{touch}         one message in full (``?persona=&locale=&channel=&step=``): the HTML part
                                  in a sandboxed frame, the text part, or the SMS
    POST /preview/login           the API key from the login form; answers with a signed session cookie

Behind ``NURTURE_API_KEY``: ``Authorization: Bearer <key>`` or ``X-API-Key``, or the cookie the login
form sets (HttpOnly, SameSite=Strict, signed with ``NURTURE_SECRET_KEY``, good for 12 hours and only while
the key is the same). Without the setting the page answers 503. Templates are read again whenever a file under
the templates folder changes, so a marketer's edit shows on the next reload.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlencode

from itsdangerous import BadSignature, URLSafeTimedSerializer
from jinja2 import Environment
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from nurture.errors import NurtureError
from nurture.lint import LintReport, lint_templates, programme_locales
from nurture.models import Channel
from nurture.preview import Previewer
from nurture.settings import Settings

COOKIE: Final = "nurture_preview"
SESSION_SECONDS: Final = 12 * 3600

_HEADERS: Final = {
    # The email's HTML is shown in a sandboxed srcdoc frame: no scripts anywhere, styles inline only.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src https: data:;"
    " form-action 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex",
}

_STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
a{color:#8a5a44}
table{border-collapse:collapse;font-size:.85rem}
th,td{border:1px solid #ddd;padding:.4rem;vertical-align:top;text-align:left}
td.cell{max-width:16rem}
.sms{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.8rem}
.segments{color:#555;font-size:.75rem}
.over{color:#b00020;font-weight:bold}
.error{color:#b00020}
.warning{color:#8a6d00}
nav a.current{font-weight:bold;text-decoration:none}
iframe{width:100%;max-width:680px;height:70vh;border:1px solid #ddd}
pre.text{white-space:pre-wrap;max-width:680px}
</style>"""

_PAGES = Environment(autoescape=True)
_PAGES.globals["style"] = _STYLE

_LOGIN = _PAGES.from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Message preview · log in</title>{{ style | safe }}</head>
<body>
<h1>Message preview</h1>
<form method="post" action="/preview/login">
<label>API key <input type="password" name="key" autocomplete="current-password" autofocus></label>
<button type="submit">Open</button>
</form>
{% if wrong %}<p class="error" id="wrong-key">That is not the API key.</p>{% endif %}
</body></html>
"""
)

_OVERVIEW = _PAGES.from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Message preview · {{ persona }}</title>
{{ style | safe }}</head>
<body>
<h1>Message preview</h1>
<nav id="personas">Persona:
{% for name in personas %}<a href="/preview?{{ {'persona': name} | urlencode }}" data-persona="{{ name }}"
{%- if name == persona %} class="current"{% endif %}>{{ name }}</a> {% endfor %}</nav>
<p id="description">{{ description }} ({{ as_of }})</p>
<section id="lint">
<h2>Lint: {{ lint.errors | length }} error{{ '' if lint.errors | length == 1 else 's' }},
{{ lint.warnings | length }} warning{{ '' if lint.warnings | length == 1 else 's' }}</h2>
{% if lint.findings %}<ul>
{% for finding in lint.findings %}<li class="finding {{ finding.severity }}"
 data-severity="{{ finding.severity }}"><code>{{ finding.path }}
{%- if finding.line %}:{{ finding.line }}{% endif %}</code> {{ finding.message }}</li>
{% endfor %}</ul>
{% else %}<p>No problems in {{ lint.rendered }} messages rendered for every persona.</p>{% endif %}
</section>
{% if rows %}
<h2>Every touch, locale and channel for {{ persona }}</h2>
<table id="messages">
<thead><tr><th>touch</th>{% for locale in locales %}{% for channel in channels %}
<th>{{ locale }} · {{ channel }}</th>{% endfor %}{% endfor %}</tr></thead>
<tbody>
{% for row in rows %}<tr data-touch="{{ row.touch }}">
<th>{{ row.touch }}<br><small>{{ row.category }}</small></th>
{% for cell in row.cells %}
{% if cell.kind == "none" %}<td class="none" data-locale="{{ cell.locale }}"
 data-channel="{{ cell.channel }}">—</td>
{% elif cell.kind == "error" %}<td class="cell error" data-locale="{{ cell.locale }}"
 data-channel="{{ cell.channel }}">{{ cell.error }}</td>
{% elif cell.channel == "email" %}<td class="cell email" data-locale="{{ cell.locale }}"
 data-channel="email"><a href="{{ cell.href }}">{{ cell.subject }}</a></td>
{% else %}<td class="cell sms" data-locale="{{ cell.locale }}" data-channel="sms"
 data-encoding="{{ cell.encoding }}" data-segments="{{ cell.segments }}">
<a href="{{ cell.href }}" class="sms">{{ cell.text }}</a>
<div class="segments{% if cell.over %} over{% endif %}">{{ cell.encoding }} · {{ cell.segments }}
segment{{ '' if cell.segments == 1 else 's' }} · {{ cell.characters }} characters</div></td>
{% endif %}{% endfor %}</tr>
{% endfor %}</tbody></table>
{% else %}<p class="error">The programme does not load: see the lint above.</p>{% endif %}
</body></html>
"""
)

_MESSAGE = _PAGES.from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ touch }} · {{ channel }} · {{ persona }}</title>
{{ style | safe }}</head>
<body>
<p><a href="/preview?{{ {'persona': persona} | urlencode }}">← every message for {{ persona }}</a></p>
<h1>{{ touch }} · {{ channel }} · persona {{ persona }} · {{ locale }}</h1>
<nav id="variants">
{% for other in locales %}<a href="{{ link(locale=other) }}"
{%- if other == locale %} class="current"{% endif %}>{{ other }}</a>
{% endfor %} |
{% for other in channels %}<a href="{{ link(channel=other) }}"
{%- if other == channel %} class="current"{% endif %}>{{ other }}</a>
{% endfor %}
{% if steps | length > 1 %} | {% for other in steps %}<a href="{{ link(step=other) }}"
{%- if other == step %} class="current"{% endif %}>step {{ other }}</a> {% endfor %}{% endif %}
</nav>
{% if error %}<p class="error" id="error">{{ error }}</p>{% else %}
<p>Template: <code id="template">{{ message.template }}</code> ({{ message.locale }})</p>
{% if channel == "email" %}
<p><strong>Subject:</strong> <span id="subject">{{ message.subject }}</span></p>
<iframe id="html" title="HTML part" sandbox srcdoc="{{ message.html }}"></iframe>
<h2>Plain-text part</h2>
<pre class="text" id="text">{{ message.text }}</pre>
{% else %}
<div class="sms" id="sms">{{ message.text }}</div>
<p class="segments{% if over %} over{% endif %}" id="segments">{{ message.encoding }} · {{ message.segments }}
segment{{ '' if message.segments == 1 else 's' }} · {{ message.text | length }} characters
(at most {{ limit }} segments)</p>
{% endif %}{% endif %}
</body></html>
"""
)


@dataclass
class _Live:
    """The previewer and lint of one state of the templates folder, kept until a file changes."""

    key: tuple[str, str]
    previewer: Previewer | None
    error: str | None
    lint: LintReport


def routes(settings: Settings, now: Callable[[], dt.datetime]) -> list[Route]:
    """Give the /preview routes for `nurture serve`."""
    key = settings.api_key.get_secret_value() if settings.api_key is not None else ""
    # The cookie holds a digest of the key: changing NURTURE_API_KEY logs every browser out.
    key_digest = hashlib.sha256(key.encode()).hexdigest()
    serializer = URLSafeTimedSerializer(settings.secret_key.get_secret_value(), salt="nurture-preview")
    secure = settings.public_url.startswith("https://")
    lock = threading.Lock()
    cache: list[_Live] = []

    def live() -> _Live:
        at = now()
        state = (_fingerprint(settings.templates_dir), at.strftime("%Y-%m-%dT%H"))
        with lock:
            if cache and cache[0].key == state:
                return cache[0]
            previewer, error = None, None
            try:
                previewer = Previewer(settings, at)
            except NurtureError as exc:
                error = str(exc)
            report = lint_templates(settings.templates_dir, settings, at=at)
            cache[:] = [_Live(state, previewer, error, report)]
            return cache[0]

    def authorised(request: Request) -> bool:
        if not key:
            raise HTTPException(503, "NURTURE_API_KEY is not set: the preview page is off")
        # The same headers as the API's (POST /api/visits): X-API-Key, or a bearer token.
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = request.headers.get("x-api-key") or (token.strip() if scheme.lower() == "bearer" else "")
        if given and hmac.compare_digest(given.encode(), key.encode()):
            return True
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return False
        try:
            return bool(serializer.loads(cookie, max_age=SESSION_SECONDS) == key_digest)
        except BadSignature:
            return False

    def login_page(*, wrong: bool = False) -> HTMLResponse:
        return HTMLResponse(_LOGIN.render(wrong=wrong), status_code=401, headers=_HEADERS)

    async def login(request: Request) -> Response:
        authorised(request)  # 503 when no key is set
        form = await request.form()
        given = form.get("key")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), key.encode()):
            return login_page(wrong=True)
        response = RedirectResponse("/preview", status_code=303, headers=_HEADERS)
        response.set_cookie(
            COOKIE,
            serializer.dumps(key_digest),
            max_age=SESSION_SECONDS,
            path="/preview",
            httponly=True,
            samesite="strict",
            secure=secure,
        )
        return response

    def overview_html(persona: str | None) -> str:
        state = live()
        previewer = state.previewer
        rows: list[dict[str, Any]] = []
        names: list[str] = []
        description, channels = "", list(Channel)
        locales: tuple[str, ...] = ()
        if previewer is not None:
            try:
                names = list(previewer.personas)
            except NurtureError:
                names = []
        if previewer is not None and names:
            persona = persona if persona in names else names[0]
            description = previewer.personas[persona].description
            locales = programme_locales(previewer.renderer, previewer.programme)
            for touch in previewer.programme.touches:
                cells = []
                for locale in locales:
                    for channel in channels:
                        cells.append(_cell(previewer, touch.name, channel, persona, locale, settings))
                rows.append({"touch": touch.name, "category": str(touch.category), "cells": cells})
        return _OVERVIEW.render(
            persona=persona,
            personas=names,
            description=description,
            as_of=now().strftime("%d %b %Y %H:%M UTC"),
            lint=state.lint,
            rows=rows,
            locales=locales,
            channels=[str(c) for c in channels],
        )

    async def overview(request: Request) -> Response:
        if not authorised(request):
            return login_page()
        html = await run_in_threadpool(overview_html, request.query_params.get("persona"))
        return HTMLResponse(html, headers=_HEADERS)

    def message_html(touch: str, query: dict[str, str]) -> str:
        state = live()
        previewer = state.previewer
        if previewer is None:
            raise HTTPException(409, state.error or "the programme does not load")
        try:
            known = previewer.touch(touch)
            names = list(previewer.personas)
        except NurtureError as exc:
            raise HTTPException(404, str(exc)) from None
        persona = query.get("persona") or names[0]
        if persona not in names:
            raise HTTPException(404, f"unknown persona {persona!r}")
        locales = programme_locales(previewer.renderer, previewer.programme)
        locale = query.get("locale") or previewer.personas[persona].locale
        try:
            channel = Channel(query.get("channel") or known.channels[0])
        except ValueError:
            raise HTTPException(404, f"no channel {query.get('channel')!r}") from None
        steps = previewer.steps(known)
        step_text = query.get("step", "")
        step = int(step_text) if step_text.isdigit() and int(step_text) in steps else steps[0]
        shown = {"persona": persona, "locale": locale, "channel": str(channel), "step": step}

        def link(**changed: Any) -> str:
            values = {name: value for name, value in {**shown, **changed}.items() if value is not None}
            return f"/preview/{quote(touch)}?{urlencode(values)}"

        message, error = None, None
        try:
            message = previewer.for_persona(touch, channel, persona, locale=locale, step=step).message
        except NurtureError as exc:
            error = str(exc)
        return _MESSAGE.render(
            touch=touch,
            channel=str(channel),
            persona=persona,
            locale=locale,
            locales=locales,
            channels=[str(c) for c in Channel],
            steps=steps,
            step=step,
            link=link,
            message=message,
            error=error,
            over=message is not None and (message.segments or 0) > settings.sms_max_segments,
            limit=settings.sms_max_segments,
        )

    async def message(request: Request) -> Response:
        if not authorised(request):
            return login_page()
        html = await run_in_threadpool(message_html, request.path_params["touch"], dict(request.query_params))
        return HTMLResponse(html, headers=_HEADERS)

    return [
        Route("/preview", overview, methods=["GET"]),
        Route("/preview/login", login, methods=["POST"]),
        Route("/preview/{touch}", message, methods=["GET"]),
    ]


def _cell(
    previewer: Previewer, touch: str, channel: Channel, persona: str, locale: str, settings: Settings
) -> dict[str, Any]:
    known = previewer.touch(touch)
    cell: dict[str, Any] = {"locale": locale, "channel": str(channel)}
    if channel not in known.channels:
        return {**cell, "kind": "none"}
    query = urlencode({"persona": persona, "locale": locale, "channel": str(channel)})
    cell["href"] = f"/preview/{quote(touch)}?{query}"
    try:
        message = previewer.for_persona(touch, channel, persona, locale=locale).message
    except NurtureError as exc:
        return {**cell, "kind": "error", "error": str(exc)}
    segments = message.segments or 0
    return {
        **cell,
        "kind": "message",
        "subject": message.subject,
        "text": message.text,
        "encoding": message.encoding,
        "segments": segments,
        "characters": len(message.text),
        "over": segments > settings.sms_max_segments,
    }


def _fingerprint(folder: Path) -> str:
    """A digest of every file's name, size and modification time under ``folder``."""
    digest = hashlib.blake2b(digest_size=16)
    for directory, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            try:
                stat = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            digest.update(f"{directory}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
