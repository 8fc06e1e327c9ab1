"""The programme: the touches marketers edit under ``templates/``, loaded and validated as data.

``templates/programme.yaml`` holds the rules every touch shares (send window, caps, default holdout);
``templates/touches/*.yaml`` holds one touch each; ``templates/content/*.yaml`` holds the educational content
items. Every problem is reported with the file, the line and the field, all at once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nurture.errors import ProgrammeError, ProgrammeProblem
from nurture.models import Channel, Satisfaction, SendCategory, Stage, ValueTier


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Strict):
    """The local hours in which messages may go out: ``start`` inclusive, ``end`` exclusive."""

    start: dt.time = dt.time(9, 0)
    end: dt.time = dt.time(20, 0)

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self

    def __contains__(self, moment: dt.time) -> bool:
        return self.start <= moment < self.end


class Caps(_Strict):
    """How many marketing messages one contact may get, across channels."""

    per_local_day: int = Field(1, ge=0)
    per_rolling_7_days: int = Field(3, ge=0)
    exempt: list[SendCategory] = [SendCategory.SERVICE]


class Audience(_Strict):
    """Who a touch is for; every field given must hold (``any_of``: at least one of the sub-audiences)."""

    stages: list[Stage] | None = None
    value_tiers: list[ValueTier] | None = None
    satisfaction: list[Satisfaction] | None = None
    tags: list[str] | None = Field(
        None, min_length=1, description="Has at least one of these interest tags (leave out for any)."
    )
    min_visits: int | None = Field(None, ge=0)
    any_of: list[Audience] | None = None


class OfferKind(StrEnum):
    PERCENT = "percent"
    AMOUNT = "amount"
    FREE_SERVICE = "free_service"
    POINTS = "points"


class Offer(_Strict):
    """An incentive; ``by_tier`` sizes it by the contact's value tier (``value`` for tiers not listed)."""

    kind: OfferKind
    value: Decimal = Field(ge=0)
    by_tier: dict[ValueTier, Decimal] = {}
    valid_days: int = Field(14, ge=1)
    description: str | None = None
    check_margin: bool = Field(
        False, description="Skip the offer when it would cost more than the expected margin of the visit."
    )

    def value_for(self, tier: ValueTier) -> Decimal:
        """Give the offer's size for a contact of ``tier``."""
        return self.by_tier.get(tier, self.value)


class AfterFirstVisit(_Strict):
    kind: Literal["after_first_visit"]
    days: int = Field(1, ge=0)


class Every(_Strict):
    kind: Literal["every"]
    days: int = Field(ge=1)
    first_after: int | None = Field(
        None, ge=0, description="Days after the first visit for the first send; default: days."
    )
    content: bool = Field(False, description="Each send carries a content item the contact has not had.")


class BeforeExpectedVisit(_Strict):
    kind: Literal["before_expected_visit"]
    days: int = Field(3, ge=0)


class PunchCard(_Strict):
    kind: Literal["punch_card"]
    stamps_to_go: int = Field(1, ge=1)


class PointsThreshold(_Strict):
    kind: Literal["points_threshold"]
    points: int = Field(ge=1)


class Campaign(_Strict):
    kind: Literal["campaign"]
    starts: dt.date
    ends: dt.date
    early_access_days: int = Field(0, ge=0)
    early_access: Audience = Audience(stages=[Stage.LOYAL])

    @model_validator(mode="after")
    def _ordered(self) -> Campaign:
        if self.ends < self.starts:
            raise ValueError("ends must not be before starts")
        return self


class Birthday(_Strict):
    kind: Literal["birthday"]


class ReferredFriendVisited(_Strict):
    kind: Literal["referred_friend_visited"]


class Complaint(_Strict):
    kind: Literal["complaint"]
    within_hours: int = Field(24, ge=1)
    detractor_nps_at_most: int = Field(6, ge=0, le=10)
    detractor_csat_at_most: int = Field(2, ge=1, le=5)


class Lapsed(_Strict):
    kind: Literal["lapsed"]
    steps: list[int] = Field(min_length=1, max_length=3, description="Days after lapsing for each message.")

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)) or steps[0] < 0:
            raise ValueError("steps must be increasing days from 0")
        return steps


class Annual(_Strict):
    kind: Literal["annual"]
    month: int = Field(ge=1, le=12)
    day: int = Field(ge=1, le=31)

    @model_validator(mode="after")
    def _real_day(self) -> Annual:
        dt.date(2024, self.month, self.day)  # a leap year: 29 February is allowed
        return self


Trigger = Annotated[
    AfterFirstVisit
    | Every
    | BeforeExpectedVisit
    | PunchCard
    | PointsThreshold
    | Campaign
    | Birthday
    | ReferredFriendVisited
    | Complaint
    | Lapsed
    | Annual,
    Field(discriminator="kind"),
]


class Touch(_Strict):
    """One message of the programme: when it is due, to whom, over which channels, with what offer."""

    name: str
    description: str = ""
    category: SendCategory = SendCategory.MARKETING
    priority: int = Field(50, ge=0, le=100, description="Higher goes first when caps allow one message.")
    channels: list[Channel] = Field(min_length=1)
    trigger: Trigger
    audience: Audience = Audience()
    offer: Offer | None = None
    cooldown_days: int = Field(0, ge=0, description="Days after a send of this touch before another.")
    valid_days: int = Field(1, ge=1, description="Days a due message stays worth sending if deferred.")
    holdout: float | None = Field(None, ge=0, lt=1)
    attribution_days: float | None = Field(
        None,
        gt=0,
        le=90,
        description="Days after a send in which a visit is credited to it, on every channel of the touch;"
        " default: NURTURE_ATTRIBUTION_EMAIL_DAYS or NURTURE_ATTRIBUTION_SMS_DAYS by the send's channel.",
    )
    enabled: bool = True

    @field_validator("channels")
    @classmethod
    def _distinct(cls, channels: list[Channel]) -> list[Channel]:
        if len(set(channels)) != len(channels):
            raise ValueError("a channel is listed twice")
        return channels


class Rules(_Strict):
    """``programme.yaml``: what every touch shares."""

    default_locale: str = "en"
    locales: list[str] | None = Field(
        None,
        description="Locales every touch must have templates in (`nurture templates lint` checks);"
        " default: the default locale and every locale folder found.",
    )
    send_window: Window = Window()
    caps: Caps = Caps()
    holdout: float = Field(0.10, ge=0, lt=1)
    holdout_salt: str = "nurture"
    hold_marketing_while_complaint_open: bool = True
    margin_rate: Decimal = Field(
        Decimal("0.5"), gt=0, le=1, description="Share of a visit's spend that is margin (incentive check)."
    )


class ContentItem(_Strict):
    """An educational content item: tips, a guide, inspiration; never a promotion."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    title: dict[str, str] = Field(min_length=1, description="By locale: en, es, pt ...")
    summary: dict[str, str] = Field(min_length=1)
    body: dict[str, str] = {}
    url: str | None = None
    tags: list[str] = Field([], description="Interests it serves; none means it suits everyone.")

    def localized(self, locale: str, default_locale: str) -> dict[str, str | None]:
        """Give the item's text in ``locale``, falling back to its language, then the default locale."""

        def pick(texts: Mapping[str, str]) -> str | None:
            for candidate in (locale, locale.split("_")[0], default_locale):
                if candidate in texts:
                    return texts[candidate]
            return next(iter(texts.values()), None)

        return {
            "id": self.id,
            "title": pick(self.title),
            "summary": pick(self.summary),
            "body": pick(self.body),
            "url": self.url,
        }


@dataclass(frozen=True)
class Programme:
    """The loaded programme: its shared rules, its enabled touches by priority, its content items."""

    rules: Rules
    touches: tuple[Touch, ...]
    content: tuple[ContentItem, ...]
    root: Path

    def touch(self, name: str) -> Touch:
        """Give the touch called ``name``."""
        for touch in self.touches:
            if touch.name == name:
                return touch
        raise KeyError(name)

    def holdout_for(self, touch: Touch) -> float:
        """Give the share of contacts held out of ``touch``."""
        return self.rules.holdout if touch.holdout is None else touch.holdout


def load_programme(root: Path) -> Programme:
    """Load and validate the programme under ``root``; raise ``ProgrammeError`` listing every problem."""
    problems: list[ProgrammeProblem] = []
    rules_path = root / "programme.yaml"
    rules = _load(rules_path, Rules, problems) if rules_path.exists() else Rules()
    if not rules_path.exists():
        problems.append(ProgrammeProblem(path=rules_path, line=None, field=None, message="file not found"))
    touches: list[Touch] = []
    for path in sorted((root / "touches").glob("*.yaml")):
        touch = _load(path, Touch, problems, defaults={"name": path.stem})
        if touch is None:
            continue
        if touch.name != path.stem:
            problems.append(
                ProgrammeProblem(
                    path=path, line=1, field="name", message=f"must match the file name {path.stem!r}"
                )
            )
        touches.append(touch)
    content: list[ContentItem] = []
    for path in sorted((root / "content").glob("*.yaml")):
        item = _load(path, ContentItem, problems, defaults={"id": path.stem})
        if item is not None:
            content.append(item)
    if not touches and not problems:
        problems.append(
            ProgrammeProblem(path=root / "touches", line=None, field=None, message="no touches defined")
        )
    problems.extend(_cross_checks(root, touches, content))
    if problems or rules is None:
        raise ProgrammeError(problems)
    enabled = sorted((t for t in touches if t.enabled), key=lambda t: (-t.priority, t.name))
    return Programme(rules=rules, touches=tuple(enabled), content=tuple(content), root=root)


def _cross_checks(
    root: Path, touches: Sequence[Touch], content: Sequence[ContentItem]
) -> Iterator[ProgrammeProblem]:
    """Check what no single file can: content exists, and loyal customers get the best offer first."""
    if any(isinstance(t.trigger, Every) and t.trigger.content for t in touches) and not content:
        yield ProgrammeProblem(
            path=root / "content", line=None, field=None, message="a touch sends content but there is none"
        )
    ids = [item.id for item in content]
    for duplicate in sorted({i for i in ids if ids.count(i) > 1}):
        yield ProgrammeProblem(
            path=root / "content", line=None, field="id", message=f"{duplicate!r} is used twice"
        )
    loyal_best: dict[OfferKind, Decimal] = {}
    for touch in touches:
        if touch.offer is not None and _reaches(touch.audience, Stage.LOYAL):
            best = max([touch.offer.value, *touch.offer.by_tier.values()])
            loyal_best[touch.offer.kind] = max(loyal_best.get(touch.offer.kind, Decimal(0)), best)
    for touch in touches:
        offer = touch.offer
        if offer is None or not _new_customers_only(touch.audience):
            continue
        best = max([offer.value, *offer.by_tier.values()])
        if best > loyal_best.get(offer.kind, Decimal(0)):
            yield ProgrammeProblem(
                path=root / "touches" / f"{touch.name}.yaml",
                line=None,
                field="offer.value",
                message=(
                    f"a new-customers-only offer of {best} ({offer.kind}) beats the best offer loyal "
                    f"customers get ({loyal_best.get(offer.kind, Decimal(0))}): loyal customers come first"
                ),
            )


_NEW_STAGES = {Stage.PROSPECT, Stage.NEW}


def _stages(audience: Audience) -> set[Stage]:
    stages = set(audience.stages) if audience.stages is not None else set(Stage)
    if audience.any_of:
        stages &= set().union(*(_stages(sub) for sub in audience.any_of))
    return stages


def _reaches(audience: Audience, stage: Stage) -> bool:
    return stage in _stages(audience)


def _new_customers_only(audience: Audience) -> bool:
    stages = _stages(audience)
    return bool(stages) and stages <= _NEW_STAGES


# Loading YAML with line numbers, so that every problem names its line.

_M = TypeVar("_M", bound=BaseModel)


def _load(
    path: Path, model: type[_M], problems: list[ProgrammeProblem], defaults: Mapping[str, Any] | None = None
) -> _M | None:
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(ProgrammeProblem(path=path, line=None, field=None, message=f"cannot read: {exc}"))
        return None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        problems.append(ProgrammeProblem(path=path, line=line, field=None, message=f"invalid YAML: {reason}"))
        return None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(ProgrammeProblem(path=path, line=1, field=None, message="must be a mapping"))
        return None
    lines = dict(_lines(node)) if node is not None else {}
    try:
        return model.model_validate({**(defaults or {}), **data})
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(part for part in error["loc"] if not _is_union_tag(part, error))
            if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
                loc = (*loc, "kind")
            problems.append(
                ProgrammeProblem(
                    path=path,
                    line=_line_of(lines, loc),
                    field=".".join(str(part) for part in loc) or None,
                    message=error["msg"],
                )
            )
        return None


def load_file(
    path: Path, model: type[_M], problems: list[ProgrammeProblem], defaults: Mapping[str, Any] | None = None
) -> _M | None:
    """Load one YAML file as ``model``; on failure add each problem, with its line, to ``problems``."""
    return _load(path, model, problems, defaults)


def _is_union_tag(part: str | int, error: Any) -> bool:
    # pydantic puts the discriminator value ("after_first_visit") into the location of a tagged union.
    return isinstance(part, str) and error["type"] != "union_tag_invalid" and part in _TRIGGER_KINDS


_TRIGGER_KINDS = {
    "after_first_visit",
    "every",
    "before_expected_visit",
    "punch_card",
    "points_threshold",
    "campaign",
    "birthday",
    "referred_friend_visited",
    "complaint",
    "lapsed",
    "annual",
}


def _lines(
    node: yaml.Node, prefix: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], int]]:
    yield prefix, node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, key.value)
            yield path, key.start_mark.line + 1
            for sub, line in _lines(value, path):
                if sub != path:
                    yield sub, line
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _lines(item, (*prefix, index))


def _line_of(lines: Mapping[tuple[str | int, ...], int], loc: tuple[str | int, ...]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None
