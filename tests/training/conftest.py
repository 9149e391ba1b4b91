"""Fixtures shared by the training tests."""

from __future__ import annotations

from collections.abc import Iterator

import huggingface_hub.constants
import pytest


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """No hub: the MiniLM must load from the package's local files."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield
