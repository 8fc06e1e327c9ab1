"""The HTML report, opened in headless Chromium: its charts are drawn, with no network."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker
from tests.browser import page_after_scripts
from tests.histories import Business
from tests.test_retention import COSTS, OFFERS, WINDOW, day, five_customers, send
from typer.testing import CliRunner

from nurture.cli import app
from nurture.models import Channel
from nurture.reports import html


def chart(page: object, name: str) -> tuple[int, list[tuple[float, float]]]:
    """How many marks a chart drew, and the size of each of its SVGs."""
    figure = page.find("figure", id=name)  # type: ignore[attr-defined]
    assert figure is not None, f"no chart {name}"
    sizes = [(float(svg["width"]), float(svg["height"])) for svg in figure.find_all("svg")]
    return int(figure.get("data-marks", "-1")), sizes


def test_report_html_draws_every_chart_offline(
    sessions: sessionmaker[Session], settings: object, tmp_path: Path
) -> None:
    ids = five_customers(Business(sessions))
    with sessions.begin() as session:
        send(session, ids["A"], "welcome", day(2026, 1, 2))
        send(session, ids["B"], "winback", day(2026, 2, 2), channel=Channel.SMS, segments=1)
    out = tmp_path / "report.html"
    result = CliRunner().invoke(
        app, ["report", "html", "--out", str(out), "--since", "2026-01-01", "--until", "2026-03-31"]
    )
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    raw = out.read_text(encoding="utf-8")
    # Self-contained: no stylesheet, script, image or frame comes from anywhere else.
    assert "<link" not in raw and " src=" not in raw and "@import" not in raw

    page = page_after_scripts(out)
    assert page.body is not None and page.body.get("data-drawn") == "true"
    marks, sizes = chart(page, "cohorts")
    assert marks == 4  # January's cohort over three months, March's over one; February had none
    assert sizes and all(w > 0 and h > 0 for w, h in sizes)
    cells = page.find("figure", id="cohorts").find_all("rect")  # type: ignore[union-attr]
    assert sorted(cell.find("title").text for cell in cells) == [
        "2026-01 +0: 100.0% (2)",
        "2026-01 +1: 50.0% (1)",
        "2026-01 +2: 0.0% (0)",
        "2026-03 +0: 100.0% (1)",
    ]
    for name in ("activity", "money"):
        marks, sizes = chart(page, name)
        assert marks == 4, name  # a bar for each of three months, and the line
        assert sizes and all(w > 0 and h > 0 for w, h in sizes)
    bars = page.find("figure", id="activity").find_all("rect")  # type: ignore[union-attr]
    assert [bar.find("title").text for bar in bars] == [
        "2026-01: 1 messages sent",
        "2026-02: 1 messages sent",
        "2026-03: 0 messages sent",
    ]
    money = page.find("figure", id="money").find_all("rect")  # type: ignore[union-attr]
    assert [bar.find("title").text for bar in money] == [
        "2026-01: 120 revenue",
        "2026-02: 120 revenue",
        "2026-03: 80 revenue",
    ]
    assert chart(page, "lift")[0] == 0  # nothing measured yet, and the page says so
    assert "No lift measured yet" in page.find("figure", id="lift").text  # type: ignore[union-attr]
    data = json.loads(page.find("script", id="report-data").text)  # type: ignore[union-attr]
    assert data["report"]["customers"] == 5


def test_lift_chart_draws_each_touch_with_its_interval(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    five_customers(Business(sessions))
    lifts = [
        html.Lift("incentive", 0.8, 0.4, 1.2, treated=900, held_out=100, conclusive=True),
        html.Lift("education", 0.02, -0.1, 0.14, treated=900, held_out=100, conclusive=False),
        html.Lift("birthday", None, None, None, treated=12, held_out=1, conclusive=False),
    ]
    with sessions() as session:
        text = html.page(
            session,
            WINDOW,
            COSTS,
            OFFERS,
            lifts=lifts,
            title="Test",
            now=dt.datetime(2026, 4, 1, tzinfo=dt.UTC),
        )
    out = tmp_path / "lift.html"
    out.write_text(text, encoding="utf-8")
    page = page_after_scripts(out)
    marks, sizes = chart(page, "lift")
    assert marks == 2 and sizes and all(w > 0 and h > 0 for w, h in sizes)
    figure = page.find("figure", id="lift")
    dots = [circle.find("title").text for circle in figure.find_all("circle")]  # type: ignore[union-attr]
    assert dots == ["incentive: 80.0% [40.0%, 120.0%]", "education: 2.0% [-10.0%, 14.0%]"]
    assert "too few contacts to tell (12 sent, 1 held out)" in figure.text  # type: ignore[union-attr]
