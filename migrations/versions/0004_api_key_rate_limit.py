"""api_keys.rate_limit: a key's own request limit (``600/minute``); NULL follows the default

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('api_keys', sa.Column('rate_limit', sa.String(length=100), nullable=True))


def downgrade() -> None:
    op.drop_column('api_keys', 'rate_limit')
