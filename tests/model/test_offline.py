"""The ``offline`` fixture really keeps model loading off the network."""

from __future__ import annotations

import socket

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError


def test_offline_fixture_blocks_the_hub_and_the_network(offline: None) -> None:
    with pytest.raises(LocalEntryNotFoundError):
        huggingface_hub.hf_hub_download("sentence-transformers/all-MiniLM-L6-v2", "config.json")
    with pytest.raises(OSError, match="network access"):
        socket.create_connection(("93.184.215.14", 443), timeout=1)
    with socket.create_server(("127.0.0.1", 0)) as server:  # loopback stays usable
        socket.create_connection(server.getsockname(), timeout=1).close()
