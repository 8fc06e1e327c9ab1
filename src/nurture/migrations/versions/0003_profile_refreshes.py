"""profile refreshes: the instant profiles are computed as of, kept once rather than on every profile row

So that a refresh can leave a profile row alone when nothing in it changed.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import nurture.models

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "profile_refreshes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("as_of", nurture.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("refreshed_at", nurture.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("contacts_summed_up", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_profile_refreshes")),
    )
    op.execute(
        "INSERT INTO profile_refreshes (as_of, refreshed_at, contacts_summed_up) "
        "SELECT as_of, as_of, count(*) FROM contact_profiles GROUP BY as_of"
    )
    with op.batch_alter_table("contact_profiles") as batch:
        batch.drop_column("as_of")


def downgrade() -> None:
    with op.batch_alter_table("contact_profiles") as batch:
        batch.add_column(sa.Column("as_of", nurture.models.UTCDateTime(timezone=True), nullable=True))
    op.execute("UPDATE contact_profiles SET as_of = (SELECT max(as_of) FROM profile_refreshes)")
    op.drop_table("profile_refreshes")
