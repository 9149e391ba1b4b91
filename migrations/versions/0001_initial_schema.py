"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-24 06:44:42.221631
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('app', sa.String(length=100), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=False),
    sa.Column('scopes', postgresql.ARRAY(sa.String(length=16)), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('prefix', name=op.f('uq_api_keys_prefix')),
    sa.UniqueConstraint('secret_hash', name=op.f('uq_api_keys_secret_hash'))
    )
    op.create_table('failure_clusters',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('label', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('fixed_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_failure_clusters'))
    )
    op.create_table('model_versions',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('promoted_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_versions')),
    sa.UniqueConstraint('name', name=op.f('uq_model_versions_name'))
    )
    op.create_table('cycles',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.Enum('running', 'awaiting_review', 'promoted', 'rejected', 'failed', name='cycle_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('base_model_version_id', sa.BigInteger(), nullable=True),
    sa.Column('candidate_model_version_id', sa.BigInteger(), nullable=True),
    sa.Column('config', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('summary', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('flow_run_id', sa.String(length=64), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['base_model_version_id'], ['model_versions.id'], name=op.f('fk_cycles_base_model_version_id_model_versions')),
    sa.ForeignKeyConstraint(['candidate_model_version_id'], ['model_versions.id'], name=op.f('fk_cycles_candidate_model_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cycles'))
    )
    op.create_index(op.f('ix_cycles_status'), 'cycles', ['status'], unique=False)
    op.create_table('evaluation_runs',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('app', sa.String(length=100), nullable=False),
    sa.Column('run_id', sa.String(length=200), nullable=False),
    sa.Column('benchmark', sa.String(length=200), nullable=False),
    sa.Column('suite', sa.String(length=200), nullable=True),
    sa.Column('model_version_id', sa.BigInteger(), nullable=False),
    sa.Column('sample_count', sa.Integer(), nullable=False),
    sa.Column('passed_count', sa.Integer(), nullable=False),
    sa.Column('payload_sha256', sa.String(length=64), nullable=False),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_evaluation_runs_model_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluation_runs')),
    sa.UniqueConstraint('app', 'run_id', name=op.f('uq_evaluation_runs_app_run_id'))
    )
    op.create_table('failure_cases',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('dedup_key', sa.String(length=128), nullable=False),
    sa.Column('cluster_id', sa.BigInteger(), nullable=True),
    sa.Column('status', sa.Enum('open', 'routed', 'awaiting_triage', 'in_round', 'fixed', 'dismissed', name='case_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('task', sa.Enum('text_to_image', 'image_editing', name='task', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('image_uri', sa.Text(), nullable=True),
    sa.Column('image_sha256', sa.String(length=64), nullable=True),
    sa.Column('model_version_id', sa.BigInteger(), nullable=True),
    sa.Column('skill', sa.String(length=100), nullable=True),
    sa.Column('signal_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('first_seen_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['cluster_id'], ['failure_clusters.id'], name=op.f('fk_failure_cases_cluster_id_failure_clusters')),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_failure_cases_model_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_failure_cases')),
    sa.UniqueConstraint('dedup_key', name=op.f('uq_failure_cases_dedup_key'))
    )
    op.create_index(op.f('ix_failure_cases_cluster_id'), 'failure_cases', ['cluster_id'], unique=False)
    op.create_index(op.f('ix_failure_cases_status'), 'failure_cases', ['status'], unique=False)
    op.create_table('case_routes',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('case_id', sa.BigInteger(), nullable=False),
    sa.Column('track', sa.Enum('rl', 'pretraining_gap', 'prompt_enhancer', name='track', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('confidence', sa.Double(), nullable=False),
    sa.Column('evidence', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('decided_by', sa.Enum('model', 'human', name='decider', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('decider_ref', sa.String(length=200), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('confidence >= 0 AND confidence <= 1', name=op.f('ck_case_routes_confidence_unit')),
    sa.ForeignKeyConstraint(['case_id'], ['failure_cases.id'], name=op.f('fk_case_routes_case_id_failure_cases'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_case_routes'))
    )
    op.create_index('ix_case_routes_case_id_created_at', 'case_routes', ['case_id', 'created_at'], unique=False)
    op.create_table('regression_scenarios',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('cluster_id', sa.BigInteger(), nullable=True),
    sa.Column('source_case_id', sa.BigInteger(), nullable=True),
    sa.Column('fixed_in_cycle_id', sa.BigInteger(), nullable=True),
    sa.Column('task', sa.Enum('text_to_image', 'image_editing', name='task', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('skill', sa.String(length=100), nullable=True),
    sa.Column('spec', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('active', sa.Boolean(), server_default='true', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['cluster_id'], ['failure_clusters.id'], name=op.f('fk_regression_scenarios_cluster_id_failure_clusters')),
    sa.ForeignKeyConstraint(['fixed_in_cycle_id'], ['cycles.id'], name=op.f('fk_regression_scenarios_fixed_in_cycle_id_cycles')),
    sa.ForeignKeyConstraint(['source_case_id'], ['failure_cases.id'], name=op.f('fk_regression_scenarios_source_case_id_failure_cases')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_regression_scenarios'))
    )
    op.create_table('signals',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('source', sa.Enum('evaluation', 'mining', 'feedback', name='signal_source', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('kind', sa.Enum('thumbs', 'rating', 'pairwise', 'comment', 'flags', 'evaluation_sample', 'mining_hit', name='signal_kind', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('app', sa.String(length=100), nullable=False),
    sa.Column('event_id', sa.String(length=256), nullable=False),
    sa.Column('task', sa.Enum('text_to_image', 'image_editing', name='task', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('image_uri', sa.Text(), nullable=True),
    sa.Column('image_sha256', sa.String(length=64), nullable=True),
    sa.Column('input_images', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('model_version_id', sa.BigInteger(), nullable=True),
    sa.Column('evaluation_run_id', sa.BigInteger(), nullable=True),
    sa.Column('thumbs_up', sa.Boolean(), nullable=True),
    sa.Column('rating', sa.SmallInteger(), nullable=True),
    sa.Column('passed', sa.Boolean(), nullable=True),
    sa.Column('flags', postgresql.ARRAY(sa.String(length=32)), nullable=True),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('chosen_image_uri', sa.Text(), nullable=True),
    sa.Column('rejected_image_uri', sa.Text(), nullable=True),
    sa.Column('scores', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('details', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('user_ref', sa.String(length=200), nullable=True),
    sa.Column('session_ref', sa.String(length=200), nullable=True),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('payload_sha256', sa.String(length=64), nullable=False),
    sa.CheckConstraint('rating IS NULL OR rating BETWEEN 1 AND 5', name=op.f('ck_signals_rating_range')),
    sa.ForeignKeyConstraint(['evaluation_run_id'], ['evaluation_runs.id'], name=op.f('fk_signals_evaluation_run_id_evaluation_runs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_signals_model_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_signals')),
    sa.UniqueConstraint('app', 'event_id', name=op.f('uq_signals_app_event_id'))
    )
    op.create_index(op.f('ix_signals_evaluation_run_id'), 'signals', ['evaluation_run_id'], unique=False)
    op.create_index('ix_signals_kind_id', 'signals', ['kind', 'id'], unique=False)
    op.create_index('ix_signals_model_version_id_id', 'signals', ['model_version_id', 'id'], unique=False)
    op.create_index('ix_signals_received_at', 'signals', ['received_at'], unique=False)
    op.create_index('ix_signals_source_id', 'signals', ['source', 'id'], unique=False)
    op.create_table('training_rounds',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('cycle_id', sa.BigInteger(), nullable=False),
    sa.Column('track', sa.Enum('rl', 'pretraining_gap', 'prompt_enhancer', name='track', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('recipe', sa.String(length=100), nullable=False),
    sa.Column('status', sa.Enum('pending', 'running', 'succeeded', 'failed', name='round_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('config', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('data_manifest', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('metrics', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('evaluation', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['cycle_id'], ['cycles.id'], name=op.f('fk_training_rounds_cycle_id_cycles')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_rounds'))
    )
    op.create_index(op.f('ix_training_rounds_cycle_id'), 'training_rounds', ['cycle_id'], unique=False)
    op.create_table('case_signals',
    sa.Column('case_id', sa.BigInteger(), nullable=False),
    sa.Column('signal_id', sa.BigInteger(), nullable=False),
    sa.Column('linked_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['failure_cases.id'], name=op.f('fk_case_signals_case_id_failure_cases'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['signal_id'], ['signals.id'], name=op.f('fk_case_signals_signal_id_signals')),
    sa.PrimaryKeyConstraint('case_id', 'signal_id', name=op.f('pk_case_signals')),
    sa.UniqueConstraint('signal_id', name=op.f('uq_case_signals_signal_id'))
    )
    op.create_table('checkpoints',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('training_round_id', sa.BigInteger(), nullable=True),
    sa.Column('model_version_id', sa.BigInteger(), nullable=True),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_checkpoints_model_version_id_model_versions')),
    sa.ForeignKeyConstraint(['training_round_id'], ['training_rounds.id'], name=op.f('fk_checkpoints_training_round_id_training_rounds')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_checkpoints'))
    )
    op.create_index(op.f('ix_checkpoints_training_round_id'), 'checkpoints', ['training_round_id'], unique=False)
    op.create_table('review_items',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('kind', sa.Enum('augmentation_batch', 'reward_recalibration', 'prompt_enhancer_data', 'model_promotion', 'triage_case', name='review_kind', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('status', sa.Enum('pending', 'claimed', 'approved', 'rejected', name='review_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('title', sa.Text(), nullable=False),
    sa.Column('artefact', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('cycle_id', sa.BigInteger(), nullable=True),
    sa.Column('training_round_id', sa.BigInteger(), nullable=True),
    sa.Column('case_id', sa.BigInteger(), nullable=True),
    sa.Column('cluster_id', sa.BigInteger(), nullable=True),
    sa.Column('claimed_by', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('decided_by', sa.String(length=200), nullable=True),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('decision_reason', sa.Text(), nullable=True),
    sa.Column('edits', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['failure_cases.id'], name=op.f('fk_review_items_case_id_failure_cases')),
    sa.ForeignKeyConstraint(['cluster_id'], ['failure_clusters.id'], name=op.f('fk_review_items_cluster_id_failure_clusters')),
    sa.ForeignKeyConstraint(['cycle_id'], ['cycles.id'], name=op.f('fk_review_items_cycle_id_cycles')),
    sa.ForeignKeyConstraint(['training_round_id'], ['training_rounds.id'], name=op.f('fk_review_items_training_round_id_training_rounds')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_review_items'))
    )
    op.create_index(op.f('ix_review_items_cycle_id'), 'review_items', ['cycle_id'], unique=False)
    op.create_index('ix_review_items_status_created_at', 'review_items', ['status', 'created_at'], unique=False)
    op.create_table('training_round_cases',
    sa.Column('training_round_id', sa.BigInteger(), nullable=False),
    sa.Column('case_id', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['failure_cases.id'], name=op.f('fk_training_round_cases_case_id_failure_cases')),
    sa.ForeignKeyConstraint(['training_round_id'], ['training_rounds.id'], name=op.f('fk_training_round_cases_training_round_id_training_rounds'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('training_round_id', 'case_id', name=op.f('pk_training_round_cases'))
    )
    op.create_table('review_audit',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('review_item_id', sa.BigInteger(), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('before', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('after', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['review_item_id'], ['review_items.id'], name=op.f('fk_review_audit_review_item_id_review_items')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_review_audit'))
    )
    op.create_index(op.f('ix_review_audit_review_item_id'), 'review_audit', ['review_item_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_review_audit_review_item_id'), table_name='review_audit')
    op.drop_table('review_audit')
    op.drop_table('training_round_cases')
    op.drop_index('ix_review_items_status_created_at', table_name='review_items')
    op.drop_index(op.f('ix_review_items_cycle_id'), table_name='review_items')
    op.drop_table('review_items')
    op.drop_index(op.f('ix_checkpoints_training_round_id'), table_name='checkpoints')
    op.drop_table('checkpoints')
    op.drop_table('case_signals')
    op.drop_index(op.f('ix_training_rounds_cycle_id'), table_name='training_rounds')
    op.drop_table('training_rounds')
    op.drop_index('ix_signals_source_id', table_name='signals')
    op.drop_index('ix_signals_received_at', table_name='signals')
    op.drop_index('ix_signals_model_version_id_id', table_name='signals')
    op.drop_index('ix_signals_kind_id', table_name='signals')
    op.drop_index(op.f('ix_signals_evaluation_run_id'), table_name='signals')
    op.drop_table('signals')
    op.drop_table('regression_scenarios')
    op.drop_index('ix_case_routes_case_id_created_at', table_name='case_routes')
    op.drop_table('case_routes')
    op.drop_index(op.f('ix_failure_cases_status'), table_name='failure_cases')
    op.drop_index(op.f('ix_failure_cases_cluster_id'), table_name='failure_cases')
    op.drop_table('failure_cases')
    op.drop_table('evaluation_runs')
    op.drop_index(op.f('ix_cycles_status'), table_name='cycles')
    op.drop_table('cycles')
    op.drop_table('model_versions')
    op.drop_table('failure_clusters')
    op.drop_table('api_keys')
