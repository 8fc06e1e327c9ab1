"""Settings: one model, read once at the edge (environment, prefix ``NURTURE_``, optional ``.env``)."""

from __future__ import annotations

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

    @field_validator("public_url")
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
