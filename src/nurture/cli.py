"""The ``nurture`` command: the shell's way in to everything nurture does."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from sqlalchemy import Engine

from nurture import db
from nurture.errors import NurtureError
from nurture.settings import Settings, load_settings

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__)
db_app = typer.Typer(no_args_is_help=True, help="The database schema.")
app.add_typer(db_app, name="db")

console = Console()
err_console = Console(stderr=True)


def fail(error: NurtureError | str) -> typer.Exit:
    """Print one error line and give the exit that ends the command."""
    err_console.print(f"[bold red]error:[/] {error}", highlight=False, markup=True)
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
