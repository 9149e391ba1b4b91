"""The project file: which adapter fills each port, and with what settings.

``flywheel.toml`` in the working directory (or the file ``--project FILE`` /
``FLYWHEEL_PROJECT`` names) has one table per port (:data:`flywheel.ports.PORTS`), each
naming its ``adapter`` and that adapter's settings, plus ``[project]`` (its name),
``[images]`` (where the server may read images from) and ``[filters]`` (the thresholds of
the filter chain augmentation passes). No project file means the embedded
world: every port filled by the world's adapter.

Adapters are found by name in :data:`ADAPTERS` and imported only when a part is built, so
loading a team's project never imports the world (and the world's never imports a team's
libraries).
"""

from __future__ import annotations

import importlib
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.adapters.base import Adapter, AdapterContext
from flywheel.media.access import ImageAccessConfig
from flywheel.media.filters import FilterThresholds
from flywheel.ports import OPTIONAL_PORTS, PORTS, PortName

PROJECT_FILE = "flywheel.toml"
PROJECT_ENV = "FLYWHEEL_PROJECT"
WORLD = "world"

ADAPTERS: dict[PortName, dict[str, str]] = {
    "generator": {
        WORLD: "flywheel.world.adapters:GENERATOR",
        "flywheel": "flywheel.adapters.native:GENERATOR",
        "diffusers": "flywheel.adapters.diffusers_generator:GENERATOR",
    },
    "judge": {
        WORLD: "flywheel.world.adapters:JUDGE",
        "http": "flywheel.adapters.http_judge:JUDGE",
        "vlm": "flywheel.adapters.vlm_judge:JUDGE",
    },
    "suites": {
        WORLD: "flywheel.world.adapters:SUITES",
        "jsonl": "flywheel.adapters.datasets:SUITES",
    },
    "reward": {
        WORLD: "flywheel.world.adapters:REWARD",
        "open_clip": "flywheel.adapters.native:REWARD",
    },
    "enhancer": {
        WORLD: "flywheel.world.adapters:ENHANCER",
        "causal_lm": "flywheel.adapters.native:ENHANCER",
    },
    "corpus": {
        WORLD: "flywheel.world.adapters:CORPUS",
        "directory": "flywheel.adapters.datasets:DIRECTORY",
        "parquet": "flywheel.adapters.datasets:PARQUET",
        "hf_datasets": "flywheel.adapters.datasets:HF_DATASETS",
    },
    "degrader": {
        WORLD: "flywheel.world.adapters:DEGRADER",
        "rules": "flywheel.adapters.degrader:RULES",
    },
    "synthesizer": {
        WORLD: "flywheel.world.adapters:SYNTHESIZER",
    },
    "launcher": {
        "in_process": "flywheel.adapters.launchers:IN_PROCESS",
        "command": "flywheel.adapters.launchers:COMMAND",
        "prefect": "flywheel.adapters.launchers:PREFECT",
    },
}
"""Port -> adapter name -> ``module:attribute`` of its :class:`Adapter` (imported lazily)."""

WORLD_LAUNCHER = "in_process"
"""The embedded world's rounds train in this process."""


class ProjectError(ValueError):
    """A project file that cannot be read or names what does not exist (one line)."""


class PartSection(BaseModel):
    """One port's table: the adapter's name and its settings (checked by the adapter)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    adapter: str = Field(min_length=1)

    def settings(self) -> dict[str, Any]:
        """Every key of the table but ``adapter``."""
        return dict(self.model_extra or {})


class ProjectMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="flywheel", min_length=1)
    """Shown by the CLI and the dashboard; the default model name prefix."""


class Project(BaseModel):
    """A parsed project file (or the embedded world's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project: ProjectMeta = Field(default_factory=ProjectMeta)
    images: ImageAccessConfig = Field(default_factory=ImageAccessConfig)
    filters: FilterThresholds = Field(default_factory=FilterThresholds)
    """Thresholds of the filter chain retrieved and synthesized samples pass."""
    generator: PartSection
    judge: PartSection
    suites: PartSection
    reward: PartSection
    enhancer: PartSection
    corpus: PartSection
    degrader: PartSection
    synthesizer: PartSection | None = None
    launcher: PartSection

    path: Path | None = None
    """The file it was read from (None: the embedded world, no file)."""

    @property
    def root(self) -> Path:
        """The directory relative paths are resolved against."""
        return self.path.parent if self.path is not None else Path.cwd()

    @property
    def is_world(self) -> bool:
        """Every part is the world's (the embedded default)."""
        return all(
            (s := self.section(p)) is None or s.adapter in (WORLD, WORLD_LAUNCHER) for p in PORTS
        )

    def section(self, port: PortName) -> PartSection | None:
        section: PartSection | None = getattr(self, port)
        return section


def world_project() -> Project:
    """The embedded default: every port filled by the world."""
    world = PartSection(adapter=WORLD)
    return Project(
        generator=world,
        judge=world,
        suites=world,
        reward=world,
        enhancer=world,
        corpus=world,
        degrader=world,
        synthesizer=world,
        launcher=PartSection(adapter=WORLD_LAUNCHER),
    )


def find_project(explicit: Path | None = None, *, cwd: Path | None = None) -> Path | None:
    """The project file to use: ``explicit``, else ``$FLYWHEEL_PROJECT``, else
    ``flywheel.toml`` in ``cwd``; None: the embedded world. A file named explicitly or by the
    environment must exist."""
    named = explicit or (Path(os.environ[PROJECT_ENV]) if os.environ.get(PROJECT_ENV) else None)
    if named is not None:
        if not named.is_file():
            raise ProjectError(f"{named}: no such project file")
        return named
    default = (cwd or Path.cwd()) / PROJECT_FILE
    return default if default.is_file() else None


def _problems(error: ValidationError) -> str:
    parts = []
    for problem in error.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(file)"
        parts.append(f"{where}: {problem['msg']}")
    return "; ".join(parts)


def read_project(path: Path) -> Project:
    """Parse and check ``path`` (sections and adapter names; settings are checked when a
    part is built)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProjectError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProjectError(f"{path}: not TOML ({exc})") from None
    unknown = sorted(set(data) - {"project", "images", "filters", *PORTS})
    if unknown:
        raise ProjectError(f"{path}: unknown table(s) {', '.join(unknown)}")
    missing = [p for p in PORTS if p not in data and p not in OPTIONAL_PORTS]
    if missing:
        raise ProjectError(f"{path}: no [{'], ['.join(missing)}] table")
    try:
        project = Project.model_validate({**data, "path": path.resolve()})
    except ValidationError as exc:
        raise ProjectError(f"{path}: {_problems(exc)}") from None
    for port in PORTS:
        section = project.section(port)
        if section is not None and section.adapter not in ADAPTERS[port]:
            known = ", ".join(sorted(ADAPTERS[port]))
            raise ProjectError(
                f"{path}: [{port}] adapter {section.adapter!r} is unknown (known: {known})"
            )
    return project


def load_project(explicit: Path | None = None) -> Project:
    """The project in force (:func:`find_project`), or the embedded world's."""
    path = find_project(explicit)
    return read_project(path) if path is not None else world_project()


def adapter_for(port: PortName, name: str) -> Adapter[Any]:
    """The adapter ``name`` of ``port`` (imported now)."""
    try:
        target = ADAPTERS[port][name]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS[port]))
        raise ProjectError(f"[{port}] adapter {name!r} is unknown (known: {known})") from None
    module, attribute = target.split(":")
    adapter: Adapter[Any] = getattr(importlib.import_module(module), attribute)
    return adapter


@dataclass(frozen=True, kw_only=True, slots=True)
class BuiltPart:
    """A part built from its section."""

    port: PortName
    adapter: str
    part: Any


def build_part(project: Project, port: PortName, context: AdapterContext) -> BuiltPart | None:
    """Build ``port``'s part (None: an optional port the project leaves out);
    :class:`ProjectError` when its settings are wrong."""
    section = project.section(port)
    if section is None:
        return None
    adapter = adapter_for(port, section.adapter)
    try:
        settings = adapter.settings.model_validate(section.settings())
    except ValidationError as exc:
        raise ProjectError(f"[{port}] {section.adapter}: {_problems(exc)}") from None
    return BuiltPart(port=port, adapter=section.adapter, part=adapter.build(settings, context))
