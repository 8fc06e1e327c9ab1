"""Contacts: how each field of a contact is read from what a person typed, and the referral codes they share.

Every ``parse_*`` function takes the raw text of one field and returns the normalised value, or raises
``ValueError`` with a message a person can act on; the import turns that message into a reject reason.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from functools import cache, lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from babel import Locale, UnknownLocaleError
from babel.core import get_global
from email_validator import EmailNotValidError, validate_email
from phonenumbers import timezone as phone_timezones

# No 0/O, 1/I/L: a code read aloud or copied from a receipt is still right.
REFERRAL_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
REFERRAL_CODE_LENGTH = 8
TAG_SEPARATORS = re.compile(r"[|,;]")
MAX_TAG_LENGTH = 64
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})


def new_referral_code() -> str:
    """Draw a fresh random referral code."""
    return "".join(secrets.choice(REFERRAL_ALPHABET) for _ in range(REFERRAL_CODE_LENGTH))


def parse_email(raw: str) -> str:
    """Validate an email address (syntax only, no DNS) and return its normalised form."""
    try:
        return validate_email(raw, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"{raw!r} is not a valid email address: {exc}") from None


def parse_country(raw: str) -> str:
    """Return an ISO 3166-1 alpha-2 country code in upper case."""
    code = raw.strip().upper()
    if code not in _countries():
        raise ValueError(f"{raw!r} is not an ISO 3166 country code (e.g. ES, PT, BR, MX, US)")
    return code


def parse_phone(raw: str, country: str | None) -> phonenumbers.PhoneNumber:
    """Read a phone number, written internationally or the local way of ``country``."""
    try:
        number = phonenumbers.parse(raw, country)
    except phonenumbers.NumberParseException as exc:
        if country is None and exc.error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE:
            raise ValueError(
                f"{raw!r} is written the local way: give the row a country or set NURTURE_DEFAULT_COUNTRY"
            ) from None
        raise ValueError(f"{raw!r} is not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        where = phonenumbers.region_code_for_number(number) or country or "any country"
        raise ValueError(f"{raw!r} is not a valid number for {where}")
    return number


def e164(number: phonenumbers.PhoneNumber) -> str:
    """Format a phone number as E.164."""
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def country_of(number: phonenumbers.PhoneNumber) -> str | None:
    """Return the country a phone number belongs to, when it belongs to one."""
    region = phonenumbers.region_code_for_number(number)
    return region if region in _countries() else None


@lru_cache(maxsize=1024)  # a file names a handful of locales, thousands of times
def parse_locale(raw: str) -> str:
    """Return a locale babel knows, normalised like ``es`` or ``pt_BR``."""
    try:
        return str(Locale.parse(raw.strip().replace("-", "_")))
    except (UnknownLocaleError, ValueError, TypeError):
        raise ValueError(f"{raw!r} is not a known locale (e.g. es, pt, pt_BR, en)") from None


@lru_cache(maxsize=1024)
def parse_timezone(raw: str) -> str:
    """Return an IANA timezone name that zoneinfo knows."""
    name = raw.strip()
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{raw!r} is not an IANA timezone (e.g. Europe/Madrid)") from None
    return name


def implied_timezone(number: phonenumbers.PhoneNumber | None, country: str | None, default: str) -> str:
    """Return the one timezone a phone number or else a country implies, or ``default`` when neither does."""
    if number is not None:
        zones = [zone for zone in phone_timezones.time_zones_for_number(number) if zone != "Etc/Unknown"]
        if len(zones) == 1:
            return str(zones[0])
    if country is not None:
        zones = _territory_zones().get(country, [])
        if len(zones) == 1:
            return str(zones[0])
    return default


def parse_birthday(raw: str, today: dt.date) -> dt.date:
    """Return a birthday written as an ISO date (YYYY-MM-DD) that is not in the future."""
    text = raw.strip()
    if not _ISO_DATE.fullmatch(text):
        raise ValueError(f"{raw!r} is not a date written YYYY-MM-DD")
    try:
        date = dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{raw!r} is not a date that exists") from None
    if date > today:
        raise ValueError(f"{raw!r} is in the future")
    return date


def parse_tags(raw: str) -> frozenset[str]:
    """Return the interest tags of a field, split on ``|``, ``,`` or ``;`` and lowercased."""
    tags = frozenset(tag.strip().lower() for tag in TAG_SEPARATORS.split(raw) if tag.strip())
    for tag in tags:
        if len(tag) > MAX_TAG_LENGTH:
            raise ValueError(f"tag {tag!r} is longer than {MAX_TAG_LENGTH} characters")
    return tags


def parse_consent(raw: str) -> bool | None:
    """Return True (granted), False (refused) or None (not given: empty)."""
    text = raw.strip().lower()
    if not text:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{raw!r} is not a consent: write true/false, yes/no or 1/0, or leave it empty")


@cache
def _countries() -> frozenset[str]:
    return frozenset(_territory_zones()) | frozenset(phonenumbers.SUPPORTED_REGIONS)


@cache
def _territory_zones() -> dict[str, list[str]]:
    return dict(get_global("territory_zones"))
