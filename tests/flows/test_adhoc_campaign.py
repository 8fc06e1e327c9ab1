"""The adhoc-campaign flow as ops run it from the shell: the size first, approval of a large one through
Prefect's pause for input, rejection sending nothing."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from histories import NOW, Business, outbox_emails
from nurture.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DAY = dt.timedelta(days=1)


@pytest.fixture
def database_url(tmp_path: Path, _sqlite_template: Path) -> str:
    """SQLite only: these tests are about the flow's wiring; the campaign's SQL runs on both elsewhere."""
    path = tmp_path / "nurture.db"
    shutil.copy(_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
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
    monkeypatch.setenv("NURTURE_CAMPAIGN_APPROVAL_SIZE", "2")
    monkeypatch.setenv("PREFECT_HOME", str(prefect_home))
    return settings.model_copy(update={"templates_dir": root})


@pytest.fixture
def loyal_three(sessions: sessionmaker[Session]) -> Business:
    business = Business(sessions)
    for _ in range(3):
        business.contact(visits=[NOW - DAY * d for d in (100, 70, 40, 10)])
    return business


def send(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "nurture"), "campaign", "send", *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=os.environ.copy(), timeout=600, stdin=subprocess.DEVNULL
    )


@pytest.mark.slow
def test_a_large_campaign_waits_for_approval_and_a_rejection_sends_nothing(
    settings: Settings, loyal_three: Business
) -> None:
    result = send("--touch", "promotion", "--segment", "loyal", "--at", NOW.isoformat(), "--json")

    assert result.returncode == 0, result.stderr
    assert "segment loyal holds 0 contacts (profiles as of never refreshed" in result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    # The pause showed the dry run's summary, then nobody approved it (no terminal, no --yes).
    assert "Segment **loyal**: **3** contacts" in result.stdout
    assert "would go out | 3" in result.stdout
    assert "nothing sent" in result.stderr
    assert summary["rejected"] is True and summary["audience"] == 3
    assert loyal_three.sends() == [] and outbox_emails(settings) == []


@pytest.mark.slow
def test_an_approved_campaign_sends_once_and_a_second_run_sends_nothing_more(
    settings: Settings, loyal_three: Business
) -> None:
    args = ("--touch", "promotion", "--segment", "loyal", "--campaign", "winter-vip", "--json")
    first = send(*args, "--yes", "--at", NOW.isoformat())
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.splitlines()[-1])
    assert summary["sent"] == 3 and summary["campaign"] == "winter-vip"
    assert len(outbox_emails(settings)) == 3
    for bad in ("Traceback", "ERROR"):
        assert bad not in first.stderr, first.stderr

    # Started and approved once: running it again resumes without asking, and sends nothing twice.
    again = send(*args, "--at", (NOW + dt.timedelta(hours=1)).isoformat())
    assert again.returncode == 0, again.stderr
    assert "resuming it" in again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["sent"] == 0
    assert len(loyal_three.sends()) == 3 and {s.campaign for s in loyal_three.sends()} == {"winter-vip"}

    other = send(*args, "--holdout", "20")
    assert other.returncode == 1 and "holdout None (asked: 0.2)" in other.stderr


@pytest.mark.slow
def test_cancel_stops_the_campaigns_flow_runs_and_no_other(settings: Settings) -> None:
    from flows.adhoc_campaign import adhoc_campaign
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Scheduled
    from prefect.testing.utilities import prefect_test_harness
    from typer.testing import CliRunner

    from nurture.cli import app

    later = Scheduled(scheduled_time=dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
    with prefect_test_harness(server_startup_timeout=120), get_client(sync_client=True) as client:
        winter = client.create_flow_run(adhoc_campaign, name="winter", state=later)
        spring = client.create_flow_run(adhoc_campaign, name="spring", state=later)

        result = CliRunner().invoke(app, ["campaign", "cancel", "winter"])
        again = CliRunner().invoke(app, ["campaign", "cancel", "winter"])

        cancelled = client.read_flow_run(winter.id).state
        untouched = client.read_flow_run(spring.id).state
    assert result.exit_code == 0, result.output
    assert str(winter.id) in result.output
    assert cancelled is not None and cancelled.type in (StateType.CANCELLING, StateType.CANCELLED)
    assert untouched is not None and untouched.type is StateType.SCHEDULED
    assert again.exit_code == 1 and "no running, paused or scheduled flow run" in again.output
