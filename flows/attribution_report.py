"""The attribution report flow: what the messages of the last weeks brought, as Prefect artifacts."""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from nurture.attribution import AttributionReport, report_for
from nurture.settings import load_settings


class AttributionParameters(BaseModel):
    """Which sends the attribution report covers."""

    days: int = Field(28, ge=1, le=731, description="Sends of the last this many days, up to the instant.")
    at: dt.datetime | None = Field(
        None, description="The instant the report is made as of, with its UTC offset; empty means now."
    )


@task(cache_policy=NO_CACHE)
def attribute(at: dt.datetime, days: int, *, before_run: bool = False) -> AttributionReport:
    """Credit the visits to the sends of the last ``days`` days up to ``at`` and measure each touch's lift.

    ``before_run``: only the sends claimed before ``at``, not those of a calendar run for that instant (its
    claims carry the instant itself), so that the report is the same whenever during the run it is made.
    """
    since = at - dt.timedelta(days=days)
    return report_for(load_settings(), now=at, since=since, until=at if before_run else None)


def publish(report: AttributionReport) -> None:
    """Publish the report as a Markdown artifact and a table artifact the Prefect UI shows."""
    create_markdown_artifact(
        report.markdown(), key="attribution-report", description="Visits credited and lift over the holdout"
    )
    create_table_artifact(
        report.rows(), key="attribution-lift", description="Each touch's lift over its holdout, 95% intervals"
    )


@flow(name="attribution-report", log_prints=True)
def attribution_report(parameters: AttributionParameters | None = None) -> dict[str, Any]:
    """Report what the messages of the last weeks brought, as artifacts."""
    parameters = parameters or AttributionParameters()
    at = parameters.at or dt.datetime.now(dt.UTC)
    if at.tzinfo is None:
        raise ValueError("at must carry a UTC offset, e.g. 2026-11-23T10:00:00+00:00")
    report = attribute(at, parameters.days)
    publish(report)
    return report.to_dict()
