"""Helpers shared by the cache tests (no tests here)."""

from __future__ import annotations

from pathlib import Path


def corrupt_value_on_disk(path: Path, value: bytes) -> None:
    """Flips one byte in the middle of ``value`` inside ``path/data.mdb``."""
    data = bytearray((path / "data.mdb").read_bytes())
    at = data.find(value)
    assert at >= 0, "value not found contiguously in data.mdb"
    data[at + len(value) // 2] ^= 0xFF
    (path / "data.mdb").write_bytes(bytes(data))
