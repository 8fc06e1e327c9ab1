"""Errors nurture raises on purpose.

    NurtureError
    ├── ImportFileError        an import file cannot be read at all (unreadable, bad encoding, missing column)
    ├── InvalidVisits          visits posted to the API break the import's rules: every problem by item, field
    ├── ContactNotFound        no contact has the external id asked for
    ├── ProfileNotRefreshed    a contact has no profile yet: `nurture contacts refresh` has not run since
    ├── ProgrammeError         the programme under templates/ is invalid: every problem by file, line, field
    │   └── SegmentError       templates/segments.yaml is invalid: every problem by file, line, field
    ├── UnknownTouch           a run was asked for a touch the programme does not have
    ├── UnknownPersona         a preview was asked for a persona personas.yaml does not have
    ├── BadAddress             a test send's seed address is not an email address or phone number
    ├── UnknownSegment         a campaign was asked for a segment segments.yaml does not define
    ├── CampaignError          a campaign cannot run as asked (resumed with other options, no profiles yet)
    ├── TemplateError          a message template cannot be rendered, named by file and line
    ├── ConfigurationError     a setting names something that does not exist (an unknown channel)
    ├── BadToken               an unsubscribe token is forged, garbled or signed with another key
    └── DemoError              the demo cannot run where it was asked to (a foreign folder, a database in use)

Each carries its context as keyword-only attributes and renders as one line a person can act on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class NurtureError(Exception):
    """Base of every error nurture raises on purpose."""


class ImportFileError(NurtureError):
    """Raised when an import file cannot be imported at all; nothing has been written."""

    def __init__(self, message: str, *, path: Path, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


class InvalidVisits(NurtureError):
    """Raised when posted visits break the visits import's rules; nothing has been written."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class ContactNotFound(NurtureError):
    """Raised when no contact has the given external id."""

    def __init__(self, *, external_id: str) -> None:
        self.external_id = external_id
        super().__init__(f"no contact with external id {external_id!r}")


@dataclass(frozen=True)
class ProgrammeProblem:
    """One problem in the programme files: where it is and what is wrong."""

    path: Path
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ProgrammeError(NurtureError):
    """Raised when the programme under templates/ is invalid; lists every problem found."""

    def __init__(self, problems: Sequence[ProgrammeProblem]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        head = f"the programme has {count} problem{'s' if count != 1 else ''}"
        super().__init__("\n".join([head, *(f"  {problem}" for problem in self.problems)]))


class SegmentError(ProgrammeError):
    """Raised when ``segments.yaml`` is invalid; lists every problem found."""

    def __init__(self, problems: Sequence[ProgrammeProblem]) -> None:
        super().__init__(problems)
        count = len(self.problems)
        head = f"the segments have {count} problem{'s' if count != 1 else ''}"
        self.args = ("\n".join([head, *(f"  {problem}" for problem in self.problems)]),)


class ProfileNotRefreshed(NurtureError):
    """Raised when a contact has no profile yet because no refresh has run since it was imported."""

    def __init__(self, *, external_id: str | None = None) -> None:
        self.external_id = external_id
        whose = f"contact {external_id!r} has" if external_id is not None else "no contact has"
        super().__init__(f"{whose} no profile yet: run `nurture contacts refresh` first")


class TemplateError(NurtureError):
    """Raised when a message template fails to compile or render, or no locale has it."""

    def __init__(self, *, template: str, line: int | None, touch: str, locale: str, message: str) -> None:
        self.template = template
        self.line = line
        self.touch = touch
        self.locale = locale
        self.message = message
        where = f"{template}:{line}" if line is not None else template
        super().__init__(f"{where}: {message}")


class ConfigurationError(NurtureError):
    """Raised when a setting's value cannot be used; names the ``NURTURE_*`` variable to fix."""

    def __init__(self, message: str, *, setting: str) -> None:
        self.setting = setting
        super().__init__(f"NURTURE_{setting.upper()}: {message}")


class BadToken(NurtureError):
    """Raised when an unsubscribe token was not signed by this installation or cannot be read."""

    def __init__(self, message: str = "invalid or tampered token") -> None:
        super().__init__(message)


class DemoError(NurtureError):
    """Raised when the demo cannot run where it was asked to (a foreign folder, a database in use)."""


class UnknownTouch(NurtureError):
    """Raised when a run is asked for touches the programme does not have."""

    def __init__(self, names: Sequence[str], *, known: Sequence[str]) -> None:
        self.names = tuple(names)
        super().__init__(f"unknown touch {', '.join(names)}; the programme has: {', '.join(sorted(known))}")


class UnknownPersona(NurtureError):
    """Raised when a preview or test send names a persona that ``personas.yaml`` does not have."""

    def __init__(self, name: str, *, known: Sequence[str]) -> None:
        self.name = name
        super().__init__(f"unknown persona {name!r}; personas.yaml has: {', '.join(known)}")


class BadAddress(NurtureError):
    """Raised when a test send's seed address cannot take the message: not an email, not a phone number."""

    def __init__(self, message: str, *, address: str) -> None:
        self.address = address
        super().__init__(f"--to {address!r}: {message}")


class UnknownSegment(NurtureError):
    """Raised when a campaign is asked for a segment that ``segments.yaml`` does not define."""

    def __init__(self, name: str, *, known: Sequence[str]) -> None:
        self.name = name
        super().__init__(f"unknown segment {name!r}; segments.yaml has: {', '.join(known) or 'none'}")


class CampaignError(NurtureError):
    """Raised when a campaign cannot run as asked; says what to do instead."""

    def __init__(self, message: str, *, campaign: str) -> None:
        self.campaign = campaign
        super().__init__(f"campaign {campaign!r}: {message}")
