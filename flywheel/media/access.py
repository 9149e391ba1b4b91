"""Where the server may read images from (the ``[images]`` table of the project file)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ImageAccessConfig(BaseModel):
    """What image URIs the server reads. Anything else is stored but never read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file_roots: list[Path] = Field(default_factory=list)
    """``file://`` URIs are read only under these directories (after resolving ``..`` and
    symlinks). ``$FLYWHEEL_HOME`` is always one (flywheel's own images live there)."""
    buckets: list[str] = Field(default_factory=list)
    """``s3://bucket[/prefix]`` and ``gs://bucket[/prefix]`` URIs read (with the cloud
    client libraries' own credentials)."""
    https_hosts: list[str] = Field(default_factory=list)
    """Host names whose ``https://`` URIs are read; never one that resolves to a private,
    loopback or link-local address."""
    max_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    """Largest image read."""
    timeout_s: float = Field(default=10.0, gt=0)
    """Longest a remote read may take, in all."""
