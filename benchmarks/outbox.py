"""Measure the outbox channel: messages a second that ``push`` writes, for email and for SMS.

    .venv/bin/python benchmarks/outbox.py [--messages 10000] [--batch 1000] [--dir benchmarks/.data]

Messages are the size the calendar renders (a 6 kB HTML email with its text part, accents and an emoji
in names and subjects; a 140-character SMS with a link). Files go to a new temporary folder under
``--dir`` (default ``benchmarks/.data``, on the repository's disk; ``/dev/shm`` measures without the
disk), removed afterwards. Also measures the signed unsubscribe link each message carries.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from nurture.channels import OutgoingMessage, messenger_for
from nurture.models import Channel
from nurture.settings import Settings
from nurture.tokens import unsubscribe_url

HTML = (
    '<!doctype html><html><body style="font-family: Helvetica, Arial, sans-serif">'
    + '<p style="margin: 0 0 12px 0; color: #333333">Olá {name}, obrigado pela sua visita. '
    "Preparámos uma seleção de cuidados para esta estação, só para si.</p>" * 30 + "</body></html>"
)
TEXT = "Olá {name}, obrigado pela sua visita.\nPreparámos uma seleção de cuidados para esta estação.\n" * 8
SMS = "Hola {name}: tu próxima cita está cerca. Te esperamos con un 15% de descuento. Baja: {url}"


def emails(settings: Settings, count: int) -> list[OutgoingMessage]:
    """Rendered-size emails for ``count`` contacts."""
    messages = []
    for send_id in range(1, count + 1):
        name = f"María João {send_id} 🌸"
        messages.append(
            OutgoingMessage(
                send_id=send_id,
                key=f"{send_id}:welcome:2026-11-23",
                channel=Channel.EMAIL,
                to=f"contact{send_id}@example.com",
                to_name=name,
                subject=f"¡{name}, tu regalo de bienvenida te espera!",
                html=HTML.format(name=name),
                text=TEXT.format(name=name),
                locale="pt_BR",
                touch="welcome",
                unsubscribe_url=unsubscribe_url(settings, send_id),
                encoding=None,
                segments=None,
            )
        )
    return messages


def texts(settings: Settings, count: int) -> list[OutgoingMessage]:
    """Rendered-size SMS for ``count`` contacts."""
    return [
        OutgoingMessage(
            send_id=send_id,
            key=f"{send_id}:incentive:2026-11-23",
            channel=Channel.SMS,
            to=f"+3461{send_id:07d}",
            to_name="Begoña",
            subject=None,
            html=None,
            text=SMS.format(name="Begoña", url=unsubscribe_url(settings, send_id, "sms")),
            locale="es",
            touch="incentive",
            unsubscribe_url=None,
            encoding="UCS-2",
            segments=2,
        )
        for send_id in range(1, count + 1)
    ]


def measure(settings: Settings, channel: Channel, messages: list[OutgoingMessage], batch: int) -> str:
    """Push ``messages`` in batches; messages a second of wall time, and CPU time a message."""
    messenger = messenger_for(channel, settings)
    started, cpu_started = time.perf_counter(), time.process_time()
    for start in range(0, len(messages), batch):
        deliveries = messenger.push(messages[start : start + batch])
        assert all(delivery.provider_message_id for delivery in deliveries), deliveries[:1]
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    messenger.close()
    return f"{len(messages) / elapsed:,.0f} messages/s ({cpu / len(messages) * 1e6:.0f} µs CPU each)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / ".data")
    arguments = parser.parse_args()
    arguments.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=arguments.dir, prefix="outbox-") as directory:
        settings = Settings(_env_file=None, outbox_dir=Path(directory))  # type: ignore[call-arg]
        started = time.perf_counter()
        for contact_id in range(arguments.messages):
            unsubscribe_url(settings, contact_id)
        token_micros = (time.perf_counter() - started) / arguments.messages * 1e6
        print(f"unsubscribe links: {token_micros:.1f} µs each")
        email_messages = emails(settings, arguments.messages)
        sms_messages = texts(settings, arguments.messages)
        for channel, messages in ((Channel.EMAIL, email_messages), (Channel.SMS, sms_messages)):
            rate = measure(settings, channel, messages, arguments.batch)
            print(f"{channel}: {len(messages):,} messages pushed, new files: {rate}")
            rate = measure(settings, channel, messages, arguments.batch)
            print(f"{channel}: the same {len(messages):,} pushed again, files replaced: {rate}")
        size = sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())
        print(f"outbox size: {size / 1e6:.1f} MB for {2 * arguments.messages:,} files")


if __name__ == "__main__":
    main()
