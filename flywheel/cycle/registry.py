"""The model registry: which model serves, and which checkpoints make each version.

A model version is a set of component checkpoints (``checkpoints.component``): the
generator, the prompt enhancer and the reward model, each a local directory. The version
serving now is the one promoted last (``model_versions.promoted_at``). On a fresh database
the shipped world base is registered and promoted as ``world-base`` (:func:`current_model`
with ``register_base``), so the first cycle starts from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from flywheel.db.models import Checkpoint, Component, ModelVersion
from flywheel.signals import repository as signals
from retrieval.embedding import weights_digest
from training.io import local_path


class RegistryError(ValueError):
    """A version that cannot be registered or served."""


@dataclass(frozen=True, slots=True)
class ModelBundle:
    """One model version's components."""

    version_id: int
    name: str
    generator: Path
    enhancer: Path
    reward: Path

    def components(self) -> dict[Component, Path]:
        return {
            Component.GENERATOR: self.generator,
            Component.ENHANCER: self.enhancer,
            Component.REWARD: self.reward,
        }


def _digest(directory: Path) -> str | None:
    try:
        return weights_digest(directory)
    except ValueError:
        return None


def register_version(
    session: Session,
    *,
    name: str,
    components: Mapping[Component, Path],
    description: str | None = None,
    rounds: Mapping[Component, int] | None = None,
) -> int:
    """Record ``name`` with one checkpoint per component (each an existing directory; a
    component a training round produced names it in ``rounds``); returns its id. A name
    already registered with checkpoints is refused."""
    missing = [c.value for c in Component if c not in components]
    if missing:
        raise RegistryError(f"{name}: no {', '.join(missing)} directory")
    for component, directory in components.items():
        if not Path(directory).is_dir():
            raise RegistryError(f"{name}: the {component.value} directory {directory} is missing")
    version_id = signals.model_version_id(session, name=name)
    known = session.scalar(select(Checkpoint.id).where(Checkpoint.model_version_id == version_id))
    if known is not None:
        raise RegistryError(f"model version {name!r} is already registered")
    version = session.get(ModelVersion, version_id)
    assert version is not None
    version.description = description
    for component, directory in components.items():
        path = Path(directory).resolve()
        session.add(
            Checkpoint(
                model_version_id=version_id,
                training_round_id=(rounds or {}).get(component),
                component=component,
                uri=path.as_uri(),
                sha256=_digest(path),
                step=0,
            )
        )
    session.flush()
    return version_id


def promote(session: Session, *, version_id: int) -> None:
    """Make the version the one that serves (from now)."""
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise RegistryError(f"no model version {version_id}")
    version.promoted_at = datetime.now(UTC)
    session.flush()


def bundle(session: Session, *, version_id: int) -> ModelBundle:
    """The version's components."""
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise RegistryError(f"no model version {version_id}")
    rows = session.scalars(
        select(Checkpoint).where(Checkpoint.model_version_id == version_id).order_by(Checkpoint.id)
    ).all()
    paths = {row.component: local_path(row.uri) for row in rows}
    found = {c: p for c, p in paths.items() if p is not None}
    missing = [c.value for c in Component if c not in found]
    if missing:
        raise RegistryError(f"model version {version.name!r} has no local {', '.join(missing)}")
    return ModelBundle(
        version_id=version_id,
        name=version.name,
        generator=found[Component.GENERATOR],
        enhancer=found[Component.ENHANCER],
        reward=found[Component.REWARD],
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class ShippedModel:
    """A model a stack ships (the embedded world's base): registered and promoted on a
    registry that serves none."""

    name: str
    components: Mapping[Component, Path]
    description: str


def current_model(session: Session, *, shipped: ShippedModel | None = None) -> ModelBundle | None:
    """The version promoted last; on a registry with none, the ``shipped`` model registered
    and promoted (flushed, the caller commits), or None without one."""
    version_id = session.scalar(
        select(ModelVersion.id)
        .where(ModelVersion.promoted_at.is_not(None))
        .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc())
        .limit(1)
    )
    if version_id is not None:
        return bundle(session, version_id=version_id)
    if shipped is None:
        return None
    version_id = register_version(
        session,
        name=shipped.name,
        components=shipped.components,
        description=shipped.description,
    )
    promote(session, version_id=version_id)
    return bundle(session, version_id=version_id)
