"""Measure the SendGrid channel against a local fake SendGrid answering in 50 ms: throughput, and faults.

    .venv/bin/python benchmarks/sendgrid_channel.py [--messages 20000] [--concurrency 64] [--rate 1500]
                                            [--processes 1] [--latency 0.05]
    .venv/bin/python benchmarks/sendgrid_channel.py --faults 0.1 [--messages 5000]

A fake SendGrid runs in its own process on 127.0.0.1 (HTTP/1.1 with keep-alive, a thread per connection) and
answers POST /v3/mail/send after ``--latency`` seconds with 202 and an X-Message-Id, counting what it accepted
by the ``nurture_send_id`` in ``custom_args`` and by recipient. It reports its own CPU time, so that one can
tell it is not the bottleneck on a machine it shares with the client.

Throughput (no ``--faults``): ``SendGridMessenger.push`` is given ``--messages`` emails in batches of
NURTURE_SEND_BATCH_SIZE, as the calendar does, with NURTURE_SENDGRID_CONCURRENCY and NURTURE_SENDGRID_RATE
set from the options. With ``--processes N`` the emails are split over N processes, each holding its share of
the rate and the concurrency as a calendar run's worker processes do (``nurture.channels.sending.shared_by``).

Faults (``--faults F``): a share F of the requests fails, a fifth each way. Three strike the first attempt
of a fixed set of send ids: 429 with ``Retry-After: 1``; 500; and the request read and accepted, then the
connection reset without an answer (the answer is lost: the channel records ``unknown``). Two strike a
kept-alive connection between two requests, before the server reads the next one: either the server closes
it while it is idle (the channel sees the close before it writes and sends on a new connection; a request
that crosses the close gets no answer and is ``unknown``), or it resets it once the next request has arrived,
without reading it (``unknown``, or retried if the reset came while the request was still being written).
Then the benchmark plays it through as ops would: ``--messages`` new customers are imported and the contact
calendar emails each of them the welcome touch through the fake SendGrid; ``nurture sends reconcile`` marks
as sent the unknown sends the fake accepted and releases the others; the calendar runs again and sends the
released ones (each a new send, which may fail again), until nothing is unknown. At the end every
customer's address must have been accepted by the fake exactly once and the ledger must say sent for each.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import multiprocessing
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from select import select as wait_readable
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import SecretStr
from sqlalchemy import func, select

from nurture import db
from nurture.calendar import RunSummary, open_run
from nurture.channels import Delivery, OutgoingMessage
from nurture.channels.sendgrid import SEND_ID_ARG, SendGridMessenger
from nurture.channels.sending import shared_by
from nurture.imports import import_file
from nurture.models import Channel, Contact, Send, SendStatus
from nurture.settings import Settings

REPO = Path(__file__).resolve().parents[1]
HTML = "<html><body>" + "<p>Your points are waiting: 120 points, 3 stamps to the next coffee.</p>" * 30
TEXT = "Your points are waiting: 120 points, 3 stamps to the next coffee.\n" * 30
BY_SEND_ID = ("429", "500", "reset after accepting")  # strike the first attempt of a send id
BETWEEN = ("close while idle", "reset unread")  # strike a kept-alive connection between two requests
FAULTS = (*BY_SEND_ID, *BETWEEN)
MADRID = ZoneInfo("Europe/Madrid")
FIRST_RUN = dt.datetime(2026, 11, 23, 10, 0, tzinfo=MADRID)  # the day after the customers' first visit


def fault_for(send_id: int, share: float) -> str | None:
    """Say how the first attempt for ``send_id`` fails, or None; the same at every run."""
    draw = random.Random(send_id).random()
    share *= len(BY_SEND_ID) / len(FAULTS)
    if draw >= share:
        return None
    return BY_SEND_ID[int(draw / share * len(BY_SEND_ID))]


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


def serve(latency: float, faults: float, ports: Any) -> None:
    """Run the fake SendGrid until killed; put its port on ``ports``."""
    lock = threading.Lock()
    accepted: Counter[int] = Counter()
    accepted_to: Counter[str] = Counter()
    seen: set[int] = set()
    injected: Counter[str] = Counter()
    requests = iter(range(1, 1 << 62))
    draws = random.Random(7)
    between_share = faults / len(FAULTS)
    counted = {"requests": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle(self) -> None:
            self.handle_one_request()
            while not self.close_connection:
                fault = None
                if between_share:
                    with lock:
                        draw = draws.random()
                    if draw < between_share * len(BETWEEN):
                        fault = BETWEEN[int(draw / between_share)]
                if fault == "close while idle":
                    with lock:
                        injected[fault] += 1
                    return  # closed before the next request comes: whatever the client sends is not read
                if fault == "reset unread":
                    wait_readable([self.connection], [], [])
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        return  # the client closed it
                    with lock:
                        injected[fault] += 1
                    self.reset()
                    return
                self.handle_one_request()

        def reset(self) -> None:
            # SO_LINGER 0 makes the close a RST: the client gets no answer.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            personalization = body["personalizations"][0]
            send_id = int(personalization["custom_args"][SEND_ID_ARG])
            to = personalization["to"][0]["email"]
            with lock:
                first = send_id not in seen
                seen.add(send_id)
                counted["requests"] += 1
            fault = fault_for(send_id, faults) if first else None
            time.sleep(latency)
            if fault is None or fault == "reset after accepting":
                with lock:
                    accepted[send_id] += 1
                    accepted_to[to] += 1
                    number = next(requests)
            if fault == "reset after accepting":
                with lock:
                    injected[fault] += 1
                self.reset()
                return
            if fault is not None:
                with lock:
                    injected[fault] += 1
                status = int(fault)
                payload = json.dumps({"errors": [{"message": f"fake {fault}", "field": None}]}).encode()
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "1")
            else:
                payload = b""
                self.send_response(202)
                self.send_header("X-Message-Id", f"fake{number:012d}")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            with lock:
                payload = json.dumps(
                    {
                        "accepted": dict(accepted),
                        "accepted_to": dict(accepted_to),
                        "injected": dict(injected),
                        "requests": counted["requests"],
                        "cpu": time.process_time(),
                    }
                ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def finish(self) -> None:
            try:
                super().finish()
            except OSError:
                pass  # a connection this server reset on purpose

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = Server(("127.0.0.1", 0), Handler)
    ports.put(server.server_port)
    server.serve_forever(poll_interval=0.05)


def stats(url: str) -> dict[str, Any]:
    """Ask the fake SendGrid what it took, injected and spent."""
    with urllib.request.urlopen(f"{url}/stats", timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def messages(low: int, high: int) -> list[OutgoingMessage]:
    """Give marketing emails with send ids ``low`` to ``high - 1``."""
    return [
        OutgoingMessage(
            send_id=i,
            key=f"bench:{i}",
            channel=Channel.EMAIL,
            to=f"contact{i}@example.com",
            to_name=f"Contact {i}",
            subject="Your points are waiting",
            html=HTML,
            text=TEXT,
            locale="en",
            touch="points-reminder",
            unsubscribe_url=f"https://nurture.example.com/u/token{i}",
            encoding=None,
            segments=None,
        )
        for i in range(low, high)
    ]


def push_share(settings: Settings, low: int, high: int, barrier: Any, results: Any) -> None:
    """Push emails ``low`` to ``high - 1`` through one messenger, timed from the barrier on."""
    outgoing = messages(low, high)
    messenger = SendGridMessenger(settings)
    size = settings.send_batch_size
    barrier.wait()
    deliveries: list[Delivery] = []
    cpu, started = time.process_time(), time.monotonic()
    try:
        for start in range(0, len(outgoing), size):
            deliveries.extend(messenger.push(outgoing[start : start + size]))
    finally:
        ended, cpu = time.monotonic(), time.process_time() - cpu
        opened, closed = messenger._keep_alive.opened, messenger._keep_alive.dropped
        messenger.close()
    statuses = [(d.send_id, str(d.status)) for d in deliveries]
    results.put(
        {
            "started": started,
            "ended": ended,
            "cpu": cpu,
            "statuses": statuses,
            "opened": opened,
            "closed": closed,
        }
    )


def throughput(options: argparse.Namespace, url: str) -> None:
    """Push the emails through the channel, in one process or several, and check each went out once."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        sendgrid_api_key=SecretStr("SG.benchmark"),
        sendgrid_base_url=url,
        sendgrid_rate=options.rate,
        sendgrid_concurrency=options.concurrency,
        send_batch_size=options.batch,
    )
    share = shared_by(settings, options.processes)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(options.processes + 1), context.Queue()
    bounds = [options.messages * i // options.processes + 1 for i in range(options.processes + 1)]
    workers = [
        context.Process(target=push_share, args=(share, bounds[i], bounds[i + 1], barrier, results))
        for i in range(options.processes)
    ]
    for worker in workers:
        worker.start()
    load, before = os.getloadavg()[0], stats(url)
    barrier.wait()
    parts = [results.get() for _ in workers]
    after = stats(url)
    for worker in workers:
        worker.join()

    wall = max(p["ended"] for p in parts) - min(p["started"] for p in parts)
    cpu = sum(p["cpu"] for p in parts)
    server_cpu = after["cpu"] - before["cpu"]
    requests = after["requests"] - before["requests"]
    statuses = Counter(status for p in parts for _, status in p["statuses"])
    sent = {send_id for p in parts for send_id, status in p["statuses"] if status == SendStatus.SENT}
    accepted = {int(k): v for k, v in after["accepted"].items()}
    duplicates = sum(1 for v in accepted.values() if v > 1)
    print(
        f"{options.messages:,} emails, {options.processes} process(es), concurrency {options.concurrency},"
        f" rate limit {options.rate:g}/s, batches of {options.batch}, fake SendGrid answering in"
        f" {options.latency * 1000:g} ms; load average {load:.2f} at the start"
    )
    print(f"  {options.messages / wall:,.0f} emails a second sustained; wall {wall:.2f} s")
    print(f"  client CPU {cpu:.2f} s ({cpu / options.messages * 1e6:,.0f} µs an email)")
    print(
        f"  fake SendGrid CPU {server_cpu:.2f} s ({server_cpu / max(1, requests) * 1e6:,.0f} µs a request,"
        f" {server_cpu / wall:.0%} of a core)"
    )
    print(
        f"  connections opened {sum(p['opened'] for p in parts)},"
        f" found closed by the server and replaced {sum(p['closed'] for p in parts)}"
    )
    print(
        f"  accepted by the server {sum(accepted.values()):,} ({len(accepted):,} send ids),"
        f" duplicates {duplicates}; channel: sent {statuses[SendStatus.SENT]:,},"
        f" failed {statuses[SendStatus.FAILED]:,}, unknown {statuses[SendStatus.UNKNOWN]:,}"
    )
    if duplicates or sent != set(accepted) or len(sent) != options.messages:
        raise SystemExit("NOT exactly once")


def business(folder: Path, count: int) -> tuple[Path, Path]:
    """Write ``count`` new customers in Madrid, each with a first visit yesterday, as import files."""
    contacts, visits = folder / "contacts.csv", folder / "visits.csv"
    with contacts.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            ["external_id", "first_name", "email", "country", "locale", "timezone", "email_consent"]
        )
        for i in range(1, count + 1):
            writer.writerow([f"c{i}", "Lucía", f"c{i}@example.com", "ES", "es", "Europe/Madrid", "true"])
    with visits.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["external_id", "contact_external_id", "occurred_at", "amount"])
        for i in range(1, count + 1):
            writer.writerow([f"v{i}", f"c{i}", "2026-11-22T18:00:00", "40.00"])
    return contacts, visits


def calendar_run(settings: Settings, at: dt.datetime) -> tuple[RunSummary, float, int, int]:
    """Run the calendar's welcome touch in this process; give its summary, wall, retries, closes caught."""
    started = time.monotonic()
    with open_run(settings, at, touches=["welcome"]) as run:
        summary, ranges = run.begin(50_000)
        for low, high in ranges:
            summary.combine(run.send(low, high))
        messenger = run.calendar.messengers.get(Channel.EMAIL)
        retries = closed = 0
        if isinstance(messenger, SendGridMessenger):
            retries, closed = messenger._sender.budget.spent, messenger._keep_alive.dropped
    return summary, time.monotonic() - started, retries, closed


def reconcile(env: dict[str, str], *args: str) -> dict[str, Any]:
    """Run ``nurture sends reconcile ARGS --json`` as ops would; give its answer."""
    nurture = Path(sys.executable).with_name("nurture")
    done = subprocess.run(
        [str(nurture), "sends", "reconcile", *args, "--json"], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"nurture sends reconcile failed: {done.stderr}")
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def exactly_once(options: argparse.Namespace, url: str) -> None:
    """Email new customers through the calendar under faults, reconcile as ops would, until all went once."""
    folder = Path(tempfile.mkdtemp(prefix="nurture-sendgrid-"))
    try:
        templates = folder / "templates"
        shutil.copytree(REPO / "templates", templates)
        programme = templates / "programme.yaml"
        programme.write_text(programme.read_text().replace("holdout: 0.10", "holdout: 0"))
        database = f"sqlite:///{folder / 'nurture.db'}"
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            database_url=database,
            templates_dir=templates,
            outbox_dir=folder / "outbox",
            email_channel="sendgrid",
            sendgrid_api_key=SecretStr("SG.benchmark"),
            sendgrid_base_url=url,
            sendgrid_rate=options.rate,
            sendgrid_concurrency=options.concurrency,
            send_batch_size=options.batch,
            calendar_processes=1,
            # Every fault may be retried: the default budget (200) is sized for a provider that is down.
            send_retry_budget=max(200, options.messages),
        )
        engine = db.make_engine(database)
        db.upgrade(engine)
        sessions = db.session_factory(engine)
        for path in business(folder, options.messages):
            import_file(sessions, path.stem, path, settings)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NURTURE_")}
        env |= {"NURTURE_DATABASE_URL": database, "NURTURE_TEMPLATES_DIR": str(templates)}
        print(
            f"{options.messages:,} new customers emailed the welcome touch by the calendar, concurrency"
            f" {options.concurrency}, rate limit {options.rate:g}/s, fake SendGrid answering in"
            f" {options.latency * 1000:g} ms, {options.faults:.0%} of requests failing;"
            f" load average {os.getloadavg()[0]:.2f} at the start"
        )
        at, closed = FIRST_RUN, 0
        for number in range(1, 11):
            summary, wall, retries, closed_now = calendar_run(settings, at)
            closed += closed_now
            totals = summary.totals
            print(
                f"  run {number} at {at:%H:%M}: sent {totals['sent']:,}, unknown {totals['unknown']:,},"
                f" failed {totals['failed']:,}, {retries:,} retries, in {wall:.1f} s"
            )
            unknown = [row["id"] for row in reconcile(env)["unknown"]]
            if not unknown:
                break
            taken = set(map(int, stats(url)["accepted"]))
            went = [i for i in unknown if i in taken]
            lost = [i for i in unknown if i not in taken]
            settled = reconcile(env, *(f"--sent={i}" for i in went), *(f"--release={i}" for i in lost))
            print(
                f"    nurture sends reconcile: {len(settled['sent']):,} the fake SendGrid took marked sent,"
                f" {len(settled['released']):,} it never read released"
            )
            at += dt.timedelta(minutes=30)
        else:
            raise SystemExit("still unknown sends after 10 runs")
        final = stats(url)
        with sessions() as session:
            sent = session.scalar(
                select(func.count()).select_from(Send).where(Send.status == SendStatus.SENT)
            )
            contacts = session.scalar(select(func.count()).select_from(Contact))
            per_contact = session.execute(
                select(Send.contact_id, func.count())
                .where(Send.status == SendStatus.SENT)
                .group_by(Send.contact_id)
                .having(func.count() > 1)
            ).all()
        engine.dispose()
        injected = final["injected"]
        print(
            "  faults injected: "
            + ", ".join(f"{kind} {injected.get(kind, 0):,}" for kind in FAULTS)
            + f" of {final['requests']:,} requests; connections found closed and replaced: {closed:,}"
        )
        accepted_to = Counter(final["accepted_to"])
        twice = sorted(to for to, n in accepted_to.items() if n > 1)
        missing = options.messages - len(accepted_to)
        problems = []
        if twice:
            problems.append(f"{len(twice)} addresses accepted more than once: {twice[:5]}")
        if missing:
            problems.append(f"{missing} addresses never accepted")
        if sent != contacts or per_contact:
            problems.append(f"the ledger says {sent} sent for {contacts} contacts")
        if problems:
            raise SystemExit("NOT exactly once: " + "; ".join(problems))
        print(
            f"  exactly once in the end: each of the {options.messages:,} addresses accepted once by the"
            f" fake SendGrid, none twice; the ledger says sent for each"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=None, help="20,000; 5,000 with --faults")
    parser.add_argument("--concurrency", type=int, default=96, help="NURTURE_SENDGRID_CONCURRENCY")
    parser.add_argument("--rate", type=float, default=1500.0, help="NURTURE_SENDGRID_RATE, emails a second")
    parser.add_argument("--batch", type=int, default=1000, help="NURTURE_SEND_BATCH_SIZE")
    parser.add_argument("--processes", type=int, default=1, help="sending processes (throughput only)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the fake SendGrid takes")
    parser.add_argument("--faults", type=float, default=0.0, help="share of requests that fail")
    options = parser.parse_args()
    if options.messages is None:
        options.messages = 5_000 if options.faults else 20_000

    ports: Any = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(options.latency, options.faults, ports), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{ports.get(timeout=30)}"
    try:
        if options.faults:
            exactly_once(options, url)
        else:
            throughput(options, url)
    finally:
        server.kill()
        server.join()


if __name__ == "__main__":
    main()
