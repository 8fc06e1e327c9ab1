"""nurture templates lint: each mistake a marketer can make, named by file and line, and exit codes."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from nurture.calendar import Calendar
from nurture.cli import app
from nurture.models import Channel
from nurture.personas import load_personas
from nurture.programme import load_programme
from nurture.rendering import CONTEXT
from nurture.settings import Settings

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the shipped programme, templates and personas that a test may break."""
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATES, target)
    return target


def lint(folder: Path, *options: str) -> Result:
    return CliRunner().invoke(app, ["templates", "lint", "--templates-dir", str(folder), *options])


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def lines(result: Result) -> list[str]:
    return result.stdout.splitlines()


def test_the_shipped_templates_lint_clean() -> None:
    result = lint(TEMPLATES)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert re.search(r"\d{3} messages rendered .* for every persona: 0 errors, 0 warnings", result.stderr)


def test_a_syntax_error_names_file_and_line(copy: Path) -> None:
    (copy / "messages/welcome/es/sms.txt").write_text("Hola\n{% if contact.first_name %}\nhi\n")
    result = lint(copy)
    assert result.exit_code == 1
    assert any(
        line.startswith(f"{copy}/messages/welcome/es/sms.txt:3: error: syntax error: Unexpected end")
        for line in lines(result)
    ), result.stdout


def test_an_unknown_filter_is_a_syntax_error(copy: Path) -> None:
    edit(copy / "messages/birthday/en/email.txt", "{{ business.name }}", "{{ business.name | shout }}")
    result = lint(copy)
    assert result.exit_code == 1
    assert f"{copy}/messages/birthday/en/email.txt" in result.stdout
    assert "No filter named 'shout'" in result.stdout


def test_variables_and_fields_outside_the_documented_context_are_errors(copy: Path) -> None:
    page = copy / "messages/welcome/en/email.html"
    edit(
        page,
        "<p>See you soon",
        "<p>{{ contcat.first_name }} {{ contact.favourite_colour }}</p>\n<p>See you soon",
    )
    edit(copy / "messages/welcome/es/sms.txt", "{{ links.survey }}", "{{ links['surveys'] }}")
    result = lint(copy)
    assert result.exit_code == 1
    output = lines(result)
    line = (
        page.read_text().splitlines().index("<p>{{ contcat.first_name }} {{ contact.favourite_colour }}</p>")
        + 1
    )
    assert (
        f"{page}:{line}: error: 'contcat' is not a variable templates get; did you mean 'contact'?" in output
    )
    assert any(
        entry.startswith(f"{page}:{line}: error: contact.favourite_colour: no such field (it has: first_name")
        for entry in output
    )
    assert any(
        entry.startswith(f"{copy}/messages/welcome/es/sms.txt:3: error: links.surveys: no such field")
        and "did you mean 'survey'?" in entry
        for entry in output
    )


def test_loop_variables_and_macro_arguments_are_not_the_context(copy: Path) -> None:
    # `offer` inside the partial's macro is its argument; `p` in a loop is the loop's: neither is flagged.
    result = lint(copy)
    assert result.exit_code == 0
    edit(
        copy / "messages/education/en/email.html",
        "{% endblock %}",
        "{% for contact in [{'anything': 1}] %}{{ contact.anything }}{% endfor %}\n{% endblock %}",
    )
    assert lint(copy).exit_code == 0


def test_words_a_partial_does_not_define_are_named_with_the_partial(copy: Path) -> None:
    edit(copy / "messages/_partials/pt.txt", '{% set sms_stop = "Sair" %}\n', "")
    result = lint(copy)
    assert result.exit_code == 1
    assert any(
        re.match(
            rf"{copy}/messages/welcome/pt/sms.txt:\d+: error: words.sms_stop: messages/_partials/pt.txt", line
        )
        for line in lines(result)
    ), result.stdout


def test_a_partial_cannot_use_the_context(copy: Path) -> None:
    edit(
        copy / "messages/_partials/en.txt",
        '{% set book = "Book your visit" %}',
        "{% set book = business.name %}",
    )
    result = lint(copy)
    assert result.exit_code == 1
    assert any(
        re.match(
            rf"{copy}/messages/_partials/en.txt:\d+: error: 'business': a partial cannot use the context",
            line,
        )
        for line in lines(result)
    ), result.stdout


def test_a_missing_locale_variant_is_an_error_naming_what_contacts_get_instead(copy: Path) -> None:
    (copy / "messages/birthday/pt/sms.txt").unlink()
    shutil.rmtree(copy / "messages/promotion/es")
    result = lint(copy)
    assert result.exit_code == 1
    output = lines(result)
    assert f"{copy}/messages/birthday/pt/sms.txt: error: missing: pt contacts get the en sms" in output
    for name in ("subject.txt", "email.html", "email.txt"):
        assert f"{copy}/messages/promotion/es/{name}: error: missing: es contacts get the en email" in output
    # promotion is email only: no SMS is asked for.
    assert f"{copy}/messages/promotion/es/sms.txt" not in result.stdout


def test_a_locale_the_programme_declares_must_exist_everywhere(copy: Path) -> None:
    edit(copy / "programme.yaml", "locales: [en, es, pt]", "locales: [en, es, pt, fr]")
    result = lint(copy)
    assert result.exit_code == 1
    assert f"{copy}/messages/welcome/fr/sms.txt: error: missing: fr contacts get the en sms" in lines(result)


def test_a_marketing_email_without_an_unsubscribe_link_is_an_error(copy: Path) -> None:
    edit(
        copy / "messages/_layouts/email.html",
        '<a href="{{ links.unsubscribe }}">{{ words.unsubscribe }}</a>',
        "{{ words.unsubscribe }}",
    )
    result = lint(copy)
    assert result.exit_code == 1
    assert (
        f"{copy}/messages/welcome/es/email.html: error: a marketing email without an unsubscribe link:"
        " nothing in the HTML links to {{ links.unsubscribe }}" in lines(result)
    )
    # Service messages (complaint recovery, reward confirmations) carry no unsubscribe link.
    assert "complaint_recovery" not in result.stdout and "referral_reward" not in result.stdout


def test_a_text_part_without_the_unsubscribe_link_is_a_warning(copy: Path) -> None:
    layout = copy / "messages/_layouts/email.txt"
    edit(layout, "{{ words.unsubscribe }}: {{ links.unsubscribe }}\n", "")
    result = lint(copy)
    assert result.exit_code == 0, result.stdout
    assert f"{copy}/messages/welcome/en/email.txt: warning: the plain-text part" in result.stdout
    assert re.search(r"0 errors, \d+ warnings", result.stderr)


def test_an_sms_over_the_configured_segments_is_an_error(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NURTURE_SMS_MAX_SEGMENTS", "2")
    result = lint(copy)
    assert result.exit_code == 1
    assert re.search(
        rf"^{copy}/messages/welcome/es/sms.txt: error: [34] segments \(UCS-2, \d+ characters, persona \w+\):"
        " over NURTURE_SMS_MAX_SEGMENTS=2$",
        result.stdout,
        re.M,
    ), result.stdout


def test_a_look_alike_character_forcing_ucs2_is_named_with_its_replacement(copy: Path) -> None:
    sms = copy / "messages/welcome/en/sms.txt"
    edit(sms, "How did it go?", "How did it go\u2026 we\u2019d love to know")
    result = lint(copy)
    assert result.exit_code == 1
    line = next(n for n, text in enumerate(sms.read_text().splitlines(), 1) if "\u2019" in text)
    output = lines(result)
    assert any(
        entry.startswith(f"{sms}:{line}: error: '\u2019' (RIGHT SINGLE QUOTATION MARK) makes this SMS UCS-2:")
        and "persona emma" in entry
        and entry.endswith('write "\'" instead')
        for entry in output
    ), result.stdout
    assert any("(HORIZONTAL ELLIPSIS)" in entry and "write '...' instead" in entry for entry in output)


def test_a_look_alike_in_an_sms_that_needs_ucs2_anyway_is_not_flagged(copy: Path) -> None:
    # Portuguese loyalty SMS already has ã and ó: the dash costs nothing more.
    edit(copy / "messages/loyalty_milestone/pt/sms.txt", "{{ links.booking }}", "\u2014 {{ links.booking }}")
    assert lint(copy).exit_code == 0


def test_html_gmail_would_clip_is_an_error(copy: Path) -> None:
    padding = "<p>" + "Lots of words to read. " * 5000 + "</p>\n"
    edit(
        copy / "messages/promotion/en/email.html", "{% block content %}\n", "{% block content %}\n" + padding
    )
    result = lint(copy)
    assert result.exit_code == 1
    assert re.search(
        rf"^{copy}/messages/promotion/en/email.html: error: the HTML is 1\d\d KB rendered and inlined"
        r" \(persona \w+\): Gmail clips emails over 100 KB",
        result.stdout,
        re.M,
    ), result.stdout


def test_a_broken_persona_file_names_its_line(copy: Path) -> None:
    edit(copy / "personas.yaml", "  visits: 14\n", "  visits: many\n")
    result = lint(copy)
    assert result.exit_code == 1
    personas = (copy / "personas.yaml").read_text().splitlines()
    line = personas.index("  visits: many") + 1
    assert any(
        entry.startswith(f"{copy}/personas.yaml:{line}: error: lucia.visits: ") for entry in lines(result)
    ), result.stdout


def test_a_template_no_touch_uses_is_a_warning(copy: Path) -> None:
    shutil.copytree(copy / "messages/welcome", copy / "messages/welcom")
    result = lint(copy)
    assert result.exit_code == 0
    assert f"{copy}/messages/welcom: warning: no enabled touch in touches/ uses these templates" in lines(
        result
    )


def test_the_readme_documents_exactly_the_render_context() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme.split("**Variables**", 1)[1].split("\n\n", 2)[1]
    rows = {
        name: row
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }
    assert set(rows) == set(CONTEXT)
    for name, variable in CONTEXT.items():
        for field in variable.fields + variable.optional:
            assert f"`{field}`" in rows[name], f"README: {name}.{field} is not documented"


def test_the_calendar_builds_exactly_the_documented_context() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    programme = load_programme(TEMPLATES)
    at = dt.datetime(2026, 11, 23, 12, tzinfo=dt.UTC)
    calendar = Calendar(settings, programme, at, dry_run=True)
    persona = load_personas(TEMPLATES)["lucia"]
    for touch in programme.touches:
        context = calendar.preview_context(
            persona.recipient("lucia", at), touch, Channel.EMAIL, tags=persona.tags, friend=persona.friend
        )
        # locale and template_locale are added by the renderer itself.
        assert set(context) | {"locale", "template_locale"} == set(CONTEXT)
        for name, value in context.items():
            if isinstance(value, dict):
                variable = CONTEXT[name]
                assert set(variable.fields) <= set(value) <= set(variable.fields + variable.optional), name


def test_findings_with_and_without_a_line_in_one_file_are_all_listed(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NURTURE_SMS_MAX_SEGMENTS", "1")
    sms = copy / "messages/welcome/en/sms.txt"
    edit(sms, "How did it go?", "How\u2019d it go?")
    result = lint(copy)
    assert result.exit_code == 1
    found = [line for line in lines(result) if line.startswith(f"{sms}")]
    assert re.match(rf"{sms}: error: \d segments", found[0])  # the file as a whole first, then by line
    assert found[1].startswith(f"{sms}:3: error: '\u2019' (RIGHT SINGLE QUOTATION MARK)")
