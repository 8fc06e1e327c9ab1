"""A synthetic business: a salon and spa chain's contacts, visits and feedback as import files.

The generator writes ``contacts.csv``, ``visits.csv`` and ``feedback.csv`` in the import columns, for
customers in Spain, Portugal, Brazil, Mexico and the United States. Each simulated customer has latent
traits (visit rhythm, churn hazard, responsiveness to messages, satisfaction, referral rate) that drive
their history and are written as extra ``sim_*`` contact columns; the importer keeps them as contact
attributes, where :mod:`nurture.simulation` reads them back to simulate the days after ``end``.

About 2-3 % of the rows are bad in the ways real exports are (malformed email, invalid phone, unknown
timezone, impossible birthday, negative amount, a visit for an unknown contact, a duplicate id); each one
is counted in :class:`SyntheticFiles` so that a test can check the importer rejects exactly those.

Everything is drawn from one ``random.Random(seed)``: the same arguments give byte-identical files. Rows
are written as they are drawn, one contact at a time, so memory stays flat however many contacts.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import math
import random
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from nurture.imports import CONTACT_COLUMNS

# Latent traits of each simulated customer, kept by the importer as contact attributes.
TRAIT_COLUMNS = (
    "sim_country",
    "sim_service",
    "sim_interval_days",
    "sim_churn_per_day",
    "sim_churned_on",
    "sim_responsiveness",
    "sim_nps_mean",
    "sim_referral_per_day",
)
VISIT_COLUMNS = ("external_id", "contact_external_id", "occurred_at", "amount", "currency")
FEEDBACK_COLUMNS = ("contact_external_id", "occurred_at", "kind", "score", "comment", "resolved_at")

SERVICES = ("haircut", "color", "nails", "skincare", "barber", "brows", "massage", "bridal")
TAG_SEPARATOR = "|"

# Typical ticket in euros, and how many days a customer of that service usually waits between visits.
SERVICE_PRICE_EUR = {
    "haircut": 35.0,
    "color": 78.0,
    "nails": 28.0,
    "skincare": 62.0,
    "barber": 19.0,
    "brows": 17.0,
    "massage": 55.0,
    "bridal": 190.0,
}
SERVICE_INTERVAL_DAYS = {
    "haircut": 42.0,
    "color": 49.0,
    "nails": 21.0,
    "skincare": 35.0,
    "barber": 24.0,
    "brows": 28.0,
    "massage": 30.0,
    "bridal": 60.0,
}
FEMALE_SERVICES = {
    "haircut": 30,
    "color": 18,
    "nails": 20,
    "skincare": 12,
    "brows": 8,
    "massage": 9,
    "bridal": 3,
}
MALE_SERVICES = {"barber": 70, "haircut": 15, "skincare": 6, "massage": 9}

# Spread of one customer's gaps between visits around their own interval (log-normal sigma).
GAP_SIGMA = 0.35
# Shares of visits followed by an NPS answer and by a CSAT answer.
NPS_SHARE = 0.18
CSAT_SHARE = 0.08

# The share of rows that are deliberately bad, and the kinds per file.
BAD_ROW_SHARE = 0.025
BAD_CONTACT_KINDS = (
    "malformed_email",
    "invalid_phone",
    "unknown_timezone",
    "impossible_birthday",
    "duplicate_id",
)
BAD_VISIT_KINDS = ("negative_amount", "unknown_contact", "duplicate_id")
BAD_FEEDBACK_KINDS = ("unknown_contact",)


@dataclass(frozen=True)
class Country:
    """How customers of one country look: names, phones, zones, language and prices."""

    code: str
    weight: float
    currency: str
    price_factor: float  # local price of a euro's worth of service
    whole_prices: bool
    timezones: tuple[tuple[str, float], ...]
    locales: tuple[tuple[str, float], ...]
    female_names: tuple[str, ...]
    male_names: tuple[str, ...]
    last_names: tuple[str, ...]
    two_surnames: bool
    email_domains: tuple[str, ...]
    phone: Callable[[random.Random, str], tuple[str, str]]  # (E.164, local way) for a timezone


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split(", "))


def _digits(rng: random.Random, count: int) -> str:
    return f"{rng.randrange(10**count):0{count}d}"


def _spanish_phone(rng: random.Random, _zone: str) -> tuple[str, str]:
    national = "6" + _digits(rng, 8)
    return f"+34{national}", f"{national[:3]} {national[3:5]} {national[5:7]} {national[7:]}"


def _portuguese_phone(rng: random.Random, _zone: str) -> tuple[str, str]:
    national = "9" + rng.choice("1236") + _digits(rng, 7)
    return f"+351{national}", f"{national[:3]} {national[3:6]} {national[6:]}"


_BRAZIL_AREAS = {
    "America/Sao_Paulo": ("11", "21", "31", "41", "51", "61", "19", "27"),
    "America/Fortaleza": ("85", "98"),
    "America/Recife": ("81", "83"),
    "America/Bahia": ("71", "73"),
    "America/Manaus": ("92",),
}


def _brazilian_phone(rng: random.Random, zone: str) -> tuple[str, str]:
    area = rng.choice(_BRAZIL_AREAS[zone])
    subscriber = "9" + rng.choice("6789") + _digits(rng, 7)
    return f"+55{area}{subscriber}", f"({area}) {subscriber[:5]}-{subscriber[5:]}"


_MEXICO_AREAS = {
    "America/Mexico_City": ("55", "33", "81"),
    "America/Tijuana": ("664",),
    "America/Cancun": ("998",),
}


def _mexican_phone(rng: random.Random, zone: str) -> tuple[str, str]:
    area = rng.choice(_MEXICO_AREAS[zone])
    national = area + _digits(rng, 10 - len(area))
    return f"+52{national}", f"{national[: len(area)]} {national[len(area) : -4]} {national[-4:]}"


_US_AREAS = {
    "America/New_York": ("212", "646", "718", "305", "617"),
    "America/Chicago": ("312", "773", "214"),
    "America/Denver": ("303", "720"),
    "America/Los_Angeles": ("213", "310", "415", "206"),
    "Pacific/Honolulu": ("808",),
}


def _us_phone(rng: random.Random, zone: str) -> tuple[str, str]:
    area = rng.choice(_US_AREAS[zone])
    # Exchanges 2xx-9xx, avoiding the N11 service codes and the fictional 555.
    exchange = rng.choice("23456789") + _digits(rng, 2)
    while exchange[1:] == "11" or exchange == "555":
        exchange = rng.choice("23456789") + _digits(rng, 2)
    line = _digits(rng, 4)
    return f"+1{area}{exchange}{line}", f"({area}) {exchange}-{line}"


COUNTRIES: tuple[Country, ...] = (
    Country(
        code="ES",
        weight=0.30,
        currency="EUR",
        price_factor=1.0,
        whole_prices=False,
        timezones=(("Europe/Madrid", 0.9), ("Atlantic/Canary", 0.1)),
        locales=(("es", 0.96), ("en", 0.04)),
        female_names=_names(
            "María, Lucía, Carmen, Sofía, Paula, Marta, Elena, Begoña, Inés, Núria, Alba, Irene, Pilar, "
            "Rocío, Ángela, Montserrat, Aitana, Noelia"
        ),
        male_names=_names("José, Javier, Álvaro, Sergio, Iñaki, Raúl, Jesús, Andrés, Pablo, Óscar"),
        last_names=_names(
            "García, Martínez, López, Sánchez, Pérez, Gómez, Fernández, Rodríguez, Muñoz, Jiménez, "
            "Díaz, Núñez, Ibáñez, Castaño, Peña, Gutiérrez, Alonso, Ortega"
        ),
        two_surnames=True,
        email_domains=_names("gmail.com, hotmail.es, yahoo.es, outlook.es, icloud.com, telefonica.net"),
        phone=_spanish_phone,
    ),
    Country(
        code="PT",
        weight=0.12,
        currency="EUR",
        price_factor=0.85,
        whole_prices=False,
        timezones=(("Europe/Lisbon", 0.92), ("Atlantic/Azores", 0.04), ("Atlantic/Madeira", 0.04)),
        locales=(("pt", 0.97), ("en", 0.03)),
        female_names=_names(
            "Maria, Ana, Beatriz, Inês, Leonor, Matilde, Mariana, Carolina, Joana, Sónia, Conceição, Rita"
        ),
        male_names=_names("João, Tomás, Gonçalo, Rodrigo, Duarte, Simão, Afonso, Luís"),
        last_names=_names(
            "Silva, Santos, Ferreira, Pereira, Oliveira, Costa, Rodrigues, Martins, Gonçalves, "
            "Magalhães, Conceição, Araújo, Simões, Brandão"
        ),
        two_surnames=True,
        email_domains=_names("gmail.com, sapo.pt, hotmail.com, outlook.pt, iol.pt"),
        phone=_portuguese_phone,
    ),
    Country(
        code="BR",
        weight=0.22,
        currency="BRL",
        price_factor=3.6,
        whole_prices=True,
        timezones=(
            ("America/Sao_Paulo", 0.72),
            ("America/Fortaleza", 0.08),
            ("America/Recife", 0.07),
            ("America/Bahia", 0.07),
            ("America/Manaus", 0.06),
        ),
        locales=(("pt", 0.99), ("en", 0.01)),
        female_names=_names(
            "Ana, Júlia, Giovanna, Letícia, Larissa, Fernanda, Camila, Bárbara, Luíza, Vitória, Débora, "
            "Patrícia, Tainá, Lívia"
        ),
        male_names=_names("João, Luiz, Caio, Vinícius, Antônio, Matheus, Thiago, Júlio"),
        last_names=_names(
            "Silva, Souza, Oliveira, Santos, Lima, Araújo, Gonçalves, Ribeiro, Assunção, Conceição, "
            "Magalhães, Nascimento, Loureiro, Falcão"
        ),
        two_surnames=False,
        email_domains=_names("gmail.com, hotmail.com, yahoo.com.br, uol.com.br, bol.com.br, outlook.com"),
        phone=_brazilian_phone,
    ),
    Country(
        code="MX",
        weight=0.16,
        currency="MXN",
        price_factor=14.0,
        whole_prices=True,
        timezones=(("America/Mexico_City", 0.8), ("America/Tijuana", 0.1), ("America/Cancun", 0.1)),
        locales=(("es", 0.97), ("en", 0.03)),
        female_names=_names(
            "Guadalupe, Ximena, Fernanda, Valeria, Renata, Daniela, Mónica, Verónica, Itzel, Araceli, "
            "Yesenia, Sofía"
        ),
        male_names=_names("José, Luis, Juan Pablo, Emiliano, Diego, Héctor, Ramón, Jesús"),
        last_names=_names(
            "Hernández, García, Martínez, López, González, Ramírez, Cruz, Flores, Gómez, Morales, "
            "Vázquez, Jiménez, Ordóñez, Peña"
        ),
        two_surnames=True,
        email_domains=_names("gmail.com, hotmail.com, outlook.com, yahoo.com.mx, prodigy.net.mx"),
        phone=_mexican_phone,
    ),
    Country(
        code="US",
        weight=0.20,
        currency="USD",
        price_factor=1.25,
        whole_prices=True,
        timezones=(
            ("America/New_York", 0.4),
            ("America/Chicago", 0.12),
            ("America/Denver", 0.06),
            ("America/Los_Angeles", 0.32),
            ("Pacific/Honolulu", 0.1),
        ),
        locales=(("en", 0.8), ("es", 0.2)),
        female_names=_names(
            "Emily, Olivia, Madison, Ashley, Jessica, Hannah, Chloé, Zoë, Renée, Malia, Leilani, Sarah, "
            "María, Lucía"
        ),
        male_names=_names("Michael, James, Tyler, Ethan, Noah, Kai, Carlos, Andrés"),
        last_names=_names(
            "Smith, Johnson, Williams, Brown, Davis, Miller, Wilson, Anderson, Kahale, Nakamura, "
            "Rodríguez, Hernández, O'Brien, Nguyen"
        ),
        two_surnames=False,
        email_domains=_names("gmail.com, yahoo.com, outlook.com, icloud.com, aol.com, hawaii.rr.com"),
        phone=_us_phone,
    ),
)

COMPLAINTS = {
    "es": (
        "Me hicieron esperar 40 minutos aunque tenía cita.",
        "El color no quedó como pedí, ¿pueden arreglarlo?",
        "Me cobraron de más en la manicura.",
        "La recepcionista fue muy brusca conmigo.",
    ),
    "pt": (
        "Esperei quarenta minutos mesmo com hora marcada.",
        "A cor não ficou como pedi; podem corrigir?",
        "Cobraram a mais pela manicure.",
        "A recepção foi muito grosseira comigo.",
    ),
    "en": (
        "I waited 40 minutes even though I had an appointment.",
        "The colour is not what I asked for, can you fix it?",
        "I was overcharged for my manicure.",
        "The front desk was really rude to me.",
    ),
}
PRAISE = {
    "es": ("¡Me encantó, como siempre!", "Muy profesionales y amables.", "El mejor masaje del año."),
    "pt": ("Adorei, como sempre!", "Muito profissionais e simpáticas.", "A melhor massagem do ano."),
    "en": ("Loved it, as always!", "So professional and friendly.", "Best massage of the year."),
}
COUNTRY_BY_CODE = {country.code: country for country in COUNTRIES}

CONSENT_YES = ("yes", "true", "1", "Yes", "TRUE")
CONSENT_NO = ("no", "false", "0")


@dataclass
class SyntheticFiles:
    """What :func:`generate` wrote: the three files and how many rows, good and bad, each holds."""

    directory: Path
    contacts: Path
    visits: Path
    feedback: Path
    rows: Counter[str] = field(default_factory=Counter)  # data rows per file: contacts, visits, feedback
    bad: dict[str, Counter[str]] = field(default_factory=dict)  # per file, bad rows by kind

    def bad_rows(self, kind: str) -> int:
        """Count the deliberately bad rows of one file ("contacts", "visits" or "feedback")."""
        return sum(self.bad.get(kind, Counter()).values())


def _pick(rng: random.Random, weighted: Sequence[tuple[str, float]]) -> str:
    roll = rng.random() * sum(weight for _, weight in weighted)
    for value, weight in weighted:
        roll -= weight
        if roll < 0:
            return value
    return weighted[-1][0]


def _ascii(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum() or ch == " ").replace(" ", "")


def _money(value: float, whole: bool) -> str:
    return f"{round(value):d}.00" if whole else f"{round(value * 2) / 2:.2f}"


@functools.cache
def zone(name: str) -> ZoneInfo:
    """The timezone named ``name``, loaded once (zoneinfo keeps only a few strongly)."""
    return ZoneInfo(name)


def _local_instant(day: dt.date, minutes: int, tz: ZoneInfo) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(minutes // 60, minutes % 60), tzinfo=tz)


def _iso(instant: dt.datetime, with_offset: bool = True) -> str:
    if with_offset:
        return instant.isoformat(timespec="minutes")
    return instant.replace(tzinfo=None).isoformat(timespec="minutes")


class _Writer:
    """The three CSV writers and their counts, bad rows included."""

    def __init__(self, files: SyntheticFiles, handles: dict[str, TextIO]) -> None:
        self.files = files
        self.writers = {name: csv.writer(handle, lineterminator="\n") for name, handle in handles.items()}

    def row(self, name: str, values: Sequence[Any]) -> None:
        self.writers[name].writerow(values)
        self.files.rows[name] += 1

    def bad_row(self, name: str, kind: str, values: Sequence[Any]) -> None:
        self.row(name, values)
        self.files.bad.setdefault(name, Counter())[kind] += 1


@dataclass
class Person:
    """One simulated customer as drawn, before their history is written."""

    external_id: str
    country: Country
    zone: str
    locale: str
    female: bool
    first_name: str
    last_name: str
    email: str
    phone_e164: str
    phone_local: str
    birthday: dt.date | None
    tags: list[str]
    service: str
    interval_days: float
    churn_per_day: float
    responsiveness: float
    nps_mean: float
    referral_per_day: float


def draw_person(rng: random.Random, external_id: str, country: Country | None = None) -> Person:
    """Draw one customer's identity and latent traits, in ``country`` or one drawn by weight."""
    if country is None:
        country = COUNTRIES[-1]
        roll = rng.random()
        for candidate in COUNTRIES:
            roll -= candidate.weight
            if roll < 0:
                country = candidate
                break
    zone = _pick(rng, country.timezones)
    locale = _pick(rng, country.locales)
    female = rng.random() < 0.78
    first_name = rng.choice(country.female_names if female else country.male_names)
    last_name = rng.choice(country.last_names)
    if country.two_surnames and rng.random() < 0.7:
        last_name = f"{last_name} {rng.choice(country.last_names)}"
    handle = f"{_ascii(first_name)}.{_ascii(last_name.split()[0])}"
    if rng.random() < 0.6:
        handle += str(rng.randrange(1, 100))
    email = f"{handle}@{rng.choice(country.email_domains)}"
    phone_e164, phone_local = country.phone(rng, zone)
    birthday: dt.date | None = None
    if rng.random() < 0.85:
        birthday = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(0, 365 * 56))
    services = FEMALE_SERVICES if female else MALE_SERVICES
    weighted = [(name, float(weight)) for name, weight in services.items()]
    service = _pick(rng, weighted)
    tags = [service]
    for _ in range(rng.choice((0, 0, 1, 1, 2))):
        extra = _pick(rng, weighted)
        if extra not in tags and extra != "bridal":
            tags.append(extra)
    interval = SERVICE_INTERVAL_DAYS[service] * math.exp(rng.gauss(0, 0.35))
    return Person(
        external_id=external_id,
        country=country,
        zone=zone,
        locale=locale,
        female=female,
        first_name=first_name,
        last_name=last_name,
        email=email,
        phone_e164=phone_e164,
        phone_local=phone_local,
        birthday=birthday,
        tags=tags,
        service=service,
        interval_days=round(min(max(interval, 7.0), 150.0), 1),
        # Half-life of about a year on average, very different from one customer to the next.
        churn_per_day=round(min(math.exp(rng.gauss(math.log(1 / 500), 0.8)), 0.05), 6),
        responsiveness=round(min(math.exp(rng.gauss(-0.125, 0.5)), 3.0), 3),
        nps_mean=round(min(max(rng.gauss(8.3, 1.6), 0.0), 10.0), 1),
        referral_per_day=round(math.exp(rng.gauss(math.log(1 / 900), 0.6)), 6),
    )


def contact_row(
    rng: random.Random, person: Person, referred_by: str, churned_on: dt.date | None
) -> list[str]:
    """The contacts.csv row of a drawn customer, with the quirks of a real export."""
    email = person.email if rng.random() < 0.93 else ""
    has_phone = rng.random() < 0.85
    local_phone = rng.random() < 0.45
    phone = (person.phone_local if local_phone else person.phone_e164) if has_phone else ""
    # An E.164 phone tells the country; exports often leave the column empty then.
    country = "" if phone and not local_phone and rng.random() < 0.1 else person.country.code
    email_consent = ""
    if email:
        roll = rng.random()
        email_consent = (
            rng.choice(CONSENT_YES) if roll < 0.8 else rng.choice(CONSENT_NO) if roll < 0.9 else ""
        )
    sms_consent = ""
    if phone:
        roll = rng.random()
        sms_consent = rng.choice(CONSENT_YES) if roll < 0.45 else rng.choice(CONSENT_NO) if roll < 0.7 else ""
    return [
        person.external_id,
        person.first_name,
        person.last_name,
        email,
        phone,
        country,
        person.locale,
        person.zone,
        person.birthday.isoformat() if person.birthday else "",
        TAG_SEPARATOR.join(person.tags),
        referred_by,
        email_consent,
        sms_consent,
        person.country.code,
        person.service,
        f"{person.interval_days}",
        f"{person.churn_per_day}",
        churned_on.isoformat() if churned_on else "",
        f"{person.responsiveness}",
        f"{person.nps_mean}",
        f"{person.referral_per_day}",
    ]


def visit_amount(rng: random.Random, person: Person) -> str:
    """The amount of one visit: a service from the customer's interests at local prices."""
    return spend(rng, person.country, person.service, person.tags)


def spend(rng: random.Random, country: Country, service: str, tags: Sequence[str]) -> str:
    """The amount of one visit: mostly the customer's main service, sometimes another interest."""
    chosen = service if rng.random() < 0.7 or not tags else rng.choice(tags)
    price = SERVICE_PRICE_EUR.get(chosen, 35.0) * country.price_factor * math.exp(rng.gauss(0, 0.2))
    return _money(price, country.whole_prices)


def nps_score(rng: random.Random, nps_mean: float) -> int:
    """One answer to "how likely are you to recommend us", around the customer's mean."""
    return min(10, max(0, round(rng.gauss(nps_mean, 1.3))))


def complaint_chance(nps_mean: float) -> float:
    """The chance that one visit ends in a complaint: rare, and far likelier for unhappy customers."""
    return 0.008 + 0.05 * max(0.0, (7.0 - nps_mean) / 7.0)


def _bad_contact(rng: random.Random, kind: str, person: Person, duplicate_of: list[str]) -> list[str]:
    row = contact_row(rng, person, "", None)
    if kind == "malformed_email":
        row[3] = rng.choice(
            (person.email.replace("@", "@@"), person.email.replace("@", "."), person.email + "@")
        )
    elif kind == "invalid_phone":
        row[4], row[5] = rng.choice((("12345", person.country.code), ("+99912", ""), ("000 000", "ES")))
    elif kind == "unknown_timezone":
        row[7] = rng.choice(("Europe/Atlantis", "America/Sao Paulo", "Mars/Olympus_Mons", "GMT+25"))
    elif kind == "impossible_birthday":
        row[8] = rng.choice(("1987-02-30", "1990-13-05", "2001-04-31", "1975-00-12"))
    elif kind == "duplicate_id":
        row[0] = duplicate_of[0]
    return row


def generate(
    directory: Path,
    *,
    contacts: int = 3000,
    seed: int = 7,
    start: dt.date = dt.date(2025, 6, 1),
    end: dt.date = dt.date(2026, 11, 1),
) -> SyntheticFiles:
    """Write contacts.csv, visits.csv and feedback.csv of a believable business into ``directory``.

    Customers join over ``[start, end)``, more of them lately (the business grows); about one in ten
    never visits (a sign-up from the website). Each visits on their own rhythm (log-normal gaps around
    their interval) until their churn hazard strikes; some visits bring an NPS or CSAT answer and a few a
    complaint, most of them resolved within days.
    """
    if end <= start:
        raise ValueError(f"end {end} must be after start {start}")
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files = SyntheticFiles(
        directory=directory,
        contacts=directory / "contacts.csv",
        visits=directory / "visits.csv",
        feedback=directory / "feedback.csv",
    )
    span_days = (end - start).days
    until = dt.datetime.combine(end, dt.time(), tzinfo=dt.UTC)
    # Earlier customers who visited: referrers for later ones and the ids duplicate rows repeat.
    customers: deque[str] = deque(maxlen=500)
    last_visit_id = ""
    visit_number = 0
    with (
        files.contacts.open("w", encoding="utf-8", newline="") as contacts_file,
        files.visits.open("w", encoding="utf-8", newline="") as visits_file,
        files.feedback.open("w", encoding="utf-8", newline="") as feedback_file,
    ):
        out = _Writer(files, {"contacts": contacts_file, "visits": visits_file, "feedback": feedback_file})
        out.writers["contacts"].writerow(CONTACT_COLUMNS + TRAIT_COLUMNS)
        out.writers["visits"].writerow(VISIT_COLUMNS)
        out.writers["feedback"].writerow(FEEDBACK_COLUMNS)
        for index in range(contacts):
            external_id = f"C{index + 1:07d}"
            person = draw_person(rng, external_id)
            # Growth: the joining day's quantile is sqrt-shaped, so recent months bring more customers.
            joined = start + dt.timedelta(
                days=min(span_days - 1, int(span_days * math.sqrt((index + rng.random()) / contacts)))
            )
            referred_by = rng.choice(customers) if customers and rng.random() < 0.08 else ""
            prospect = rng.random() < 0.1
            one_and_done = rng.random() < 0.2
            local_zone = zone(person.zone)
            history: list[tuple[dt.datetime, str]] = []
            churned_on: dt.date | None = None
            if not prospect:
                lifetime = rng.expovariate(person.churn_per_day)
                churn_day = joined + dt.timedelta(days=0 if one_and_done else min(int(lifetime), 10_000))
                day = joined
                while day < end and day <= churn_day:
                    minutes = rng.randrange(9 * 60, 20 * 60, 15)
                    history.append((_local_instant(day, minutes, local_zone), visit_amount(rng, person)))
                    if person.service == "bridal" and len(history) >= 3:
                        churn_day = day
                        break
                    gap = person.interval_days * math.exp(rng.gauss(0, GAP_SIGMA))
                    # At least three days apart, so that answers to two visits never share a timestamp.
                    day += dt.timedelta(days=max(3, round(gap)))
                if churn_day < end:
                    churned_on = churn_day
            out.row("contacts", contact_row(rng, person, referred_by, churned_on))
            if rng.random() < BAD_ROW_SHARE:
                kind = rng.choice(BAD_CONTACT_KINDS if customers else BAD_CONTACT_KINDS[:-1])
                junk = draw_person(rng, f"C{index + 1:07d}-{rng.randrange(10, 99)}")
                out.bad_row("contacts", kind, _bad_contact(rng, kind, junk, [rng.choice(customers or [""])]))
            for occurred, amount in history:
                visit_number += 1
                visit_id = f"V{visit_number:08d}"
                with_offset = rng.random() < 0.9
                out.row(
                    "visits",
                    [visit_id, external_id, _iso(occurred, with_offset), amount, person.country.currency],
                )
                last_visit_id = visit_id
                if rng.random() < BAD_ROW_SHARE:
                    kind = rng.choice(BAD_VISIT_KINDS)
                    bad = [
                        f"V{visit_number:08d}-X",
                        external_id,
                        _iso(occurred),
                        amount,
                        person.country.currency,
                    ]
                    if kind == "negative_amount":
                        bad[3] = f"-{amount}"
                    elif kind == "unknown_contact":
                        bad[1] = f"C{rng.randrange(10**8, 10**9)}"
                    else:
                        bad[0] = last_visit_id
                    out.bad_row("visits", kind, bad)
                _feedback_after(rng, out, person, occurred, until)
            if history:
                customers.append(external_id)
    return files


def _feedback_after(
    rng: random.Random, out: _Writer, person: Person, visit: dt.datetime, until: dt.datetime
) -> None:
    """Write the answers and complaints that follow one visit before ``until``, if any."""
    language = person.locale if person.locale in COMPLAINTS else "en"
    if rng.random() < NPS_SHARE:
        score = nps_score(rng, person.nps_mean)
        comment = rng.choice(PRAISE[language]) if score >= 9 and rng.random() < 0.3 else ""
        answered = visit + dt.timedelta(hours=rng.randrange(2, 48))
        if answered < until:
            out.row("feedback", [person.external_id, _iso(answered), "nps", score, comment, ""])
    if rng.random() < CSAT_SHARE:
        score = min(5, max(1, round(rng.gauss(person.nps_mean / 2, 0.7))))
        if visit + dt.timedelta(hours=3) < until:
            out.row(
                "feedback", [person.external_id, _iso(visit + dt.timedelta(hours=3)), "csat", score, "", ""]
            )
    if rng.random() < complaint_chance(person.nps_mean):
        complained = visit + dt.timedelta(hours=rng.randrange(1, 30))
        resolved_at = complained + dt.timedelta(hours=rng.randrange(4, 24 * 6))
        resolved = _iso(resolved_at) if rng.random() < 0.7 and resolved_at < until else ""
        comment = rng.choice(COMPLAINTS[language])
        if complained < until:
            out.row("feedback", [person.external_id, _iso(complained), "complaint", "", comment, resolved])
    if rng.random() < 0.002 and visit + dt.timedelta(days=2) < until:
        out.row(
            "feedback", [person.external_id, _iso(visit + dt.timedelta(days=2)), "cancel_request", "", "", ""]
        )
    if rng.random() < BAD_ROW_SHARE * 0.25:
        ghost = f"C{rng.randrange(10**8, 10**9)}"
        out.bad_row("feedback", "unknown_contact", [ghost, _iso(visit), "nps", nps_score(rng, 8), "", ""])
