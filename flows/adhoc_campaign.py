"""The ad-hoc campaign flow: one touch to a segment, approved by a person when large, sent exactly once."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from prefect import flow, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import BaseModel, Field

from nurture import campaigns
from nurture.calendar import Run, RunSummary
from nurture.campaigns import CampaignSpec, CampaignSummary
from nurture.models import Channel
from nurture.settings import Settings, load_settings

# A run started this much ahead of its time at most waits for it (workers prefetch 10 s by default).
MAX_EARLY_SECONDS = 60.0


class CampaignParameters(BaseModel):
    """What ops ask of an ad-hoc campaign."""

    touch: str = Field(description="The programme's touch whose templates and offer go out, e.g. promotion.")
    segment: str = Field(description="A segment named in templates/segments.yaml.")
    campaign: str | None = Field(
        None,
        pattern=campaigns.NAME_PATTERN,
        description="The campaign's name: running it again resumes it. Empty means <touch>-<segment>.",
    )
    channel: Channel | None = Field(None, description="Only this channel; empty means the touch's order.")
    holdout: float | None = Field(
        None, ge=0, lt=100, description="Percent of the segment held out as a control group."
    )
    loyalty_first_hours: int | None = Field(
        None, ge=1, le=24 * 30, description="Loyal customers first; everyone else this many hours later."
    )
    send_at: dt.datetime | None = Field(None, description="When the campaign starts; empty means now.")
    limit: int | None = Field(None, ge=1, description="At most this many contacts of the segment.")
    dry_run: bool = Field(False, description="Count, render three samples, estimate SMS cost; send nothing.")
    at: dt.datetime | None = Field(None, description="Run as of this instant; empty means now.")
    batch_size: int = Field(50_000, ge=100, le=1_000_000, description="Contacts planned and sent per task.")

    def spec(self, at: dt.datetime) -> CampaignSpec:
        """Give the campaign these parameters ask for, starting at ``send_at`` or ``at``."""
        if self.send_at is not None and self.send_at.tzinfo is None:
            raise ValueError("send_at must carry a UTC offset, e.g. 2026-11-23T10:00:00+01:00")
        return CampaignSpec(
            name=self.campaign or campaigns.default_name(self.touch, self.segment),
            touch=self.touch,
            segment=self.segment,
            starts_at=(self.send_at or at).astimezone(dt.UTC),
            channel=self.channel,
            holdout=None if self.holdout is None else self.holdout / 100,
            loyalty_first_hours=self.loyalty_first_hours,
            limit=self.limit,
        )


class Approval(RunInput):
    """A person's answer to a paused campaign."""

    approve: bool = Field(False, description="Send the campaign as summarised above.")


@task(cache_policy=NO_CACHE)
def plan(settings: Settings, parameters: CampaignParameters, at: dt.datetime) -> campaigns.Planned:
    """Check the touch and segment; give the campaign as stored or as asked, and whether it has started."""
    return campaigns.plan(settings, parameters.spec(at), at)


@task(cache_policy=NO_CACHE)
def prepare(run: Run, batch_size: int) -> tuple[RunSummary, list[tuple[int, int]]]:
    """Bring every profile to the run's instant, size the segment and split the contacts into ranges."""
    return run.begin(batch_size)


@task(cache_policy=NO_CACHE)
def send_range(run: Run, low: int, high: int) -> RunSummary:
    """Plan, render, claim, send and record the campaign for the contacts in one range."""
    return run.send(low, high)


@task(cache_policy=NO_CACHE)
def start(settings: Settings, spec: CampaignSpec, at: dt.datetime, approved: bool) -> CampaignSpec:
    """Record the campaign's options, fixing its start for every later run of it."""
    return campaigns.begin(settings, spec, at, approved=approved)


def one_pass(
    settings: Settings, spec: CampaignSpec, at: dt.datetime, dry_run: bool, batch: int
) -> CampaignSummary:
    """Run the campaign once over every contact: dry, or for real."""
    with campaigns.open_campaign(settings, spec, at, dry_run=dry_run) as run:
        summary, ranges = prepare(run, batch)
        assert isinstance(summary, CampaignSummary)
        print(f"campaign {spec.name}: segment {spec.segment} holds {summary.audience} contacts")
        for part in [send_range.submit(run, low, high) for low, high in ranges]:
            summary.combine(part.result())
    return summary


def _name(parameters: dict[str, Any]) -> str:
    asked = parameters["parameters"]
    return str(asked.campaign or campaigns.default_name(asked.touch, asked.segment))


@flow(
    name="adhoc-campaign",
    log_prints=True,
    flow_run_name=lambda: _name(runtime.flow_run.parameters),
)
def adhoc_campaign(parameters: CampaignParameters) -> dict[str, Any]:
    """Send one touch to a segment exactly once: dry run, approval when large, waves, resumable."""
    settings = load_settings()
    if parameters.at is None:
        _wait_for_scheduled_time()
    at = parameters.at or dt.datetime.now(dt.UTC)
    if at.tzinfo is None:
        raise ValueError("at must carry a UTC offset, e.g. 2026-11-23T10:00:00+00:00")
    planned = plan(settings, parameters, at)
    spec = planned.spec
    if parameters.dry_run or not planned.started:
        summary = one_pass(settings, spec, at, True, parameters.batch_size)
        _publish(summary)
        if parameters.dry_run:
            return summary.as_dict()
        approved = False
        if summary.audience > settings.campaign_approval_size:
            print(
                f"campaign {spec.name} reaches {summary.audience} contacts, more than"
                f" {settings.campaign_approval_size}: waiting for a person to approve it"
            )
            answer = pause_flow_run(
                wait_for_input=Approval.with_initial_data(description=summary.markdown()),
                timeout=settings.campaign_approval_timeout_minutes * 60,
                poll_interval=2,
            )
            if answer is None or not answer.approve:
                print(f"campaign {spec.name} was rejected: nothing sent")
                return {**summary.as_dict(), "rejected": True}  # the dry run's counts: nothing sent
            approved = True
            at = parameters.at or dt.datetime.now(dt.UTC)
        spec = start(settings, spec, at, approved)
    summary = one_pass(settings, spec, at, False, parameters.batch_size)
    _publish(summary)
    result = summary.as_dict()
    follow_up = campaigns.next_run(spec, summary)
    result["next_run"] = follow_up.isoformat() if follow_up else None
    if follow_up is not None and runtime.deployment.id:
        # Deployed: the campaign schedules its own next run; triggered twice, the ledger still sends once.
        # Named now, not when it starts, so that `nurture campaign cancel` finds it while it waits.
        run_deployment(
            runtime.deployment.id,
            parameters={"parameters": parameters.model_dump(mode="json", exclude={"at"})},
            scheduled_time=follow_up,
            flow_run_name=spec.name,
            timeout=0,
            as_subflow=False,
        )
        print(f"campaign {spec.name}: next run scheduled at {follow_up.isoformat()}")
    return result


def _wait_for_scheduled_time() -> None:
    """Wait for the run's scheduled time when a worker started it early.

    Workers take scheduled runs a few seconds ahead (``PREFECT_WORKER_PREFETCH_SECONDS``): a second wave
    started then would find the early-access window still open and send to nobody new.
    """
    scheduled = runtime.flow_run.scheduled_start_time
    early = (scheduled - dt.datetime.now(dt.UTC)).total_seconds() if scheduled is not None else 0
    if early > 0:
        time.sleep(min(early, MAX_EARLY_SECONDS))


def _publish(summary: CampaignSummary) -> None:
    create_markdown_artifact(
        summary.markdown(),
        key=f"campaign-{summary.campaign}".replace("_", "-"),
        description="What the campaign sent, or in a dry run would send, and why not",
    )
