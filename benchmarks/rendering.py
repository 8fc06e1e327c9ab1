"""Measure rendering: messages a second on one core, for email (subject, HTML, text) and for SMS.

    .venv/bin/python benchmarks/rendering.py [--messages 20000] [--templates templates]

Every message has its own context (``sample_context`` with a different variant: names, dates, points,
offer values and codes vary), cycling through the eleven touches and the three locales, as a calendar
run renders them. Contexts are built before the clock starts. Also reports what compiling every template
costs once, and what inlining the CSS of each rendered email would cost if it were done per message
instead of once per compiled template.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import css_inline

from nurture.models import Channel
from nurture.rendering import Renderer, sample_context, touches_in

LOCALES = ("en", "es", "pt_BR")


def contexts(touches: tuple[str, ...], count: int) -> list[tuple[str, str, dict[str, Any]]]:
    """One (touch, locale, context) per message, every context different."""
    pairs = itertools.cycle(itertools.product(touches, LOCALES))
    return [
        (touch, locale, sample_context(touch, locale, variant=n))
        for n, (touch, locale) in zip(range(count), pairs, strict=False)
    ]


def measure(renderer: Renderer, channel: Channel, work: list[tuple[str, str, dict[str, Any]]]) -> str:
    """Render every message of ``work``; messages a second of wall time, and CPU time a message."""
    started, cpu_started = time.perf_counter(), time.process_time()
    for touch, locale, context in work:
        renderer.render(touch, channel, locale, context)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return f"{len(work) / elapsed:,.0f} messages/s ({cpu / len(work) * 1e6:.0f} µs CPU each)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument(
        "--templates", type=Path, default=Path(__file__).resolve().parent.parent / "templates"
    )
    arguments = parser.parse_args()
    touches = touches_in(arguments.templates)
    work = contexts(touches, arguments.messages)

    renderer = Renderer(arguments.templates, default_locale="en")
    started = time.perf_counter()
    for (touch, locale), channel in itertools.product(itertools.product(touches, LOCALES), Channel):
        renderer.render(touch, channel, locale, sample_context(touch, locale))
    compiled, seconds = len(renderer.environment.cache or {}), time.perf_counter() - started
    print(f"compiling {compiled} templates (CSS inlined into the HTML ones): {seconds:.2f} s")

    for channel in Channel:
        print(f"{channel}: {len(work):,} messages rendered: {measure(renderer, channel, work)}")

    sample = [renderer.render(t, Channel.EMAIL, loc, c).html or "" for t, loc, c in work[:500]]
    inliner = css_inline.CSSInliner(load_remote_stylesheets=False)
    started = time.process_time()
    for html in sample:
        inliner.inline(html)
    per_message = (time.process_time() - started) / len(sample) * 1e6
    print(f"for comparison, css_inline on each rendered email: {per_message:.0f} µs CPU a message")


if __name__ == "__main__":
    main()
