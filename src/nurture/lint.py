"""Lint: what `nurture templates lint` finds in the templates before a message goes out wrong.

Errors (the command exits 1) are what would break a send, break the law or cost money on every send:

- a template that does not compile (syntax, unknown filter), or fails to render for a persona;
- a variable that is not in the render context (``rendering.CONTEXT``), or a field it does not have;
  a ``words.*`` name the locale's partial does not define; a context variable in a partial (partials
  are imported without the context);
- a programme touch missing a channel's files in one of the programme's ``locales``;
- a marketing email whose HTML part has no link to ``links.unsubscribe``;
- an SMS over ``NURTURE_SMS_MAX_SEGMENTS`` segments for some persona, or forced into UCS-2 by a
  character that has a GSM-7 look-alike (a curly quote, a dash, a no-break space, an ellipsis);
- an email whose HTML is over 100 KB once rendered and inlined (Gmail clips it);
- a broken programme or ``personas.yaml``.

Warnings are worth a look but send fine: a marketing email whose plain-text part lacks the unsubscribe
link, a message folder no touch uses.

Every message is rendered for every persona (``personas.yaml``) in every locale through the calendar's
own context, as of ``at``.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from html.parser import HTMLParser
from pathlib import Path
from typing import Final

from jinja2 import Environment, TemplateSyntaxError, meta, nodes

from nurture.calendar import Calendar
from nurture.errors import ProgrammeError, TemplateError
from nurture.models import Channel, SendCategory
from nurture.personas import Persona, load_personas
from nurture.programme import Lapsed, Programme, load_programme
from nurture.rendering import CHANNEL_FILES, CONTEXT, EMAIL_HTML, EMAIL_TEXT, MESSAGES, Renderer
from nurture.settings import Settings
from nurture.sms import GSM_7, encode_info, forced_ucs2

GMAIL_CLIP_BYTES: Final = 100 * 1024  # Gmail clips a message whose HTML is over about 102 KB
PARTIALS: Final = "_partials"


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing lint found: where (file and line, when there is one) and what."""

    path: Path
    line: int | None
    severity: Severity
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.severity}: {self.message}"


@dataclass(frozen=True, slots=True)
class LintReport:
    """Everything lint found, sorted by file and line, and how many messages it rendered."""

    findings: tuple[Finding, ...]
    rendered: int

    @property
    def errors(self) -> tuple[Finding, ...]:
        """The findings that fail the lint."""
        return tuple(f for f in self.findings if f.severity is Severity.ERROR)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        """The findings worth a look that do not fail it."""
        return tuple(f for f in self.findings if f.severity is Severity.WARNING)


def lint_templates(templates_dir: Path, settings: Settings, *, at: dt.datetime) -> LintReport:
    """Check every template under ``templates_dir`` statically, then render it for every persona."""
    found = _Findings()
    programme = None
    try:
        programme = load_programme(templates_dir)
    except ProgrammeError as error:
        found.problems(error)
    personas: dict[str, Persona] = {}
    try:
        personas = load_personas(templates_dir)
    except ProgrammeError as error:
        found.problems(error)
    default_locale = programme.rules.default_locale if programme else settings.default_locale
    renderer = Renderer(templates_dir, default_locale=default_locale)
    for path in _template_files(renderer.root):
        found.extend(_static(renderer.environment, renderer.root, path))
    rendered = 0
    if programme is not None:
        locales = programme_locales(renderer, programme)
        found.extend(_missing(renderer, programme, locales))
        if personas:
            rendered = _render_all(renderer, programme, personas, locales, settings, at, found)
    ordered = sorted(found.kept.values(), key=lambda f: (str(f.path), f.line or 0, f.severity, f.message))
    return LintReport(tuple(ordered), rendered)


class _Findings:
    """Findings kept once per (file, line, what), whichever persona showed them first."""

    def __init__(self) -> None:
        self.kept: dict[tuple[Path, int | None, str], Finding] = {}

    def add(self, finding: Finding, key: str | None = None) -> None:
        self.kept.setdefault((finding.path, finding.line, key or finding.message), finding)

    def has_error(self, path: Path, line: int | None) -> bool:
        return any(
            f.path == path and f.line == line and f.severity is Severity.ERROR for f in self.kept.values()
        )

    def extend(self, findings: Iterator[Finding]) -> None:
        for finding in findings:
            self.add(finding)

    def problems(self, error: ProgrammeError) -> None:
        for problem in error.problems:
            message = f"{problem.field}: {problem.message}" if problem.field else problem.message
            self.add(Finding(problem.path, problem.line, Severity.ERROR, message))


def _template_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for directory, _, names in os.walk(root):
        files.extend(Path(directory) / name for name in names if name.endswith((".txt", ".html")))
    return sorted(files)


# Static checks: the template's source against the context, the filters and the partials.


def _static(environment: Environment, root: Path, path: Path) -> Iterator[Finding]:
    name = path.relative_to(root).as_posix()
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        yield Finding(path, None, Severity.ERROR, f"cannot read: {exc}")
        return
    try:
        environment.compile(source, name, str(path))
        tree = environment.parse(source, name, str(path))
    except TemplateSyntaxError as exc:
        yield Finding(path, exc.lineno, Severity.ERROR, f"syntax error: {exc.message}")
        return
    partial = name.startswith(f"{PARTIALS}/")
    # Partials are imported without the context: only their macros' arguments and Jinja's globals.
    allowed = set(environment.globals) | (set() if partial else set(CONTEXT))
    # A child template's blocks also see what its layout imports at the top (the layouts' ``words``).
    inherited = _inherited(root, tree)
    if inherited is None:
        return  # the layout does not compile: named where it is checked, its children cannot be
    allowed |= inherited
    local = {node.name for node in tree.find_all(nodes.Name) if node.ctx in ("store", "param")}
    for variable in sorted(meta.find_undeclared_variables(tree) - allowed):
        line = next(n.lineno for n in tree.find_all(nodes.Name) if n.name == variable and n.ctx == "load")
        if partial and variable in CONTEXT:
            message = f"{variable!r}: a partial cannot use the context; pass it to the macro as an argument"
        else:
            message = f"{variable!r} is not a variable templates get{_did_you_mean(variable, allowed)}"
        yield Finding(path, line, Severity.ERROR, message)
    for owner, attribute, line in _fields_used(tree):
        if owner in local:
            continue
        if owner in CONTEXT and CONTEXT[owner].fields:
            known = CONTEXT[owner].fields + CONTEXT[owner].optional
            if attribute not in known:
                hint = _did_you_mean(attribute, known) or f" (it has: {', '.join(known)})"
                yield Finding(path, line, Severity.ERROR, f"{owner}.{attribute}: no such field{hint}")
    if "words" in _imported(tree) | inherited:
        for partial_path, exported in _partials_for(root, name).items():
            for owner, attribute, line in _fields_used(tree):
                if owner == "words" and attribute not in exported:
                    message = (
                        f"words.{attribute}: {partial_path.relative_to(root.parent)} does not define it"
                        f"{_did_you_mean(attribute, exported)}"
                    )
                    yield Finding(path, line, Severity.ERROR, message)


def _fields_used(tree: nodes.Template) -> Iterator[tuple[str, str, int]]:
    """Give each ``name.field`` and ``name["field"]`` the template reads, with its line."""
    for node in tree.find_all(nodes.Getattr):
        owner = node.node
        if isinstance(owner, nodes.Name) and owner.ctx == "load":
            yield owner.name, node.attr, node.lineno
    for item in tree.find_all(nodes.Getitem):
        owner, key = item.node, item.arg
        if isinstance(owner, nodes.Name) and owner.ctx == "load" and isinstance(key, nodes.Const):
            if isinstance(key.value, str):
                yield owner.name, key.value, item.lineno


def _imported(tree: nodes.Template) -> set[str]:
    return {node.target for node in tree.find_all(nodes.Import)}


def _inherited(root: Path, tree: nodes.Template) -> set[str] | None:
    """The names a template's layout imports or sets at its top level; None when it does not parse."""
    names: set[str] = set()
    for node in tree.find_all(nodes.Extends):
        if not isinstance(node.template, nodes.Const) or not isinstance(node.template.value, str):
            continue
        try:
            parent = Environment().parse((root / node.template.value).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, TemplateSyntaxError):
            return None
        names |= {n.target for n in parent.body if isinstance(n, nodes.Import)}
        names |= {
            n.target.name
            for n in parent.body
            if isinstance(n, nodes.Assign) and isinstance(n.target, nodes.Name)
        }
    return names


def _partials_for(root: Path, name: str) -> dict[Path, tuple[str, ...]]:
    """The partials a template's ``words`` can be: its locale's, or every one for a layout."""
    parts = name.split("/")
    folder = root / PARTIALS
    if len(parts) == 3 and not parts[0].startswith("_"):
        candidates = [folder / f"{parts[1]}.txt"]
    else:
        candidates = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    return {path: _exports(path) for path in candidates if path.is_file()}


def _exports(path: Path) -> tuple[str, ...]:
    """The words and macros a partial exports: its top-level ``set`` names and macros."""
    try:
        tree = Environment().parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, TemplateSyntaxError):
        return ()  # reported where the partial itself is checked
    names = [n.name for n in tree.body if isinstance(n, nodes.Macro)]
    for node in tree.body:
        if isinstance(node, nodes.Assign) and isinstance(node.target, nodes.Name):
            names.append(node.target.name)
    return tuple(names)


def _did_you_mean(word: str, choices: Sequence[str] | set[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


# Locale variants: every touch in every locale the programme speaks.


def programme_locales(renderer: Renderer, programme: Programme) -> tuple[str, ...]:
    """The locales every touch must have: the programme's ``locales``, else every locale folder found."""
    if programme.rules.locales is not None:
        return tuple(dict.fromkeys([programme.rules.default_locale, *programme.rules.locales]))
    found = {
        folder.name
        for touch in programme.touches
        if (renderer.root / touch.name).is_dir()
        for folder in (renderer.root / touch.name).iterdir()
        if folder.is_dir()
    }
    return tuple(dict.fromkeys([programme.rules.default_locale, *sorted(found)]))


def _missing(renderer: Renderer, programme: Programme, locales: Sequence[str]) -> Iterator[Finding]:
    touches = {touch.name for touch in programme.touches}
    for touch in programme.touches:
        for channel in touch.channels:
            for locale in locales:
                folder = renderer.root / touch.name / locale
                absent = [name for name in CHANNEL_FILES[channel] if not (folder / name).is_file()]
                if not absent:
                    continue
                fallback = next(
                    (
                        candidate
                        for candidate in renderer.locales(locale)[1:]
                        if all((renderer.root / touch.name / candidate / n).is_file() for n in absent)
                    ),
                    None,
                )
                if fallback is None:
                    then = f"the {touch.name} {channel} cannot be sent to {locale} contacts"
                else:
                    then = f"{locale} contacts get the {fallback} {channel}"
                for name in absent:
                    yield Finding(folder / name, None, Severity.ERROR, f"missing: {then}")
    for folder in sorted(renderer.root.iterdir()) if renderer.root.is_dir() else []:
        if folder.is_dir() and not folder.name.startswith("_") and folder.name not in touches:
            yield Finding(folder, None, Severity.WARNING, "no enabled touch in touches/ uses these templates")


# Rendered checks: every touch, locale, channel and persona through the calendar's own context.


def _render_all(
    renderer: Renderer,
    programme: Programme,
    personas: Mapping[str, Persona],
    locales: Sequence[str],
    settings: Settings,
    at: dt.datetime,
    found: _Findings,
) -> int:
    calendar = Calendar(settings, programme, at, dry_run=True)
    rendered = 0
    for touch in programme.touches:
        steps = range(1, len(touch.trigger.steps) + 1) if isinstance(touch.trigger, Lapsed) else [None]
        for locale in locales:
            for channel in touch.channels:
                if not renderer.has(touch.name, channel, locale):
                    continue  # reported as missing
                for (name, persona), step in ((p, s) for p in personas.items() for s in steps):
                    recipient = persona.recipient(name, at, locale=locale)
                    context = calendar.preview_context(
                        recipient, touch, channel, tags=persona.tags, step=step, friend=persona.friend
                    )
                    try:
                        message = renderer.render(touch.name, channel, locale, context)
                    except TemplateError as error:
                        path = Path(error.template)
                        if found.has_error(path, error.line):
                            continue  # the static check named it already
                        found.add(
                            Finding(path, error.line, Severity.ERROR, f"{error.message} (persona {name})"),
                            key=error.message,
                        )
                        continue
                    rendered += 1
                    where = renderer.templates_dir / message.template
                    who = f"persona {name}" + (f", step {step}" if step is not None else "")
                    if channel is Channel.SMS:
                        _check_sms(renderer.templates_dir, where, message.text, who, settings, found)
                        continue
                    html = message.html or ""
                    if touch.category is SendCategory.MARKETING:
                        unsubscribe = context["links"]["unsubscribe"]
                        if unsubscribe not in _links(html):
                            found.add(
                                Finding(
                                    where,
                                    None,
                                    Severity.ERROR,
                                    "a marketing email without an unsubscribe link: nothing in the HTML"
                                    " links to {{ links.unsubscribe }}",
                                ),
                                key="unsubscribe",
                            )
                        if unsubscribe not in message.text:
                            found.add(
                                Finding(
                                    where.with_name(EMAIL_TEXT),
                                    None,
                                    Severity.WARNING,
                                    "the plain-text part of a marketing email does not print"
                                    " {{ links.unsubscribe }}",
                                ),
                                key="unsubscribe",
                            )
                    size = len(html.encode())
                    if size > GMAIL_CLIP_BYTES:
                        found.add(
                            Finding(
                                where.with_name(EMAIL_HTML),
                                None,
                                Severity.ERROR,
                                f"the HTML is {size / 1024:.0f} KB rendered and inlined ({who}): Gmail clips"
                                f" emails over {GMAIL_CLIP_BYTES // 1024} KB and hides the rest, footer"
                                " and unsubscribe link included",
                            ),
                            key="size",
                        )
    return rendered


def _check_sms(
    templates_dir: Path, where: Path, body: str, who: str, settings: Settings, found: _Findings
) -> None:
    info = encode_info(body)
    limit = settings.sms_max_segments
    if info.segments > limit:
        found.add(
            Finding(
                where,
                None,
                Severity.ERROR,
                f"{info.segments} segments ({info.encoding}, {info.characters} characters, {who}):"
                f" over NURTURE_SMS_MAX_SEGMENTS={limit}",
            ),
            key="segments",
        )
    replaced = forced_ucs2(body)
    if not replaced:
        return
    gsm = encode_info("".join(replaced.get(char, char) for char in body))
    for char, lookalike in replaced.items():
        path, line = _locate(char, [where, templates_dir / MESSAGES / PARTIALS / f"{where.parent.name}.txt"])
        origin = "" if line is not None else " (it comes from the data, not the template)"
        instead = f"write {lookalike!r} instead" if lookalike else "remove it"
        found.add(
            Finding(
                path,
                line,
                Severity.ERROR,
                f"{char!r} ({unicodedata.name(char, f'U+{ord(char):04X}')}) makes this SMS UCS-2:"
                f" {info.segments} segment(s) instead of {gsm.segments} in {GSM_7} ({who}); {instead}"
                f"{origin}",
            ),
            key=f"lookalike {char}",
        )


def _locate(char: str, sources: Sequence[Path]) -> tuple[Path, int | None]:
    """Give the first source file and line where ``char`` is written; else the first file, no line."""
    for source in sources:
        try:
            lines = source.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for number, text in enumerate(lines, start=1):
            if char in text:
                return source, number
    return sources[0], None


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.add(href)


def _links(html: str) -> set[str]:
    parser = _Links()
    parser.feed(html)
    parser.close()
    return parser.hrefs
