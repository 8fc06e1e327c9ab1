"""The HTML report: one file, charts drawn by its own inline script, nothing loaded from anywhere.

The figures come from :mod:`nurture.retention`, the lift per touch from :mod:`nurture.attribution`:
they are embedded as JSON and drawn as SVG by ``charts.js``, inlined with ``report.css`` into
``report.html``. The file opens without a network, mailed or archived as it is.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from importlib.resources import files
from typing import Any

from jinja2 import Environment, select_autoescape
from sqlalchemy.orm import Session

from nurture import attribution, retention
from nurture.programme import OfferKind, Programme
from nurture.settings import Settings

_ASSETS = files("nurture.reports")


@dataclass(frozen=True)
class Lift:
    """The measured lift of one touch: relative lift in visits and its 95% interval, or too few to tell."""

    touch: str
    lift: float | None
    low: float | None
    high: float | None
    treated: int
    held_out: int
    conclusive: bool


def build(
    session: Session,
    window: retention.Window,
    settings: Settings,
    programme: Programme,
    *,
    now: dt.datetime,
    title: str = "Retention report",
    aside: Sequence[Session] = (),
) -> str:
    """Compute the figures of ``window`` and give the whole HTML report as text.

    ``aside``: more sessions on the same database, which the retention figures work on at the same time
    (see ``retention.report``).
    """
    costs = retention.Costs.from_settings(settings, programme.rules.margin_rate)
    measured = attribution.report(session, settings, programme, now=now, since=window.start, until=window.end)
    return page(
        session,
        window,
        costs,
        retention.offer_kinds(programme),
        lifts=lifts_of(measured),
        now=now,
        title=title,
        aside=aside,
    )


def lifts_of(measured: attribution.AttributionReport) -> list[Lift]:
    """Give the relative lift of each touch that had sends and holdouts, as attribution measured it."""
    return [
        Lift(
            touch=result.name,
            lift=result.lift.relative_lift,
            low=result.lift.relative_low,
            high=result.lift.relative_high,
            treated=result.lift.treated,
            held_out=result.lift.held_out,
            conclusive=bool(result.lift.significant),
        )
        for result in measured.touches
        if result.lift.treated and result.lift.held_out
    ]


def page(
    session: Session,
    window: retention.Window,
    costs: retention.Costs,
    offers: Mapping[str, OfferKind],
    *,
    lifts: Sequence[Lift] = (),
    title: str,
    now: dt.datetime,
    aside: Sequence[Session] = (),
) -> str:
    """The report page of ``window``, with the lifts measured elsewhere."""
    figures = retention.report(session, window, costs, offers, slipping_limit=20, aside=aside)
    currency = _main_currency(figures, costs.currency)
    data = {
        "title": title,
        "generated": f"{now.astimezone(dt.UTC):%Y-%m-%d %H:%M}",
        "currency": currency,
        "report": figures.as_dict(),
        "timeline": [
            {
                "period": m.period,
                "sent": m.emails + m.sms,
                "emails": m.emails,
                "sms": m.sms,
                "visits": m.visits,
                "revenue": float(m.revenue.get(currency, Decimal(0))),
                "incentive_cost": float(m.incentive_cost.get(currency, Decimal(0))),
            }
            for m in figures.timeline
        ],
        "lifts": [asdict(lift) for lift in lifts],
    }
    return render(data)


def _main_currency(figures: retention.Report, default: str) -> str:
    """The currency with the most customers (the report's first money row), else the default."""
    return figures.money[0].currency if figures.money else default


def render(data: dict[str, Any]) -> str:
    """Render the report page around ``data``, its stylesheet and script inlined."""
    environment = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    template = environment.from_string(_ASSETS.joinpath("report.html").read_text(encoding="utf-8"))
    return template.render(
        data=data,
        css=_ASSETS.joinpath("report.css").read_text(encoding="utf-8"),
        script=_ASSETS.joinpath("charts.js").read_text(encoding="utf-8"),
    )
