"""Settings: one model, read once at the edge (environment, prefix ``NURTURE_``, optional ``.env``)."""

from __future__ import annotations

from decimal import Decimal
from email.utils import parseaddr
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.numbers import list_currencies
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything nurture can be told; every field is ``NURTURE_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="NURTURE_", env_file=".env", extra="ignore")

    database_url: str = Field(
        "sqlite:///nurture.db",
        description="SQLAlchemy URL; PostgreSQL as postgresql+psycopg://user@host/db.",
    )
    templates_dir: Path = Field(Path("templates"), description="The programme and its templates.")
    outbox_dir: Path = Field(Path("outbox"), description="Where the embedded outbox channel writes.")
    secret_key: SecretStr = Field(
        SecretStr("insecure-development-key"),
        description="Signs unsubscribe tokens. Set a long random value in production.",
    )
    public_url: str = Field(
        "http://127.0.0.1:8000",
        description="Where `nurture serve` is reachable from outside; unsubscribe links start with it.",
    )

    # Channels (see README, "Channels").
    email_channel: str = Field("outbox", description="The registered channel that sends email.")
    sms_channel: str = Field("outbox", description="The registered channel that sends SMS.")
    email_from: str = Field(
        "nurture demo <hello@example.com>", description="Sender of every email: a name and an address."
    )
    email_reply_to: str | None = Field(None, description="Where replies to emails go, if not the sender.")

    # Sending through a provider (see README, "Channels"): shared by SendGrid and Twilio.
    send_timeout_seconds: float = Field(
        15.0,
        gt=0,
        description="How long to wait for a provider's answer once a request went out; no answer in time"
        " records the send as unknown, never resent by itself.",
    )
    send_connect_timeout_seconds: float = Field(
        5.0, gt=0, description="How long to try to reach a provider before the attempt counts as not made."
    )
    send_max_retries: int = Field(
        4, ge=0, description="Retries of one message after a 429, a 5xx or a connection that never opened."
    )
    send_retry_budget: int = Field(
        200,
        ge=0,
        description="Retries one provider may spend in a run, all messages together: when the provider is"
        " down, a run gives up quickly instead of waiting out every message's retries.",
    )
    send_backoff_seconds: float = Field(
        0.5, ge=0, description="First retry's delay; it doubles at each retry, with random jitter."
    )
    send_backoff_max_seconds: float = Field(30.0, ge=0, description="Longest delay between two retries.")
    send_retry_after_max_seconds: float = Field(
        120.0,
        ge=0,
        description="Longest Retry-After a provider may ask for and still be waited out; a longer one fails"
        " the message with the provider's answer.",
    )

    # SendGrid (NURTURE_EMAIL_CHANNEL=sendgrid)
    sendgrid_api_key: SecretStr | None = Field(None, description="SendGrid API key with Mail Send access.")
    sendgrid_base_url: str = Field(
        "https://api.sendgrid.com", description="SendGrid's API; tests point it at a local server."
    )
    sendgrid_unsubscribe_group: int | None = Field(
        None, ge=1, description="SendGrid unsubscribe group (asm group id) marketing emails belong to."
    )
    sendgrid_rate: float = Field(50.0, gt=0, description="Emails a second nurture sends SendGrid at most.")
    sendgrid_concurrency: int = Field(8, ge=1, description="SendGrid requests in flight at once.")

    # Twilio (NURTURE_SMS_CHANNEL=twilio)
    twilio_account_sid: str | None = Field(
        None, pattern=r"^AC[0-9a-fA-F]{32}$", description="Twilio account SID (AC...)."
    )
    twilio_auth_token: SecretStr | None = Field(
        None, description="Twilio auth token: authenticates API calls and signs Twilio's webhooks."
    )
    twilio_messaging_service_sid: str | None = Field(
        None,
        pattern=r"^MG[0-9a-fA-F]{32}$",
        description="Messaging Service (MG...) SMS are sent from; set this or NURTURE_TWILIO_FROM.",
    )
    twilio_from: str | None = Field(
        None,
        pattern=r"^\+[1-9][0-9]{6,14}$",
        description="Number (E.164) SMS are sent from; set this or NURTURE_TWILIO_MESSAGING_SERVICE_SID.",
    )
    twilio_base_url: str = Field(
        "https://api.twilio.com", description="Twilio's REST API; tests point it at a local server."
    )
    twilio_rate: float = Field(
        10.0,
        gt=0,
        description="SMS segments a second nurture sends Twilio at most (as Twilio counts them: a 2-segment"
        " message counts 2); set it to what your senders are allowed.",
    )
    twilio_concurrency: int = Field(4, ge=1, description="Twilio requests in flight at once.")

    # Imports
    default_country: str | None = Field(
        None, description="ISO 3166 country for phones written the local way when a row has no country."
    )
    default_locale: str = Field("en", description="Locale of contacts imported without one.")
    default_timezone: str = Field(
        "UTC", description="IANA timezone of contacts whose row and phone number do not tell one."
    )
    default_currency: str = Field(
        "EUR", description="ISO 4217 currency of visits imported without one.", min_length=3, max_length=3
    )
    import_batch_size: int = Field(5000, ge=100, description="Rows written to the database at a time.")
    import_transaction_rows: int = Field(
        100_000,
        ge=100,
        description="Rows committed at a time: few large commits are much faster on SQLite; an interrupted"
        " import keeps what it committed and running it again finishes the job.",
    )

    # What nurture knows about each customer (see README, "Lifecycle").
    loyal_min_visits: int = Field(4, ge=2, description="Visits from which a customer in rhythm is loyal.")
    at_risk_after: float = Field(
        1.5,
        gt=1,
        description="At risk once the time since the last visit exceeds this many expected intervals.",
    )
    lapsed_after: float = Field(3.0, gt=1, description="Lapsed after this many expected intervals.")
    lost_after: float = Field(6.0, gt=1, description="Lost after this many expected intervals.")
    prior_weight: float = Field(
        5.0,
        ge=0,
        description="Pseudo-intervals of similar customers' rhythm blended into a contact's own rhythm.",
    )
    default_interval_days: float = Field(
        30.0, gt=0, description="Rhythm assumed for everyone while no customer has visited on two days yet."
    )
    high_value_share: float = Field(
        0.2, gt=0, lt=1, description="Top share of customers by value: tier high."
    )
    medium_value_share: float = Field(0.3, gt=0, lt=1, description="Next share by value: tier medium.")
    punch_card_size: int = Field(10, ge=2, description="Stamps that complete a punch card.")
    points_per_unit: float = Field(1.0, ge=0, description="Loyalty points earned per unit of currency spent.")

    # The contact calendar
    send_batch_size: int = Field(
        1000, ge=1, description="Messages claimed, sent and recorded together: one commit each way per batch."
    )

    sms_max_segments: int = Field(
        4,
        ge=1,
        description="Segments an SMS may take before `nurture templates lint` fails it: each segment is"
        " billed as one message.",
    )

    calendar_processes: int = Field(
        0,
        ge=0,
        description="Worker processes a calendar run spreads its ranges of contacts over; 0: one per CPU"
        " core; 1: everything in the run's own process.",
    )

    # Attribution (see README, "Conversions and attribution").
    attribution_email_days: float = Field(
        5.0, gt=0, le=90, description="Days after an email in which a visit is credited to it."
    )
    attribution_sms_days: float = Field(
        1.0, gt=0, le=90, description="Days after an SMS in which a visit is credited to it."
    )
    attribution_min_group: int = Field(
        30,
        ge=2,
        description="Sends a treated or held-out group needs before its lift is shown; smaller groups say"
        " they are too small instead of showing a number.",
    )

    # Ad-hoc campaigns (see README, "Ad-hoc campaigns (ops)")
    campaign_approval_size: int = Field(
        1000,
        ge=0,
        description="A campaign reaching more contacts than this pauses for a person's approval before it"
        " sends anything.",
    )
    campaign_approval_timeout_minutes: int = Field(
        24 * 60, ge=1, description="How long a paused campaign waits for approval; then nothing is sent."
    )
    sms_segment_price: Decimal = Field(
        Decimal("0.0079"),
        ge=0,
        description="What one SMS segment costs, in your provider's billing currency: a campaign's estimate.",
    )

    # The business every message speaks for (the templates' ``business`` variable).
    business_name: str = Field("Luma Studio", description="The business name messages are signed with.")
    business_website: str = Field("https://example.com", description="The business's website.")
    business_booking_url: str = Field(
        "https://example.com/book", description="Where a customer books a visit (the booking buttons)."
    )
    business_address: str = Field(
        "1 Example Street, Springfield", description="Postal address shown in every email footer."
    )
    business_phone: str = Field("+1 555 0100", description="Phone number shown in messages.")

    # `nurture serve`: provider webhooks and unsubscribe pages (see README, "nurture serve").
    sendgrid_webhook_public_key: str | None = Field(
        None,
        description="The verification key of SendGrid's Signed Event Webhook (base64, as SendGrid shows it);"
        " without it POST /webhooks/sendgrid refuses every request.",
    )
    webhook_tolerance_seconds: int = Field(
        300,
        ge=1,
        description="A signed SendGrid webhook whose timestamp is further than this from now is refused,"
        " so that a captured request cannot be replayed later.",
    )
    max_body_bytes: int = Field(
        1_048_576,
        ge=1024,
        description="Largest request body `nurture serve` reads; a larger one gets 413 and writes nothing."
        " SendGrid posts events in batches well under 1 MiB.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="The key clients send (Authorization: Bearer KEY, or X-API-Key: KEY) to post visits to"
        " POST /api/visits, and that opens the /preview page; without it both refuse every request.",
    )
    sms_help_text: str | None = Field(
        None,
        description="The reply to HELP or INFO; by default the business name and phone, and how to stop.",
    )

    # Retention figures (see README, "Retention"): costs in NURTURE_DEFAULT_CURRENCY.
    acquisition_cost: Decimal | None = Field(
        None, ge=0, description="What winning one new customer costs, to weigh the cost of retention against."
    )
    email_cost: Decimal = Field(Decimal(0), ge=0, description="What sending one email costs.")
    sms_segment_cost: Decimal = Field(Decimal(0), ge=0, description="What sending one SMS segment costs.")

    @field_validator("public_url", "sendgrid_base_url", "twilio_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("email_from", "email_reply_to")
    @classmethod
    def _mailbox(cls, value: str | None) -> str | None:
        if value is not None and "@" not in parseaddr(value)[1]:
            raise ValueError(f"{value!r} is not a mailbox like 'Name <name@example.com>'")
        return value

    stale_claim_minutes: int = Field(
        60,
        ge=1,
        description="A claim left this long by a run that died is marked unknown: never resent by itself.",
    )

    @field_validator("default_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA timezone {value!r}") from exc
        return value

    @field_validator("default_currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        code = value.upper()
        if code not in list_currencies():
            raise ValueError(f"unknown ISO 4217 currency {value!r}")
        return code

    @field_validator("default_country")
    @classmethod
    def _upper_country(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return value.strip().upper() or None


def load_settings() -> Settings:
    """Read the settings from the environment and ``.env``."""
    return Settings()
