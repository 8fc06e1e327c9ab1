"""The contact calendar flow as ops and schedules run it: from the shell, and through Prefect."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from histories import Business, local, outbox_emails
from nurture.settings import Settings

REPO = Path(__file__).resolve().parents[2]
MADRID = "Europe/Madrid"
AT = local(MADRID, 2026, 11, 23, 10, 0)
TOTALS = {"planned", "sent", "held_out", "deferred_window", "deferred_cap", "suppressed_consent", "failed"}


@pytest.fixture
def database_url(tmp_path: Path, _sqlite_template: Path) -> str:
    """SQLite only: these tests are about the flow's wiring; the calendar's SQL runs on both elsewhere."""
    path = tmp_path / "nurture.db"
    shutil.copy(_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server for the in-process flow runs of this module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Prefect home for these tests: the throwaway server's database is migrated once, not per test."""
    return tmp_path_factory.mktemp("prefect")


@pytest.fixture
def settings(
    settings: Settings, tmp_path: Path, prefect_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates", root)
    programme = root / "programme.yaml"
    programme.write_text(programme.read_text().replace("holdout: 0.10", "holdout: 0"))
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(root))
    monkeypatch.setenv("PREFECT_HOME", str(prefect_home))
    return settings.model_copy(update={"templates_dir": root})


@pytest.fixture
def two_new_customers(sessions: sessionmaker[Session]) -> Iterator[Business]:
    business = Business(sessions)
    business.contact(visits=[local(MADRID, 2026, 11, 22, 12, 0)])
    business.contact(locale="pt", timezone="Europe/Lisbon", visits=[local(MADRID, 2026, 11, 22, 12, 0)])
    yield business


def nurture(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "nurture"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), timeout=300)


@pytest.mark.slow
def test_calendar_run_from_the_shell_prints_one_json_object_and_runs_clean(
    settings: Settings, two_new_customers: Business
) -> None:
    result = nurture("calendar", "run", "--at", AT.isoformat(), "--json")

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert TOTALS <= summary.keys()
    assert summary["sent"] == 2 and summary["by_touch"]["welcome"]["sent"] == 2
    assert len(outbox_emails(settings)) == 2
    # Clean for a newcomer: no tracebacks or errors from Prefect's throwaway server, no telemetry.
    for bad in ("Traceback", "Error", "ERROR", "database is locked"):
        assert bad not in result.stderr, result.stderr


@pytest.mark.slow
def test_a_dry_run_says_what_would_go_out_and_sends_nothing(
    settings: Settings, two_new_customers: Business, prefect_server: None
) -> None:
    from flows.contact_calendar import CalendarParameters, contact_calendar

    result = contact_calendar(CalendarParameters(at=AT, dry_run=True))
    assert result["dry_run"] is True and result["by_touch"]["welcome"]["sent"] == 2
    assert outbox_emails(settings) == [] and two_new_customers.sends() == []


def test_an_unknown_touch_is_one_clear_error(settings: Settings) -> None:
    result = nurture("calendar", "run", "--touch", "welcom", "--json")
    assert result.returncode == 1
    assert "unknown touch welcom" in result.stderr and "welcome" in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_the_flow_publishes_its_summary_as_a_markdown_artifact(
    settings: Settings, two_new_customers: Business, prefect_server: None
) -> None:
    from flows.contact_calendar import CalendarParameters, contact_calendar
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    state = contact_calendar(
        CalendarParameters(at=AT, touches=["welcome"], batch_size=100), return_state=True
    )
    result = state.result()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["contact-calendar"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
        )
    assert result["sent"] == 2
    [artifact] = artifacts
    assert artifact.type == "markdown"
    assert "| welcome |" in str(artifact.data) and "**2**" in str(artifact.data)
    assert dt.datetime.fromisoformat(result["at"]) == AT
