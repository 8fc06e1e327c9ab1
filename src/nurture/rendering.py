"""Rendering: a touch's templates, in the contact's language, turned into the message a channel sends.

Templates live under ``<templates_dir>/messages``::

    _layouts/email.html, _layouts/email.txt      the frame every email shares (inherited)
    _partials/<locale>.txt                       words and macros every touch shares in one language
    <touch>/<locale>/subject.txt                 the email subject (one line)
    <touch>/<locale>/email.html                  the HTML part (autoescaped, CSS inlined)
    <touch>/<locale>/email.txt                   the plain-text part (not escaped)
    <touch>/<locale>/sms.txt                     the SMS body (whitespace collapsed)

One sandboxed Jinja2 environment per ``Renderer``: templates are compiled once, with the layout's CSS
inlined into their markup at compile time, and rendered per recipient. A locale falls back from
``pt_BR`` to ``pt`` to the default locale; a failure of any kind raises ``TemplateError`` naming the
template file and line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from html import escape
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import css_inline
from babel import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.numbers import format_currency, format_decimal, format_percent
from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateNotFound,
    TemplateSyntaxError,
    nodes,
    pass_context,
    select_autoescape,
)
from jinja2.compiler import CodeGenerator, Frame
from jinja2.environment import TemplateModule
from jinja2.runtime import Context, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import escape as escape_markup

from nurture.errors import TemplateError
from nurture.models import Channel
from nurture.settings import Settings
from nurture.sms import encode_info

MESSAGES: Final = "messages"
SUBJECT, EMAIL_HTML, EMAIL_TEXT, SMS_TEXT = "subject.txt", "email.html", "email.txt", "sms.txt"
CHANNEL_FILES: Final[Mapping[Channel, tuple[str, ...]]] = {
    Channel.EMAIL: (SUBJECT, EMAIL_HTML, EMAIL_TEXT),
    Channel.SMS: (SMS_TEXT,),
}


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """One message, ready for a channel: email parts or an SMS body with its encoding and segments."""

    subject: str | None
    html: str | None
    text: str
    template: str  # the main template file, relative to templates_dir
    locale: str  # the locale whose templates were used
    encoding: str | None
    segments: int | None


@dataclass(frozen=True, slots=True)
class _Resolved:
    locale: str
    format_locale: str  # babel's identifier of the locale dates and money are formatted in
    templates: tuple[Template, ...]
    main: str


class Renderer:
    """Render the programme's message templates; one sandboxed environment, templates compiled once."""

    def __init__(self, templates_dir: Path, *, default_locale: str) -> None:
        self.templates_dir = templates_dir
        self.default_locale = _normalise(default_locale)
        self.root = templates_dir / MESSAGES
        self.environment = _environment(self.root)
        self._files = _existing_files(self.root)
        self._resolved: dict[tuple[str, Channel, str], _Resolved] = {}

    def compile_all(self) -> None:
        """Compile every message template now, ahead of the first message (a run's worker, at its start)."""
        for name in sorted(self._files):
            if name.endswith((".txt", ".html")):
                # A template that does not compile is reported where it is used, naming its file and line.
                with contextlib.suppress(Exception):
                    self.environment.get_template(name)

    def locales(self, locale: str) -> tuple[str, ...]:
        """The locales tried for ``locale``, most specific first: ``pt_BR``, ``pt``, the default."""
        return _fallbacks(_normalise(locale), self.default_locale)

    def has(self, touch: str, channel: Channel, locale: str) -> bool:
        """Tell whether ``touch`` can be rendered on ``channel`` for ``locale`` (fallbacks included)."""
        return self._usable_locale(touch, channel, locale) is not None

    def render(
        self, touch: str, channel: Channel, locale: str, context: Mapping[str, Any]
    ) -> RenderedMessage:
        """Render ``touch`` for one recipient on ``channel`` in ``locale`` (or its fallback)."""
        resolved = self._resolved.get((touch, channel, locale)) or self._resolve(touch, channel, locale)
        # One set of variables for the message's templates, made the way Template.render makes it for
        # each of them (the environment's globals, then the context): Jinja would copy it twice each.
        variables = {
            **self.environment.globals,
            **context,
            "locale": resolved.format_locale,
            "template_locale": resolved.locale,
        }
        token = _format_locale.set(resolved.format_locale)
        try:
            parts = [self._render(template, variables) for template in resolved.templates]
        except Exception as exc:
            raise self._error(exc, touch, resolved.locale, resolved.main) from exc
        finally:
            _format_locale.reset(token)
        if channel is Channel.SMS:
            body = " ".join(parts[0].split())
            if not body:
                raise self._empty(touch, resolved, "the SMS body renders empty")
            info = encode_info(body)
            return RenderedMessage(
                None, None, body, resolved.main, resolved.locale, info.encoding, info.segments
            )
        subject = " ".join(parts[0].split())
        if not subject:
            raise self._empty(touch, resolved, "the subject renders empty")
        return RenderedMessage(
            subject, parts[1], _tidy_text(parts[2]), resolved.main, resolved.locale, None, None
        )

    # Resolution: which locale's files, compiled once per (touch, channel, locale).

    def _usable_locale(self, touch: str, channel: Channel, locale: str) -> str | None:
        files = CHANNEL_FILES[channel]
        for candidate in self.locales(locale):
            if all(f"{touch}/{candidate}/{name}" in self._files for name in files):
                return candidate
        return None

    def _resolve(self, touch: str, channel: Channel, locale: str) -> _Resolved:
        used = self._usable_locale(touch, channel, locale)
        main = CHANNEL_FILES[channel][1 if channel is Channel.EMAIL else 0]
        if used is None:
            tried = ", ".join(self.locales(locale))
            raise TemplateError(
                template=str(self.root / touch),
                line=None,
                touch=touch,
                locale=locale,
                message=f"no {channel} templates ({', '.join(CHANNEL_FILES[channel])}) for locale {tried}",
            )
        names = [f"{touch}/{used}/{name}" for name in CHANNEL_FILES[channel]]
        try:
            templates = tuple(self.environment.get_template(name) for name in names)
        except Exception as exc:
            raise self._error(exc, touch, used, f"{touch}/{used}/{main}") from exc
        requested = _normalise(locale)
        # Format dates and money the contact's regional way only when the words are in their language.
        format_as = requested if requested.split("_")[0] == used.split("_")[0] else used
        resolved = _Resolved(
            used, str(_babel_locale(format_as)), templates, f"{MESSAGES}/{touch}/{used}/{main}"
        )
        self._resolved[(touch, channel, locale)] = resolved
        return resolved

    def _render(self, template: Template, variables: dict[str, Any]) -> str:
        try:
            return "".join(template.root_render_func(template.new_context(variables, shared=True)))
        except Exception:
            # As Template.render does: the traceback then points at the template's file and line.
            self.environment.handle_exception()

    # Errors: name the file and line a person has to open.

    def _error(self, exc: Exception, touch: str, locale: str, main: str) -> TemplateError:
        if isinstance(exc, TemplateError):
            return exc
        path, line = self._where(exc)
        template = path or str(self.templates_dir / main if main.startswith(MESSAGES) else self.root / main)
        if isinstance(exc, TemplateNotFound):
            message = f"template not found: {exc.name}"
        elif isinstance(exc, TemplateSyntaxError):
            message = f"syntax error: {exc.message}"
        else:
            message = str(exc) or type(exc).__name__
        return TemplateError(template=template, line=line, touch=touch, locale=locale, message=message)

    def _where(self, exc: Exception) -> tuple[str | None, int | None]:
        if isinstance(exc, TemplateSyntaxError) and exc.filename:
            return exc.filename, exc.lineno
        found: tuple[str | None, int | None] = (None, None)
        for frame, line in _frames(exc.__traceback__):
            # Jinja rewrites a failing template's frames to point at the template file and line.
            if "__jinja_exception__" in frame.f_globals:
                found = (frame.f_code.co_filename, line)
        return found

    def _empty(self, touch: str, resolved: _Resolved, message: str) -> TemplateError:
        return TemplateError(
            template=str(self.templates_dir / resolved.main),
            line=None,
            touch=touch,
            locale=resolved.locale,
            message=message,
        )


def _frames(tb: TracebackType | None) -> Iterator[tuple[Any, int]]:
    while tb is not None:
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next


def _existing_files(root: Path) -> frozenset[str]:
    found: set[str] = set()
    for directory, _, names in os.walk(root):
        relative = Path(directory).relative_to(root).as_posix()
        found.update(name if relative == "." else f"{relative}/{name}" for name in names)
    return frozenset(found)


def _normalise(locale: str) -> str:
    return locale.replace("-", "_")


@lru_cache(maxsize=256)
def _fallbacks(locale: str, default: str) -> tuple[str, ...]:
    chain = [locale, locale.split("_")[0], default, default.split("_")[0]]
    return tuple(dict.fromkeys(part for part in chain if part))


def _tidy_text(text: str) -> str:
    # Lines without trailing spaces, at most one blank line in a row. (A regular expression collapsing
    # the runs of newlines cost three times this loop: as much as rendering the text part's layout.)
    lines: list[str] = []
    blank = False
    for line in text.strip().splitlines():
        line = line.rstrip()
        if line or not blank:
            lines.append(line)
        blank = not line
    return "\n".join(lines) + "\n"


# The environment: sandboxed, strict, autoescaped for HTML only, with the locale's filters.


class _CodeGenerator(CodeGenerator):
    """Jinja's compiler, printing each ``{{ value }}`` through one call instead of two."""

    # Jinja compiles ``{{ value }}`` to ``escape(environment.finalize(value))`` (``str(...)`` where not
    # autoescaped); an email prints twenty or so values, and each call and each Markup made costs.

    def _output_child_pre(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        if _fused(frame, finalize):
            self.write("environment.print_html(" if frame.eval_ctx.autoescape else "environment.print_text(")
        else:
            super()._output_child_pre(node, frame, finalize)

    def _output_child_post(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        if _fused(frame, finalize):
            self.write(")")
        else:
            super()._output_child_post(node, frame, finalize)


def _fused(frame: Frame, finalize: Any) -> bool:
    # Inside {% autoescape %} blocks the choice is made at render time: Jinja's own code is kept there.
    return not frame.eval_ctx.volatile and finalize.src == "environment.finalize("


_NEEDS_ESCAPE: Final = re.compile("[&<>\"']").search


def _print_html(value: Any) -> Any:
    """``escape(_blank_none(value))``: a string with nothing to escape is printed as it is."""
    if type(value) is str:
        return escape_markup(value) if _NEEDS_ESCAPE(value) else value
    return "" if value is None else escape_markup(value)


def _print_text(value: Any) -> str:
    """``str(_blank_none(value))``."""
    if type(value) is str:
        return value
    return "" if value is None else str(value)


_DICT_ATTRIBUTES: Final = frozenset(dir(dict))


class _Template(Template):
    """A template whose module, as ``{% import %}`` gives it, is looked up without making a set."""

    def _get_default_module(self, ctx: Context | None = None) -> TemplateModule:
        # Jinja makes the set of the importer's globals missing from ours on every import, four per
        # email, to learn that there are none: our templates all have the environment's globals.
        if self._module is not None and (ctx is None or ctx.globals_keys <= self.globals.keys()):
            return self._module
        return super()._get_default_module(ctx)


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, with each template's globals as a plain dict."""

    code_generator_class = _CodeGenerator
    template_class = _Template

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # Plain functions in the instance, so that the compiled templates call them without binding.
        self.print_html = _print_html
        self.print_text = _print_text

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        # A macro (a partial's words) is safe to call and takes no context: what the sandbox's checks
        # and Context.call would find out, with several failed attribute lookups, on every call.
        if type(obj) is Macro:
            kwargs.pop("_block_vars", None)
            kwargs.pop("_loop_vars", None)
            try:
                return obj(*args, **kwargs)
            except StopIteration:
                return self.undefined(
                    "value was undefined because a callable raised a StopIteration exception"
                )
        return super().call(context, obj, *args, **kwargs)

    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        # Jinja chains a template's globals to the environment's so that later changes show through;
        # ours never change after start-up, and copying a ChainMap on every render costs more than the
        # rendering of a short template.
        return {**self.globals, **(d or {})}

    def getattr(self, obj: Any, attribute: str) -> Any:
        # The context is plain dicts: look keys up first rather than fail a getattr on dict each time.
        kind = type(obj)
        if kind is dict:
            try:
                return obj[attribute]
            except KeyError:
                if attribute not in _DICT_ATTRIBUTES:
                    # Where the sandbox would come to after failing getattr and the lookup once more, two
                    # exceptions later: a field a context leaves out (``links.preferences is defined``).
                    return self.undefined(obj=obj, name=attribute)
        elif kind is TemplateModule and not attribute.startswith("_"):
            # An imported partial's words and macros: what the template exported, nothing else.
            try:
                return obj.__dict__[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)


def _environment(root: Path) -> Environment:
    environment = _Environment(
        loader=_InliningLoader(root),
        undefined=StrictUndefined,
        # Asked for each template at each render: the answer per file name is kept.
        autoescape=lru_cache(maxsize=None)(
            select_autoescape(enabled_extensions=("html",), default_for_string=False, default=False)
        ),
        trim_blocks=True,
        lstrip_blocks=True,
        # Templates are read once per Renderer; a new run picks up edits.
        auto_reload=False,
        cache_size=-1,
        finalize=_blank_none,
    )
    environment.filters.update(money=money, date=date, percent=percent, number=number, paragraphs=paragraphs)
    return environment


def _blank_none(value: Any) -> Any:
    # A field the contact never gave (no first name, no phone) prints as nothing, not as "None".
    return "" if value is None else value


# The message's formatting locale, by name: the formatting caches below hash a string faster than a Locale.
_format_locale: ContextVar[str] = ContextVar("format_locale")


@lru_cache(maxsize=64)
def _babel_locale(name: str) -> Locale:
    try:
        return Locale.parse(name)
    except (UnknownLocaleError, ValueError):
        return Locale.parse(name.split("_")[0]) if "_" in name else Locale("en")


# The formatting filters take the template context only so that Jinja never folds them into constants
# at compile time: the locale is the message's, known at render time.


def _current_locale() -> str:
    return _format_locale.get("en")


@pass_context
def money(context: Context, value: Decimal | int | float, currency: str | None = None) -> str:
    """Format an amount the message locale's way, with its currency when known: ``1.234,50 €``."""
    return _money(value, currency, _current_locale())


@lru_cache(maxsize=4096)
def _money(value: Decimal | int | float, currency: str | None, locale: str) -> str:
    if currency is None:
        return str(format_decimal(value, format="#,##0.00", locale=_babel_locale(locale)))
    return str(format_currency(value, currency, locale=_babel_locale(locale)))


@pass_context
def date(context: Context, value: dt.date | None, format: str = "long") -> str:
    """Format a date the message locale's way: ``short``, ``medium``, ``long``, ``full`` or a pattern."""
    if value is None:
        # babel would print today's date: a missing date must be handled by the template, not guessed.
        raise ValueError("no date to format (the value is None): test it with {% if ... %} first")
    return _date(value, format, _current_locale())


@lru_cache(maxsize=4096)
def _date(value: dt.date, format: str, locale: str) -> str:
    return str(format_date(value, format=format, locale=_babel_locale(locale)))


@pass_context
def percent(context: Context, value: Decimal | int | float) -> str:
    """Format percentage points the message locale's way: ``15`` gives ``15%`` (``15 %`` in es)."""
    return _percent(value, _current_locale())


@lru_cache(maxsize=1024)
def _percent(value: Decimal | int | float, locale: str) -> str:
    return str(format_percent(Decimal(value) / 100, locale=_babel_locale(locale), decimal_quantization=False))


@pass_context
def number(context: Context, value: Decimal | int | float) -> str:
    """Format a number with the message locale's grouping: ``1,240`` (``1.240`` in es)."""
    return _number(value, _current_locale())


@lru_cache(maxsize=4096)
def _number(value: Decimal | int | float, locale: str) -> str:
    return str(format_decimal(value, locale=_babel_locale(locale)))


def paragraphs(text: str | None) -> list[str]:
    """Split text into its paragraphs (separated by blank lines), each on one line."""
    if not text:
        return []
    if type(text) is str:
        # A run sends the same few content items to thousands: each body is split once.
        return list(_paragraphs(text))
    return _split_paragraphs(text)


@lru_cache(maxsize=1024)
def _paragraphs(text: str) -> tuple[str, ...]:
    return tuple(_split_paragraphs(text))


def _split_paragraphs(text: str) -> list[str]:
    return [" ".join(part.split()) for part in re.split(r"\n\s*\n", text) if part.strip()]


# CSS inlining at compile time: the source handed to Jinja already carries the style attributes.

_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)
_EXTENDS = re.compile(r"\{%-?\s*extends\s+([\"'])(.+?)\1\s*-?%\}")
_STYLE_BLOCK = re.compile(r"<style\b[^>]*>(.*?)</style\s*>", re.S | re.I)
_SKIP = re.compile(r"<!--.*?-->|<(script|style|title|textarea)\b.*?</\1\s*>", re.S | re.I)
_START_TAG = re.compile(r"<([A-Za-z][A-Za-z0-9-]*)")
_ATTRIBUTE = re.compile(r"\s*([^\s\"'>/=]+)(?:\s*=\s*(\"[^\"]*\"|'[^']*'|[^\s\"'=<>`]+))?")
_TAG_END = re.compile(r"\s*/?>")
_MARK = "data-nurture-i"


class _InliningLoader(FileSystemLoader):
    """A file loader whose HTML templates come with their (and their layout's) CSS inlined."""

    def get_source(self, environment: Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        source, filename, uptodate = super().get_source(environment, template)
        if not template.endswith(".html"):
            return source, filename, uptodate
        try:
            inlined = inline_styles(source, self._inherited_css(environment, source, seen={template}))
        except (css_inline.InlineError, ValueError) as exc:
            raise TemplateSyntaxError(f"cannot inline its CSS: {exc}", 1, template, filename) from exc
        return inlined, filename, uptodate

    def _inherited_css(self, environment: Environment, source: str, seen: set[str]) -> str:
        match = _EXTENDS.search(source)
        if match is None or match.group(2) in seen:
            return ""
        parent = match.group(2)
        parent_source = super().get_source(environment, parent)[0]
        own = "\n".join(_STYLE_BLOCK.findall(parent_source))
        return self._inherited_css(environment, parent_source, seen | {parent}) + "\n" + own


def inline_styles(source: str, inherited_css: str = "") -> str:
    """Give an HTML template's source with its CSS rules written into each element's style attribute.

    Jinja tags are left exactly where they were, and every line stays on its line number, so that an
    error in the compiled template still names the line a person wrote. Rules apply by the classes and
    elements written literally in the file; the ``<style>`` blocks stay for clients that read them.
    """
    masked = _JINJA.sub(lambda match: re.sub(r"[^\n]", "x", match.group()), source)
    skipped = [(match.start(), match.end()) for match in _SKIP.finditer(masked)]
    tags: list[tuple[int, tuple[int, int] | None]] = []  # name end, span of an existing style value
    marked: list[str] = []
    position = 0
    for match in _START_TAG.finditer(masked):
        if any(start <= match.start() < end for start, end in skipped):
            continue
        style, cursor = None, match.end()
        while (attribute := _ATTRIBUTE.match(masked, cursor)) and attribute.end() > cursor:
            if attribute.group(1).lower() == "style" and attribute.group(2):
                value_start = attribute.start(2) + (1 if attribute.group(2)[0] in "\"'" else 0)
                value_end = attribute.end(2) - (1 if attribute.group(2)[0] in "\"'" else 0)
                style = (value_start, value_end)
            cursor = attribute.end()
        if not _TAG_END.match(masked, cursor):
            continue
        marked.append(masked[position : match.end()])
        marked.append(f' {_MARK}="{len(tags)}"')
        position = match.end()
        if style is not None:
            # The inliner must see only the stylesheet's rules; the written style is kept as it is.
            name_start = masked.rindex("style", match.end(), style[0])
            marked.append(masked[position:name_start] + "data-nurture-s")
            position = name_start + len("style")
        tags.append((match.end(), style))
    marked.append(masked[position:])
    document = "".join(marked)
    if re.search(r"<html\b", document, re.I):
        inliner = css_inline.CSSInliner(load_remote_stylesheets=False, extra_css=inherited_css or None)
        inlined = inliner.inline(document)
    else:
        own = "\n".join(_STYLE_BLOCK.findall(document))
        inliner = css_inline.CSSInliner(load_remote_stylesheets=False)
        inlined = inliner.inline_fragment(document, inherited_css + "\n" + own)
    styles = _MarkedStyles()
    styles.feed(inlined)
    styles.close()
    result = source
    for index in sorted(styles.found, reverse=True):
        declarations = escape(styles.found[index].strip(), quote=False).replace('"', "&quot;")
        name_end, existing = tags[index]
        if existing is None:
            result = f'{result[:name_end]} style="{declarations}"{result[name_end:]}'
        else:
            # Declarations written in the file come last, so they win over the stylesheet.
            result = f"{result[: existing[0]]}{declarations} {result[existing[0] :]}"
    return result


class _MarkedStyles(HTMLParser):
    """Collect the style the inliner gave each marked element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: dict[int, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        index, style = values.get(_MARK), values.get("style")
        if index is not None and style:
            self.found[int(index)] = style

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)


# The render context: every variable a template may use. The README documents it and
# `nurture templates lint` checks templates against it; the calendar builds exactly these.


@dataclass(frozen=True, slots=True)
class Variable:
    """One variable every template gets: what it holds and, for a mapping, its fields."""

    holds: str
    fields: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()  # fields only sometimes there: test them with ``is defined``


CONTEXT: Final[Mapping[str, Variable]] = {
    "contact": Variable(
        "the contact",
        ("first_name", "last_name", "email", "phone", "locale", "timezone", "referral_code", "tags"),
    ),
    "profile": Variable(
        "where the contact stands",
        (
            "stage",
            "value_tier",
            "satisfaction",
            "visits",
            "last_visit",
            "expected_next_visit",
            "points",
            "stamps",
            "punch_card_size",
            "stamps_to_go",
        ),
    ),
    "offer": Variable(
        "the touch's offer, or None", ("kind", "value", "currency", "code", "expires_on", "description")
    ),
    "content": Variable("education only: the content item", ("id", "title", "summary", "body", "url")),
    "friend": Variable("referral_reward only: the referred friend", ("first_name",)),
    "step": Variable("winback only: 1, 2 or 3"),
    "business": Variable("from NURTURE_BUSINESS_*", ("name", "website", "booking_url", "address", "phone")),
    "links": Variable(
        "links for this message", ("unsubscribe", "booking", "survey", "referral"), ("preferences",)
    ),
    "touch": Variable("the touch's name"),
    "today": Variable("the contact's local date"),
    "locale": Variable("the formatting locale (pt_BR)"),
    "template_locale": Variable("the templates' folder used (pt)"),
}


# Business settings as the templates' ``business`` variable.


def business_context(settings: Settings) -> dict[str, str]:
    """The ``business`` variable every template gets, from the settings."""
    return {
        "name": settings.business_name,
        "website": settings.business_website,
        "booking_url": settings.business_booking_url,
        "address": settings.business_address,
        "phone": settings.business_phone,
    }


# Sample contexts: what `nurture templates check` and `preview` render, and what the benchmark varies.

_SAMPLE_PEOPLE: Final[Mapping[str, tuple[tuple[str, str], ...]]] = {
    "en": (("Emma", "Clarke"), ("Liam", "O'Brien"), ("Olivia", "Patel"), ("Noah", "Williams")),
    "es": (("Lucía", "Fernández"), ("Javier", "Muñoz"), ("Carmen", "Ruiz"), ("Diego", "Ortega")),
    "pt": (("Ana", "Souza"), ("João", "Pereira"), ("Beatriz", "Lima"), ("Rafael", "Gonçalves")),
}
_SAMPLE_PLACE: Final[Mapping[str, tuple[str, str, str, str]]] = {
    "en": ("USD", "America/New_York", "+1 212 555 0142", "12 Flower Street, New York, NY 10001"),
    "es": ("EUR", "Europe/Madrid", "+34 910 123 456", "Calle de las Flores 12, 28004 Madrid"),
    "pt": ("BRL", "America/Sao_Paulo", "+55 11 3123 4567", "Rua das Flores, 12, São Paulo - SP"),
}
_SAMPLE_CONTENT: Final[Mapping[str, tuple[str, str, str]]] = {
    "en": (
        "Keep your cut fresh between visits",
        "Three small habits that make a haircut look good for weeks, not days.",
        "Wash with lukewarm water and a gentle shampoo: hot water dries hair out.\n\n"
        "Let your hair air-dry halfway before using the dryer, and keep the heat on medium.\n\n"
        "Book your next trim before the ends start to split: for most cuts that is every 6 to 8 weeks.",
    ),
    "es": (
        "Tu corte impecable entre visitas",
        "Tres hábitos sencillos para que el corte luzca bien durante semanas, no días.",
        "Lávate el pelo con agua tibia y un champú suave: el agua muy caliente lo reseca.\n\n"
        "Deja que se seque al aire hasta la mitad antes de usar el secador, y a temperatura media.\n\n"
        "Reserva el próximo repaso antes de que se abran las puntas: para la mayoría de cortes, "
        "cada 6 u 8 semanas.",
    ),
    "pt": (
        "Seu corte impecável entre as visitas",
        "Três hábitos simples para o corte ficar bonito por semanas, não dias.",
        "Lave o cabelo com água morna e um xampu suave: água muito quente resseca os fios.\n\n"
        "Deixe secar naturalmente até a metade antes de usar o secador, em temperatura média.\n\n"
        "Agende a próxima aparada antes que as pontas se abram: para a maioria dos cortes, "
        "a cada 6 a 8 semanas.",
    ),
}
_SAMPLE_OFFERS: Final[Mapping[str, tuple[str, Decimal]]] = {
    "incentive": ("percent", Decimal(15)),
    "promotion": ("percent", Decimal(20)),
    "birthday": ("amount", Decimal("10.00")),
    "referral_ask": ("amount", Decimal("10.00")),
    "referral_reward": ("points", Decimal(500)),
    "complaint_recovery": ("free_service", Decimal(0)),
    "winback": ("percent", Decimal(20)),
    "appreciation_day": ("points", Decimal(200)),
}
SAMPLE_TODAY: Final = dt.date(2026, 5, 14)


def sample_context(touch: str, locale: str, *, variant: int = 0) -> dict[str, Any]:
    """A realistic context for ``touch`` in ``locale``; ``variant`` varies the contact and the numbers."""
    language = _normalise(locale).split("_")[0]
    language = language if language in _SAMPLE_PEOPLE else "en"
    people = _SAMPLE_PEOPLE[language]
    first_name, last_name = people[variant % len(people)]
    currency, timezone, phone, address = _SAMPLE_PLACE[language]
    today = SAMPLE_TODAY + dt.timedelta(days=variant % 97)
    stamps = 7 + variant % 3
    code = f"{first_name[:3].upper()}{100 + variant % 900}"
    website = "https://lumastudio.example"
    offer = None
    if touch in _SAMPLE_OFFERS:
        kind, value = _SAMPLE_OFFERS[touch]
        offer = {
            "kind": kind,
            "value": value + (variant % 3) * (5 if kind != "points" else 100),
            "currency": currency if kind == "amount" else None,
            "code": f"{touch[:4].upper()}-{7300 + variant % 1000}",
            "expires_on": today + dt.timedelta(days=14),
            "description": None,
        }
    content = None
    if touch == "education":
        title, summary, body = _SAMPLE_CONTENT[language]
        content = {
            "id": "haircut-between-visits",
            "title": title,
            "summary": summary,
            "body": body,
            "url": f"{website}/guides/haircut-between-visits",
        }
    return {
        "touch": touch,
        "today": today,
        "step": (variant % 3) + 1 if touch == "winback" else None,
        "contact": {
            "first_name": first_name,
            "last_name": last_name,
            "email": f"{first_name.lower()}.{variant}@example.com",
            "phone": f"{phone[:-4]}{1000 + variant % 9000}",
            "locale": locale,
            "timezone": timezone,
            "referral_code": code,
            "tags": ["haircut", "color"],
        },
        "profile": {
            "stage": "loyal",
            "value_tier": ("high", "medium", "low")[variant % 3],
            "satisfaction": "promoter",
            "visits": 6 + variant % 20,
            "last_visit": today - dt.timedelta(days=26 + variant % 9),
            "expected_next_visit": today + dt.timedelta(days=3),
            "points": 1240 + 10 * (variant % 50),
            "stamps": stamps,
            "punch_card_size": 10,
            "stamps_to_go": 10 - stamps,
        },
        "offer": offer,
        "content": content,
        "friend": {"first_name": people[(variant + 1) % len(people)][0]}
        if touch == "referral_reward"
        else None,
        "business": {
            "name": "Luma Studio",
            "website": website,
            "booking_url": f"{website}/book",
            "address": address,
            "phone": phone,
        },
        "links": {
            "unsubscribe": f"http://127.0.0.1:8000/u/eyJjIjo{variant}fQ.aGVsbG8",
            "booking": f"{website}/book",
            "survey": f"{website}/survey?ref={code}",
            "referral": f"{website}/r/{code}",
            "preferences": f"http://127.0.0.1:8000/p/eyJjIjo{variant}fQ.aGVsbG8",
        },
    }


# Checking every template: what `nurture templates check` runs before marketers' edits go live.

_PROBE = "<i>nurture-probe</i>"


@dataclass(frozen=True, slots=True)
class SmsSample:
    """How one touch's SMS came out with the sample context: for the check's table."""

    touch: str
    locale: str
    step: int | None
    encoding: str
    segments: int
    characters: int


@dataclass(frozen=True, slots=True)
class TemplateCheck:
    """What checking every touch, locale and channel found."""

    problems: tuple[TemplateError, ...]
    warnings: tuple[str, ...]
    rendered: int
    sms: tuple[SmsSample, ...]


def touches_in(templates_dir: Path) -> tuple[str, ...]:
    """The touches that have templates: the folders under ``messages/`` not starting with ``_``."""
    root = templates_dir / MESSAGES
    if not root.is_dir():
        return ()
    return tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")))


def check_templates(
    templates_dir: Path, *, default_locale: str, business: Mapping[str, str] | None = None
) -> TemplateCheck:
    """Render every touch in every locale on every channel with sample contexts; collect what fails."""
    renderer = Renderer(templates_dir, default_locale=default_locale)
    root = renderer.root
    problems: list[TemplateError] = []
    warnings: list[str] = []
    samples: list[SmsSample] = []
    rendered = 0
    touches = touches_in(templates_dir)
    all_locales = sorted({p.name for touch in touches for p in (root / touch).iterdir() if p.is_dir()})
    for touch in touches:
        for locale in all_locales:
            folder = root / touch / locale
            if not folder.is_dir():
                instead = " or ".join(renderer.locales(locale)[1:])
                warnings.append(f"{folder}: missing ({locale} contacts get {instead})")
                continue
            for channel, names in CHANNEL_FILES.items():
                missing = [name for name in names if not (folder / name).is_file()]
                if missing:
                    fallback = renderer._usable_locale(touch, channel, locale)
                    then = f"{locale} contacts get the {fallback} {channel}" if fallback else f"no {channel}"
                    warnings.extend(f"{folder / name}: missing ({then})" for name in missing)
                    continue
                for step in (1, 2, 3) if touch == "winback" else (None,):
                    context = sample_context(touch, locale)
                    context["step"] = step
                    if business is not None:
                        context["business"] = dict(business)
                    try:
                        message = renderer.render(touch, channel, locale, context)
                    except TemplateError as error:
                        if str(error) not in {str(problem) for problem in problems}:
                            problems.append(error)
                        break
                    rendered += 1
                    if channel is Channel.SMS:
                        info = encode_info(message.text)
                        samples.append(
                            SmsSample(touch, locale, step, info.encoding, info.segments, info.characters)
                        )
                    elif (problem := _unescaped(renderer, touch, locale, context)) is not None:
                        problems.append(problem)
    if not touches:
        warnings.append(f"{root}: no touch folders")
    return TemplateCheck(tuple(problems), tuple(warnings), rendered, tuple(samples))


def _unescaped(renderer: Renderer, touch: str, locale: str, context: dict[str, Any]) -> TemplateError | None:
    """Render the HTML part for a contact whose name is markup; a problem if it comes out unescaped."""
    contact = {**context["contact"], "first_name": _PROBE, "last_name": _PROBE}
    try:
        message = renderer.render(touch, Channel.EMAIL, locale, {**context, "contact": contact})
    except TemplateError:
        return None  # the plain render succeeded; this one only differs in the name
    if message.html is None or _PROBE not in message.html:
        return None
    return TemplateError(
        template=str(renderer.root / touch / locale / EMAIL_HTML),
        line=None,
        touch=touch,
        locale=locale,
        message="prints the contact's name unescaped (a |safe filter, or a _partials macro given it)",
    )
