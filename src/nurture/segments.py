"""Segments: named groups of contacts ops send ad-hoc campaigns to, defined in ``templates/segments.yaml``.

Each segment is a set of conditions on the contact and their profile (stage, value tier, satisfaction,
tags, locale, country, when they last visited), all of which must hold. The file is validated when loaded,
every problem named by file, line and field; a segment becomes one SQL condition over every contact.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

from babel import Locale, UnknownLocaleError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    StringConstraints,
    field_validator,
    model_validator,
)
from sqlalchemy import ColumnElement, and_, exists, func, or_, select, true
from sqlalchemy.orm import Session

from nurture import profiles
from nurture.errors import ProgrammeProblem, SegmentError, UnknownSegment
from nurture.models import Contact, ContactProfile, ContactTag, Satisfaction, Stage, ValueTier
from nurture.programme import load_file

P = ContactProfile
C = Contact
SEGMENTS_FILE = "segments.yaml"
_COUNTRIES = frozenset(
    code for code in map(str, Locale("en").territories) if len(code) == 2 and code.isalpha()
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LastVisit(_Strict):
    """When the contact last visited: days before the run's instant, or UTC dates; every bound given holds."""

    at_least_days_ago: int | None = Field(None, ge=0, description="Not visited for at least this many days.")
    at_most_days_ago: int | None = Field(None, ge=0, description="Visited within this many days.")
    after: dt.date | None = Field(None, description="Last visit on or after this date (UTC).")
    before: dt.date | None = Field(None, description="Last visit before this date (UTC).")

    @model_validator(mode="after")
    def _consistent(self) -> LastVisit:
        if all(
            bound is None
            for bound in (self.at_least_days_ago, self.at_most_days_ago, self.after, self.before)
        ):
            raise ValueError("give at least one of at_least_days_ago, at_most_days_ago, after, before")
        if (
            self.at_least_days_ago is not None
            and self.at_most_days_ago is not None
            and self.at_most_days_ago < self.at_least_days_ago
        ):
            raise ValueError("at_most_days_ago must not be less than at_least_days_ago")
        if self.after is not None and self.before is not None and self.before <= self.after:
            raise ValueError("before must be after after")
        return self


class Segment(_Strict):
    """Who is in a segment: every condition given must hold; a list means any of its values."""

    description: str = ""
    stages: list[Stage] | None = None
    value_tiers: list[ValueTier] | None = None
    satisfaction: list[Satisfaction] | None = None
    tags: list[str] | None = Field(
        None, min_length=1, description="Has at least one of these interest tags (leave out for any)."
    )
    exclude_tags: list[str] | None = Field(None, description="Has none of these tags.")
    locales: list[str] | None = Field(
        None, description="'pt' is every Portuguese locale; 'pt_BR' just Brazil."
    )
    countries: list[str] | None = Field(None, description="ISO 3166 alpha-2 codes, e.g. ES.")
    min_visits: int | None = Field(None, ge=0)
    last_visit: LastVisit | None = None

    @field_validator("tags", "exclude_tags")
    @classmethod
    def _lowercase(cls, tags: list[str] | None) -> list[str] | None:
        # Imports store tags lowercased.
        return None if tags is None else [tag.strip().lower() for tag in tags]

    @field_validator("locales")
    @classmethod
    def _known_locales(cls, locales: list[str] | None) -> list[str] | None:
        if locales is None:
            return None
        known = []
        for name in locales:
            try:
                known.append(str(Locale.parse(name.replace("-", "_"))))
            except (ValueError, UnknownLocaleError) as exc:
                raise ValueError(f"unknown locale {name!r}") from exc
        return known

    @field_validator("countries")
    @classmethod
    def _known_countries(cls, countries: list[str] | None) -> list[str] | None:
        if countries is None:
            return None
        codes = [code.strip().upper() for code in countries]
        unknown = [code for code in codes if code not in _COUNTRIES]
        if unknown:
            raise ValueError(f"unknown ISO 3166 country {', '.join(unknown)}")
        return codes

    def condition(self, at: dt.datetime) -> ColumnElement[bool]:
        """Give the SQL condition selecting the segment over profiles (P) joined to contacts (C) at ``at``."""
        conditions = profiles.matching(self, contact_id=C.id)
        if self.exclude_tags:
            conditions.append(
                ~exists().where(ContactTag.contact_id == C.id, ContactTag.tag.in_(self.exclude_tags))
            )
        if self.locales is not None:
            conditions.append(
                or_(
                    *(
                        C.locale == locale
                        if "_" in locale
                        else or_(C.locale == locale, C.locale.startswith(f"{locale}_", autoescape=True))
                        for locale in self.locales
                    )
                )
            )
        if self.countries is not None:
            conditions.append(C.country.in_(self.countries))
        visit = self.last_visit
        if visit is not None:
            conditions.append(P.last_visit.is_not(None))
            if visit.at_least_days_ago is not None:
                conditions.append(P.last_visit <= at - dt.timedelta(days=visit.at_least_days_ago))
            if visit.at_most_days_ago is not None:
                conditions.append(P.last_visit >= at - dt.timedelta(days=visit.at_most_days_ago))
            if visit.after is not None:
                conditions.append(P.last_visit >= _midnight(visit.after))
            if visit.before is not None:
                conditions.append(P.last_visit < _midnight(visit.before))
        return and_(true(), *conditions)


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


SegmentName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


class Segments(RootModel[dict[SegmentName, Segment]]):
    """``segments.yaml``: segment names (lowercase letters, digits, ``-`` and ``_``) and their conditions."""

    model_config = ConfigDict(frozen=True)

    def get(self, name: str) -> Segment:
        """Give the segment called ``name``; raise ``UnknownSegment`` naming the ones there are."""
        if name not in self.root:
            raise UnknownSegment(name, known=sorted(self.root))
        return self.root[name]


def load_segments(templates_dir: Path) -> Segments:
    """Load and validate ``segments.yaml`` in ``templates_dir``; raise ``SegmentError`` naming problems."""
    path = templates_dir / SEGMENTS_FILE
    problems: list[ProgrammeProblem] = []
    if not path.exists():
        raise SegmentError([ProgrammeProblem(path=path, line=None, field=None, message="file not found")])
    segments = load_file(path, Segments, problems)
    if problems or segments is None:
        raise SegmentError(problems)
    return segments


def size(session: Session, segment: Segment, at: dt.datetime) -> int:
    """Count the contacts in ``segment`` as their profiles stand."""
    query = select(func.count()).select_from(P).join(C, C.id == P.contact_id).where(segment.condition(at))
    return session.execute(query).scalar_one()
