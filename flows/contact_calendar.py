"""The contact calendar flow: plan for one instant, send range by range, publish what happened."""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from flows.attribution_report import attribute, publish
from nurture.calendar import Run, RunSummary, open_run
from nurture.settings import load_settings

ATTRIBUTION_DAYS = 28  # the attribution artifact each run publishes covers the sends of these last days


class CalendarParameters(BaseModel):
    """What a run of the contact calendar is asked to do."""

    at: dt.datetime | None = Field(
        None, description="The instant to plan for, with its UTC offset; empty means now."
    )
    dry_run: bool = Field(False, description="Plan and render, but claim and send nothing.")
    touches: list[str] | None = Field(None, description="Only these touches; empty means all of them.")
    batch_size: int = Field(50_000, ge=100, le=1_000_000, description="Contacts planned and sent per task.")


@task(cache_policy=NO_CACHE)
def prepare(run: Run, batch_size: int) -> tuple[RunSummary, list[tuple[int, int]]]:
    """Refresh every profile as of the run's instant and split the contacts into ranges."""
    return run.begin(batch_size)


@task(cache_policy=NO_CACHE)
def send_range(run: Run, low: int, high: int) -> RunSummary:
    """Plan, render, claim, send and record what is due to the contacts in one range."""
    return run.send(low, high)


@flow(name="contact-calendar", log_prints=True)
def contact_calendar(parameters: CalendarParameters | None = None) -> dict[str, Any]:
    """Send every message of the programme that is due now, exactly once."""
    parameters = parameters or CalendarParameters()
    at = parameters.at or dt.datetime.now(dt.UTC)
    if at.tzinfo is None:
        raise ValueError("at must carry a UTC offset, e.g. 2026-11-23T10:00:00+00:00")
    settings = load_settings()
    with open_run(settings, at, dry_run=parameters.dry_run, touches=parameters.touches) as run:
        summary, ranges = prepare(run, parameters.batch_size)
        # The ranges run side by side, each in one of the run's worker processes (see Run).
        for part in [send_range.submit(run, low, high) for low, high in ranges]:
            summary.combine(part.result())
    create_markdown_artifact(
        summary.markdown(), key="contact-calendar", description="What the contact calendar sent and why not"
    )
    publish(attribute(at, ATTRIBUTION_DAYS))
    return summary.as_dict()
