"""photo faces: the detected face box and the training crop of each photo

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: photos stored before faces were detected have neither.
    op.add_column('subject_photo', sa.Column('face_x', sa.Integer(), nullable=True))
    op.add_column('subject_photo', sa.Column('face_y', sa.Integer(), nullable=True))
    op.add_column('subject_photo', sa.Column('face_w', sa.Integer(), nullable=True))
    op.add_column('subject_photo', sa.Column('face_h', sa.Integer(), nullable=True))
    op.add_column('subject_photo', sa.Column('train_blob_key', sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    op.drop_column('subject_photo', 'train_blob_key')
    op.drop_column('subject_photo', 'face_h')
    op.drop_column('subject_photo', 'face_w')
    op.drop_column('subject_photo', 'face_y')
    op.drop_column('subject_photo', 'face_x')
