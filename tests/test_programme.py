"""The programme marketers edit: loaded as data, every problem named by file, line and field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nurture.cli import app
from nurture.errors import ProgrammeError
from nurture.programme import Every, load_programme

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates", root)
    return root


def problems(root: Path) -> list[str]:
    with pytest.raises(ProgrammeError) as caught:
        load_programme(root)
    return [str(problem) for problem in caught.value.problems]


def test_the_shipped_programme_covers_the_retention_practice() -> None:
    programme = load_programme(REPO / "templates")
    names = {touch.name for touch in programme.touches}
    assert names == {
        "welcome",
        "education",
        "incentive",
        "loyalty_milestone",
        "promotion",
        "birthday",
        "referral_ask",
        "referral_reward",
        "complaint_recovery",
        "winback",
        "appreciation_day",
    }
    assert [t.priority for t in programme.touches] == sorted(
        (t.priority for t in programme.touches), reverse=True
    )
    assert len(programme.content) >= 6
    assert programme.holdout_for(programme.touch("complaint_recovery")) == 0


def test_a_wrong_field_names_file_line_and_field(root: Path) -> None:
    touch = root / "touches" / "incentive.yaml"
    touch.write_text(
        touch.read_text().replace("  days: 3\n", "  days: -3\n").replace("priority: 70", "priority: high")
    )
    found = problems(root)
    assert any(p.startswith(f"{touch}:3: priority:") for p in found), found
    assert any(
        p.startswith(f"{touch}:7: trigger.days:") and "greater than or equal to 0" in p for p in found
    ), found


def test_an_audience_asking_for_none_of_no_tags_is_refused(root: Path) -> None:
    touch = root / "touches" / "education.yaml"
    touch.write_text(touch.read_text().replace("audience:\n", "audience:\n  tags: []\n", 1))
    found = problems(root)
    assert any(f"{touch}:10: audience.tags:" in p and "at least 1" in p for p in found), found


def test_every_problem_is_reported_at_once(root: Path) -> None:
    (root / "touches" / "welcome.yaml").write_text(
        "channels: [email, pigeon]\ntrigger: {kind: after_first_visit}\n"
    )
    (root / "touches" / "birthday.yaml").write_text("channels: [email]\ntrigger:\n  kind: someday\n")
    (root / "touches" / "winback.yaml").write_text("channels: [email]\ntrigger: [unclosed\n")
    found = problems(root)
    assert any("welcome.yaml:1: channels.1:" in p for p in found), found
    assert any("birthday.yaml:3: trigger.kind:" in p and "someday" in p for p in found), found
    assert any("winback.yaml:" in p and "invalid YAML" in p for p in found), found


def test_an_unknown_field_is_refused_not_ignored(root: Path) -> None:
    touch = root / "touches" / "welcome.yaml"
    touch.write_text(touch.read_text() + "prority: 10\n")
    assert any("welcome.yaml:" in p and "prority" in p and "not permitted" in p for p in problems(root))


def test_a_new_customers_only_offer_better_than_loyal_customers_get_is_refused(root: Path) -> None:
    (root / "touches" / "first_timer.yaml").write_text(
        "channels: [email]\n"
        "trigger: {kind: after_first_visit, days: 3}\n"
        "audience: {stages: [new]}\n"
        "offer: {kind: percent, value: 40}\n"
    )
    [problem] = problems(root)
    assert "first_timer.yaml" in problem and "offer.value" in problem and "loyal customers" in problem


def test_a_touch_is_added_with_no_python(root: Path) -> None:
    (root / "touches" / "spring_tips.yaml").write_text(
        "channels: [email]\npriority: 10\ntrigger: {kind: every, days: 60, content: true}\n"
        "audience: {tags: [color]}\n"
    )
    programme = load_programme(root)
    touch = programme.touch("spring_tips")
    assert isinstance(touch.trigger, Every) and touch.audience.tags == ["color"]


def test_programme_check_exits_one_naming_the_problem(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NURTURE_TEMPLATES_DIR", str(root))
    ok = CliRunner().invoke(app, ["programme", "check"])
    assert ok.exit_code == 0, ok.output
    assert "11 touches" in ok.output
    (root / "touches" / "welcome.yaml").write_text(
        "channels: [email]\ntrigger: {kind: after_first_visit, days: x}\n"
    )
    bad = CliRunner().invoke(app, ["programme", "check"])
    assert bad.exit_code == 1
    assert "welcome.yaml:2: trigger.days" in bad.output
