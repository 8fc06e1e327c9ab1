"""sends by contact and touch: what the calendar asks of each contact's ledger, read from the index alone

Revision ID: 0008_sends_by_contact_and_touch
Revises: 0007_campaigns
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008_sends_by_contact_and_touch"
down_revision: str | None = "0007_campaigns"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ["contact_id", "touch", "claimed_at", "due_at", "status"]


def upgrade() -> None:
    op.create_index("ix_sends_contact_touch", "sends", COLUMNS)


def downgrade() -> None:
    op.drop_index("ix_sends_contact_touch", table_name="sends")
