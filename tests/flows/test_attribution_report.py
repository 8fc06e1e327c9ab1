"""The attribution-report flow and the calendar run publish attribution as Prefect artifacts."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from histories import Business, local
from nurture.models import Channel, Send, SendCategory, SendStatus
from nurture.settings import Settings

REPO = Path(__file__).resolve().parents[2]
MADRID = "Europe/Madrid"
AT = local(MADRID, 2026, 11, 23, 10, 0)


@pytest.fixture
def database_url(tmp_path: Path, _sqlite_template: Path) -> str:
    """SQLite only: these tests are about the flow's wiring; the report's SQL runs on both elsewhere."""
    path = tmp_path / "nurture.db"
    shutil.copy(_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One temporary Prefect server for this module's flow runs, gone before the next module's."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect")))
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture
def settings(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates", root)
    programme = root / "programme.yaml"
    programme.write_text(programme.read_text().replace("holdout: 0.10", "holdout: 0"))
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(root))
    return settings.model_copy(update={"templates_dir": root})


def artifacts(flow_run_id: Any, *keys: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys))),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    return {artifact.key: artifact for artifact in found}


@pytest.mark.slow
def test_the_weekly_flow_publishes_the_report_as_markdown_and_a_table(
    settings: Settings, sessions: sessionmaker[Session], prefect_server: None
) -> None:
    from flows.attribution_report import AttributionParameters, attribution_report

    business = Business(sessions)
    sent_at = AT - dt.timedelta(days=10)
    lucia = business.contact(visits=[sent_at + dt.timedelta(days=2)], amount=Decimal("35"))
    with sessions.begin() as session:
        session.add(
            Send(
                key=f"incentive:{lucia}:x", contact_id=lucia, touch="incentive", occurrence="x",
                category=SendCategory.MARKETING, status=SendStatus.SENT, channel=Channel.EMAIL,
                due_at=sent_at, claimed_at=sent_at, sent_at=sent_at,
            )
        )  # fmt: skip

    state = attribution_report(AttributionParameters(at=AT, days=28), return_state=True)
    result = state.result()
    found = artifacts(state.state_details.flow_run_id, "attribution-report", "attribution-lift")

    assert [t["name"] for t in result["touches"]] == ["incentive"]
    assert found["attribution-report"].type == "markdown"
    assert "| incentive | 1 | 0 |" in str(found["attribution-report"].data)
    assert "too small: 1 sent and 0 held out" in str(found["attribution-report"].data)
    assert found["attribution-lift"].type == "table"
    assert "EUR 35.00" in str(found["attribution-lift"].data)


@pytest.mark.slow
def test_each_calendar_run_publishes_the_attribution_of_the_sends_before_it(
    settings: Settings, sessions: sessionmaker[Session], prefect_server: None
) -> None:
    from flows.contact_calendar import CalendarParameters, contact_calendar

    Business(sessions).contact(visits=[local(MADRID, 2026, 11, 22, 12, 0)])
    keys = ("attribution-report", "attribution-lift", "contact-calendar")

    first = contact_calendar(
        CalendarParameters(at=AT, touches=["welcome"], batch_size=100), return_state=True
    )
    later = AT + dt.timedelta(hours=1)
    second = contact_calendar(
        CalendarParameters(at=later, touches=["welcome"], batch_size=100), return_state=True
    )
    found_first = artifacts(first.state_details.flow_run_id, *keys)
    found_second = artifacts(second.state_details.flow_run_id, *keys)

    assert first.result()["sent"] == 1 and second.result()["sent"] == 0
    assert set(found_first) == set(found_second) == set(keys)
    # The report is made beside the run, over the sends before it: the first run's welcome shows in the next.
    assert "| welcome |" not in str(found_first["attribution-report"].data)
    assert "| welcome | 1 | 0 |" in str(found_second["attribution-report"].data)
    assert f"to {later:%Y-%m-%d}" in str(found_second["attribution-report"].data)
