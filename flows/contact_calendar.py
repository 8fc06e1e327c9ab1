"""The contact calendar flow: plan for one instant, send range by range, publish what happened.

A run's ranges go to its own worker processes, or, with ``range_deployment``, each to a run of the
``calendar-range`` flow on whichever worker of the pool takes it: several machines share one run.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from pydantic import BaseModel, Field

from flows.attribution_report import attribute, publish
from nurture.calendar import Run, RunRequest, RunSummary, open_run, send_range
from nurture.profiles import Basis
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
    range_deployment: str | None = Field(
        None,
        description="Hand each range to a run of this deployment (calendar-range/on-demand), so that the work"
        " pool's workers, on every machine, send them; empty: this run's own processes send them.",
    )
    ranges_at_once: int = Field(
        4,
        ge=1,
        le=256,
        description="With range_deployment, how many ranges are sent at once; each sends at that share of"
        " the providers' rates, so that together they keep to the configured ones.",
    )


class RangeParameters(BaseModel):
    """One range of contacts of a calendar run begun elsewhere: what the run is, and the range's ids."""

    at: dt.datetime = Field(description="The run's instant.")
    run_id: str = Field(description="The run's id, recorded with its claims in the ledger.")
    dry_run: bool = Field(False, description="Plan and render, but claim and send nothing.")
    touches: list[str] | None = Field(None, description="Only these touches; empty means all of them.")
    low: int = Field(description="The first contact id of the range.")
    high: int = Field(description="The contact id just after the range.")
    basis: Basis = Field(description="The population's medians and value-tier bounds, as the run found them.")
    sharing: int = Field(1, ge=1, description="Ranges of the run sent at once, this one among them.")


@task(cache_policy=NO_CACHE)
def prepare(run: Run, batch_size: int) -> tuple[RunSummary, list[tuple[int, int]]]:
    """Refresh every profile as of the run's instant and split the contacts into ranges."""
    return run.begin(batch_size)


@task(name="send_range", cache_policy=NO_CACHE)
def send_range_in_run(run: Run, low: int, high: int) -> RunSummary:
    """Plan, render, claim, send and record what is due to the contacts in one range."""
    return run.send(low, high)


@task(cache_policy=NO_CACHE)
def send_range_elsewhere(deployment: str, job: RangeParameters, turn: threading.Semaphore) -> RunSummary:
    """Have a worker of the pool send one range as a run of ``deployment``; wait for it, give what it did."""
    # No more than job.sharing ranges at once: each sends at that share of the providers' rates.
    with turn:
        child = run_deployment(
            deployment,
            parameters={"parameters": job.model_dump(mode="json")},
            flow_run_name=f"contacts {job.low}-{job.high - 1}",
        )
    assert isinstance(child, FlowRun)  # called from sync code, it waits and gives the finished run
    if child.state is None or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        raise RuntimeError(
            f"contacts {job.low}-{job.high - 1}: the run {child.name} of {deployment} ended {state};"
            " its log says why"
        )
    summary = child.state.result()
    assert isinstance(summary, RunSummary), summary
    return summary


@flow(name="contact-calendar", log_prints=True)
def contact_calendar(parameters: CalendarParameters | None = None) -> dict[str, Any]:
    """Send every message of the programme that is due now, exactly once."""
    parameters = parameters or CalendarParameters()
    at = parameters.at or dt.datetime.now(dt.UTC)
    if at.tzinfo is None:
        raise ValueError("at must carry a UTC offset, e.g. 2026-11-23T10:00:00+00:00")
    settings = load_settings()
    elsewhere = parameters.range_deployment
    if elsewhere:
        # The ranges go to other flow runs: this one sums up, hands out and waits, in one process.
        settings = settings.model_copy(update={"calendar_processes": 1})
    # The attribution of the sends before this run, worked out beside it: while the run sums the profiles up
    # on one core, the report takes the other.
    attribution = attribute.submit(at, ATTRIBUTION_DAYS, before_run=True)
    with open_run(settings, at, dry_run=parameters.dry_run, touches=parameters.touches) as run:
        summary, ranges = prepare(run, parameters.batch_size)
        if elsewhere:
            assert run.basis is not None
            sharing = min(parameters.ranges_at_once, len(ranges))
            turn = threading.BoundedSemaphore(sharing)
            jobs = [_range_job(run, run.basis, low, high, sharing) for low, high in ranges]
            parts = [send_range_elsewhere.submit(elsewhere, job, turn) for job in jobs]
        else:
            # The ranges run side by side, each in one of the run's worker processes (see Run).
            parts = [send_range_in_run.submit(run, low, high) for low, high in ranges]
        for part in parts:
            summary.combine(part.result())
    print(f"where the time went: {summary.speed()}")
    create_markdown_artifact(
        summary.markdown(), key="contact-calendar", description="What the contact calendar sent and why not"
    )
    publish(attribution.result())
    return summary.as_dict()


def _range_job(run: Run, basis: Basis, low: int, high: int, sharing: int) -> RangeParameters:
    request = run.request
    touches = list(request.touches) if request.touches else None
    return RangeParameters(
        at=request.at,
        run_id=request.run_id,
        dry_run=request.dry_run,
        touches=touches,
        low=low,
        high=high,
        basis=basis,
        sharing=sharing,
    )


@flow(name="calendar-range", log_prints=True, persist_result=True)
def calendar_range(parameters: RangeParameters) -> RunSummary:
    """Send what is due to one range of contacts, for a contact-calendar run begun on another worker."""
    touches = tuple(parameters.touches) if parameters.touches else None
    request = RunRequest(load_settings(), parameters.at, parameters.dry_run, touches, parameters.run_id)
    summary = send_range(
        request, parameters.basis, parameters.low, parameters.high, sharing=parameters.sharing
    )
    print(f"contacts {parameters.low}-{parameters.high - 1}: " + json.dumps(summary.as_dict()["by_touch"]))
    return summary
