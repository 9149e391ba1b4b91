"""training_rounds.status 'skipped': a round whose artefact a reviewer rejected before it trained

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 00:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = ('pending', 'running', 'succeeded', 'failed')
_AFTER = (*_BEFORE, 'skipped')


def _check(values: tuple[str, ...]) -> None:
    listed = ', '.join(f"'{v}'" for v in values)
    op.execute('ALTER TABLE training_rounds DROP CONSTRAINT ck_training_rounds_round_status')
    op.execute(
        'ALTER TABLE training_rounds ADD CONSTRAINT ck_training_rounds_round_status '
        f'CHECK (status IN ({listed}))'
    )


def upgrade() -> None:
    _check(_AFTER)


def downgrade() -> None:
    op.execute("UPDATE training_rounds SET status = 'failed' WHERE status = 'skipped'")
    _check(_BEFORE)
