"""Fixtures of the model tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """No Hugging Face hub: loading must work from local files alone."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield
