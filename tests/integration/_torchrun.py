"""Shared by the tests that start ``torchrun``."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (for ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
