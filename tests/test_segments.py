"""Segments ops edit in templates/segments.yaml: validated by file, line and field, selected in one query."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from histories import NOW, Business, local
from nurture import profiles
from nurture.cli import app
from nurture.errors import SegmentError, UnknownSegment
from nurture.models import Channel, Contact, ContactProfile
from nurture.segments import Segment, load_segments, size
from nurture.settings import Settings

REPO = Path(__file__).resolve().parent.parent
MADRID = "Europe/Madrid"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates", root)
    return root


def problems(root: Path) -> list[str]:
    with pytest.raises(SegmentError) as caught:
        load_segments(root)
    return [str(problem) for problem in caught.value.problems]


def test_the_shipped_segments_load() -> None:
    segments = load_segments(REPO / "templates")
    assert {"active", "loyal", "lapsed-spain", "promoters-pt"} <= set(segments.root)
    assert segments.get("promoters-pt").locales == ["pt"]


def test_every_mistake_is_named_by_file_line_and_field(root: Path) -> None:
    path = root / "segments.yaml"
    path.write_text(
        "good:\n"
        "  stages: [loyal]\n"
        "typos:\n"
        "  stages: [loyall]\n"
        "  countries: [ES, XX]\n"
        "  locales: [klingon]\n"
        "  tag: [color]\n"
        "ranges:\n"
        "  last_visit:\n"
        "    at_least_days_ago: 90\n"
        "    at_most_days_ago: 30\n"
        "Bad Name:\n"
        "  stages: [new]\n"
        "nobody:\n"
        "  tags: []\n"
    )
    found = problems(root)
    assert any(p.startswith(f"{path}:4: typos.stages.0:") and "loyal" in p for p in found), found
    assert any(p.startswith(f"{path}:5: typos.countries:") and "XX" in p for p in found), found
    assert any(p.startswith(f"{path}:6: typos.locales:") and "klingon" in p for p in found), found
    assert any(p.startswith(f"{path}:7: typos.tag:") for p in found), found
    assert any(p.startswith(f"{path}:9: ranges.last_visit:") and "at_least_days_ago" in p for p in found), (
        found
    )
    assert any(p.startswith(f"{path}:12: Bad Name") for p in found), found
    # An empty list would select nobody: a mistake, said so, not a segment that is silently empty.
    assert any(p.startswith(f"{path}:15: nobody.tags:") and "at least 1" in p for p in found), found
    assert not any("good" in p for p in found)


def test_broken_yaml_and_a_missing_file_are_clear(root: Path) -> None:
    path = root / "segments.yaml"
    path.write_text("loyal:\n  stages: [loyal\n")
    [problem] = problems(root)
    assert problem.startswith(f"{path}:") and "invalid YAML" in problem
    path.unlink()
    assert problems(root) == [f"{path}: file not found"]


def test_an_unknown_segment_names_the_ones_there_are() -> None:
    with pytest.raises(UnknownSegment, match="unknown segment 'loyl'.*loyal"):
        load_segments(REPO / "templates").get("loyl")


@pytest.fixture
def people(sessions: sessionmaker[Session], settings: Settings) -> dict[str, int]:
    """A small business with a profile for everyone, as of NOW."""
    business = Business(sessions)
    day = dt.timedelta(days=1)
    visits = {
        "loyal_es": [NOW - day * d for d in (200, 150, 100, 60, 20)],
        "new_br": [NOW - day * 3],
        "lapsed_es": [NOW - day * 400, NOW - day * 300, NOW - day * 120],
        "prospect_pt": [],
    }
    ids = {
        "loyal_es": business.contact(country="ES", tags=["color"], visits=visits["loyal_es"]),
        "new_br": business.contact(
            country="BR", locale="pt_BR", timezone="America/Sao_Paulo", visits=visits["new_br"]
        ),
        "lapsed_es": business.contact(country="ES", tags=["nails"], visits=visits["lapsed_es"]),
        "prospect_pt": business.contact(
            country="PT", locale="pt", timezone="Europe/Lisbon", consent=[Channel.SMS], email=None
        ),
    }
    business.contact(
        country="US", locale="en", timezone="America/New_York", visits=[local(MADRID, 2026, 11, 1)]
    )
    with sessions.begin() as session:
        profiles.refresh(session, settings, NOW)
    return ids


def members(sessions: sessionmaker[Session], segment: Segment) -> set[int]:
    with sessions() as session:
        query = (
            select(Contact.id)
            .join(ContactProfile, ContactProfile.contact_id == Contact.id)
            .where(segment.condition(NOW))
        )
        return set(session.scalars(query))


def test_a_segment_selects_its_contacts_in_sql(
    sessions: sessionmaker[Session], people: dict[str, int]
) -> None:
    def who(**conditions: object) -> set[str]:
        segment = Segment.model_validate(conditions)
        found = members(sessions, segment)
        with sessions() as session:
            assert size(session, segment, NOW) == len(found)
        return {name for name, contact_id in people.items() if contact_id in found}

    assert who(stages=["loyal"]) == {"loyal_es"}
    assert who(countries=["es"]) == {"loyal_es", "lapsed_es"}
    assert who(locales=["pt"]) == {"new_br", "prospect_pt"}  # a language takes in its regions
    assert who(locales=["pt-BR"]) == {"new_br"}
    assert who(tags=["Color", "haircut"]) == {"loyal_es"}
    assert who(countries=["ES"], exclude_tags=["nails"]) == {"loyal_es"}
    assert who(last_visit={"at_least_days_ago": 60}) == {"lapsed_es"}
    assert who(last_visit={"at_most_days_ago": 30}, countries=["ES", "BR"]) == {"loyal_es", "new_br"}
    assert who(last_visit={"after": "2026-07-01", "before": "2026-10-01"}) == {"lapsed_es"}
    assert who(min_visits=3, countries=["ES"]) == {"loyal_es", "lapsed_es"}
    assert who(stages=["prospect"]) == {"prospect_pt"}
    assert who(stages=["loyal"], countries=["BR"]) == set()


def test_campaign_segments_shows_each_segments_size(settings: Settings, people: dict[str, int]) -> None:
    result = CliRunner().invoke(app, ["campaign", "segments", "--at", NOW.isoformat(), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["segments"]["loyal"] == 1
    assert shown["segments"]["lapsed-spain"] == 1  # in Spain, last visit 120 days ago
    assert dt.datetime.fromisoformat(shown["profiles_as_of"]) == NOW


def test_campaign_segments_stops_on_a_broken_file(
    settings: Settings, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "segments.yaml").write_text("loyal:\n  stages: [loyall]\n")
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(root))
    result = CliRunner().invoke(app, ["campaign", "segments"])
    assert result.exit_code == 1
    assert f"{root / 'segments.yaml'}:2: loyal.stages.0:" in result.output
