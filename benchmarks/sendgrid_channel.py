"""Measure the SendGrid channel against a local fake SendGrid answering in 50 ms: throughput, and faults.

    .venv/bin/python benchmarks/sendgrid_channel.py [--messages 20000] [--concurrency 96] [--rate 1500]
                                            [--latency 0.05] [--faults 0.1]

A fake SendGrid runs in its own process on 127.0.0.1 (a thread per connection, a listen backlog of 512) and
answers POST /v3/mail/send after ``--latency`` seconds with 202 and an X-Message-Id, counting what it
accepted by the ``nurture_send_id`` in ``custom_args``. ``SendGridMessenger.push`` is then given
``--messages`` emails in batches of NURTURE_SEND_BATCH_SIZE, as the calendar does, with
NURTURE_SENDGRID_CONCURRENCY and NURTURE_SENDGRID_RATE set from the options.

With ``--faults F`` a deterministic share F of the send ids (the same ones at every run) has its first
attempt fail, a third each way: 429 with ``Retry-After: 1``, 500, or the connection reset without an answer.
The server reads the request before it resets, so the request went out and the channel rightly records
``unknown`` and never resends it (SendGrid takes no idempotency key): the server did not accept those, and
the benchmark counts them apart. "Sent exactly once" is then checked as: every send the channel calls sent
was accepted exactly once, no send id was accepted twice, and the unknowns are exactly the reset ones.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import socket
import struct
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import SecretStr

from nurture.channels import Delivery, OutgoingMessage
from nurture.channels.sendgrid import SEND_ID_ARG, SendGridMessenger
from nurture.models import Channel, SendStatus
from nurture.settings import Settings

HTML = "<html><body>" + "<p>Your points are waiting: 120 points, 3 stamps to the next coffee.</p>" * 30
TEXT = "Your points are waiting: 120 points, 3 stamps to the next coffee.\n" * 30
FAULTS = ("429", "500", "reset")


def fault_for(send_id: int, share: float) -> str | None:
    """Say how the first attempt for ``send_id`` fails, or None; the same at every run."""
    draw = random.Random(send_id).random()
    if draw >= share:
        return None
    return FAULTS[int(draw / share * len(FAULTS))]


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512


def serve(latency: float, faults: float, ports: Any) -> None:
    """Run the fake SendGrid until killed; put its port on ``ports``."""
    lock = threading.Lock()
    accepted: Counter[int] = Counter()
    seen: set[int] = set()
    injected: Counter[str] = Counter()
    reset_ids: list[int] = []
    counter = iter(range(1, 1 << 62))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            send_id = int(body["personalizations"][0]["custom_args"][SEND_ID_ARG])
            with lock:
                first = send_id not in seen
                seen.add(send_id)
            fault = fault_for(send_id, faults) if first else None
            time.sleep(latency)
            if fault == "reset":
                with lock:
                    injected[fault] += 1
                    reset_ids.append(send_id)
                # SO_LINGER 0: closing sends a RST, the client sees the connection reset with no answer.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
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
                with lock:
                    accepted[send_id] += 1
                    number = next(counter)
                payload = b""
                self.send_response(202)
                self.send_header("X-Message-Id", f"fake{number:012d}")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            with lock:
                payload = json.dumps(
                    {"accepted": dict(accepted), "injected": dict(injected), "reset_ids": reset_ids}
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


def messages(count: int) -> list[OutgoingMessage]:
    """Give ``count`` marketing emails, send ids 1 to ``count``."""
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
        for i in range(1, count + 1)
    ]


def batches(items: Sequence[OutgoingMessage], size: int) -> list[Sequence[OutgoingMessage]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=96, help="NURTURE_SENDGRID_CONCURRENCY")
    parser.add_argument("--rate", type=float, default=1500.0, help="NURTURE_SENDGRID_RATE, emails a second")
    parser.add_argument("--batch", type=int, default=1000, help="NURTURE_SEND_BATCH_SIZE")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the fake SendGrid takes")
    parser.add_argument("--faults", type=float, default=0.0, help="share of first attempts that fail")
    options = parser.parse_args()

    ports: Any = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(options.latency, options.faults, ports), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{ports.get(timeout=30)}"
    settings = Settings(  # type: ignore[call-arg]
        sendgrid_api_key=SecretStr("SG.benchmark"),
        sendgrid_base_url=url,
        sendgrid_rate=options.rate,
        sendgrid_concurrency=options.concurrency,
        send_batch_size=options.batch,
        # Every fault may be retried: the default budget (200) is sized for a provider that is down.
        send_retry_budget=max(200, options.messages),
    )
    outgoing = messages(options.messages)
    messenger = SendGridMessenger(settings)
    deliveries: list[Delivery] = []
    cpu = time.process_time()
    started = time.perf_counter()
    try:
        for batch in batches(outgoing, settings.send_batch_size):
            deliveries.extend(messenger.push(batch))
    finally:
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu
        retries = messenger._sender.budget.spent
        messenger.close()
    with urllib.request.urlopen(f"{url}/stats", timeout=30) as response:
        stats = json.loads(response.read())
    server.kill()
    server.join()

    accepted = {int(k): v for k, v in stats["accepted"].items()}
    statuses = Counter(d.status for d in deliveries)
    sent = {d.send_id for d in deliveries if d.status is SendStatus.SENT}
    unknown = {d.send_id for d in deliveries if d.status is SendStatus.UNKNOWN}
    duplicates = sum(1 for v in accepted.values() if v > 1)
    print(
        f"{options.messages:,} emails, concurrency {options.concurrency}, rate limit {options.rate:g}/s,"
        f" batches of {options.batch}, fake SendGrid answering in {options.latency * 1000:g} ms,"
        f" faults {options.faults:g}"
    )
    print(f"  {options.messages / wall:,.0f} emails a second sustained; wall {wall:.2f} s")
    print(f"  client CPU {cpu:.2f} s ({cpu / options.messages * 1e6:,.0f} µs an email)")
    print(
        f"  accepted by the server {sum(accepted.values()):,} ({len(accepted):,} send ids),"
        f" duplicates at the server {duplicates}"
    )
    print(
        f"  channel: sent {statuses[SendStatus.SENT]:,}, failed {statuses[SendStatus.FAILED]:,},"
        f" unknown {statuses[SendStatus.UNKNOWN]:,}, retries {retries:,}"
    )
    injected = stats["injected"]
    print("  faults injected: " + ", ".join(f"{kind} {injected.get(kind, 0):,}" for kind in FAULTS))
    problems = []
    if duplicates:
        problems.append(f"{duplicates} send ids accepted twice")
    if sent != set(accepted):
        problems.append(f"{len(sent ^ set(accepted))} sends where the channel and the server disagree")
    if unknown != set(stats["reset_ids"]):
        problems.append(f"{len(unknown ^ set(stats['reset_ids']))} unknowns that were not a reset")
    if statuses[SendStatus.FAILED]:
        problems.append(f"{statuses[SendStatus.FAILED]} failed")
    if problems:
        raise SystemExit("NOT exactly once: " + "; ".join(problems))
    print(
        "  exactly once: every sent email accepted once, none twice;"
        f" the {len(unknown):,} unknown are the resets, none accepted"
    )


if __name__ == "__main__":
    main()
