"""checkpoints.component: a model version is a generator, an enhancer and a reward

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 22:35:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        'checkpoints',
        sa.Column(
            'component',
            sa.Enum('generator', 'enhancer', 'reward', name='component', native_enum=False,
                    create_constraint=True, length=32),
            server_default='generator',  # the column's CHECK comes with its enum type
            nullable=False,
        ),
    )


def downgrade() -> None:
    op.drop_column('checkpoints', 'component')
