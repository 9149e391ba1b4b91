"""The embedded world's side of the loop: the steps, tracks and attribution evidence that know
the world's truth (its scenes, evaluator, users' words and seed probes). The loop never
imports this package; it finds :data:`~flywheel.world.loop.backend.WORLD_BACKEND` by name
when no project file names another stack (:mod:`flywheel.project`)."""
