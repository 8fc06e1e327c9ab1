"""SMS bodies as carriers count them: GSM-7 or UCS-2, and how many segments a body is billed as.

A body whose every character is in the GSM 03.38 default alphabet (or its extension table, whose
characters take two septets: an escape and the character) is sent as GSM-7: 160 septets in one
segment, 153 a segment once it is split (the rest carries the concatenation header). Any other
character makes the whole body UCS-2: 70 UTF-16 code units in one segment, 67 a segment once split;
a character outside the Basic Multilingual Plane (most emoji) takes two units. A segment never splits
an escape sequence or a surrogate pair, so such a character moves whole to the next segment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

# Registers the "gsm03.38" codec: the GSM 03.38 tables come from it rather than from a copy here.
import gsm0338  # noqa: F401

GSM_7: Final = "GSM-7"
UCS_2: Final = "UCS-2"

_ESCAPE: Final = 0x1B


def _gsm_alphabet() -> tuple[frozenset[str], frozenset[str]]:
    basic = frozenset(bytes([code]).decode("gsm03.38") for code in range(128) if code != _ESCAPE)
    extension = set()
    for code in range(128):
        try:
            extension.add(bytes([_ESCAPE, code]).decode("gsm03.38"))
        except UnicodeDecodeError:
            continue
    return basic, frozenset(extension - basic)


GSM_BASIC, GSM_EXTENSION = _gsm_alphabet()
_GSM_ANY: Final = GSM_BASIC | GSM_EXTENSION

GSM_SINGLE, GSM_PART = 160, 153
UCS_SINGLE, UCS_PART = 70, 67


@dataclass(frozen=True, slots=True)
class SmsEncoding:
    """How a body goes over the air: its encoding, segments, characters and encoding units."""

    encoding: str
    segments: int
    characters: int
    units: int  # septets for GSM-7, UTF-16 code units for UCS-2


def encode_info(body: str) -> SmsEncoding:
    """Tell the encoding a carrier sends ``body`` in and how many segments it is billed as."""
    if _GSM_ANY.issuperset(body):
        wide = 0 if GSM_EXTENSION.isdisjoint(body) else sum(body.count(char) for char in GSM_EXTENSION)
        segments = _segments(body, len(body) + wide, wide, GSM_SINGLE, GSM_PART, GSM_EXTENSION.__contains__)
        return SmsEncoding(GSM_7, segments, len(body), len(body) + wide)
    units = len(body.encode("utf-16-le")) // 2
    segments = _segments(body, units, units - len(body), UCS_SINGLE, UCS_PART, _astral)
    return SmsEncoding(UCS_2, segments, len(body), units)


def _astral(char: str) -> bool:
    return ord(char) > 0xFFFF


def _segments(
    body: str, units: int, wide: int, single: int, part: int, is_wide: Callable[[str], bool]
) -> int:
    if units == 0:
        return 0
    if units <= single:
        return 1
    if not wide:
        return -(-units // part)
    # A two-unit character cannot straddle a segment boundary: it moves whole to the next segment.
    segments, used = 1, 0
    for char in body:
        width = 2 if is_wide(char) else 1
        if used + width > part:
            segments, used = segments + 1, 0
        used += width
    return segments


# Characters outside GSM 03.38 that look like one inside it (after Twilio's "Smart Encoding" list): one of
# them in an otherwise GSM-7 body makes the whole message UCS-2, at 70 characters a segment instead of 160.
LOOKALIKES: Final[dict[str, str]] = {
    "\u00a0": " ",  # no-break space
    "\u2002": " ",  # en space
    "\u2003": " ",  # em space
    "\u2009": " ",  # thin space
    "\u202f": " ",  # narrow no-break space
    "\u200b": "",  # zero-width space
    "\u00ad": "",  # soft hyphen
    "\u2010": "-",  # hyphen
    "\u2011": "-",  # non-breaking hyphen
    "\u2012": "-",  # figure dash
    "\u2013": "-",  # en dash
    "\u2014": "-",  # em dash
    "\u2212": "-",  # minus sign
    "\u2018": "'",  # left single quotation mark
    "\u2019": "'",  # right single quotation mark (and curly apostrophe)
    "\u201a": "'",  # single low-9 quotation mark
    "\u2032": "'",  # prime
    "\u00b4": "'",  # acute accent
    "`": "'",  # grave accent
    "\u201c": '"',  # left double quotation mark
    "\u201d": '"',  # right double quotation mark
    "\u201e": '"',  # double low-9 quotation mark
    "\u2033": '"',  # double prime
    "\u00ab": '"',  # left-pointing double angle quotation mark
    "\u00bb": '"',  # right-pointing double angle quotation mark
    "\u2026": "...",  # horizontal ellipsis
    "\u2022": "-",  # bullet
    "\u02c6": "^",  # modifier letter circumflex
    "\u02dc": "~",  # small tilde
}


def forced_ucs2(body: str) -> dict[str, str]:
    """Give the look-alike characters that alone make ``body`` UCS-2, each with its GSM-7 replacement.

    Empty when the body is GSM-7 already, or when it would stay UCS-2 without them (an ``ã`` or an
    emoji needs UCS-2 whatever the quotes are).
    """
    found = {char: LOOKALIKES[char] for char in dict.fromkeys(body) if char in LOOKALIKES}
    if not found or _GSM_ANY.issuperset(body):
        return {}
    plain = "".join(found.get(char, char) for char in body)
    return found if _GSM_ANY.issuperset(plain) else {}
