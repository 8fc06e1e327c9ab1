"""Sending through a provider's API: requests in flight at once, a rate really held, no retry sending twice.

A provider channel hands ``Sender.push`` its batch and one function, ``attempt(message) -> Delivery``,
that makes one request and says what came of it. The attempt raises ``Retry`` only when the provider
certainly did not take the message (a 429, a 5xx, a connection that never opened); the sender then waits
(exponential backoff with jitter, or the provider's ``Retry-After``) and tries again, within
``NURTURE_SEND_MAX_RETRIES`` per message and ``NURTURE_SEND_RETRY_BUDGET`` per run. A request that went
out and got no answer is the attempt's ``UNKNOWN``, never retried: neither SendGrid nor Twilio takes an
idempotency key, so a second request could deliver a second message.

Every attempt, retries included, first takes its share of the provider's rate from a ``RateLimiter``
shared by the sender's threads: one unit per email, one per SMS segment. Processes sending for one run at
once each hold their share of the rate, the concurrency and the retry budget (``shared_by``), so that the
configured figures hold for the whole run.

``stop`` (a cancelled run) lets the requests in flight finish and starts no more: each message not yet
tried comes back ``CLAIMED``, never sent, so that the calendar gives its claim up.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime

from nurture.channels import Delivery, OutgoingMessage
from nurture.models import SendStatus
from nurture.settings import Settings

__all__ = ["RateLimiter", "Retry", "RetryBudget", "Sender", "retry_after", "shared_by"]

log = logging.getLogger(__name__)
NOT_SENT = "not sent: the run was stopped before this message was tried"

Attempt = Callable[[OutgoingMessage], Delivery]

# Per provider, held by each process sending for a run: its rate and its requests in flight.
_RATES = ("sendgrid_rate", "twilio_rate")
_CONCURRENCIES = ("sendgrid_concurrency", "twilio_concurrency")


def shared_by(settings: Settings, processes: int) -> Settings:
    """Give the settings of one of ``processes`` processes sending for the same run at once.

    Each holds ``1/processes`` of every provider's rate and of the run's retry budget, and as many
    requests in flight (at least one), so that together they stay within the configured figures.
    """
    if processes <= 1:
        return settings
    update: dict[str, float | int] = {name: getattr(settings, name) / processes for name in _RATES}
    update |= {name: max(1, getattr(settings, name) // processes) for name in _CONCURRENCIES}
    update["send_retry_budget"] = settings.send_retry_budget // processes
    return settings.model_copy(update=update)


class Retry(Exception):
    """Raised by an attempt when the provider certainly did not take the message, so it may be tried again."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


def retry_after(value: str | None) -> float | None:
    """Read a ``Retry-After`` header (seconds or an HTTP date) as seconds from now; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


class RateLimiter:
    """Space requests so that at most ``rate`` units a second start, however many threads ask.

    Callers take turns under a lock: each waits for its slot and sets the next one from the moment it really
    got going, so a thread that wakes late pushes the others back instead of letting them bunch up after
    it. No burst: over any second the units started stay within ``rate`` and one request's worth.
    """

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("the rate must be positive")
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = clock()

    def acquire(self, units: float = 1.0) -> None:
        """Wait until ``units`` may start."""
        with self._lock:
            now = self._clock()
            if self._next > now:
                self._sleep(self._next - now)
                now = self._clock()
            self._next = max(now, self._next) + units / self.rate

    def hold_off(self, seconds: float) -> None:
        """Let nothing start for ``seconds``, as a provider's ``Retry-After`` asks of the whole account."""
        with self._lock:
            self._next = max(self._next, self._clock() + seconds)


class RetryBudget:
    """The retries one provider may spend in a run, shared by every message and thread."""

    def __init__(self, retries: int) -> None:
        self.retries = retries
        self.spent = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Spend one retry; False once the budget is gone."""
        with self._lock:
            if self.spent >= self.retries:
                return False
            self.spent += 1
            return True


class Sender:
    """Push batches to one provider: a thread pool, its rate limiter, retries and the run's retry budget."""

    def __init__(
        self,
        provider: str,
        settings: Settings,
        *,
        rate: float,
        concurrency: int,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.provider = provider
        self.limiter = RateLimiter(rate, sleep=sleep)
        self.budget = RetryBudget(settings.send_retry_budget)
        self._max_retries = settings.send_max_retries
        self._backoff = settings.send_backoff_seconds
        self._backoff_max = settings.send_backoff_max_seconds
        self._retry_after_max = settings.send_retry_after_max_seconds
        self._sleep = sleep
        self._random = random.Random()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"nurture-{provider}")
        self._stopping = threading.Event()

    def push(
        self,
        messages: Sequence[OutgoingMessage],
        attempt: Attempt,
        units: Callable[[OutgoingMessage], float] = lambda message: 1.0,
    ) -> list[Delivery]:
        """Deliver each message with ``attempt``, several at once; one ``Delivery`` per message, in order."""
        return list(self._pool.map(lambda message: self._deliver(message, attempt, units(message)), messages))

    def _deliver(self, message: OutgoingMessage, attempt: Attempt, units: float) -> Delivery:
        tries = 0
        while True:
            self.limiter.acquire(units)
            if self._stopping.is_set():
                # Never tried, or certainly not taken by the provider (only such an attempt is retried).
                return Delivery(message.send_id, SendStatus.CLAIMED, error=NOT_SENT)
            tries += 1
            try:
                return attempt(message)
            except Retry as retry:
                failed = self._give_up(retry, tries)
                if failed is not None:
                    return Delivery(message.send_id, SendStatus.FAILED, error=failed)
                if retry.retry_after is not None:
                    self.limiter.hold_off(retry.retry_after)
                    self._sleep(retry.retry_after)
                else:
                    self._sleep(self._delay(tries))
            except Exception as exc:
                # Whatever broke may have broken after the request went out: a person decides.
                log.exception("sending send %s through %s", message.send_id, self.provider)
                error = f"unexpected {type(exc).__name__} while sending through {self.provider}: {exc}"
                return Delivery(message.send_id, SendStatus.UNKNOWN, error=error)

    def _give_up(self, retry: Retry, tries: int) -> str | None:
        """Say why ``retry`` is not retried, or None when it is."""
        if tries > self._max_retries:
            return f"{retry.reason} (gave up after {tries} attempts)"
        if retry.retry_after is not None and retry.retry_after > self._retry_after_max:
            return (
                f"{retry.reason} (asked to retry after {retry.retry_after:.0f} s, more than"
                f" NURTURE_SEND_RETRY_AFTER_MAX_SECONDS={self._retry_after_max:g})"
            )
        if not self.budget.take():
            return (
                f"{retry.reason} (not retried: this run spent its {self.budget.retries} retries on"
                f" {self.provider}, NURTURE_SEND_RETRY_BUDGET)"
            )
        return None

    def _delay(self, tries: int) -> float:
        """Give the wait before retry number ``tries``: exponential, capped, half of it random."""
        ceiling = min(self._backoff_max, self._backoff * 2.0 ** (tries - 1))
        return ceiling / 2 + self._random.uniform(0, ceiling / 2)

    def stop(self) -> None:
        """Start no more requests: messages not yet tried come back ``CLAIMED``; those in flight finish."""
        self._stopping.set()

    def close(self) -> None:
        """Wait for requests in flight and stop the threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)
