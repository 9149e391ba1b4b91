"""The cycle in production: a Prefect deployment on a process work pool, started by an
automation when enough cases are routed to a track (and, optionally, on a schedule).

``flywheel deploy`` registers three things with the Prefect API (``PREFECT_API_URL``):

- a **work pool** (``process`` type) whose workers (``prefect worker start --pool flywheel``)
  run the training rounds — on GPU hosts in production;
- the **deployment** ``flywheel-cycle/<name>`` of :func:`~flywheel.cycle.flow.cycle_flow`
  (module entry point: the workers run the installed package), with the cycle's
  configuration as its parameters and a concurrency limit of one (the cycle lock keeps
  that true across pools too);
- its **trigger**: an automation that runs the deployment when ``min_cases`` cases were
  routed to one track within ``within`` — counted from the ``flywheel.case.routed`` events
  that :func:`emit_routed` sends (one per routed case, its resource the track) whenever
  attribution runs outside a cycle (``flywheel attribution run``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, cast
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.events import emit_event
from prefect.events.schemas.automations import Posture
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.types.entrypoint import EntrypointType

from flywheel.cycle.config import CycleConfig
from flywheel.cycle.flow import cycle_flow

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

ROUTED_EVENT = "flywheel.case.routed"
"""Event sent per case routed outside a cycle; its resource is ``flywheel.track.<track>``."""
TRACK_RESOURCE = "flywheel.track."


@dataclass(kw_only=True, slots=True)
class DeployConfig:
    """Where and when the production cycle runs."""

    work_pool: str = "flywheel"
    """The process work pool whose workers run cycles."""
    name: str = "production"
    """Deployment name (``flywheel-cycle/<name>``)."""
    min_cases: int = 20
    """Routed cases on one track (within ``within``) that start a cycle."""
    within: timedelta = field(default_factory=lambda: timedelta(hours=24))
    """The window those cases are counted in."""
    cron: str | None = None
    """Also run on this schedule (e.g. ``0 2 * * *``); None: only the trigger."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if not self.work_pool.strip() or not self.name.strip():
            raise ValueError("DeployConfig: work_pool and name must not be empty")
        if self.min_cases < 1:
            raise ValueError(f"DeployConfig.min_cases must be >= 1, got {self.min_cases}")
        if self.within <= timedelta(0):
            raise ValueError("DeployConfig.within must be positive")


@dataclass(frozen=True, slots=True)
class Deployed:
    """What :func:`deploy_cycle` registered."""

    work_pool: str
    deployment_id: UUID
    deployment: str
    """``flywheel-cycle/<name>``."""


def api_configured() -> bool:
    """Whether a Prefect API is set (production), rather than an ephemeral one."""
    return bool(PREFECT_API_URL.value())


def deploy_cycle(config: DeployConfig, cycle: CycleConfig) -> Deployed:
    """Create the work pool if missing and create or update the deployment and its trigger."""
    config.validate()
    if cycle.dry_run or cycle.auto_approve:
        raise ValueError("a deployed cycle neither plans only nor approves its own review")
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(config.work_pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=config.work_pool, type="process"))
    trigger = DeploymentEventTrigger(
        name=f"{config.min_cases} cases routed to a track",
        expect={ROUTED_EVENT},
        match={"prefect.resource.id": f"{TRACK_RESOURCE}*"},
        for_each={"prefect.resource.id"},
        posture=Posture.Reactive,
        threshold=config.min_cases,
        within=config.within,
    )
    # Called outside an event loop, Prefect's dual sync / async methods run synchronously.
    deployment = cycle_flow.to_deployment(
        name=config.name,
        work_pool_name=config.work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        parameters={"config": cycle.model_dump(mode="json")},
        triggers=[trigger],
        cron=config.cron,
        concurrency_limit=1,
        description="One flywheel cycle: signals to the final review (flywheel.cycle.flow).",
        tags=["flywheel"],
    )
    deployment_id = cast("UUID", cast("RunnerDeployment", deployment).apply())
    return Deployed(
        work_pool=config.work_pool,
        deployment_id=deployment_id,
        deployment=f"{cycle_flow.name}/{config.name}",
    )


def emit_routed(routed: dict[str, int]) -> int:
    """Send one ``flywheel.case.routed`` event per routed case (only to a configured Prefect
    API); how many were sent."""
    if not api_configured():
        return 0
    sent = 0
    for track, count in routed.items():
        for _ in range(count):
            event = emit_event(
                event=ROUTED_EVENT,
                resource={
                    "prefect.resource.id": f"{TRACK_RESOURCE}{track}",
                    "prefect.resource.name": track,
                },
            )
            sent += event is not None
    return sent
