"""Headless Chromium for tests: Debian's `chromium`, installed by make.

``dump_dom`` opens a file with the network cut off and gives the DOM its scripts left (``page_after_scripts``
parses it). ``browser()`` drives one tab over the DevTools protocol (a WebSocket) for pages served on
127.0.0.1 behind a login form: type, submit, follow the redirect, click, read.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
from bs4 import BeautifulSoup
from websockets.sync.client import ClientConnection, connect

# What the DevTools session starts Chromium with.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check"]


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


class Browser:
    """One Chromium tab driven over the DevTools protocol."""

    def __init__(self, socket: ClientConnection, timeout: float) -> None:
        self._socket = socket
        self._timeout = timeout
        self._id = 0
        self._events: list[dict[str, Any]] = []  # what arrived while waiting for a command's answer
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and give its result; events that arrive meanwhile are kept."""
        self._id += 1
        self._socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=self._timeout))
            if message.get("id") == self._id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message.get("result", {})
            if "method" in message:
                self._events.append(message)

    def _wait_for_load(self) -> None:
        if any(event["method"] == "Page.loadEventFired" for event in self._events):
            self._events.clear()
            return
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            message = json.loads(self._socket.recv(timeout=self._timeout))
            if message.get("method") == "Page.loadEventFired":
                self._events.clear()
                return
        raise AssertionError("the page did not load in time")

    def goto(self, url: str) -> None:
        """Open ``url`` and wait until the page has loaded."""
        self._events.clear()
        result = self.call("Page.navigate", url=url)
        assert "errorText" not in result, f"{url}: {result['errorText']}"
        self._wait_for_load()

    def evaluate(self, expression: str) -> Any:
        """Run JavaScript in the page and give its value."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def submit(self, selector: str, **fields: str) -> None:
        """Fill the form's named fields, submit it the way a click does, and wait for the next page."""
        for name, value in fields.items():
            self.evaluate(
                f"document.querySelector({json.dumps(selector)}).elements[{json.dumps(name)}].value"
                f" = {json.dumps(value)}"
            )
        self._events.clear()
        self.evaluate(f"document.querySelector({json.dumps(selector)}).requestSubmit()")
        self._wait_for_load()

    def click(self, selector: str) -> None:
        """Click the first element matching ``selector`` (a link) and wait for the page it opens."""
        self._events.clear()
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")
        self._wait_for_load()

    def dom(self) -> str:
        """Give the page's current DOM."""
        return str(self.evaluate("document.documentElement.outerHTML"))

    def text(self, selector: str) -> str:
        """Give the text of the first element matching ``selector`` (empty when there is none)."""
        return str(
            self.evaluate(f"(document.querySelector({json.dumps(selector)}) || {{innerText: ''}}).innerText")
        )


@contextmanager
def browser(*, timeout: float = 60) -> Iterator[Browser]:
    """Start headless Chromium with one blank tab; stop it at the end."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        process = subprocess.Popen(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + timeout
            while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
                assert process.poll() is None, "chromium exited at start"
                assert time.monotonic() < deadline, "chromium did not start in time"
                time.sleep(0.05)
            port = int(port_file.read_text().splitlines()[0])
            with urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as answer:
                targets = json.load(answer)
            page = next(t for t in targets if t["type"] == "page")
            with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout) as socket:
                yield Browser(socket, timeout)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
