"""cycles.status 'no_rounds': a cycle that found no track with enough work

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 00:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = ('running', 'awaiting_review', 'promoted', 'rejected', 'failed')
_AFTER = (*_BEFORE, 'no_rounds')


def _check(values: tuple[str, ...]) -> None:
    listed = ', '.join(f"'{v}'" for v in values)
    op.execute('ALTER TABLE cycles DROP CONSTRAINT ck_cycles_cycle_status')
    op.execute(f'ALTER TABLE cycles ADD CONSTRAINT ck_cycles_cycle_status CHECK (status IN ({listed}))')


def upgrade() -> None:
    _check(_AFTER)


def downgrade() -> None:
    op.execute("UPDATE cycles SET status = 'rejected' WHERE status = 'no_rounds'")
    _check(_BEFORE)
