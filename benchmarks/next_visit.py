"""Measure the next-visit prediction and the churn stages on real purchases: the CDNOW history.

CDNOW (shipped in the ``lifetimes`` package) holds every purchase of 23,570 customers of an online CD store
who first bought in the first quarter of 1997, up to the end of June 1998. The purchases up to a cutoff are
written as nurture's import files and imported through the real import path; profiles are refreshed as of
the end of the cutoff day; the predictions are then compared with what the customers did after it:

- next visit: mean absolute error in days between ``expected_next_visit`` and the first purchase after the
  cutoff, over the customers who came back;
- churn: ``at_risk``, ``lapsed`` or ``lost`` at the cutoff as a prediction of "did not buy again before the
  end of the data" (precision, recall, F1).

The baseline gives everyone the same rhythm, the median gap between two purchase days of the whole
population before the cutoff: next visit = last visit + that median; churned = more than ``at_risk_after``
medians since the last visit.

    .venv/bin/python benchmarks/next_visit.py [--cutoff 1997-09-30] [--sweep]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import math
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nurture import db, profiles
from nurture.imports import import_file
from nurture.models import Stage
from nurture.settings import Settings

CHURNED = {Stage.AT_RISK, Stage.LAPSED, Stage.LOST}
END = dt.date(1998, 6, 30)  # the last day of the data
DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Purchase:
    day: dt.date
    amount: Decimal


@dataclass(frozen=True)
class Prediction:
    next_visit: dt.date
    churned: bool


@dataclass(frozen=True)
class Scores:
    mae_days: float
    precision: float
    recall: float
    f1: float
    mcc: float


def cdnow() -> dict[str, list[Purchase]]:
    """Every CDNOW purchase by customer, in date order."""
    path = next(
        file for file in importlib.metadata.files("lifetimes") or [] if file.name == "CDNOW_master.txt"
    )
    purchases: dict[str, list[Purchase]] = defaultdict(list)
    for line in Path(str(path.locate())).read_text().splitlines()[1:]:  # the first line is a header
        customer, day, _cds, dollars = line.split()
        purchases[customer].append(Purchase(dt.datetime.strptime(day, "%Y%m%d").date(), Decimal(dollars)))
    return {customer: sorted(rows, key=lambda row: row.day) for customer, rows in purchases.items()}


def write_import_files(directory: Path, history: dict[str, list[Purchase]], cutoff: dt.date) -> list[Path]:
    """Write contacts.csv and visits.csv in nurture's import columns, with the purchases up to ``cutoff``."""
    contacts, visits = directory / "contacts.csv", directory / "visits.csv"
    with contacts.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["external_id", "timezone", "locale"])
        writer.writerows([customer, "UTC", "en"] for customer in history)
    with visits.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["external_id", "contact_external_id", "occurred_at", "amount", "currency"])
        for customer, purchases in history.items():
            for number, purchase in enumerate(purchases):
                if purchase.day <= cutoff:
                    writer.writerow(
                        [f"{customer}-{number}", customer, purchase.day.isoformat(), purchase.amount, "USD"]
                    )
    return [contacts, visits]


def nurture_predictions(url: str, settings: Settings, cutoff: dt.date) -> tuple[dict[str, Prediction], float]:
    """Refresh the profiles as of the end of ``cutoff``; return each customer's prediction and the seconds."""
    at = dt.datetime.combine(cutoff + DAY, dt.time(), dt.UTC)
    engine = db.make_engine(url)
    try:
        sessions = db.session_factory(engine)
        started = time.perf_counter()
        with sessions.begin() as session:
            profiles.refresh(session, settings, at)
        seconds = time.perf_counter() - started
        with sessions() as session:
            predictions = {
                profile.external_id: Prediction(profile.expected_next_visit.date(), profile.stage in CHURNED)
                for profile in profiles.profiles(session)
                if profile.expected_next_visit is not None
            }
    finally:
        engine.dispose()
    return predictions, seconds


def baseline_predictions(
    history: dict[str, list[Purchase]], settings: Settings, cutoff: dt.date
) -> tuple[dict[str, Prediction], float]:
    """Everyone gets the population's median gap between purchase days; return predictions and the median."""
    days = {
        customer: sorted({purchase.day for purchase in purchases if purchase.day <= cutoff})
        for customer, purchases in history.items()
    }
    gaps = [(b - a).days for visited in days.values() for a, b in zip(visited, visited[1:], strict=False)]
    median = statistics.median(gaps)
    elapsed_at = cutoff + DAY
    predictions = {
        customer: Prediction(
            visited[-1] + dt.timedelta(days=median),
            (elapsed_at - visited[-1]).days > settings.at_risk_after * median,
        )
        for customer, visited in days.items()
        if visited
    }
    return predictions, median


def score(predictions: dict[str, Prediction], history: dict[str, list[Purchase]], cutoff: dt.date) -> Scores:
    """Compare the predictions with the purchases after ``cutoff``."""
    errors: list[int] = []
    outcomes: Counter[tuple[bool, bool]] = Counter()
    for customer, prediction in predictions.items():
        later = [purchase.day for purchase in history[customer] if purchase.day > cutoff]
        if later:
            errors.append(abs((prediction.next_visit - later[0]).days))
        outcomes[prediction.churned, not later] += 1
    tp, fp = outcomes[True, True], outcomes[True, False]
    fn, tn = outcomes[False, True], outcomes[False, False]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    # Most customers churn, so F1 on "churned" rewards flagging everyone (F1 0.82 here); the Matthews
    # correlation weighs both classes and is 0 for any constant guess.
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = (tp * tn - fp * fn) / denominator if denominator else 0.0
    return Scores(statistics.fmean(errors), precision, recall, f1, mcc)


def table(title: str, rows: Iterable[tuple[str, Scores]]) -> Table:
    result = Table(title=title)
    for column in (
        "method",
        "next visit MAE (days)",
        "churn precision",
        "churn recall",
        "churn F1",
        "churn MCC",
    ):
        result.add_column(column, justify="left" if column == "method" else "right")
    for name, scores in rows:
        result.add_row(
            name,
            f"{scores.mae_days:.1f}",
            f"{scores.precision:.3f}",
            f"{scores.recall:.3f}",
            f"{scores.f1:.3f}",
            f"{scores.mcc:.3f}",
        )
    return result


def stage_table(url: str, history: dict[str, list[Purchase]], cutoff: dt.date) -> Table:
    """How many customers each stage held at the cutoff, and how many of them bought again."""
    engine = db.make_engine(url)
    counts: dict[Stage, list[int]] = {stage: [0, 0] for stage in Stage}
    with db.session_factory(engine)() as session:
        for profile in profiles.profiles(session):
            counts[profile.stage][0] += 1
            counts[profile.stage][1] += any(p.day > cutoff for p in history[profile.external_id])
    engine.dispose()
    result = Table(title=f"stages at {cutoff} and who bought again by {END}")
    for column in ("stage", "customers", "bought again"):
        result.add_column(column, justify="left" if column == "stage" else "right")
    for stage, (customers, returned) in counts.items():
        if customers:
            result.add_row(str(stage), f"{customers:,}", f"{returned / customers:.0%}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cutoff",
        type=dt.date.fromisoformat,
        default=dt.date(1997, 9, 30),
        help="last day of history imported (default: the 39-week calibration period of the BG/NBD paper)",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also score a grid of prior_weight x at_risk_after"
    )
    args = parser.parse_args()
    console = Console(width=120)

    history = cdnow()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        url = f"sqlite:///{directory / 'cdnow.db'}"
        settings = Settings(database_url=url, _env_file=None)  # type: ignore[call-arg]
        db.upgrade(db.make_engine(url))
        started = time.perf_counter()
        engine = db.make_engine(url)
        for path in write_import_files(directory, history, args.cutoff):
            summary = import_file(db.session_factory(engine), path.stem, path, settings)
            if summary.rejected:
                raise SystemExit(f"{path.name}: {summary.rejected} rows rejected, see {summary.rejects_file}")
        engine.dispose()
        imported = time.perf_counter() - started

        ours, refresh_seconds = nurture_predictions(url, settings, args.cutoff)
        theirs, median = baseline_predictions(history, settings, args.cutoff)
        came_back = sum(any(p.day > args.cutoff for p in history[c]) for c in ours)
        console.print(
            f"CDNOW: {len(ours):,} customers with a purchase up to {args.cutoff}, {came_back:,} bought again "
            f"by {END}; import {imported:.1f} s, refresh {refresh_seconds:.2f} s; population median gap "
            f"{median:g} days"
        )
        console.print(
            table(
                f"cutoff {args.cutoff}",
                [
                    ("baseline: last visit + population median gap", score(theirs, history, args.cutoff)),
                    (
                        f"nurture (prior_weight {settings.prior_weight:g}, at_risk_after "
                        f"{settings.at_risk_after:g})",
                        score(ours, history, args.cutoff),
                    ),
                ],
            )
        )
        console.print(stage_table(url, history, args.cutoff))
        if args.sweep:
            rows = []
            for weight in (0.0, 1.0, 3.0, 5.0, 10.0):
                for at_risk in (1.5, 2.0, 3.0):
                    tuned = settings.model_copy(update={"prior_weight": weight, "at_risk_after": at_risk})
                    name = f"prior_weight {weight:g}, at_risk_after {at_risk:g}"
                    rows.append(
                        (name, score(nurture_predictions(url, tuned, args.cutoff)[0], history, args.cutoff))
                    )
                    baseline = baseline_predictions(history, tuned, args.cutoff)[0]
                    rows.append(
                        (f"  baseline, at_risk_after {at_risk:g}", score(baseline, history, args.cutoff))
                    )
            console.print(table("sweep", rows))


if __name__ == "__main__":
    main()
