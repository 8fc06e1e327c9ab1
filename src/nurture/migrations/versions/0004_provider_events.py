"""provider events: what SendGrid and Twilio report, suppressed addresses, inbound SMS, topic unsubscribes

What `nurture serve` records: each provider event once (``send_events``, by the provider's own id), the
last final delivery answer on the send itself, addresses that bounced or reported spam, the SMS contacts
send us, and the touches a contact unsubscribed from. Sends gain an index on the provider's message id,
which Twilio's status callbacks are matched by.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import nurture.models

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=32)


def upgrade() -> None:
    op.create_table(
        "send_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("send_id", sa.Integer(), nullable=True),
        sa.Column("provider", _enum("provider", "sendgrid", "twilio"), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("dedupe_key", sa.String(length=255), nullable=False),
        sa.Column("occurred_at", nurture.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("received_at", nurture.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["send_id"], ["sends.id"], name=op.f("fk_send_events_send_id_sends"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_send_events")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_send_events_dedupe_key")),
    )
    op.create_index("ix_send_events_send_id", "send_events", ["send_id"])
    op.create_table(
        "email_suppressions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("suppressed_at", nurture.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_email_suppressions")),
        sa.UniqueConstraint("address", name=op.f("uq_email_suppressions_address")),
    )
    op.create_table(
        "inbound_messages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("provider_sid", sa.String(length=64), nullable=False),
        sa.Column("contact_id", sa.Integer(), nullable=True),
        sa.Column("send_id", sa.Integer(), nullable=True),
        sa.Column("from_number", sa.String(length=32), nullable=False),
        sa.Column("to_number", sa.String(length=32), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("kind", _enum("inbound_kind", "opt_out", "opt_in", "help", "reply"), nullable=False),
        sa.Column("received_at", nurture.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["contact_id"],
            ["contacts.id"],
            name=op.f("fk_inbound_messages_contact_id_contacts"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["send_id"], ["sends.id"], name=op.f("fk_inbound_messages_send_id_sends"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbound_messages")),
        sa.UniqueConstraint("provider_sid", name=op.f("uq_inbound_messages_provider_sid")),
    )
    op.create_index("ix_inbound_messages_contact_id", "inbound_messages", ["contact_id"])
    op.create_index("ix_inbound_messages_send_id", "inbound_messages", ["send_id"])
    op.create_table(
        "topic_unsubscribes",
        sa.Column("contact_id", sa.Integer(), nullable=False),
        sa.Column("topic", sa.String(length=64), nullable=False),
        sa.Column("unsubscribed_at", nurture.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["contact_id"],
            ["contacts.id"],
            name=op.f("fk_topic_unsubscribes_contact_id_contacts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("contact_id", "topic", name=op.f("pk_topic_unsubscribes")),
    )
    # On SQLite the CHECK constraint makes this copy the table once.
    with op.batch_alter_table("sends") as batch:
        batch.add_column(
            sa.Column(
                "delivery",
                _enum("delivery", "delivered", "bounced", "dropped", "undelivered", "failed"),
                nullable=True,
            )
        )
        batch.add_column(sa.Column("delivery_error", sa.Text(), nullable=True))
        batch.add_column(sa.Column("delivery_at", nurture.models.UTCDateTime(timezone=True), nullable=True))
        batch.create_index("ix_sends_provider_message_id", ["provider_message_id"])


def downgrade() -> None:
    with op.batch_alter_table("sends") as batch:
        batch.drop_index("ix_sends_provider_message_id")
        batch.drop_constraint(op.f("ck_sends_delivery"), type_="check")
        batch.drop_column("delivery_at")
        batch.drop_column("delivery_error")
        batch.drop_column("delivery")
    op.drop_table("topic_unsubscribes")
    op.drop_index("ix_inbound_messages_send_id", table_name="inbound_messages")
    op.drop_index("ix_inbound_messages_contact_id", table_name="inbound_messages")
    op.drop_table("inbound_messages")
    op.drop_table("email_suppressions")
    op.drop_index("ix_send_events_send_id", table_name="send_events")
    op.drop_table("send_events")
