"""Measure the marketers' template tools: `nurture templates lint` and the /preview page of nurture serve.

    .venv/bin/python benchmarks/template_tools.py [--templates templates] [--runs 3]

Lint: the whole check (programme, personas, every template read, every touch rendered in every locale on
each of its channels for every persona), in this process, each run on a fresh start. The page: the first
load of /preview after a change to the templates (it renders and lints everything again), then the
overview of each other persona and one message in full, through Starlette's test client (no network).
Wall and CPU seconds of this process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from starlette.testclient import TestClient

from nurture import db
from nurture.lint import lint_templates
from nurture.settings import Settings
from nurture.web import create_app


def timed(work: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run ``work``; give its result, wall seconds and CPU seconds."""
    started, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--templates", type=Path, default=Path("templates"))
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            templates_dir=options.templates,
            database_url=f"sqlite:///{scratch}/bench.db",
            api_key=SecretStr("bench"),
        )
        at = dt.datetime.now(dt.UTC)
        for run in range(1, options.runs + 1):
            report, wall, cpu = timed(lambda: lint_templates(options.templates, settings, at=at))
            print(
                f"lint run {run}: {report.rendered} messages rendered, {len(report.errors)} errors,"
                f" {len(report.warnings)} warnings: {wall:.2f} s wall, {cpu:.2f} s CPU"
            )
        engine = db.connect(settings)
        headers = {"Authorization": "Bearer bench"}
        with TestClient(create_app(settings, db.session_factory(engine))) as client:
            for run in range(1, options.runs + 1):
                # A fresh app each run: the first load after a change to the templates.
                fresh = TestClient(create_app(settings, db.session_factory(engine)))
                answer, wall, cpu = timed(lambda c=fresh: c.get("/preview", headers=headers))
                assert answer.status_code == 200, answer.text
                size = len(answer.text)
                print(f"/preview first load {run}: {size:,} bytes, {wall:.2f} s wall, {cpu:.2f} s CPU")
            client.get("/preview", headers=headers)
            for persona in ("lucia", "joao", "maria_guadalupe", "anonymous"):
                answer, wall, cpu = timed(
                    lambda p=persona: client.get(f"/preview?persona={p}", headers=headers)
                )
                assert answer.status_code == 200
                print(f"/preview?persona={persona}: {wall * 1000:.0f} ms wall, {cpu * 1000:.0f} ms CPU")
            answer, wall, cpu = timed(
                lambda: client.get("/preview/incentive?persona=lucia&channel=email", headers=headers)
            )
            assert answer.status_code == 200
            print(
                f"/preview/incentive (one email in full): {wall * 1000:.0f} ms wall, {cpu * 1000:.0f} ms CPU"
            )
        engine.dispose()


if __name__ == "__main__":
    main()
