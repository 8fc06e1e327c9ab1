"""Rendering the programme's templates: every touch and locale, fallbacks, escaping, styles, errors."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from nurture.cli import app
from nurture.errors import TemplateError
from nurture.models import Channel
from nurture.rendering import Renderer, inline_styles, sample_context

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"
TOUCHES = [  # every touch of the default programme
    "welcome",
    "education",
    "incentive",
    "loyalty_milestone",
    "promotion",
    "birthday",
    "referral_ask",
    "referral_reward",
    "complaint_recovery",
    "winback",
    "appreciation_day",
]
LOCALES = ["en", "es", "pt"]


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(TEMPLATES, default_locale="en")


@pytest.fixture
def templates_copy(tmp_path: Path) -> Path:
    """A copy of the shipped templates that a test may break."""
    copy = tmp_path / "templates"
    shutil.copytree(TEMPLATES / "messages", copy / "messages")
    return copy


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("touch", TOUCHES)
def test_every_touch_renders_in_every_locale_on_both_channels(
    renderer: Renderer, touch: str, locale: str
) -> None:
    context = sample_context(touch, locale)
    email = renderer.render(touch, Channel.EMAIL, locale, context)
    assert email.locale == locale
    assert email.template == f"messages/{touch}/{locale}/email.html"
    assert email.subject and "\n" not in email.subject and "{" not in email.subject
    assert email.html is not None and email.html.startswith("<!doctype html>")
    assert context["contact"]["first_name"] in email.text
    assert context["links"]["unsubscribe"] in email.text
    assert f'href="{context["links"]["unsubscribe"]}"' in email.html
    assert "None" not in email.text and "None" not in email.html

    sms = renderer.render(touch, Channel.SMS, locale, context)
    assert sms.template == f"messages/{touch}/{locale}/sms.txt"
    assert sms.subject is None and sms.html is None
    assert sms.encoding in {"GSM-7", "UCS-2"}
    assert sms.segments is not None and 1 <= sms.segments <= 4
    assert "  " not in sms.text and "\n" not in sms.text
    assert not re.search(r"[.!?:][A-ZÁÉÍÓÚ¡¿]", sms.text), "two sentences glued together"
    assert not re.search(r"[a-z][.!?:][A-ZÁÉÍÓÚ¡¿]", email.text), "two sentences glued together"
    for text in (sms.text, email.text, email.subject):
        assert not re.search(r"[,;:][.!?]|\s[,.;:!?]", text), f"stray punctuation in {text!r}"
    assert context["links"]["unsubscribe"] in sms.text


@pytest.mark.parametrize("locale", LOCALES)
def test_winback_speaks_differently_at_each_step(renderer: Renderer, locale: str) -> None:
    texts = set()
    for step in (1, 2, 3):
        context = {**sample_context("winback", locale), "step": step}
        email = renderer.render("winback", Channel.EMAIL, locale, context)
        sms = renderer.render("winback", Channel.SMS, locale, context)
        texts.update({email.subject, email.text, sms.text})
    assert len(texts) == 9


@pytest.mark.parametrize("kind", ["percent", "amount", "free_service", "points"])
@pytest.mark.parametrize("touch", ["incentive", "birthday", "complaint_recovery", "winback", "promotion"])
def test_every_kind_of_offer_reads_well(renderer: Renderer, touch: str, kind: str) -> None:
    context = sample_context(touch, "en")
    context["offer"] = {
        "kind": kind,
        "value": Decimal(25),
        "currency": "USD" if kind == "amount" else None,
        "code": "GIFT-2026",
        "expires_on": dt.date(2026, 6, 30),
        "description": "a deep-conditioning treatment" if kind == "free_service" else None,
    }
    email = renderer.render(touch, Channel.EMAIL, "en", context)
    expected = {
        "percent": "25% off",
        "amount": "$25.00 off",
        "free_service": "a deep-conditioning treatment",
        "points": "25 bonus points",
    }[kind]
    assert expected in email.text and expected in email.html
    assert "GIFT-2026" in email.text and "June 30, 2026" in email.text


@pytest.mark.parametrize("touch", ["incentive", "birthday", "complaint_recovery", "winback", "promotion"])
def test_a_touch_whose_offer_was_removed_still_renders(renderer: Renderer, touch: str) -> None:
    context = {**sample_context(touch, "es"), "offer": None}
    assert renderer.render(touch, Channel.EMAIL, "es", context).text
    assert renderer.render(touch, Channel.SMS, "es", context).text


def test_a_regional_locale_uses_its_language_and_formats_the_regional_way(renderer: Renderer) -> None:
    message = renderer.render("welcome", Channel.SMS, "pt_BR", sample_context("welcome", "pt_BR"))
    assert message.locale == "pt"
    assert message.template == "messages/welcome/pt/sms.txt"
    assert renderer.render("welcome", Channel.SMS, "pt-BR", sample_context("welcome", "pt")).locale == "pt"


def test_a_locale_without_templates_falls_back_to_the_default(renderer: Renderer) -> None:
    message = renderer.render("welcome", Channel.EMAIL, "fr_FR", sample_context("welcome", "fr"))
    assert message.locale == "en"
    assert message.subject is not None and message.subject.startswith("Thank you")
    assert renderer.locales("fr_FR") == ("fr_FR", "fr", "en")


def test_a_locale_missing_a_file_falls_back_whole(templates_copy: Path) -> None:
    (templates_copy / "messages/welcome/es/email.txt").unlink()
    renderer = Renderer(templates_copy, default_locale="en")
    email = renderer.render("welcome", Channel.EMAIL, "es", sample_context("welcome", "es"))
    sms = renderer.render("welcome", Channel.SMS, "es", sample_context("welcome", "es"))
    assert (email.locale, sms.locale) == ("en", "es")


def test_has_tells_which_touches_can_be_rendered(templates_copy: Path) -> None:
    shutil.rmtree(templates_copy / "messages/welcome/en")
    (templates_copy / "messages/welcome/es/sms.txt").unlink()
    renderer = Renderer(templates_copy, default_locale="en")
    assert renderer.has("welcome", Channel.EMAIL, "es_MX")
    assert renderer.has("welcome", Channel.SMS, "pt")
    assert not renderer.has("welcome", Channel.SMS, "es")
    assert not renderer.has("welcome", Channel.EMAIL, "fr")
    assert not renderer.has("no_such_touch", Channel.EMAIL, "en")
    with pytest.raises(TemplateError, match="no sms templates") as caught:
        renderer.render("welcome", Channel.SMS, "es", sample_context("welcome", "es"))
    assert caught.value.touch == "welcome"


def test_contact_data_is_escaped_in_html_only(renderer: Renderer) -> None:
    context = sample_context("welcome", "en")
    context["contact"]["first_name"] = "<script>alert(1)</script> & O'Neil"
    email = renderer.render("welcome", Channel.EMAIL, "en", context)
    assert email.html is not None
    assert "<script>" not in email.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; O&#39;Neil" in email.html
    assert "<script>alert(1)</script> & O'Neil" in email.text
    assert email.subject is not None and "<script>alert(1)</script> & O'Neil" in email.subject


def test_every_kind_of_value_prints_as_jinja_prints_it(templates_copy: Path) -> None:
    probe = templates_copy / "messages/probe/en"
    write(probe / "subject.txt", "{{ contact.first_name }} {{ contact.last_name }}{{ profile.visits }}")
    write(
        probe / "email.html",
        "{% macro bold(x) %}<b>{{ x }}</b>{% endmacro %}\n"
        "{% set hi %}Hi {{ contact.first_name }}{% endset %}\n"
        "<p>{{ contact.first_name }}|{{ contact.last_name }}|{{ profile.visits }}|{{ offer.value }}|"
        "{{ '<i>ok</i>' | safe }}|{{ bold(contact.first_name) }}|{{ hi }}|"
        "{% autoescape false %}{{ contact.first_name }}|{{ contact.last_name }}{% endautoescape %}|"
        "{{ links.preferences is defined }}</p>\n",
    )
    write(probe / "email.txt", "{{ contact.first_name }}|{{ contact.last_name }}|{{ profile.visits }}\n")
    raw = '<Ann & "Bo\'s">'
    context = {
        "contact": {"first_name": raw, "last_name": None},
        "profile": {"visits": 7},
        "offer": {"value": Decimal("10.50")},
        "links": {},
    }
    email = Renderer(templates_copy, default_locale="en").render("probe", Channel.EMAIL, "en", context)
    name = "&lt;Ann &amp; &#34;Bo&#39;s&#34;&gt;"
    assert email.html == f"<p>{name}||7|10.50|<i>ok</i>|<b>{name}</b>|Hi {name}|{raw}||False</p>"
    assert email.text == f"{raw}||7\n"
    assert email.subject == f"{raw} 7"


def test_email_html_carries_inline_styles(renderer: Renderer) -> None:
    email = renderer.render("incentive", Channel.EMAIL, "es", sample_context("incentive", "es"))
    assert email.html is not None
    assert '<a style="color: #ffffff;display: inline-block;background-color: #8a5a44;' in email.html
    assert '<h1 style="font-family: Georgia' in email.html
    assert '<td style="padding: 16px 32px 24px;' in email.html and 'class="footer"' in email.html


def test_inlining_keeps_jinja_tags_lines_and_written_styles() -> None:
    source = (
        '<style>.x { color: red; } p { margin: 0; }</style>\n<p class="x"\n  title="{{ t }}">'
        '{% if a > b %}\n<b class="x" style="color: blue">hi</b>{% endif %}</p>'
    )
    inlined = inline_styles(source)
    assert inlined.count("\n") == source.count("\n")
    assert '<p style="margin: 0;color: red;" class="x"\n  title="{{ t }}">{% if a > b %}' in inlined
    assert '<b class="x" style="color: red; color: blue">' in inlined


def test_an_undefined_variable_names_template_and_line(templates_copy: Path) -> None:
    write(
        templates_copy / "messages/welcome/en/email.html",
        '{% extends "_layouts/email.html" %}\n{% block content %}\n<p>Hi</p>\n<p>{{ contact.nickname }}</p>\n'
        "{% endblock %}\n",
    )
    renderer = Renderer(templates_copy, default_locale="en")
    with pytest.raises(TemplateError) as caught:
        renderer.render("welcome", Channel.EMAIL, "en", sample_context("welcome", "en"))
    error = caught.value
    assert error.template == str(templates_copy / "messages/welcome/en/email.html")
    assert error.line == 4
    assert "nickname" in error.message
    assert str(error).startswith(f"{templates_copy}/messages/welcome/en/email.html:4: ")
    assert (error.touch, error.locale) == ("welcome", "en")


def test_a_failure_inside_the_layout_names_the_layout(templates_copy: Path) -> None:
    layout = templates_copy / "messages/_layouts/email.txt"
    lines = layout.read_text(encoding="utf-8").splitlines()
    lines.insert(5, "{{ business.motto }}")
    layout.write_text("\n".join(lines) + "\n", encoding="utf-8")
    renderer = Renderer(templates_copy, default_locale="en")
    with pytest.raises(TemplateError) as caught:
        renderer.render("welcome", Channel.EMAIL, "es", sample_context("welcome", "es"))
    assert (caught.value.template, caught.value.line) == (str(layout), 6)


def test_a_syntax_error_names_template_and_line(templates_copy: Path) -> None:
    write(templates_copy / "messages/welcome/es/sms.txt", "Hola\n{% if contact.first_name %}\n{{ x }}\n")
    renderer = Renderer(templates_copy, default_locale="en")
    with pytest.raises(TemplateError) as caught:
        renderer.render("welcome", Channel.SMS, "es", sample_context("welcome", "es"))
    assert caught.value.template == str(templates_copy / "messages/welcome/es/sms.txt")
    assert caught.value.line is not None and caught.value.line >= 2
    assert "syntax error" in caught.value.message


def test_templates_compiled_ahead_render_the_same_and_a_broken_one_still_names_its_line(
    templates_copy: Path,
) -> None:
    write(templates_copy / "messages/welcome/es/sms.txt", "Hola\n{% if contact.first_name %}\n{{ x }}\n")
    lazy = Renderer(templates_copy, default_locale="en")
    ahead = Renderer(templates_copy, default_locale="en")
    ahead.compile_all()  # as a run's worker does when it starts
    context = sample_context("welcome", "pt")
    assert ahead.render("welcome", Channel.EMAIL, "pt", context) == lazy.render(
        "welcome", Channel.EMAIL, "pt", context
    )
    with pytest.raises(TemplateError) as caught:
        ahead.render("welcome", Channel.SMS, "es", sample_context("welcome", "es"))
    assert caught.value.template == str(templates_copy / "messages/welcome/es/sms.txt")
    assert caught.value.line is not None and caught.value.line >= 2


@pytest.mark.parametrize(
    "expression",
    [
        "''.__class__.__mro__",
        "contact.__class__",
        "contact.clear()",
        "business.update({'name': 'x'})",
    ],
)
def test_the_sandbox_refuses_unsafe_access(templates_copy: Path, expression: str) -> None:
    write(templates_copy / "messages/welcome/en/sms.txt", f"Hi\n{{{{ {expression} }}}}\n")
    renderer = Renderer(templates_copy, default_locale="en")
    context = sample_context("welcome", "en")
    with pytest.raises(TemplateError) as caught:
        renderer.render("welcome", Channel.SMS, "en", context)
    assert caught.value.line == 2
    assert context["contact"]["first_name"] == "Emma" and context["business"]["name"] == "Luma Studio"


@pytest.mark.parametrize(
    ("locale", "money", "day"),
    [
        ("es", "1.234,50 €", "14 de mayo de 2026"),
        ("pt_BR", "R$ 1.234,50", "14 de maio de 2026"),
        ("en_US", "$1,234.50", "May 14, 2026"),
    ],
)
def test_money_and_dates_are_formatted_for_the_locale(
    templates_copy: Path, locale: str, money: str, day: str
) -> None:
    for language in ("en", "es", "pt"):
        write(
            templates_copy / f"messages/probe/{language}/sms.txt",
            "{{ offer.value | money(offer.currency) }}|{{ offer.expires_on | date }}|{{ 15 | percent }}",
        )
    renderer = Renderer(templates_copy, default_locale="en")
    context: dict[str, Any] = {
        "offer": {
            "value": Decimal("1234.50"),
            "currency": money_currency(money),
            "expires_on": dt.date(2026, 5, 14),
        }
    }
    text = renderer.render("probe", Channel.SMS, locale, context).text
    assert text.split("|")[:2] == [money, day]


def money_currency(formatted: str) -> str:
    return "EUR" if "€" in formatted else "BRL" if "R$" in formatted else "USD"


def test_sms_turns_the_non_breaking_spaces_of_formatted_money_into_spaces(templates_copy: Path) -> None:
    write(templates_copy / "messages/probe/es/sms.txt", "{{ 1234.5 | money('EUR') }}")
    renderer = Renderer(templates_copy, default_locale="es")
    message = renderer.render("probe", Channel.SMS, "es", {})
    assert message.text == "1.234,50 €"
    assert message.encoding == "GSM-7"


def test_an_empty_sms_is_an_error(templates_copy: Path) -> None:
    write(templates_copy / "messages/welcome/en/sms.txt", "{% if false %}never{% endif %}\n")
    renderer = Renderer(templates_copy, default_locale="en")
    with pytest.raises(TemplateError, match="renders empty"):
        renderer.render("welcome", Channel.SMS, "en", sample_context("welcome", "en"))


def run(*args: str) -> Result:
    return CliRunner().invoke(app, [*args], catch_exceptions=False)


def test_check_passes_on_the_shipped_templates() -> None:
    result = run("templates", "check", "--templates-dir", str(TEMPLATES))
    assert result.exit_code == 0, result.output
    assert "every template renders" in result.output
    assert "warning" not in result.output


def test_check_names_file_and_line_of_each_broken_template(templates_copy: Path) -> None:
    broken = templates_copy / "messages/birthday/es/email.txt"
    lines = broken.read_text(encoding="utf-8").splitlines()
    lines[4] = "{{ profile.favourite_colour }}"
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    write(templates_copy / "messages/welcome/pt/sms.txt", "Oi\n{% for x in %}\n")
    (templates_copy / "messages/promotion/pt/subject.txt").unlink()

    result = run("templates", "check", "--templates-dir", str(templates_copy))

    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert f"{broken}:5: " in output and "favourite_colour" in output
    assert f"{templates_copy}/messages/welcome/pt/sms.txt:2: syntax error" in output
    assert (
        f"warning: {templates_copy}/messages/promotion/pt/subject.txt: missing (pt contacts get the en email)"
        in output
    )
    assert "2 templates failed" in output


def test_check_catches_contact_data_printed_unescaped(templates_copy: Path) -> None:
    page = templates_copy / "messages/welcome/en/email.html"
    page.write_text(
        page.read_text(encoding="utf-8").replace(
            "{{ contact.first_name }}", "{{ contact.first_name | safe }}"
        )
    )
    result = run("templates", "check", "--templates-dir", str(templates_copy))
    assert result.exit_code == 1
    assert "unescaped" in result.output


def test_preview_shows_subject_text_and_sms_segments() -> None:
    result = run(
        "templates", "preview", "winback", "--locale", "es", "--step", "3", "--templates-dir", str(TEMPLATES)
    )
    assert result.exit_code == 0, result.output
    assert "Subject: Un último mensaje de Luma Studio" in result.output
    assert "es la última vez que te escribimos" in result.output
    assert "segment(s)" in result.output and "UCS-2" in result.output


def test_preview_of_an_unknown_touch_is_one_error_line() -> None:
    result = run("templates", "preview", "no_such_touch", "--templates-dir", str(TEMPLATES))
    assert result.exit_code == 1
    assert "error:" in result.output and "unknown touch no_such_touch" in result.output


@pytest.mark.parametrize("locale", LOCALES)
def test_a_complaint_from_someone_without_visits_still_reads_well(renderer: Renderer, locale: str) -> None:
    context = sample_context("complaint_recovery", locale)
    context["profile"] = {**context["profile"], "last_visit": None, "visits": 0}
    email = renderer.render("complaint_recovery", Channel.EMAIL, locale, context)
    phrase = {"en": "your last visit did", "es": "tu última visita no", "pt": "a sua última visita não"}
    assert phrase[locale] in email.text


def test_formatting_a_missing_date_is_an_error_not_today(templates_copy: Path) -> None:
    write(templates_copy / "messages/probe/en/sms.txt", "Since\n{{ profile.last_visit | date }}\n")
    renderer = Renderer(templates_copy, default_locale="en")
    with pytest.raises(TemplateError, match="no date to format") as caught:
        renderer.render("probe", Channel.SMS, "en", {"profile": {"last_visit": None}})
    assert caught.value.line == 2


def test_a_new_language_without_its_partial_fails_check_where_it_is_imported(templates_copy: Path) -> None:
    shutil.copytree(templates_copy / "messages/welcome/en", templates_copy / "messages/welcome/fr")
    result = run("templates", "check", "--templates-dir", str(templates_copy))
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert f"{templates_copy}/messages/_layouts/email.html:4: template not found: _partials/fr.txt" in output
    assert f"warning: {templates_copy}/messages/birthday/fr: missing (fr contacts get en)" in output
