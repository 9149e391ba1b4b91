"""docker-compose.yml, the Dockerfile and .env.example, checked without a Docker engine:
Debian's ``docker-compose config`` (1.29) parses and validates the file, interpolates
``.env.example``, and the resolved services are checked for what production needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from flywheel.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SERVICES = {"postgres", "qdrant", "redis", "prefect-server", "api", "worker", "prefect-worker"}


def _config(env_file: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is missing: apt-get install docker-compose (make test does)")
    return subprocess.run(
        [binary, "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    result = _config(ROOT / ".env.example")
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_the_services_and_how_they_start(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == SERVICES | {"dashboard", "prefect-worker-gpu"}
    for name in ("postgres", "qdrant", "redis", "prefect-server", "api"):
        assert services[name]["healthcheck"]["test"], name
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    # The api migrates on start (`flywheel serve` upgrades to head unless --no-migrate) and
    # waits for its three stores; everything of ours waits for a healthy (migrated) api.
    api = services["api"]
    assert api["command"][:2] == ["flywheel", "serve"]
    assert "--no-migrate" not in api["command"]
    assert {k: v["condition"] for k, v in api["depends_on"].items()} == dict.fromkeys(
        ("postgres", "qdrant", "redis"), "service_healthy"
    )
    for name in ("worker", "prefect-worker", "prefect-worker-gpu", "dashboard"):
        assert services[name]["depends_on"]["api"]["condition"] == "service_healthy", name
    assert services["worker"]["command"][:2] == ["flywheel", "worker"]
    assert services["prefect-worker"]["command"][:3] == ["prefect", "worker", "start"]
    assert services["dashboard"]["command"][:2] == ["flywheel", "dashboard"]
    # Data lives in named volumes.
    assert services["postgres"]["volumes"][0].startswith("pgdata:/var/lib/postgresql/data")
    assert services["qdrant"]["volumes"][0].startswith("qdrant:/qdrant/storage")
    assert {"pgdata", "qdrant", "redis", "prefect", "flywheel-home"} <= set(resolved["volumes"])
    # Our services reach the stores by service name.
    env = api["environment"]
    assert env["FLYWHEEL_DATABASE_URL"].startswith("postgresql://flywheel:")
    assert env["FLYWHEEL_DATABASE_URL"].endswith("@postgres:5432/flywheel")
    assert env["FLYWHEEL_QDRANT_URL"] == "http://qdrant:6333"
    assert env["FLYWHEEL_REDIS_URL"] == "redis://redis:6379/0"
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    # The rate limit the api processes share through Redis is a valid one.
    assert Settings(rate_limit=env["FLYWHEEL_RATE_LIMIT"]).rate_limit == "100/second;3000/minute"


def test_the_gpu_profile_reserves_the_gpus(resolved: dict[str, Any]) -> None:
    gpu = resolved["services"]["prefect-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["VARIANT"].startswith("cu")
    for name in SERVICES - {"prefect-worker-gpu"}:
        assert "profiles" not in resolved["services"][name], name
    assert resolved["services"]["api"]["build"]["args"]["VARIANT"] == "cpu"


def test_no_secret_is_baked_in_and_missing_ones_are_refused(tmp_path: Path) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith(("ENV", "ARG")) or line.startswith("    "):
            assert not any(w in line.upper() for w in ("PASSWORD", "SECRET", "API_KEY")), line
    assert "ARG VARIANT=cpu" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored
    assert "!.env.example" in ignored
    # Without the secrets, compose refuses to resolve the file and says which is missing.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = _config(empty)
    assert refused.returncode != 0
    assert "set POSTGRES_USER in .env" in refused.stderr or "POSTGRES" in refused.stderr
