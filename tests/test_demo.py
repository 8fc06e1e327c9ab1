"""The demo: runs from an empty folder, shows what it did, and never touches what is not its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from nurture.cli import app
from nurture.settings import Settings


def _demo(directory: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["demo", "--dir", str(directory), "--contacts", "150", *extra])
    return result.exit_code, result.output


def test_demo_imports_profiles_and_simulates_in_its_own_sqlite_file(tmp_path: Path) -> None:
    code, output = _demo(tmp_path / "demo", "--days", "3")
    assert code == 0, output
    for shown in ("Imports", "Why rows were rejected", "Lifecycle stage", "Value tier", "Satisfaction"):
        assert shown in output
    assert "What the customers did" in output and "rows rejected: 0" in output
    assert (tmp_path / "demo" / "nurture.db").exists()
    assert (tmp_path / "demo" / "data" / "contacts.rejects.csv").exists()
    assert "Traceback" not in output


def test_demo_starts_from_a_clean_folder_each_time(tmp_path: Path) -> None:
    assert _demo(tmp_path / "demo", "--days", "0")[0] == 0
    (tmp_path / "demo" / "leftover.txt").write_text("from an earlier run")
    code, output = _demo(tmp_path / "demo", "--days", "0")
    assert code == 0, output
    assert not (tmp_path / "demo" / "leftover.txt").exists()


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    code, output = _demo(mine)
    assert code == 1
    assert "not made by the demo" in output
    assert (mine / "thesis.txt").read_text() == "precious"


@pytest.mark.usefixtures("settings")
def test_demo_uses_an_exported_database_only_while_it_is_empty(tmp_path: Path, settings: Settings) -> None:
    code, output = _demo(tmp_path / "demo", "--days", "0")
    assert code == 0, output
    assert not (tmp_path / "demo" / "nurture.db").exists()  # it used NURTURE_DATABASE_URL
    code, output = _demo(tmp_path / "demo", "--days", "0")
    assert code == 1
    assert "already holds" in output and "the demo needs an empty database" in output
