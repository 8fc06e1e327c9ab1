"""The demo: runs from an empty folder, shows what it did, and never touches what is not its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nurture.cli import app
from nurture.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _shipped_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo sends the shipped programme; the tests run from a temporary folder."""
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(REPO / "templates"))


def _demo(directory: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["demo", "--dir", str(directory), "--contacts", "150", *extra])
    return result.exit_code, result.output


def test_demo_imports_profiles_simulates_and_sends_in_its_own_folder(tmp_path: Path) -> None:
    code, output = _demo(tmp_path / "demo", "--days", "3")
    assert code == 0, output
    for shown in ("Imports", "Why rows were rejected", "Lifecycle stage", "Value tier", "Satisfaction"):
        assert shown in output
    assert "What the customers did" in output and "rows rejected: 0" in output
    assert (tmp_path / "demo" / "nurture.db").exists()
    assert (tmp_path / "demo" / "data" / "contacts.rejects.csv").exists()
    assert "Traceback" not in output

    assert "Messages over 3 days, 12 calendar runs" in output
    total = re.search(r"total\s*│\s*([\d,]+)\s*│\s*([\d,]+)\s*│", output)
    assert total, output
    emails, texts = (int(n.replace(",", "")) for n in total.groups())
    assert emails > 0 and texts > 0
    assert "Due but not sent when a run found them" in output
    assert re.search(r"╭─ email: \w+, \w+, sent \w{3} \d\d Nov \d\d:\d\d UTC", output)
    assert "Subject: " in output
    assert re.search(r"╭─ sms: \w+, \w+, sent ", output)
    assert re.search(r"(GSM-7|UCS-2), \d+ segments?", output)
    outbox = (tmp_path / "demo" / "outbox").absolute()
    assert len(list(outbox.glob("email/*.eml"))) == emails
    assert len(list(outbox.glob("sms/*.json"))) == texts
    assert f"The outbox holds {emails:,} emails" in output
    assert f"{outbox}/" in output.splitlines()
    report = (tmp_path / "demo" / "report.html").absolute()
    assert str(report) in output.splitlines()
    assert 'id="report-data"' in report.read_text(encoding="utf-8")
    # It ends with what the messages brought: lift over the holdout and the visits credited.
    assert "What the messages brought" in output and "Lift over the holdout" in output
    assert re.search(r"Visits credited by last touch: [1-9][\d,]* \(", output)


def test_demo_needs_the_programme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NURTURE_TEMPLATES_DIR")
    code, output = _demo(tmp_path / "demo")
    assert code == 1
    assert "has no programme.yaml" in output and "NURTURE_TEMPLATES_DIR" in output
    assert not (tmp_path / "demo").exists()


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
