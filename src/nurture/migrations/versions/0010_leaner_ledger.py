"""leaner ledger: the sends keep three indexes instead of six, two of them partial and small

A claim inserts into every index of the sends and a record updates most of them; at two million sends that
upkeep, not the row, is most of what a message costs the ledger (70 µs of CPU to claim one on SQLite, 48 to
record it; 47 and 28 with these indexes). The calendar's index by contact and touch and attribution's index
by contact become one, covering both (``ix_sends_by_contact``): each led by the contact, so it also serves
what ``ix_sends_contact_sent`` served (a contact's last SMS, a range's recent sends). ``ix_sends_status``
held every send, for the few not settled: it becomes ``ix_sends_unsettled``, claimed and unknown sends only,
emptied as they are recorded. ``ix_sends_provider_message_id`` keeps the SMS only (Twilio's callbacks look
a send up by its SID; no email is looked up so). ``ix_sends_touch_status`` served no query.

Revision ID: 0010_leaner_ledger
Revises: 0009_attribution_by_contact
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_leaner_ledger"
down_revision: str | None = "0009_attribution_by_contact"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BY_CONTACT = [
    "contact_id",
    "touch",
    "claimed_at",
    "due_at",
    "status",
    "campaign",
    "channel",
    "sent_at",
    "incentive",
]
UNSETTLED = sa.text("status IN ('claimed', 'unknown')")
SMS = sa.text("channel = 'sms'")


def upgrade() -> None:
    op.create_index("ix_sends_by_contact", "sends", BY_CONTACT)
    op.drop_index("ix_sends_attribution", table_name="sends")
    op.drop_index("ix_sends_contact_touch", table_name="sends")
    op.drop_index("ix_sends_contact_sent", table_name="sends")
    op.drop_index("ix_sends_touch_status", table_name="sends")
    op.drop_index("ix_sends_status", table_name="sends")
    op.create_index(
        "ix_sends_unsettled",
        "sends",
        ["status", "claimed_at"],
        sqlite_where=UNSETTLED,
        postgresql_where=UNSETTLED,
    )
    op.drop_index("ix_sends_provider_message_id", table_name="sends")
    op.create_index(
        "ix_sends_provider_message_id",
        "sends",
        ["provider_message_id"],
        sqlite_where=SMS,
        postgresql_where=SMS,
    )


def downgrade() -> None:
    op.drop_index("ix_sends_provider_message_id", table_name="sends")
    op.create_index("ix_sends_provider_message_id", "sends", ["provider_message_id"])
    op.drop_index("ix_sends_unsettled", table_name="sends")
    op.create_index("ix_sends_status", "sends", ["status"])
    op.create_index("ix_sends_touch_status", "sends", ["touch", "status"])
    op.create_index("ix_sends_contact_sent", "sends", ["contact_id", "sent_at"])
    op.create_index(
        "ix_sends_contact_touch", "sends", ["contact_id", "touch", "claimed_at", "due_at", "status"]
    )
    op.create_index(
        "ix_sends_attribution",
        "sends",
        ["contact_id", "claimed_at", "status", "touch", "campaign", "channel", "sent_at", "incentive"],
    )
    op.drop_index("ix_sends_by_contact", table_name="sends")
