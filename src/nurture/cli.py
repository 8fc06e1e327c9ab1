"""The ``nurture`` command: the shell's way in to everything nurture does."""

from __future__ import annotations

import copy
import csv
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from nurture import attribution, db, demo, ledger, profiles, rendering, retention, synthetic
from nurture.errors import NurtureError, ProfileNotRefreshed, UnknownTouch
from nurture.imports import ImportKind, import_file
from nurture.models import Channel, SendStatus
from nurture.programme import Programme, load_programme
from nurture.reports import html as html_report
from nurture.settings import Settings, load_settings

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__)
db_app = typer.Typer(no_args_is_help=True, help="The database schema.")
app.add_typer(db_app, name="db")

console = Console()
err_console = Console(stderr=True)


def fail(error: NurtureError | str) -> typer.Exit:
    """Print one error line and give the exit that ends the command."""
    err_console.print(f"[bold red]error:[/] {error}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code=1)


def open_database(settings: Settings) -> Engine:
    """The configured database, migrated to the newest schema."""
    return db.connect(settings)


@db_app.command("upgrade")
def db_upgrade(
    database_url: Annotated[str | None, typer.Option(help="Overrides NURTURE_DATABASE_URL.")] = None,
) -> None:
    """Bring the database schema up to date."""
    settings = load_settings()
    url = database_url or settings.database_url
    db.upgrade(db.make_engine(url))
    console.print(f"schema is up to date: {db.make_engine(url).url.render_as_string(hide_password=True)}")


synthetic_app = typer.Typer(
    no_args_is_help=True, help="A synthetic business for demos, tests and benchmarks."
)
app.add_typer(synthetic_app, name="synthetic")


@synthetic_app.command("generate")
def synthetic_generate(
    directory: Annotated[
        Path, typer.Argument(help="Folder to write contacts.csv, visits.csv, feedback.csv to.")
    ],
    contacts: Annotated[int, typer.Option(min=1, help="Contacts to generate.")] = 3000,
    seed: Annotated[int, typer.Option(help="Same seed, same files.")] = 7,
    start: Annotated[dt.datetime, typer.Option(formats=["%Y-%m-%d"], help="First day of history.")] = (
        dt.datetime(2025, 6, 1)
    ),
    end: Annotated[dt.datetime, typer.Option(formats=["%Y-%m-%d"], help="Day the history stops.")] = (
        dt.datetime(2026, 11, 1)
    ),
) -> None:
    """Write the import files of a believable salon and spa chain, a few bad rows included."""
    if end <= start:
        raise fail(f"--end {end:%Y-%m-%d} must be after --start {start:%Y-%m-%d}")
    files = synthetic.generate(directory, contacts=contacts, seed=seed, start=start.date(), end=end.date())
    console.print(f"synthetic business written to {directory}")
    table = Table("file", "rows", "bad rows")
    for name in ("contacts", "visits", "feedback"):
        table.add_row(f"{name}.csv", f"{files.rows[name]:,}", f"{files.bad_rows(name):,}")
    console.print(table)


@app.command("import")
def import_(
    kind: Annotated[ImportKind, typer.Argument(help="What the file holds.")],
    file: Annotated[Path, typer.Argument(help="A CSV file (UTF-8, with a header line).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Import contacts, visits or feedback from a CSV file; bad rows go to FILE.rejects.csv."""
    settings = load_settings()
    engine = None
    try:
        engine = open_database(settings)
        sessions = db.session_factory(engine)
        if err_console.is_terminal:
            with Progress(console=err_console, transient=True) as bar:
                task = bar.add_task(f"importing {file.name}", total=None)
                summary = import_file(
                    sessions,
                    kind,
                    file,
                    settings,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
        else:
            summary = import_file(sessions, kind, file, settings)
    except NurtureError as error:
        raise fail(error) from None
    finally:
        if engine is not None:
            engine.dispose()
    if as_json:
        typer.echo(json.dumps(summary.as_dict()))
        return
    console.print(
        f"{file}: [bold]{summary.imported}[/] imported, [bold]{summary.updated}[/] updated,"
        f" [bold]{summary.unchanged}[/] unchanged, [bold]{summary.rejected}[/] rejected"
    )
    if summary.rejects_file is not None:
        console.print(f"rejected rows, each with its line and reason: {summary.rejects_file}")


@contextmanager
def database_sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the configured database for one command; its connections are closed at the end."""
    engine = open_database(settings)
    try:
        yield db.session_factory(engine)
    finally:
        engine.dispose()


contacts_app = typer.Typer(no_args_is_help=True, help="What nurture knows about each customer.")
app.add_typer(contacts_app, name="contacts")


def _instant(value: str | None) -> dt.datetime:
    """Parse ``--at``: ISO 8601; a time without an offset is UTC; none means now."""
    if value is None:
        return dt.datetime.now(dt.UTC)
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise fail(f"--at {value!r}: not an ISO 8601 timestamp (e.g. 2026-03-01T09:00:00+01:00)") from exc
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed


@contacts_app.command("refresh")
def contacts_refresh(
    at: Annotated[
        str | None,
        typer.Option(help="Compute profiles as of this ISO 8601 instant (no offset means UTC); default now."),
    ] = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Sum up every contact's history again, not only what changed since the last refresh.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Rebuild every contact's profile (stage, value, satisfaction, next visit, loyalty) as of an instant."""
    settings = load_settings()
    instant = _instant(at)
    started = time.perf_counter()
    with database_sessions(settings) as factory, factory.begin() as session:
        summary = profiles.refresh(session, settings, instant, full=full)
    seconds = time.perf_counter() - started
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "as_of": summary.as_of.isoformat(),
                    "contacts": summary.contacts,
                    "stages": {str(stage): count for stage, count in summary.stages.items()},
                    "value_tiers": {str(tier): count for tier, count in summary.value_tiers.items()},
                    "loyalty_entries_added": summary.loyalty_entries_added,
                    "seconds": round(seconds, 3),
                }
            )
        )
        return
    table = Table(title=f"{summary.contacts} profiles as of {summary.as_of.isoformat()}")
    table.add_column("stage")
    table.add_column("contacts", justify="right")
    for stage, count in summary.stages.items():
        table.add_row(str(stage), str(count))
    console.print(table)
    tiers = ", ".join(f"{tier} {count}" for tier, count in summary.value_tiers.items())
    console.print(f"value tiers: {tiers}")
    console.print(f"loyalty entries added: {summary.loyalty_entries_added}; took {seconds:.1f} s")


@contacts_app.command("show")
def contacts_show(
    external_id: Annotated[str, typer.Argument(help="The contact's external id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the profile as one JSON object.")] = False,
) -> None:
    """Print one contact's profile as of the last refresh."""
    settings = load_settings()
    try:
        with database_sessions(settings) as factory, factory() as session:
            record = profiles.profile(session, external_id).as_record()
    except NurtureError as error:
        raise fail(error) from error
    if as_json:
        typer.echo(json.dumps(record))
        return
    table = Table(show_header=False, title=f"contact {external_id}")
    for name, value in record.items():
        table.add_row(name, "" if value is None else str(value))
    console.print(table)


@contacts_app.command("export")
def contacts_export(
    file: Annotated[Path, typer.Argument(help="The CSV file to write, one row per profile.", dir_okay=False)],
) -> None:
    """Write every contact's profile to a CSV file for marketers."""
    settings = load_settings()
    with database_sessions(settings) as factory, factory() as session:
        if profiles.last_refreshed(session) is None:
            raise fail(ProfileNotRefreshed())
        missing = profiles.unprofiled_contacts(session)
        written = 0
        with file.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=profiles.COLUMNS)
            writer.writeheader()
            for profile in profiles.profiles(session):
                record = profile.as_record()
                # Written the way imports read consent back: true / false.
                writer.writerow({k: str(v).lower() if isinstance(v, bool) else v for k, v in record.items()})
                written += 1
    console.print(f"wrote {written} profiles to {file}")
    if missing:
        err_console.print(
            f"[yellow]warning:[/] {missing} contacts imported since the last refresh are not in the file; "
            "run `nurture contacts refresh` first"
        )


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
) -> None:
    """Answer unsubscribe links and the SendGrid and Twilio webhooks (reachable at NURTURE_PUBLIC_URL)."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from nurture.web import create_app

    settings = load_settings()
    with database_sessions(settings) as sessions:
        try:
            web_app = create_app(settings, sessions)
        except NurtureError as error:
            raise fail(error) from None
        console.print(
            f"nurture serve on http://{host}:{port}, reachable from outside at {settings.public_url}"
        )
        # uvicorn's own logging, with unsubscribe tokens kept out of its access log.
        log_config = copy.deepcopy(LOGGING_CONFIG)
        log_config["filters"] = {"hide_tokens": {"()": "nurture.web.HideTokens"}}
        log_config["loggers"]["uvicorn.access"]["filters"] = ["hide_tokens"]
        uvicorn.run(web_app, host=host, port=port, log_level="info", log_config=log_config)


@app.command("demo")
def demo_command(
    directory: Annotated[Path, typer.Option("--dir", help="Folder the demo empties and works in.")] = Path(
        "demo"
    ),
    contacts: Annotated[int, typer.Option(min=10, help="Customers of the synthetic business.")] = 3000,
    days: Annotated[int, typer.Option(min=0, help="Days to simulate after the history.")] = 21,
    seed: Annotated[int, typer.Option(help="Same seed, same demo.")] = 7,
) -> None:
    """Run the end-to-end demo on a synthetic salon and spa chain: SQLite and a local outbox, no accounts."""
    options = demo.DemoOptions(directory=directory, contacts=contacts, days=days, seed=seed)
    try:
        demo.run(options, console)
    except NurtureError as exc:
        raise fail(exc) from None


templates_app = typer.Typer(no_args_is_help=True, help="The message templates marketers edit.")
app.add_typer(templates_app, name="templates")

TemplatesDir = Annotated[
    Path | None, typer.Option("--templates-dir", help="Overrides NURTURE_TEMPLATES_DIR.", show_default=False)
]


@templates_app.command("check")
def templates_check(templates_dir: TemplatesDir = None) -> None:
    """Render every touch in every locale on both channels with sample data; exit 1 on any failure."""
    settings = load_settings()
    folder = templates_dir or settings.templates_dir
    result = rendering.check_templates(
        folder, default_locale=settings.default_locale, business=rendering.business_context(settings)
    )
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    table = Table(
        "touch", "locale", "step", "encoding", "segments", "characters", title="SMS with sample data"
    )
    for sample in result.sms:
        step = "" if sample.step is None else str(sample.step)
        segments = f"[yellow]{sample.segments}[/]" if sample.segments > 2 else str(sample.segments)
        table.add_row(sample.touch, sample.locale, step, sample.encoding, segments, str(sample.characters))
    if result.sms:
        console.print(table)
    for problem in result.problems:
        err_console.print(f"[bold red]error:[/] {problem}", highlight=False, markup=True, soft_wrap=True)
    summary = f"{result.rendered} messages rendered from {folder}"
    if result.problems:
        count = len(result.problems)
        err_console.print(f"{summary}; {count} template{'s' if count != 1 else ''} failed", highlight=False)
        raise typer.Exit(code=1)
    console.print(f"{summary}; every template renders", highlight=False)


@templates_app.command("lint")
def templates_lint(templates_dir: TemplatesDir = None) -> None:
    """Check every template: syntax, variables, locales, unsubscribe links, SMS cost, email size."""
    from nurture.lint import lint_templates

    settings = load_settings()
    folder = templates_dir or settings.templates_dir
    report = lint_templates(folder, settings, at=dt.datetime.now(dt.UTC))
    for finding in report.findings:
        # Plain `file:line: severity: message` lines, never wrapped, for editors and CI to read.
        typer.echo(str(finding))
    errors, warnings = len(report.errors), len(report.warnings)
    summary = (
        f"{report.rendered} messages rendered from {folder} for every persona:"
        f" {errors} error{'s' if errors != 1 else ''}, {warnings} warning{'s' if warnings != 1 else ''}"
    )
    typer.echo(summary, err=True)
    if errors:
        raise typer.Exit(code=1)


ContactOption = Annotated[
    str | None,
    typer.Option("--contact", metavar="ID", help="A real contact's external id (needs the database)."),
]
PersonaOption = Annotated[
    str | None,
    typer.Option(
        "--persona", metavar="NAME", help="A sample contact of personas.yaml; default: one in --locale."
    ),
]
LocaleOption = Annotated[
    str | None, typer.Option(help="Locale, e.g. es or pt_BR; default the contact's or persona's own.")
]
StepOption = Annotated[int | None, typer.Option(min=1, max=3, help="Win-back step (1-3); default 1.")]


def _previews(
    touch: str,
    channels: list[Channel] | None,
    *,
    contact: str | None,
    persona: str | None,
    locale: str | None,
    step: int | None,
    templates_dir: Path | None,
    anonymous: bool = False,
) -> tuple[Settings, list[Any]]:
    """Render ``touch`` for a contact or persona on each of ``channels`` (default: the touch's own)."""
    from nurture.calendar import contact_preview
    from nurture.preview import Previewer

    if contact is not None and persona is not None:
        raise fail("give --contact or --persona, not both")
    settings = load_settings()
    if templates_dir is not None:
        settings = settings.model_copy(update={"templates_dir": templates_dir})
    try:
        previewer = Previewer(settings, dt.datetime.now(dt.UTC))
        wanted = channels or previewer.touch(touch).channels
        if contact is not None:
            with database_sessions(settings) as sessions, sessions() as session:
                loaded = contact_preview(session, contact)
            return settings, [
                previewer.for_contact(touch, c, loaded, locale=locale, step=step, anonymous=anonymous)
                for c in wanted
            ]
        if persona is None:
            language = (locale or "").replace("-", "_").split("_")[0]
            names = list(previewer.personas)
            persona = next(
                (n for n in names if previewer.personas[n].locale.split("_")[0] == language), names[0]
            )
        return settings, [previewer.for_persona(touch, c, persona, locale=locale, step=step) for c in wanted]
    except NurtureError as error:
        raise fail(error) from None


@templates_app.command("preview")
def templates_preview(
    touch: Annotated[str, typer.Argument(help="The touch, e.g. welcome or winback.")],
    contact: ContactOption = None,
    persona: PersonaOption = None,
    locale: LocaleOption = None,
    channel: Annotated[Channel | None, typer.Option(help="Only this channel; default the touch's.")] = None,
    step: StepOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "--html", help="Write the email's HTML part (or, with --channel sms, the SMS) here."
        ),
    ] = None,
    templates_dir: TemplatesDir = None,
) -> None:
    """Show a touch as a persona or a real contact would get it now: subject, text part, SMS and segments."""
    _, previews = _previews(
        touch,
        [channel] if channel else None,
        contact=contact,
        persona=persona,
        locale=locale,
        step=step,
        templates_dir=templates_dir,
    )
    written = False
    for preview in previews:
        message = preview.message
        title = (
            f"{touch} · {preview.channel} · {preview.who} · {preview.recipient.locale} · {message.template}"
        )
        if preview.channel is Channel.EMAIL:
            body = f"[bold]Subject:[/] {escape(message.subject or '')}\n\n{escape(message.text)}"
            if out is not None and not written and message.html is not None:
                out.write_text(message.html, encoding="utf-8")
                written = True
                body += f"\n[dim]HTML part written to {escape(str(out))}[/]"
        else:
            body = f"{escape(message.text)}\n\n[dim]{message.encoding}, {message.segments} segment(s)[/]"
            if out is not None and not written:
                out.write_text(message.text + "\n", encoding="utf-8")
                written = True
                body += f"\n[dim]SMS written to {escape(str(out))}[/]"
        console.print(Panel(body, title=escape(title), title_align="left", expand=False), highlight=False)


@templates_app.command("test-send")
def templates_test_send(
    touch: Annotated[str, typer.Argument(help="The touch, e.g. welcome or winback.")],
    to: Annotated[str, typer.Option("--to", help="The seed address: an email address or a phone number.")],
    contact: ContactOption = None,
    persona: PersonaOption = None,
    locale: LocaleOption = None,
    channel: Annotated[
        Channel | None, typer.Option(help="Default: email for an address with @, else sms.")
    ] = None,
    step: StepOption = None,
    templates_dir: TemplatesDir = None,
) -> None:
    """Send a touch as a persona or contact would get it to a seed address; nothing is recorded."""
    from nurture.channels.outbox import message_path
    from nurture.preview import TEST_SENDS, send_test

    wanted = channel or (Channel.EMAIL if "@" in to else Channel.SMS)
    settings, previews = _previews(
        touch,
        [wanted],
        contact=contact,
        persona=persona,
        locale=locale,
        step=step,
        templates_dir=templates_dir,
        anonymous=True,
    )
    preview = previews[0]
    name = settings.email_channel if wanted is Channel.EMAIL else settings.sms_channel
    try:
        delivery = send_test(settings, preview, to)
    except NurtureError as error:
        raise fail(error) from None
    if delivery.status is not SendStatus.SENT:
        raise fail(f"the {name} channel did not send it ({delivery.status}): {delivery.error}")
    where = f"{name}, message id {delivery.provider_message_id}"
    if name == "outbox":
        test_settings = settings.model_copy(update={"outbox_dir": Path(settings.outbox_dir) / TEST_SENDS})
        where = f"outbox: {message_path(test_settings, wanted, delivery.send_id)}"
    console.print(
        f"test {wanted} of {touch} ({preview.who}, {preview.message.locale}) sent to {to} through {where};"
        " not recorded in the ledger",
        highlight=False,
        soft_wrap=True,
    )


calendar_app = typer.Typer(no_args_is_help=True, help="The contact calendar.")
app.add_typer(calendar_app, name="calendar")
programme_app = typer.Typer(no_args_is_help=True, help="The programme marketers edit under templates/.")
app.add_typer(programme_app, name="programme")


@calendar_app.command("run")
def calendar_run(
    at: Annotated[
        str | None, typer.Option(help="Plan for this ISO 8601 instant (no offset means UTC); default now.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Plan and render, claim and send nothing.")
    ] = False,
    touch: Annotated[list[str] | None, typer.Option(help="Only this touch; repeat for several.")] = None,
    batch_size: Annotated[int, typer.Option(min=100, help="Contacts per task.")] = 50_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Run the contact calendar flow once and print what it did."""
    instant = _instant(at)
    if touch:
        # Checked before the flow starts, so that a typo costs no Prefect server start-up.
        try:
            programme = load_programme(load_settings().templates_dir)
        except NurtureError as error:
            raise fail(error) from None
        unknown = sorted(set(touch) - {t.name for t in programme.touches})
        if unknown:
            raise fail(UnknownTouch(unknown, known=[t.name for t in programme.touches]))
    from flows.contact_calendar import CalendarParameters, contact_calendar

    parameters = CalendarParameters(at=instant, dry_run=dry_run, touches=touch or None, batch_size=batch_size)
    try:
        result = contact_calendar(parameters)
    except NurtureError as error:
        raise fail(error) from None
    if as_json:
        typer.echo(json.dumps(result, default=str))
        return
    _print_run(result)


def _print_run(result: dict[str, Any]) -> None:
    from nurture.calendar import COUNTS

    title = f"contact calendar at {result['at']}" + (" (dry run)" if result["dry_run"] else "")
    shown = [name for name in COUNTS if result[name] or name in ("planned", "sent")]
    table = Table(title=title)
    table.add_column("touch")
    for name in shown:
        table.add_column(name.replace("_", " "), justify="right")
    for touch, counts in result["by_touch"].items():
        table.add_row(touch, *(str(counts[name]) for name in shown))
    table.add_row("[bold]total[/]", *(f"[bold]{result[name]}[/]" for name in shown))
    console.print(table)
    for error in result["errors"]:
        err_console.print(f"[yellow]warning:[/] {error}", highlight=False)
    if result.get("unknown_sends"):
        ids = ", ".join(str(send_id) for send_id in result["unknown_sends"])
        err_console.print(
            f"[yellow]unknown outcome, not resent by itself:[/] sends {ids}; see `nurture sends reconcile`",
            highlight=False,
        )


@programme_app.command("check")
def programme_check() -> None:
    """Validate the programme and check every touch has its templates; exit 1 naming each problem."""
    from nurture.rendering import Renderer

    settings = load_settings()
    try:
        programme = load_programme(settings.templates_dir)
    except NurtureError as error:
        raise fail(error) from None
    renderer = Renderer(settings.templates_dir, default_locale=programme.rules.default_locale)
    missing = [
        f"{touch.name}: no {channel} template for the default locale {programme.rules.default_locale}"
        for touch in programme.touches
        for channel in touch.channels
        if not renderer.has(touch.name, channel, programme.rules.default_locale)
    ]
    if missing:
        raise fail("\n".join(missing))
    console.print(
        f"programme ok: {len(programme.touches)} touches, {len(programme.content)} content items "
        f"in {settings.templates_dir}"
    )


sends_app = typer.Typer(no_args_is_help=True, help="The send ledger.")
app.add_typer(sends_app, name="sends")


@sends_app.command("reconcile")
def sends_reconcile(
    sent: Annotated[
        list[int] | None,
        typer.Option("--sent", metavar="ID", help="Record this unknown send as sent; repeat for several."),
    ] = None,
    message_id: Annotated[
        str | None, typer.Option(help="The provider's message id of the one send given with --sent.")
    ] = None,
    release: Annotated[
        list[int] | None,
        typer.Option(
            "--release",
            metavar="ID",
            help="Let the next calendar run send this unknown send once more (if still due); repeatable.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List the sends whose outcome is unknown, or settle them: --sent ID or --release ID."""
    sent, release = sent or [], release or []
    if message_id is not None and len(sent) != 1:
        raise fail("--message-id names the one send given with --sent")
    both = sorted(set(sent) & set(release))
    if both:
        raise fail(f"send {', '.join(map(str, both))} cannot be both --sent and --release")
    settings = load_settings()
    now = dt.datetime.now(dt.UTC)
    unknown: list[ledger.UnknownSend] = []
    confirmed: list[int] = []
    released: list[int] = []
    try:
        # One transaction: every id is checked before anything changes, so a typo changes nothing.
        with database_sessions(settings) as sessions, sessions.begin() as session:
            if sent:
                confirmed = ledger.confirm_sent(session, sent, at=now, provider_message_id=message_id)
            if release:
                released = ledger.release(session, release, at=now)
            if not sent and not release:
                unknown = ledger.unknown_sends(session)
    except (NurtureError, ledger.NotUnknown) as error:
        raise fail(str(error)) from None
    if sent or release:
        if as_json:
            typer.echo(json.dumps({"sent": confirmed, "released": released}))
            return
        if confirmed:
            console.print(f"recorded as sent: {', '.join(map(str, confirmed))}")
        if released:
            console.print(
                f"released: {', '.join(map(str, released))}; the next calendar run sends each once more"
                " if it is still due then"
            )
        return
    rows = [
        {
            "id": u.id,
            "contact": u.contact,
            "touch": u.touch,
            "channel": u.channel,
            "claimed_at": u.claimed_at.isoformat(),
            "error": u.error,
        }
        for u in unknown
    ]
    if as_json:
        typer.echo(json.dumps({"unknown": rows}))
        return
    if not rows:
        console.print("no send has an unknown outcome")
        return
    table = Table("id", "contact", "touch", "channel", "claimed at", "error", title="unknown outcome")
    for row in rows:
        table.add_row(*(escape(str(row[name] or "")) for name in row))
    console.print(table)
    console.print(
        "Find out from the provider whether each went out, then: nurture sends reconcile --sent ID"
        " [--message-id ID] or --release ID",
        soft_wrap=True,
    )


report_app = typer.Typer(
    no_args_is_help=True, help="Reports: retention and attribution, in the terminal, as JSON or as HTML."
)
app.add_typer(report_app, name="report")


def _report_date(value: str | None, option: str) -> dt.date | None:
    """Parse a report's --since or --until (YYYY-MM-DD), naming the option when it is not a date."""
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise fail(f"{option} {value!r}: not a date like 2026-10-31") from None


WindowSince = Annotated[
    str | None, typer.Option(help="First day (YYYY-MM-DD), rounded down to its period; default 12 periods.")
]
WindowUntil = Annotated[
    str | None, typer.Option(help="Last day (YYYY-MM-DD), included; default today (UTC).")
]
WindowPeriod = Annotated[retention.Period, typer.Option(help="What retention is counted over.")]


def _report_window(
    since: str | None, until: str | None, period: retention.Period, today: dt.date
) -> tuple[Settings, retention.Window, Programme]:
    """The settings, the periods a retention report covers and the programme, or a clear error."""
    settings = load_settings()
    last = _report_date(until, "--until") or today
    try:
        window = retention.Window.of(last, _report_date(since, "--since"), period)
        programme = load_programme(settings.templates_dir)
    except ValueError as error:
        raise fail(str(error)) from None
    except NurtureError as error:
        raise fail(error) from None
    return settings, window, programme


@report_app.command("retention")
def report_retention(
    since: WindowSince = None,
    until: WindowUntil = None,
    period: WindowPeriod = retention.Period.MONTH,
    slipping: Annotated[int, typer.Option(min=0, help="Customers shown on the early-warning list.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Retention and churn per period and cohort, lifetime value, cost of retention, saves, satisfaction."""
    settings, window, programme = _report_window(since, until, period, dt.datetime.now(dt.UTC).date())
    costs = retention.Costs.from_settings(settings, programme.rules.margin_rate)
    with (
        database_sessions(settings) as factory,
        factory() as session,
        factory() as sends,
        factory() as rhythms,
    ):
        figures = retention.report(
            session,
            window,
            costs,
            retention.offer_kinds(programme),
            lapsed_after=settings.lapsed_after,
            slipping_limit=slipping,
            aside=(sends, rhythms),
        )
    if as_json:
        typer.echo(json.dumps(figures.as_dict()))
        return
    _print_retention(figures)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _print_retention(report: retention.Report) -> None:
    title = f"Retention per {report.period}, {report.since} to {report.until}"
    table = Table(
        title=title, caption="retention: of those who visited the period before, the share who came"
    )
    for name in ("period", "customers", "new", "base", "retained", "retention", "churn"):
        table.add_column(name, justify="left" if name == "period" else "right")
    for p in report.periods:
        name = f"{p.period} (so far)" if p.partial else p.period
        table.add_row(
            name, f"{p.active:,}", f"{p.new:,}", f"{p.base:,}", f"{p.retained:,}",
            _rate(p.retention_rate), _rate(p.churn_rate),
        )  # fmt: skip
    console.print(table)
    cohorts = Table(title=f"Cohorts: share who visited in each {report.period} after the first")
    cohorts.add_column("first visit")
    cohorts.add_column("customers", justify="right")
    longest = max((len(c.retention) for c in report.cohorts), default=0)
    for k in range(1, longest):
        cohorts.add_column(f"+{k}", justify="right")
    for c in report.cohorts:
        cohorts.add_row(c.cohort, f"{c.customers:,}", *(f"{share:.0%}" for share in c.retention[1:]))
    console.print(cohorts)
    summary = Table(show_header=False, title="Customers over the report")
    summary.add_row("customers who visited", f"{report.customers:,}")
    summary.add_row("new (first visit ever)", f"{report.new_customers:,}")
    summary.add_row("retained (had visited before)", f"{report.retained_customers:,}")
    summary.add_row("repeat-visit rate (2+ visits)", _rate(report.repeat_visit_rate))
    summary.add_row(f"churn per {report.period} (complete ones)", _rate(report.churn_rate_per_period))
    summary.add_row("churn per year", _rate(report.churn_rate_per_year))
    lifetime = report.expected_lifetime_years
    summary.add_row("expected lifetime", "-" if lifetime is None else f"{lifetime:.1f} years")
    asked = report.cancellations
    summary.add_row(
        "cancellation requests saved",
        f"{asked['saved']:,} of {asked['asked']:,} ({_rate(asked['saved_share'])})",
    )
    s = report.satisfaction
    summary.add_row(
        "satisfied / neutral / dissatisfied", f"{s['satisfied']:,} / {s['neutral']:,} / {s['dissatisfied']:,}"
    )
    nps, csat = s["nps"], s["csat"]
    summary.add_row(
        "NPS promoters / passives / detractors",
        f"{nps['promoters']:,} / {nps['passives']:,} / {nps['detractors']:,}"
        + ("" if nps["score"] is None else f" (NPS {nps['score']:+d})"),
    )
    summary.add_row(
        "CSAT satisfied / neutral / dissatisfied",
        f"{csat['satisfied']:,} / {csat['neutral']:,} / {csat['dissatisfied']:,}"
        f" ({_rate(csat['score'])} satisfied)",
    )
    summary.add_row("complaints (still open)", f"{s['complaints']:,} ({s['complaints_open']:,})")
    m = report.messages
    summary.add_row(
        "messages sent", f"{m['email']:,} emails, {m['sms']:,} SMS ({m['sms_segments']:,} segments)"
    )
    console.print(summary)
    money = Table(
        title="Revenue and lifetime value, per currency",
        caption="lifetime value: margin × spend per visit × visits a year × expected lifetime",
    )
    for name in (
        "currency",
        "customers",
        "revenue",
        "per customer",
        "per visit",
        "visits a year",
        "lifetime",
    ):
        money.add_column(name, justify="left" if name == "currency" else "right")
    for row in report.money:
        money.add_row(
            row.currency, f"{row.customers:,}", f"{row.revenue:,}", f"{row.revenue_per_customer:,}",
            f"{row.revenue_per_visit:,}", f"{row.visits_per_customer_per_year:.1f}",
            _amount(row.lifetime_value),
        )  # fmt: skip
    console.print(money)
    cost = Table(
        title="Cost of retention, per currency",
        caption="offers at face value on the contact's average visit; message and acquisition costs are set"
        " in NURTURE_DEFAULT_CURRENCY",
    )
    for name in ("currency", "retained", "incentives", "messages", "per retained", "acquisition", "ratio"):
        cost.add_column(name, justify="left" if name == "currency" else "right")
    for row in report.money:
        ratio = row.retention_to_acquisition
        cost.add_row(
            row.currency, f"{row.retained_customers:,}", f"{row.incentive_cost:,}", _amount(row.message_cost),
            _amount(row.retention_cost_per_retained), _amount(row.acquisition_cost),
            "-" if ratio is None else f"{ratio:.0%}",
        )  # fmt: skip
    console.print(cost)
    warning = Table(
        "customer", "visits", "last visit", "usual gap", "days since", "late now", "a week ago",
        title=f"Early warning: {report.slipping_count:,} customers slipping past their rhythm",
        caption="late: days past the usual gap, in usual gaps; none in the last week, not lapsed yet",
    )  # fmt: skip
    for late in report.slipping:
        warning.add_row(
            f"{escape(late.name)} ({escape(late.external_id)})", str(late.visits),
            f"{late.last_visit:%Y-%m-%d}",
            f"{late.usual_interval_days:.0f} d", f"{late.days_since:.0f} d", f"{late.late_now:.0%}",
            f"{late.late_week_ago:.0%}",
        )  # fmt: skip
    console.print(warning)


def _amount(value: Decimal | None) -> str:
    return "-" if value is None else f"{value:,}"


@report_app.command("html")
def report_html(
    out: Annotated[Path, typer.Option(help="The HTML file to write.", dir_okay=False)] = Path("report.html"),
    since: WindowSince = None,
    until: WindowUntil = None,
    period: WindowPeriod = retention.Period.MONTH,
) -> None:
    """Write one self-contained HTML file with the charts: opens anywhere, without a network."""
    now = dt.datetime.now(dt.UTC)
    settings, window, programme = _report_window(since, until, period, now.date())
    with (
        database_sessions(settings) as factory,
        factory() as session,
        factory() as sends,
        factory() as rhythms,
    ):
        page = html_report.build(session, window, settings, programme, now=now, aside=(sends, rhythms))
    out.write_text(page, encoding="utf-8")
    console.print(f"report written to {out}; it opens in any browser, without a network", soft_wrap=True)


def _report_period(since: dt.datetime | None, until: dt.datetime | None) -> tuple[dt.datetime | None, ...]:
    """Turn --since and --until days (UTC, both included) into [since, until) instants."""
    start = since.replace(tzinfo=dt.UTC) if since is not None else None
    end = until.replace(tzinfo=dt.UTC) + dt.timedelta(days=1) if until is not None else None
    if start is not None and end is not None and end <= start:
        raise fail(f"--until {until:%Y-%m-%d} is before --since {since:%Y-%m-%d}")
    return start, end


@report_app.command("attribution")
def report_attribution(
    since: Annotated[
        dt.datetime | None, typer.Option(formats=["%Y-%m-%d"], help="First day of sends (UTC).")
    ] = None,
    until: Annotated[
        dt.datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Last day of sends (UTC).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Credit visits to the messages before them and measure each touch's lift over its holdout."""
    settings = load_settings()
    start, end = _report_period(since, until)
    try:
        programme = load_programme(settings.templates_dir)
    except NurtureError as error:
        err_console.print(
            f"[yellow]warning:[/] {error}; every send gets its channel's window", soft_wrap=True
        )
        programme = None
    with database_sessions(settings) as factory, factory() as session:
        result = attribution.report(
            session, settings, programme, now=dt.datetime.now(dt.UTC), since=start, until=end
        )
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    for renderable in result.tables():
        console.print(renderable)


campaign_app = typer.Typer(no_args_is_help=True, help="Ad-hoc campaigns ops send to a segment.")
app.add_typer(campaign_app, name="campaign")


@campaign_app.command("segments")
def campaign_segments(
    at: Annotated[
        str | None, typer.Option(help="Judge last-visit ranges as of this ISO 8601 instant; default now.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Validate templates/segments.yaml and show how many contacts each segment holds."""
    from nurture import segments

    instant = _instant(at)
    settings = load_settings()
    try:
        defined = segments.load_segments(settings.templates_dir)
        with database_sessions(settings) as sessions, sessions.begin() as session:
            sizes = {name: segments.size(session, segment, instant) for name, segment in defined.root.items()}
            as_of = profiles.last_refreshed(session)
    except NurtureError as error:
        raise fail(error) from None
    if as_json:
        typer.echo(json.dumps({"profiles_as_of": as_of and as_of.isoformat(), "segments": sizes}))
        return
    table = Table("segment", "contacts", "description", title="segments")
    for name, segment in defined.root.items():
        table.add_row(name, f"{sizes[name]:,}", escape(segment.description))
    console.print(table)
    console.print(
        f"profiles as of {as_of.isoformat()}" if as_of else "no profiles yet: run `nurture contacts refresh`"
    )


@campaign_app.command("send")
def campaign_send(
    touch: Annotated[str, typer.Option(help="The programme's touch to send, e.g. promotion.")],
    segment: Annotated[str, typer.Option(help="A segment named in templates/segments.yaml.")],
    campaign: Annotated[
        str | None,
        typer.Option(help="Its name; the same name resumes it. Default: TOUCH-SEGMENT."),
    ] = None,
    channel: Annotated[Channel | None, typer.Option(help="Only this channel.")] = None,
    holdout: Annotated[float | None, typer.Option(min=0, max=99, help="Percent held out.")] = None,
    loyalty_first: Annotated[
        int | None, typer.Option(min=1, metavar="HOURS", help="Loyal customers first, everyone HOURS later.")
    ] = None,
    send_at: Annotated[str | None, typer.Option(help="Start at this ISO 8601 instant; default now.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most N contacts of the segment.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count, estimate and render samples; send nothing.")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", help="Approve a large campaign without asking (for scripts).")
    ] = False,
    at: Annotated[str | None, typer.Option(help="Run as of this ISO 8601 instant; default now.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Send one touch to a segment through the adhoc-campaign flow; --dry-run first."""
    from flows.adhoc_campaign import CampaignParameters, adhoc_campaign

    from nurture import campaigns

    instant = _instant(at)
    try:
        parameters = CampaignParameters(
            touch=touch,
            segment=segment,
            campaign=campaign,
            channel=channel,
            holdout=holdout,
            loyalty_first_hours=loyalty_first,
            send_at=_instant(send_at) if send_at else None,
            limit=limit,
            dry_run=dry_run,
            # Only when asked: a campaign approved hours later then runs as of its approval.
            at=instant if at else None,
        )
    except ValueError as error:
        raise fail(str(error).splitlines()[0] + ": " + str(error).splitlines()[-1].strip()) from None
    settings = load_settings()
    try:
        # Checked before the flow starts, so that a typo costs no Prefect server start-up.
        planned = campaigns.plan(settings, parameters.spec(instant), instant)
    except NurtureError as error:
        raise fail(error) from None
    spec = planned.spec
    as_of = planned.profiles_as_of.isoformat() if planned.profiles_as_of else "never refreshed"
    err_console.print(
        f"campaign [bold]{spec.name}[/]: segment {spec.segment} holds [bold]{planned.audience}[/] contacts"
        f" (profiles as of {as_of}; the run brings them up to date)"
        + (" — resuming it" if planned.started else ""),
        highlight=False,
        soft_wrap=True,
    )
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = adhoc_campaign(parameters)
        except BaseException as raised:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = raised

    from prefect.client.orchestration import get_client

    # Up before the flow starts, so that the flow and the approval below share one Prefect server.
    with get_client(sync_client=True) as client:
        client.hello()
    worker = threading.Thread(target=run, name=f"campaign-{spec.name}")
    worker.start()
    _answer_approval(worker, spec.name, approve=yes)
    worker.join()
    if "error" in outcome:
        raised = outcome["error"]
        if isinstance(raised, NurtureError):
            raise fail(raised)
        raise raised
    result = outcome["result"]
    if as_json:
        typer.echo(json.dumps(result, default=str))
        return
    _print_campaign(result)


def _answer_approval(worker: threading.Thread, name: str, *, approve: bool) -> None:
    """While the flow runs, answer its approval pause at the terminal (or with --yes)."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    answered: set[Any] = set()
    while worker.is_alive():
        worker.join(timeout=2)
        if not worker.is_alive():
            return
        try:
            with get_client(sync_client=True) as client:
                paused = client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["adhoc-campaign"])),
                    flow_run_filter=FlowRunFilter(
                        name=FlowRunFilterName(any_=[name]),
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
                    ),
                )
        except httpx.HTTPError:
            continue  # asked again two seconds later
        for flow_run in paused:
            if flow_run.id in answered:
                continue  # resumed; the flow notices within its poll interval
            answered.add(flow_run.id)
            description = _approval_description(flow_run.id)
            console.print(description, markup=False, highlight=False, soft_wrap=True)
            if approve:
                answer = True
            elif console.is_terminal:
                answer = typer.confirm(f"Send campaign {name} as summarised above?", default=False)
            else:
                err_console.print("not a terminal and no --yes: the campaign is rejected, nothing sent")
                answer = False
            resume_flow_run(flow_run.id, run_input={"approve": answer})


def _approval_description(flow_run_id: Any) -> str:
    """Give the summary a paused campaign shows with its approval request."""
    from prefect.client.orchestration import get_client
    from prefect.input.actions import read_flow_run_input
    from prefect.input.run_input import keyset_from_paused_state

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state is not None
    keyset = keyset_from_paused_state(flow_run.state)
    description = read_flow_run_input(keyset["description"], flow_run_id=flow_run_id)
    return str(description or "")


def _print_campaign(result: dict[str, Any]) -> None:
    from nurture.calendar import COUNTS

    mode = " (dry run)" if result["dry_run"] else ""
    if result.get("rejected"):
        mode = " (rejected: nothing sent; the dry run's counts)"
    table = Table(title=f"campaign {result['campaign']} at {result['at']}{mode}")
    table.add_column("outcome")
    table.add_column("messages", justify="right")
    for name in COUNTS:
        if result[name] or name in ("planned", "sent"):
            table.add_row(name.replace("_", " "), str(result[name]))
    console.print(table)
    channels = ", ".join(f"{k} {v}" for k, v in result["by_channel"].items()) or "none"
    console.print(
        f"by channel: {channels}; SMS segments {result['sms_segments']}, estimated cost {result['sms_cost']}",
        highlight=False,
    )
    for sample in result["samples"]:
        console.rule(f"sample: {sample['channel']}, {sample['locale']}, contact {sample['contact']}")
        if sample["subject"]:
            console.print(sample["subject"], style="bold", markup=False)
        console.print(sample["text"], markup=False, highlight=False)
    for error in result["errors"]:
        err_console.print(f"[yellow]warning:[/] {error}", highlight=False)
    if result.get("next_run"):
        console.print(
            f"Contacts still wait (their send window, the caps or the second wave): run the same command"
            f" again at or after {result['next_run']} (a deployed adhoc-campaign schedules it itself).",
            highlight=False,
        )


@campaign_app.command("cancel")
def campaign_cancel(
    name: Annotated[str, typer.Argument(help="The campaign's name (its flow runs are named after it).")],
) -> None:
    """Cancel the campaign's running, paused and scheduled flow runs on the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    live = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["adhoc-campaign"])),
            flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[name]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live)),
            ),
        )
        for flow_run in runs:
            # As `prefect flow-run cancel` does: the worker stops a running one, a scheduled one never starts.
            client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
    if not runs:
        raise fail(f"campaign {name!r} has no running, paused or scheduled flow run")
    console.print(
        f"cancelling {len(runs)} flow run(s) of campaign {name}: {', '.join(str(r.id) for r in runs)}."
        " What went out stays recorded; `nurture campaign send` with the same options resumes it.",
        highlight=False,
        soft_wrap=True,
    )
