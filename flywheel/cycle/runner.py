"""What ``flywheel cycle`` runs: the plan of a dry run, else the cycle flow."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flywheel.cycle.config import CycleConfig
from flywheel.db.engine import create_db_engine
from flywheel.settings import get_settings, prefect_environment

if TYPE_CHECKING:
    from flywheel.cycle.flow import CycleOutcome
    from flywheel.cycle.plan_types import CyclePlan


def run_cycle(config: CycleConfig, *, progress: bool = False) -> CycleOutcome | CyclePlan:
    """A dry run's plan from the project's backend (nothing written, no flow run, Prefect not
    even imported), else the outcome of :func:`~flywheel.cycle.flow.cycle_flow`."""
    settings = get_settings()
    if config.dry_run:
        from flywheel.adapters.base import AdapterContext
        from flywheel.cycle.backend import cycle_backend
        from flywheel.project import load_project

        project = load_project()
        context = AdapterContext(root=project.root, home=settings.home, device=config.device)
        backend = cycle_backend(project, context)
        engine = create_db_engine(settings, pool_size=2)
        try:
            return backend.plan(engine, config=config, home=settings.home)
        finally:
            engine.dispose()
    prefect_environment(settings)
    from flywheel.cycle.flow import cycle_flow

    return cycle_flow(config=config, progress=progress)
