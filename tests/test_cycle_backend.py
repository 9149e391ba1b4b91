"""The cycle's backends and configuration: the world's backend is found by name, the
config is nested per track and still reads what earlier versions stored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from flywheel.adapters.base import AdapterContext
from flywheel.cycle.backend import WORLD_BACKEND, CycleBackend, cycle_backend
from flywheel.cycle.config import CycleConfig
from flywheel.db.models import Component
from flywheel.project import world_project


def test_a_config_stored_with_the_flat_fields_reads_into_its_sections() -> None:
    stored = {
        "min_cases": 3,
        "pe_steps": 40,
        "pe_pairs_per_concept": 10,
        "gap_steps": 50,
        "gap_vae_steps": 0,
        "gap_replay": 20,
        "gap_batch_size": 2,
        "rl_steps": 2,
        "rl_group_size": 4,
        "regression_seeds": 3,
        "regression_cases": 1,
        "regression_tolerance": 0.1,
        "corpus": 100,
        "pool": 200,
        "labeled_per_track": 5,
    }
    config = CycleConfig.model_validate(stored)
    assert config.min_cases == 3
    assert (config.prompt_enhancer.steps, config.prompt_enhancer.pairs_per_concept) == (40, 10)
    gap = config.pretraining_gap
    assert (gap.steps, gap.vae_steps, gap.replay, gap.batch_size) == (50, 0, 20, 2)
    assert (config.rl.steps, config.rl.group_size, config.rl.prompts_per_step) == (2, 4, 4)
    assert config.regression.model_dump() == {"seeds": 3, "cases": 1, "tolerance": 0.1}
    assert config.world.model_dump() == {"corpus": 100, "pool": 200, "labeled_per_track": 5}
    # What is stored now is nested, and reads back the same.
    assert CycleConfig.model_validate(config.model_dump(mode="json")) == config


def test_a_nested_config_refuses_unknown_and_out_of_range_fields_naming_them() -> None:
    with pytest.raises(ValidationError) as error:
        CycleConfig.model_validate({"pretraining_gap": {"steps": 0}})
    assert error.value.errors()[0]["loc"] == ("pretraining_gap", "steps")
    with pytest.raises(ValidationError) as error:
        CycleConfig.model_validate({"rl": {"stepz": 3}})
    assert error.value.errors()[0]["loc"] == ("rl", "stepz")
    with pytest.raises(ValidationError):
        CycleConfig.model_validate({"gap_steps": -1})  # a flat field is checked as its section's


def test_the_world_project_runs_on_the_worlds_backend_found_by_name(tmp_path: Path) -> None:
    project = world_project()
    backend = cycle_backend(project, AdapterContext(root=tmp_path, home=tmp_path / "home"))
    assert isinstance(backend, CycleBackend)
    assert type(backend).__module__ + ":" + type(backend).__name__ == WORLD_BACKEND
    assert backend.name == "world"
    shipped = backend.shipped_model()
    assert shipped is not None
    assert shipped.name == "world-base"
    assert set(shipped.components) == set(Component)
    assert all(path.is_dir() for path in shipped.components.values())


def test_importing_the_whole_loop_never_imports_the_world() -> None:
    """Every module of the loop (all of flywheel but the world, the CLI and the demo, which
    are the composition roots) imports in a process where importing the world raises."""
    script = """
import importlib, pkgutil, sys
class Forbid:
    def find_spec(self, name, path=None, target=None):
        if name == "flywheel.world" or name.startswith("flywheel.world."):
            raise ImportError("the loop imported " + name)
        return None
sys.meta_path.insert(0, Forbid())
import flywheel
roots = ("flywheel.world", "flywheel.cli", "flywheel.demo")
names = [m.name for m in pkgutil.walk_packages(flywheel.__path__, "flywheel.")]
loop = [n for n in names if not n.startswith(roots)]
for name in loop:
    importlib.import_module(name)
print(len(loop))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) > 60
