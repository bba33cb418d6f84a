"""The look resource, Idempotency-Key records, generated secrets, and change notifications that wake
long-polls and event streams

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 03:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())
TIMESTAMP = sa.DateTime(timezone=True)
UUID = sa.Uuid()

# Every committed change to a job or a look (erasure's deletes included: a cached
# rendering must not outlive its row) is announced on one channel as "job <id>" or
# "look <id>"; a job's change also names the looks it belongs to.
# Postgres delivers notifications at commit and folds duplicates within one
# transaction, so a waiter wakes once per commit, never before the row is visible.
NOTIFY_FUNCTIONS = ("""
CREATE FUNCTION atelier_notify_job() RETURNS trigger AS $$
DECLARE
    changed uuid := CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END;
    owner uuid;
BEGIN
    PERFORM pg_notify('atelier_change', 'job ' || changed::text);
    FOR owner IN
        SELECT id FROM look
        WHERE train_job_id = changed OR generate_job_id = changed OR video_job_id = changed
    LOOP
        PERFORM pg_notify('atelier_change', 'look ' || owner::text);
    END LOOP;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
""", """
CREATE FUNCTION atelier_notify_look() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('atelier_change', 'look ' || (CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END)::text);
    RETURN NULL;
END
$$ LANGUAGE plpgsql
""", """
CREATE TRIGGER job_notify AFTER INSERT OR UPDATE OR DELETE ON job
    FOR EACH ROW EXECUTE FUNCTION atelier_notify_job()
""", """
CREATE TRIGGER look_notify AFTER INSERT OR UPDATE OR DELETE ON look
    FOR EACH ROW EXECUTE FUNCTION atelier_notify_look()
""")


def _job_fk(name: str) -> sa.Column:
    return sa.Column(name, UUID, sa.ForeignKey('job.id', ondelete='SET NULL'), nullable=True)


def upgrade() -> None:
    op.create_table(
        'look',
        sa.Column('id', UUID, primary_key=True),
        sa.Column('account_id', UUID, sa.ForeignKey('account.id', ondelete='CASCADE'), nullable=False),
        sa.Column('subject_id', UUID, sa.ForeignKey('subject.id', ondelete='CASCADE'), nullable=False),
        sa.Column('spec', JSONB, nullable=False),
        _job_fk('train_job_id'),
        _job_fk('generate_job_id'),
        _job_fk('video_job_id'),
        sa.Column('canceled_at', TIMESTAMP, nullable=True),
        sa.Column('created_at', TIMESTAMP, nullable=False),
    )
    op.create_index('ix_look_account_created', 'look', ['account_id', 'created_at'])
    op.create_index('ix_look_subject_id', 'look', ['subject_id'])
    for column in ('train_job_id', 'generate_job_id', 'video_job_id'):
        op.create_index(f'ix_look_{column}', 'look', [column])

    op.create_table(
        'idempotency_key',
        sa.Column('account_id', UUID, sa.ForeignKey('account.id', ondelete='CASCADE'), primary_key=True),
        sa.Column('key', sa.String(255), primary_key=True),
        sa.Column('method', sa.String(8), nullable=False),
        sa.Column('path', sa.String(), nullable=False),
        sa.Column('fingerprint', sa.String(), nullable=False),
        sa.Column('locked_until', TIMESTAMP, nullable=True),
        sa.Column('response_status', sa.Integer(), nullable=True),
        sa.Column('response_body', sa.LargeBinary(), nullable=True),
        sa.Column('response_headers', JSONB, nullable=True),
        sa.Column('created_at', TIMESTAMP, nullable=False),
    )
    op.create_index('ix_idempotency_key_created_at', 'idempotency_key', ['created_at'])

    # The backstop of a subject upload's Idempotency-Key (as job rows have one).
    op.add_column('subject', sa.Column('idempotency_key', sa.String(), nullable=True))
    op.create_unique_constraint('uq_subject_idempotency', 'subject', ['account_id', 'idempotency_key'])

    op.create_table(
        'secret',
        sa.Column('name', sa.String(64), primary_key=True),
        sa.Column('value', sa.LargeBinary(), nullable=False),
        sa.Column('created_at', TIMESTAMP, nullable=False),
    )
    for statement in NOTIFY_FUNCTIONS:
        op.execute(statement)


def downgrade() -> None:
    op.execute('DROP TRIGGER look_notify ON look')
    op.execute('DROP TRIGGER job_notify ON job')
    op.execute('DROP FUNCTION atelier_notify_look()')
    op.execute('DROP FUNCTION atelier_notify_job()')
    op.drop_table('secret')
    op.drop_constraint('uq_subject_idempotency', 'subject', type_='unique')
    op.drop_column('subject', 'idempotency_key')
    op.drop_table('idempotency_key')
    op.drop_table('look')
