"""Personas: named sample contacts (``templates/personas.yaml``) that previews and lint render for.

A persona is a customer as a run would see them (profile, consent, tags), kept as data so that
marketers can add the customer they worry about. It renders through the calendar's own context
(``Calendar.preview_context``), so a preview shows exactly what that customer would be sent.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale, UnknownLocaleError
from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator

from nurture.calendar import Recipient
from nurture.errors import ProgrammeError, ProgrammeProblem
from nurture.models import Satisfaction, Stage, ValueTier
from nurture.programme import load_file

FILE: Final = "personas.yaml"


class Persona(BaseModel):
    """One sample contact: who they are and where they stand with the business."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    phone: str | None = Field(None, pattern=r"^\+[1-9][0-9]{6,14}$", description="E.164")
    locale: str = "en"
    timezone: str = "UTC"
    currency: str = Field("EUR", min_length=3, max_length=3)
    tags: list[str] = []
    stage: Stage = Stage.RETURNING
    value_tier: ValueTier = ValueTier.MEDIUM
    satisfaction: Satisfaction = Satisfaction.UNKNOWN
    visits: int = Field(3, ge=0)
    total_spend: Decimal = Field(Decimal(150), ge=0)
    points: int = Field(0, ge=0)
    stamps: int = Field(0, ge=0)
    last_visit_days_ago: int | None = Field(20, ge=0)
    next_visit_in_days: int | None = 10
    friend: str | None = Field(None, description="First name of a friend they referred.")
    complaint_open: bool = False

    @field_validator("locale")
    @classmethod
    def _known_locale(cls, value: str) -> str:
        try:
            Locale.parse(value.replace("-", "_"))
        except (UnknownLocaleError, ValueError) as exc:
            raise ValueError(f"unknown locale {value!r}") from exc
        return value.replace("-", "_")

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA timezone {value!r}") from exc
        return value

    def recipient(self, name: str, at: dt.datetime, *, locale: str | None = None) -> Recipient:
        """Give the persona as the calendar's recipient at ``at``, in ``locale`` if given."""
        days_ago, days_ahead = self.last_visit_days_ago, self.next_visit_in_days
        last = None if days_ago is None else at - dt.timedelta(days=days_ago)
        following = None if days_ahead is None or last is None else at + dt.timedelta(days=days_ahead)
        return Recipient(
            id=0,  # no contact has id 0: an unsubscribe link in a preview unsubscribes nobody
            external_id=f"persona:{name}",
            first_name=self.first_name,
            last_name=self.last_name,
            email=self.email,
            phone=self.phone,
            locale=locale or self.locale,
            timezone=self.timezone,
            referral_code=f"{name.upper().replace('_', '')[:6]}26",
            stage=self.stage,
            value_tier=str(self.value_tier),
            satisfaction=str(self.satisfaction),
            complaint_open=self.complaint_open,
            visits=self.visits,
            last_visit=last,
            expected_next_visit=following,
            total_spend=self.total_spend,
            currency=self.currency,
            points=self.points,
            stamps=self.stamps,
            email_consent=self.email is not None,
            sms_consent=self.phone is not None,
        )


class _Personas(RootModel[dict[str, Persona]]):
    pass


def load_personas(templates_dir: Path) -> dict[str, Persona]:
    """Load ``personas.yaml`` under ``templates_dir``; raise ``ProgrammeError`` naming each problem's line."""
    path = templates_dir / FILE
    problems: list[ProgrammeProblem] = []
    if not path.is_file():
        raise ProgrammeError([ProgrammeProblem(path=path, line=None, field=None, message="file not found")])
    loaded = load_file(path, _Personas, problems)
    if loaded is None or problems:
        raise ProgrammeError(problems)
    if not loaded.root:
        raise ProgrammeError([ProgrammeProblem(path=path, line=1, field=None, message="no personas defined")])
    return dict(loaded.root)
