"""The ``nurture`` command: the shell's way in to everything nurture does."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import Engine

from nurture import db, synthetic
from nurture.errors import NurtureError
from nurture.imports import ImportKind, import_file
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
