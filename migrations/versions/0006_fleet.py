"""The GPU fleet: workers publish their inventory, jobs record where they were
placed and what they measured, and job costs are learnt per shape

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 00:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONB = postgresql.JSONB(astext_type=sa.Text())
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Existing rows are GPU workers unless their queue says CPU.
    op.add_column('worker', sa.Column('pool', sa.String(8), server_default='gpu', nullable=False))
    op.execute("UPDATE worker SET pool = 'cpu' WHERE queue = 'atelier:cpu'")
    op.add_column('worker', sa.Column('vram_free_bytes', sa.BigInteger(), nullable=True))
    op.add_column('worker', sa.Column('profiles', JSONB, server_default=sa.text("'[]'"), nullable=False))
    op.add_column('worker', sa.Column('loras', JSONB, server_default=sa.text("'{}'"), nullable=False))
    op.add_column('worker', sa.Column('busy_until', TIMESTAMP, nullable=True))
    op.add_column('worker', sa.Column('inventory_at', TIMESTAMP, nullable=True))
    op.add_column('worker', sa.Column('gone_at', TIMESTAMP, nullable=True))
    op.create_index('ix_worker_pool_live', 'worker', ['pool', 'last_seen'])

    op.add_column('job', sa.Column('placed_on', sa.String(), nullable=True))
    op.add_column('job', sa.Column('placement', JSONB, nullable=True))
    op.add_column('job', sa.Column('peak_vram_bytes', sa.BigInteger(), nullable=True))
    op.add_column('job', sa.Column('vram_floor_bytes', sa.BigInteger(), server_default='0', nullable=False))
    op.add_column('job', sa.Column('preempt_requested', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_index('ix_job_placed_on', 'job', ['placed_on'])

    op.create_table(
        'job_cost',
        sa.Column('shape', sa.String(), primary_key=True),
        sa.Column('samples', sa.Integer(), nullable=False),
        sa.Column('seconds_per_unit', sa.Float(), nullable=False),
        sa.Column('peak_vram_bytes', sa.BigInteger(), nullable=False),
        sa.Column('oom_floor_bytes', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('updated_at', TIMESTAMP, nullable=False),
    )


def downgrade() -> None:
    op.drop_table('job_cost')
    op.drop_index('ix_job_placed_on', table_name='job')
    for column in ('preempt_requested', 'vram_floor_bytes', 'peak_vram_bytes', 'placement', 'placed_on'):
        op.drop_column('job', column)
    op.drop_index('ix_worker_pool_live', table_name='worker')
    for column in ('gone_at', 'inventory_at', 'busy_until', 'loras', 'profiles', 'vram_free_bytes', 'pool'):
        op.drop_column('worker', column)
