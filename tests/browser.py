"""A headless Chromium for tests that need a page's scripts to run: Debian's `chromium`, installed by make."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from bs4 import BeautifulSoup


def chromium() -> str:
    """The Chromium binary; the test fails (it is not skipped) when it is missing: `make test` installs it."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install -y chromium)")
    return binary


def dump_dom(page: Path, *, width: float = 1200, height: float = 2000, timeout: float = 60) -> str:
    """Open ``page`` with the network cut off, let its scripts run, and give the DOM they left."""
    result = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            # Anything the page tries to fetch fails: a page that needs the network shows it.
            "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
            f"--window-size={int(width)},{int(height)}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def page_after_scripts(page: Path, **options: float) -> BeautifulSoup:
    """``page`` as its scripts left it, parsed."""
    return BeautifulSoup(dump_dom(page, **options), "html.parser")  # type: ignore[arg-type]
