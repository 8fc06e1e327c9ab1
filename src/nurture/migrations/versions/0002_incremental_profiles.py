"""incremental profiles: contact facts kept between refreshes, and the contacts whose history changed

Triggers on the history tables (contacts, contact_tags, visits, feedback) note each contact whose rows
were inserted, updated or deleted in ``profile_changes``, whatever wrote them, so that a refresh sums up
again only those contacts. Every existing contact is noted once here, so the first refresh after the
upgrade sums everyone up.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import nurture.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, the column naming the contact, the operations that change a contact's history)
WATCHED = [
    ("contacts", "id", ("insert",)),
    ("contact_tags", "contact_id", ("insert", "update", "delete")),
    ("visits", "contact_id", ("insert", "update", "delete")),
    ("feedback", "contact_id", ("insert", "update", "delete")),
]


def upgrade() -> None:
    op.create_table(
        "contact_facts",
        sa.Column("contact_id", sa.Integer(), nullable=False),
        sa.Column("visits", sa.Integer(), nullable=False),
        sa.Column("visit_days", sa.Integer(), nullable=False),
        sa.Column("first_visit", nurture.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_visit", nurture.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("first_epoch", sa.Float(), nullable=True),
        sa.Column("last_epoch", sa.Float(), nullable=True),
        sa.Column("own_interval_days", sa.Float(), nullable=True),
        sa.Column("total_spend", sa.Numeric(precision=14, scale=2), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("primary_tag", sa.String(length=64), nullable=False),
        sa.Column("score_kind", sa.String(length=32), nullable=True),
        sa.Column("score", sa.Integer(), nullable=True),
        sa.Column("complaint_open", sa.Boolean(), nullable=False),
        sa.Column("points", sa.Integer(), nullable=False),
        sa.Column("stamps", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["contact_id"],
            ["contacts.id"],
            name=op.f("fk_contact_facts_contact_id_contacts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("contact_id", name=op.f("pk_contact_facts")),
    )
    op.create_index("ix_contact_facts_tag_interval", "contact_facts", ["primary_tag", "own_interval_days"])
    op.create_index("ix_contact_facts_interval", "contact_facts", ["own_interval_days"])
    op.create_table(
        "profile_changes",
        sa.Column("contact_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint("contact_id", name=op.f("pk_profile_changes")),
    )
    # What a refresh sums per contact, read from the indexes alone.
    with op.batch_alter_table("visits") as batch:
        batch.drop_index("ix_visits_contact_occurred")
        batch.create_index("ix_visits_contact_occurred", ["contact_id", "occurred_at", "amount", "currency"])
    with op.batch_alter_table("loyalty_entries") as batch:
        batch.drop_index("ix_loyalty_entries_contact_occurred")
        batch.create_index(
            "ix_loyalty_entries_contact_occurred", ["contact_id", "occurred_at", "points", "stamps"]
        )
        batch.create_index("ix_loyalty_entries_occurred_at", ["occurred_at"])
    if op.get_bind().dialect.name == "postgresql":
        _postgresql_triggers()
    else:
        _sqlite_triggers()
    op.execute("INSERT INTO profile_changes (contact_id) SELECT id FROM contacts")


def _sqlite_triggers() -> None:
    for table, column, operations in WATCHED:
        for operation in operations:
            rows = {"insert": ["NEW"], "update": ["OLD", "NEW"], "delete": ["OLD"]}[operation]
            values = ", ".join(f"({row}.{column})" for row in rows)
            op.execute(
                f"CREATE TRIGGER profile_change_{table}_{operation} AFTER {operation.upper()} ON {table} "
                f"BEGIN INSERT OR IGNORE INTO profile_changes (contact_id) VALUES {values}; END"
            )


def _postgresql_triggers() -> None:
    # Statement-level triggers over the transition tables: one INSERT per statement, not one per row.
    for column in ("id", "contact_id"):
        for rows in ("new_rows", "old_rows"):
            op.execute(
                f"CREATE FUNCTION profile_change_{rows}_{column}() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN INSERT INTO profile_changes (contact_id) SELECT DISTINCT {column} FROM {rows} "
                "ON CONFLICT DO NOTHING; RETURN NULL; END $$"
            )
    for table, column, operations in WATCHED:
        for operation in operations:
            transitions = {"insert": ["new_rows"], "update": ["old_rows", "new_rows"], "delete": ["old_rows"]}
            for rows in transitions[operation]:
                referencing = "NEW TABLE AS new_rows" if rows == "new_rows" else "OLD TABLE AS old_rows"
                op.execute(
                    f"CREATE TRIGGER profile_change_{table}_{operation}_{rows} AFTER {operation.upper()} "
                    f"ON {table} REFERENCING {referencing} FOR EACH STATEMENT "
                    f"EXECUTE FUNCTION profile_change_{rows}_{column}()"
                )


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for table, _column, operations in WATCHED:
        for operation in operations:
            if postgresql:
                for rows in ("new_rows", "old_rows"):
                    op.execute(f"DROP TRIGGER IF EXISTS profile_change_{table}_{operation}_{rows} ON {table}")
            else:
                op.execute(f"DROP TRIGGER IF EXISTS profile_change_{table}_{operation}")
    if postgresql:
        for column in ("id", "contact_id"):
            for rows in ("new_rows", "old_rows"):
                op.execute(f"DROP FUNCTION IF EXISTS profile_change_{rows}_{column}()")
    op.drop_table("profile_changes")
    op.drop_table("contact_facts")
    with op.batch_alter_table("loyalty_entries") as batch:
        batch.drop_index("ix_loyalty_entries_occurred_at")
        batch.drop_index("ix_loyalty_entries_contact_occurred")
        batch.create_index("ix_loyalty_entries_contact_occurred", ["contact_id", "occurred_at"])
    with op.batch_alter_table("visits") as batch:
        batch.drop_index("ix_visits_contact_occurred")
        batch.create_index("ix_visits_contact_occurred", ["contact_id", "occurred_at"])
