"""Fixtures of the model tests."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import huggingface_hub.constants
import pytest


def _refuse_remote(address: Any) -> None:
    host = address[0] if isinstance(address, tuple) else address
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        if host == "localhost" or isinstance(address, str | bytes):  # a Unix socket path
            return
    raise OSError(f"network access to {host!r} during an offline test")


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """No Hugging Face hub, no network: loading must work from local files alone.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import, so the flag is patched
    where it lives; and any connection to a non-loopback address fails.
    """
    real_connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address: Any) -> None:
        _refuse_remote(address)
        real_connect(self, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(socket.socket, "connect", guarded_connect)
        yield
