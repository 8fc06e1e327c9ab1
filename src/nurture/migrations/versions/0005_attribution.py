"""attribution: an index covering what attribution reads of the sends of a period, by claim time

Revision ID: 0005_attribution
Revises: 0004
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005_attribution"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ["claimed_at", "status", "touch", "campaign", "channel", "sent_at", "contact_id", "incentive"]


def upgrade() -> None:
    op.create_index("ix_sends_attribution", "sends", COLUMNS)


def downgrade() -> None:
    op.drop_index("ix_sends_attribution", table_name="sends")
