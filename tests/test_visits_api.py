"""POST /api/visits on nurture serve: the visits import's rules over JSON, behind an API key."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from decimal import Decimal

import pytest
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from histories import Business
from nurture.models import Visit
from nurture.settings import Settings
from nurture.web import create_app

KEY = "k-3f9a1c0d5e7b"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def client(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[TestClient]:
    configured = settings.model_copy(update={"api_key": SecretStr(KEY), "max_body_bytes": 4096})
    with TestClient(create_app(configured, sessions)) as client:
        yield client


@pytest.fixture
def business(sessions: sessionmaker[Session]) -> Business:
    return Business(sessions)


def visits(sessions: sessionmaker[Session]) -> list[tuple[str, int, dt.datetime, Decimal, str]]:
    with sessions() as session:
        rows = session.execute(
            select(
                Visit.external_id, Visit.contact_id, Visit.occurred_at, Visit.amount, Visit.currency
            ).order_by(Visit.external_id)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def test_a_posted_visit_is_recorded_in_the_contacts_local_time_and_posting_it_again_changes_nothing(
    client: TestClient, sessions: sessionmaker[Session], business: Business
) -> None:
    lucia = business.contact(external_id="C-1", timezone="Europe/Madrid")
    visit = {"external_id": "V-1", "contact_external_id": "C-1", "occurred_at": "2026-11-20T10:30:00",
             "amount": 42.50, "currency": "eur"}  # fmt: skip

    first = client.post("/api/visits", json=visit, headers=AUTH)
    again = client.post("/api/visits", json=visit, headers={"X-API-Key": KEY})

    assert first.status_code == again.status_code == 200
    assert first.json() == {"imported": 1, "updated": 0, "unchanged": 0}
    assert again.json() == {"imported": 0, "updated": 0, "unchanged": 1}
    # 10:30 in Madrid in November is 09:30 UTC; the amount keeps its cents.
    assert visits(sessions) == [
        ("V-1", lucia, dt.datetime(2026, 11, 20, 9, 30, tzinfo=dt.UTC), Decimal("42.50"), "EUR")
    ]


def test_a_list_of_visits_is_recorded_and_an_edited_one_is_updated(
    client: TestClient, sessions: sessionmaker[Session], business: Business
) -> None:
    business.contact(external_id="C-1")
    business.contact(external_id="C-2", timezone="America/Sao_Paulo")
    batch = [
        {"external_id": "V-1", "contact_external_id": "C-1", "occurred_at": "2026-11-20T10:00:00Z"},
        {"external_id": "V-2", "contact_external_id": "C-2", "occurred_at": "2026-11-20T10:00:00-03:00",
         "amount": "80,00", "currency": "BRL"},
    ]  # fmt: skip
    assert client.post("/api/visits", json=batch, headers=AUTH).json() == {
        "imported": 2, "updated": 0, "unchanged": 0,
    }  # fmt: skip

    batch[0]["amount"] = "19.99"
    assert client.post("/api/visits", json=batch, headers=AUTH).json() == {
        "imported": 0, "updated": 1, "unchanged": 1,
    }  # fmt: skip
    assert [(v[0], v[3], v[4]) for v in visits(sessions)] == [
        ("V-1", Decimal("19.99"), "EUR"),  # no currency given: NURTURE_DEFAULT_CURRENCY
        ("V-2", Decimal("80.00"), "BRL"),
    ]


def test_one_bad_visit_in_a_list_writes_none_of_them_and_every_problem_names_its_item_and_field(
    client: TestClient, sessions: sessionmaker[Session], business: Business
) -> None:
    business.contact(external_id="C-1")
    batch = [
        {"external_id": "V-1", "contact_external_id": "C-1", "occurred_at": "2026-11-20T10:00:00Z"},
        {"external_id": "V-2", "contact_external_id": "C-404", "occurred_at": "2026-11-20T10:00:00Z"},
        {"external_id": "V-3", "contact_external_id": "C-1", "occurred_at": "yesterday"},
        {"external_id": "V-4", "contact_external_id": "C-1", "occurred_at": "2026-11-20", "amount": -5},
        {"external_id": "V-1", "contact_external_id": "C-1", "occurred_at": "2026-11-21T10:00:00Z"},
        {"external_id": "V-6", "contact_external_id": "C-1", "occurred_at": "2026-11-21", "tip": 2},
        {"contact_external_id": "C-1", "occurred_at": "2026-11-21T10:00:00Z", "currency": "XXY"},
        "V-8",
    ]

    answer = client.post("/api/visits", json=batch, headers=AUTH)

    assert answer.status_code == 400
    assert answer.json()["problems"] == [
        "item 1: contact_external_id: no contact 'C-404'; import the contacts first",
        "item 2: occurred_at: 'yesterday' is not an ISO 8601 date and time",
        "item 3: amount: '-5' is negative",
        "item 4: external_id: 'V-1' repeats item 0",
        "item 5: tip: unknown field (the fields: external_id, contact_external_id, occurred_at, amount,"
        " currency)",
        "item 6: external_id: is empty",
        "item 7: is not an object with the fields external_id, contact_external_id, occurred_at, amount,"
        " currency",
    ]
    assert visits(sessions) == []


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401),
        ({"Authorization": "Bearer wrong-key"}, 403),
        ({"X-API-Key": KEY + "x"}, 403),
    ],
)
def test_without_the_api_key_nothing_is_recorded(
    client: TestClient,
    sessions: sessionmaker[Session],
    business: Business,
    headers: dict[str, str],
    status: int,
) -> None:
    business.contact(external_id="C-1")
    visit = {"external_id": "V-1", "contact_external_id": "C-1", "occurred_at": "2026-11-20T10:00:00Z"}
    answer = client.post("/api/visits", json=visit, headers=headers)
    assert answer.status_code == status
    if status == 401:
        assert answer.headers["www-authenticate"] == "Bearer"
    assert visits(sessions) == []


def test_without_a_configured_key_the_api_refuses_everything(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    with TestClient(create_app(settings, sessions)) as client:
        answer = client.post("/api/visits", json=[], headers=AUTH)
    assert answer.status_code == 503
    assert "NURTURE_API_KEY" in answer.text


def test_a_body_that_is_not_json_or_holds_no_visits_or_is_too_large_is_refused(
    client: TestClient, sessions: sessionmaker[Session], business: Business
) -> None:
    business.contact(external_id="C-1")
    not_json = client.post("/api/visits", content=b"{external_id: V-1}", headers=AUTH)
    empty = client.post("/api/visits", json=[], headers=AUTH)
    many = [
        {"external_id": f"V-{n}", "contact_external_id": "C-1", "occurred_at": "2026-11-20T10:00:00Z"}
        for n in range(100)
    ]
    too_large = client.post("/api/visits", content=json.dumps(many).encode(), headers=AUTH)

    assert (not_json.status_code, empty.status_code, too_large.status_code) == (400, 400, 413)
    assert "not JSON" in not_json.text
    assert visits(sessions) == []
