"""Bad-case mining: miners that look for the generator's failures and emit them as
``mining_hit`` signals (:mod:`flywheel.mining.miners`), run as idempotent Celery tasks
(:mod:`flywheel.mining.tasks`)."""
