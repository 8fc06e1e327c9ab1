"""campaigns: the ad-hoc campaigns ops started, with the options every run of one agrees on

Revision ID: 0007_campaigns
Revises: 0005_attribution
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import nurture.models

revision: str = "0007_campaigns"
down_revision: str | None = "0005_attribution"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("touch", sa.String(length=64), nullable=False),
        sa.Column("segment", sa.String(length=64), nullable=False),
        sa.Column(
            "channel",
            sa.Enum("email", "sms", name="channel", native_enum=False, create_constraint=True, length=32),
            nullable=True,
        ),
        sa.Column("holdout", sa.Float(), nullable=True),
        sa.Column("loyalty_first_hours", sa.Integer(), nullable=True),
        sa.Column("contact_limit", sa.Integer(), nullable=True),
        sa.Column("last_contact_id", sa.Integer(), nullable=True),
        sa.Column("starts_at", nurture.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_at", nurture.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("approved_at", nurture.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaigns")),
        sa.UniqueConstraint("name", name=op.f("uq_campaigns_name")),
    )


def downgrade() -> None:
    op.drop_table("campaigns")
