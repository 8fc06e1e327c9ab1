"""prefect.yaml as a deployer uses it: a Prefect server, `prefect deploy --all`, process workers, runs.

Everything runs for real in subprocesses: the server on a free loopback port with a home of its own, the
CLI, the workers and the flow runs they start. The server's scheduler is off, so that no hourly run fires
in the middle of a test. One machine's setup runs on SQLite; the setup of several machines, where one run's
ranges go to the pool's workers, runs with nurture's database and the Prefect server's on PostgreSQL
(scratch databases, dropped afterwards), as several machines need. Each test costs a minute or two.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.orm import Session, sessionmaker

from channels.fake_providers import Answer, FakeProvider, Received, sendgrid
from histories import Business, local, outbox_emails
from nurture import db
from nurture.models import SendStatus
from nurture.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DAY = dt.timedelta(days=1)
POSTGRES_URL = os.environ.get("NURTURE_TEST_DATABASE_URL")
BIN = Path(sys.executable).parent
MADRID = "Europe/Madrid"
AT = local(MADRID, 2026, 11, 23, 10, 0)

pytestmark = pytest.mark.slow


class PrefectStack:
    """A Prefect server, the CLI against it and process workers, all stopped by ``close``."""

    def __init__(self, home: Path, server_database: str | None) -> None:
        self.home = home
        self.logs = home / "logs"
        self.logs.mkdir(parents=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        base = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_")}
        self.env = {
            **base,
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LOGGERS_PREFECT_SERVER_LEVEL": "CRITICAL",
            # A worker looks for new runs every second, not every ten.
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        }
        self.server_env = {
            **self.env,
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            # The server's own errors go to its log; only the CLI's and the flows' are kept quiet.
            "PREFECT_LOGGING_LOGGERS_PREFECT_SERVER_LEVEL": "WARNING",
        }
        del self.server_env["PREFECT_API_URL"]
        if server_database:
            self.server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = server_database
        self._processes: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def start_server(self, timeout: float = 150) -> None:
        """Start ``prefect server start`` and wait until its API answers."""
        server = self._start("server", ["server", "start"], self.server_env)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            if server.poll() is not None:
                pytest.fail(f"prefect server exited with {server.returncode}\n{self.tails()}")
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server did not answer within {timeout:.0f} s\n{self.tails()}")
            time.sleep(0.5)

    def start_worker(self, *args: str) -> None:
        """Start ``prefect worker start`` with ``args``; its flow runs get the test's environment."""
        worker = self._start("worker", ["worker", "start", *args], self.env)
        time.sleep(1)
        if worker.poll() is not None:
            pytest.fail(f"prefect worker exited with {worker.returncode}\n{self.tails()}")

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 240) -> str:
        """Run one ``prefect`` command to the end; fail the test with its output and the logs if it fails."""
        command = [str(BIN / "prefect"), "--no-prompt", *args]
        try:
            result = subprocess.run(
                command, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as timed_out:
            pytest.fail(
                f"`prefect {' '.join(args)}` took over {timeout:.0f} s\n{timed_out.stdout!r}\n{self.tails()}"
            )
        if result.returncode != 0:
            pytest.fail(
                f"`prefect {' '.join(args)}` exited with {result.returncode}\n"
                f"{result.stdout}\n{result.stderr}\n{self.tails()}"
            )
        return result.stdout

    def api(self, path: str) -> Any:
        """GET one resource of the server's REST API."""
        with urllib.request.urlopen(f"{self.api_url}/{path}", timeout=30) as response:
            return json.load(response)

    def wait_for(self, flow_run_id: str, timeout: float = 180) -> Any:
        """Wait until a flow run is over; give it as the API does."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.api(f"flow_runs/{flow_run_id}")
            if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            if time.monotonic() > deadline:
                pytest.fail(
                    f"flow run {flow_run_id} still {run['state_type']} after {timeout:.0f} s\n{self.tails()}"
                )
            time.sleep(1)

    def api_post(self, path: str, body: dict[str, Any]) -> Any:
        """POST ``body`` to one endpoint of the server's REST API; give the answer.

        A 503 is the server saying "try again" (its own database was busy, say): Prefect's own client retries
        it, and so does this one, a few times.
        """
        request = urllib.request.Request(
            f"{self.api_url}/{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        for attempt in range(5):
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return json.load(response)
            except urllib.error.HTTPError as error:
                if error.code != 503 or attempt == 4:
                    raise
                time.sleep(1 + attempt)
        raise AssertionError("unreachable")

    def tails(self, size: int = 6000) -> str:
        """The end of every process's log, for a failure message."""
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-size:]}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop every process started, with all of its children, and wait for them."""
        # A worker starts each flow run in a session of its own: find them before their worker goes.
        runs = [pid for process, _ in self._processes for pid in _descendants(process.pid)]
        for process, _ in self._processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for pid in runs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process, log in self._processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            # The group may outlive its leader: a flow run the worker started.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            log.close()

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}-{len(self._processes)}.log").open("wb")
        process = subprocess.Popen(
            [str(BIN / "prefect"), *args],
            cwd=self.home,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so that close stops its children too
        )
        self._processes.append((process, log))
        return process


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, from /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (in parentheses) may hold spaces: the fields after it are split safely.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture
def server_database(database_url: str) -> Iterator[str | None]:
    """Where the Prefect server keeps its state: beside nurture's database when that is PostgreSQL."""
    if not database_url.startswith("postgresql"):
        yield None
        return
    server = db.make_engine(database_url).execution_options(isolation_level="AUTOCOMMIT")
    name = f"prefect_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with server.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(database_url).set(drivername="postgresql+asyncpg", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with server.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        server.dispose()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """What a worker's machine holds of the repository: prefect.yaml, the flows and the templates."""
    home = tmp_path / "checkout"
    home.mkdir()
    shutil.copy(REPO / "prefect.yaml", home)
    shutil.copytree(REPO / "flows", home / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "templates", home / "templates")
    programme = home / "templates" / "programme.yaml"
    # No holdout: each of the two customers below is sent their welcome.
    programme.write_text(programme.read_text().replace("holdout: 0.10", "holdout: 0"))
    return home


@pytest.fixture
def stack(
    tmp_path: Path, checkout: Path, server_database: str | None, settings: Settings
) -> Iterator[PrefectStack]:
    stack = PrefectStack(tmp_path / "prefect-stack", server_database)
    stack.env["NURTURE_HOME"] = str(checkout)
    stack.env["NURTURE_TEMPLATES_DIR"] = str(checkout / "templates")
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture
def two_new_customers(sessions: sessionmaker[Session]) -> Business:
    business = Business(sessions)
    business.contact(visits=[local(MADRID, 2026, 11, 22, 12, 0)])
    business.contact(locale="pt", timezone="Europe/Lisbon", visits=[local(MADRID, 2026, 11, 22, 12, 0)])
    return business


def deploy(stack: PrefectStack, checkout: Path, workers: int = 1) -> None:
    """Start the server, create the work pool, start the workers and deploy every flow of prefect.yaml."""
    stack.start_server()
    stack.cli("work-pool", "create", "nurture", "--type", "process")
    # The workers start while the flows deploy.
    for n in range(workers):
        stack.start_worker("--pool", "nurture", "--limit", "2", "--name", f"worker-{n}")
    stack.cli("deploy", "--all", cwd=checkout)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_deployed_calendar_runs_on_a_worker_and_writes_to_the_outbox(
    stack: PrefectStack, checkout: Path, settings: Settings, two_new_customers: Business
) -> None:
    deploy(stack, checkout)

    hourly = stack.api("deployments/name/contact-calendar/hourly")
    [schedule] = hourly["schedules"]
    assert schedule["schedule"]["cron"] == "5 * * * *" and hourly["work_pool_name"] == "nurture"
    assert hourly["global_concurrency_limit"]["limit"] == 1

    parameters = {"parameters": {"at": AT.isoformat(), "dry_run": False}}
    run = ["deployment", "run", "contact-calendar/ad-hoc", "--params", json.dumps(parameters)]
    out = stack.cli(*run, "--watch", "--watch-timeout", "180")

    assert "Completed" in out, out
    emails = outbox_emails(settings)
    assert len(emails) == 2, stack.tails()
    assert sorted(send.touch for send in two_new_customers.sends()) == ["welcome", "welcome"]

    # The week's attribution report and a campaign's dry run, as their schedule and ops start them.
    weekly = stack.api("deployments/name/attribution-report/weekly")
    assert weekly["schedules"][0]["schedule"]["cron"] == "0 6 * * 1"
    at = {"at": AT.isoformat()}
    campaign = {"parameters": {**at, "touch": "promotion", "segment": "loyal", "dry_run": True}}
    started = [
        stack.cli(
            "deployment", "run", "attribution-report/weekly", "--params", json.dumps({"parameters": at})
        ),
        stack.cli("deployment", "run", "adhoc-campaign/on-demand", "--params", json.dumps(campaign)),
    ]
    for out in started:
        created = re.search(r"UUID: ([0-9a-f-]{36})", out)
        assert created, out
        assert stack.wait_for(created[1])["state_type"] == "COMPLETED", stack.tails()


@pytest.mark.skipif(not POSTGRES_URL, reason="needs NURTURE_TEST_DATABASE_URL: machines share PostgreSQL")
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_calendar_run_hands_its_ranges_to_the_workers_of_the_pool(
    stack: PrefectStack, checkout: Path, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    business = Business(sessions)
    for _ in range(250):
        business.contact(visits=[local(MADRID, 2026, 11, 22, 12, 0)])
    deploy(stack, checkout, workers=2)

    parameters = {
        "at": AT.isoformat(),
        "dry_run": False,
        "batch_size": 100,
        "range_deployment": "calendar-range/on-demand",
        "ranges_at_once": 2,
    }
    run = ["deployment", "run", "contact-calendar/ad-hoc", "--params", json.dumps({"parameters": parameters})]
    out = stack.cli(*run, "--watch", "--watch-timeout", "240")

    assert "Completed" in out, out
    ranges = stack.api_post("flow_runs/filter", {"flows": {"name": {"any_": ["calendar-range"]}}})
    assert sorted(run["name"] for run in ranges) == ["contacts 1-100", "contacts 101-200", "contacts 201-250"]
    assert {run["state_type"] for run in ranges} == {"COMPLETED"}
    # Two at a time, each at half the providers' rates.
    assert {run["parameters"]["parameters"]["sharing"] for run in ranges} == {2}
    # Every customer's welcome, once, whichever worker sent it.
    assert len(outbox_emails(settings)) == 250, stack.tails()
    sends = business.sends()
    assert len(sends) == 250 and len({send.contact_id for send in sends}) == 250


# Ad-hoc campaigns as ops run them on a worker: approved or rejected as the Prefect UI does, cancelled
# while sending, resumed.


def wait_for_state(stack: PrefectStack, flow_run_id: str, state_type: str, timeout: float = 180) -> Any:
    """Wait until a flow run reaches ``state_type``; give it as the API does."""
    deadline = time.monotonic() + timeout
    while True:
        run = stack.api(f"flow_runs/{flow_run_id}")
        if run["state_type"] == state_type:
            return run
        if (
            run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
            or time.monotonic() > deadline
        ):
            pytest.fail(f"flow run {flow_run_id} is {run['state_type']}, not {state_type}\n{stack.tails()}")
        time.sleep(0.5)


def start_campaign(stack: PrefectStack, **parameters: Any) -> str:
    """Trigger the adhoc-campaign deployment as ops do; give the flow run's id."""
    asked = json.dumps({"parameters": {"touch": "promotion", "segment": "loyal", **parameters}})
    out = stack.cli("deployment", "run", "adhoc-campaign/on-demand", "--params", asked)
    created = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert created, out
    return created[1]


def answer_as_the_ui(stack: PrefectStack, flow_run_id: str, approve: bool) -> str:
    """Resume a paused campaign with the input the Prefect UI's form sends; give what the form showed."""
    paused = wait_for_state(stack, flow_run_id, "PAUSED")
    keyset = paused["state"]["state_details"]["run_input_keyset"]
    # The flow run saves the form just after it pauses; the UI shows it once it is there.
    deadline = time.monotonic() + 30
    while True:
        try:
            description = stack.api(f"flow_runs/{flow_run_id}/input/{keyset['description']}")
            schema = stack.api(f"flow_runs/{flow_run_id}/input/{keyset['schema']}")
            break
        except urllib.error.HTTPError as error:
            if error.code != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert "approve" in schema["properties"], schema
    stack.api_post(f"flow_runs/{flow_run_id}/resume", {"run_input": {"approve": approve}})
    return str(description)


def nurture(stack: PrefectStack, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one ``nurture`` command against the stack's Prefect server."""
    command = [str(BIN / "nurture"), *args]
    return subprocess.run(command, env=stack.env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def slow_sendgrid() -> Iterator[FakeProvider]:
    """SendGrid taking half a second over each email: a campaign is still sending when ops cancel it."""
    provider = sendgrid()

    def slowly(received: Received, before: int) -> Answer:
        return Answer(202, headers={"X-Message-Id": f"sg-{before + 1}"}, delay=0.5)

    provider.script = slowly
    with provider.running():
        yield provider


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_campaign_approved_in_the_ui_and_cancelled_while_sending_sends_the_rest_once_when_resumed(
    stack: PrefectStack, checkout: Path, sessions: sessionmaker[Session], slow_sendgrid: FakeProvider
) -> None:
    business = Business(sessions)
    for _ in range(200):
        business.contact(visits=[AT - DAY * d for d in (100, 70, 40, 10)])
    stack.env.update(
        NURTURE_EMAIL_CHANNEL="sendgrid",
        NURTURE_SENDGRID_API_KEY="SG.test-key",
        NURTURE_SENDGRID_BASE_URL=slow_sendgrid.url,
        NURTURE_EMAIL_FROM="Luma Studio <hola@luma.example>",
        NURTURE_SENDGRID_CONCURRENCY="4",
        NURTURE_SEND_BATCH_SIZE="10",
        NURTURE_CAMPAIGN_APPROVAL_SIZE="50",
    )
    deploy(stack, checkout)
    asked = {"at": AT.isoformat(), "dry_run": False, "batch_size": 100}

    # Rejected in the UI: nothing goes out.
    rejected = start_campaign(stack, campaign="spring-vip", **asked)
    shown = answer_as_the_ui(stack, rejected, approve=False)
    assert "Segment **loyal**: **200** contacts" in shown and "would go out | 200" in shown
    assert stack.wait_for(rejected)["state_type"] == "COMPLETED", stack.tails()
    assert business.sends() == [] and slow_sendgrid.requests == []

    # Approved in the UI, then cancelled by ops while it sends.
    winter = start_campaign(stack, campaign="winter-vip", **asked)
    answer_as_the_ui(stack, winter, approve=True)
    deadline = time.monotonic() + 120
    while len(slow_sendgrid.requests) < 20:
        assert time.monotonic() < deadline, stack.tails()
        time.sleep(0.2)
    cancel = nurture(stack, "campaign", "cancel", "winter-vip")
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert stack.wait_for(winter)["state_type"] == "CANCELLED", stack.tails()

    # Stopped: what went out is recorded as sent, nothing is left claimed, nothing more goes out.
    went_out = len(slow_sendgrid.requests)
    time.sleep(3)
    assert len(slow_sendgrid.requests) == went_out, "the cancelled campaign went on sending"
    sends = business.sends()
    assert 20 <= went_out < 200, went_out
    statuses = Counter(send.status for send in sends)
    assert statuses == {SendStatus.SENT: went_out}, f"{statuses}\n{stack.tails()}"

    # Resumed: the rest, once each, without asking again.
    resumed = start_campaign(stack, campaign="winter-vip", **asked)
    assert stack.wait_for(resumed, timeout=240)["state_type"] == "COMPLETED", stack.tails()
    sends = business.sends()
    recipients = [request.body["personalizations"][0]["to"][0]["email"] for request in slow_sendgrid.requests]
    assert len(recipients) == 200 and len(set(recipients)) == 200
    assert len(sends) == 200 and {send.status for send in sends} == {SendStatus.SENT}
    assert {send.campaign for send in sends} == {"winter-vip"}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_loyalty_first_campaigns_second_wave_runs_on_a_worker_at_its_time_for_everyone_else(
    stack: PrefectStack, checkout: Path, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    today = dt.datetime.now(dt.UTC)
    # Where it is about noon: inside the send window now and an hour ago, whenever the test runs.
    offset = 12 - today.hour
    zone = "Etc/UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"
    business = Business(sessions)
    visits = [today - DAY * d for d in (100, 70, 40, 10)]
    loyal = [business.contact(timezone=zone, visits=visits) for _ in range(2)]
    others = [business.contact(timezone=zone, visits=visits[2:]) for _ in range(2)]
    deploy(stack, checkout)

    # Loyal customers first, with an hour of early access that began just under an hour ago.
    second_wave = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=40)
    began = second_wave - dt.timedelta(hours=1)
    asked = {"segment": "active", "campaign": "early", "loyalty_first_hours": 1, "dry_run": False}
    first = start_campaign(stack, at=began.isoformat(), **asked)
    assert stack.wait_for(first)["state_type"] == "COMPLETED", stack.tails()
    first_wave = [send for send in business.sends() if send.claimed_at < second_wave]
    assert sorted(send.contact_id for send in first_wave) == loyal

    # The first run scheduled the second wave, under the campaign's name (`nurture campaign cancel` finds
    # it); the worker starts it at its time (no scheduler here).
    runs = stack.api_post("flow_runs/filter", {"flows": {"name": {"any_": ["adhoc-campaign"]}}})
    [wave] = [run for run in runs if run["id"] != first]
    assert wave["name"] == "early"
    assert dt.datetime.fromisoformat(wave["expected_start_time"]) == second_wave
    # Without the first run's instant: it runs as of when it starts.
    assert "at" not in wave["parameters"]["parameters"]
    ran = stack.wait_for(wave["id"], timeout=240)
    assert ran["state_type"] == "COMPLETED", stack.tails()
    # (The worker may start it a few seconds early, fetching runs ahead: the run waits for its time.)
    sends = business.sends()
    assert sorted(send.contact_id for send in sends) == loyal + others
    assert all(send.claimed_at >= second_wave for send in sends if send.contact_id in others)
    assert len(outbox_emails(settings)) == 4
