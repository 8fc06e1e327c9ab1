"""SMS encodings and segment counts, at the boundaries where carriers start billing another segment."""

from __future__ import annotations

import pytest

from nurture.sms import GSM_7, UCS_2, encode_info


@pytest.mark.parametrize(
    ("body", "encoding", "segments"),
    [
        ("a" * 160, GSM_7, 1),
        ("a" * 161, GSM_7, 2),
        ("a" * 306, GSM_7, 2),
        ("a" * 307, GSM_7, 3),
        ("á" * 70, UCS_2, 1),
        ("á" * 71, UCS_2, 2),
        ("á" * 134, UCS_2, 2),
        ("á" * 135, UCS_2, 3),
    ],
)
def test_segments_change_at_the_carrier_boundaries(body: str, encoding: str, segments: int) -> None:
    info = encode_info(body)
    assert (info.encoding, info.segments, info.characters) == (encoding, segments, len(body))


def test_extension_characters_take_two_septets() -> None:
    assert (encode_info("€" * 80).units, encode_info("€" * 80).segments) == (160, 1)
    assert (encode_info("€" * 81).units, encode_info("€" * 81).segments) == (162, 2)
    assert encode_info("{[~^|\\]}").units == 16


def test_an_escape_sequence_never_straddles_two_segments() -> None:
    # 152 + 2 + 152 = 306 septets would fit two segments of 153 if the euro sign could be split.
    assert encode_info("a" * 152 + "€" + "a" * 152).segments == 3
    assert encode_info("a" * 151 + "€" + "a" * 153).segments == 2


def test_emoji_count_two_units_and_stay_whole() -> None:
    assert (encode_info("😀" * 35).units, encode_info("😀" * 35).segments) == (70, 1)
    assert encode_info("😀" * 36).segments == 2
    assert encode_info("a" * 66 + "😀" + "a" * 66).segments == 3


@pytest.mark.parametrize("char", ["é", "è", "ñ", "Ñ", "ü", "à", "Ç", "¿", "¡", "£", "\n"])
def test_gsm_basic_characters_keep_gsm_7(char: str) -> None:
    assert encode_info(f"Hola {char}").encoding == GSM_7


@pytest.mark.parametrize("char", ["á", "í", "ó", "ú", "ã", "õ", "ç", "ê", "â", "Á", "“", "\u00a0"])
def test_other_characters_force_ucs_2(char: str) -> None:
    assert encode_info(f"Hola {char}").encoding == UCS_2


def test_spanish_and_portuguese_accents_cut_a_segment_to_70() -> None:
    body = "Tu cita está confirmada para mañana a las 10:00. ¡Te esperamos en el salón!"
    assert len(body) == 75
    assert (encode_info(body).encoding, encode_info(body).segments) == (UCS_2, 2)
    plain = body.replace("á", "a").replace("ó", "o")
    assert (encode_info(plain).encoding, encode_info(plain).segments) == (GSM_7, 1)


def test_an_empty_body_is_no_segment() -> None:
    assert encode_info("").segments == 0


@pytest.mark.parametrize(
    ("body", "forced"),
    [
        ("We\u2019re open!", {"\u2019": "'"}),
        ("Book now \u2014 20% off\u2026", {"\u2014": "-", "\u2026": "..."}),
        ("10\u00a0€ off", {"\u00a0": " "}),
        ("We're open", {}),  # GSM-7 already
        ("Não perca \u2014 20% off", {}),  # ã needs UCS-2 whatever the dash is
        ("Hi \U0001f600 \u201cfriend\u201d", {}),  # so does an emoji
    ],
)
def test_look_alikes_are_named_only_when_they_alone_force_ucs2(body: str, forced: dict[str, str]) -> None:
    from nurture.sms import forced_ucs2

    assert forced_ucs2(body) == forced
    if forced:
        assert encode_info(body).encoding == UCS_2
        fixed = "".join(forced.get(char, char) for char in body)
        assert encode_info(fixed).encoding == GSM_7
