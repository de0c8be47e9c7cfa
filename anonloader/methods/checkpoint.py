"""The checkpoint folders of the networks anonloader trains itself (IDDiffuse, DiffDeID): a
JSON file with the format name, its version and the network's config, beside
``model.safetensors``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from anonloader.errors import ModelLoadError

__all__ = ["load_network_checkpoint"]


def load_network_checkpoint(
    path: str | Path,
    *,
    what: str,
    config_file: str,
    weights_file: str,
    format_name: str,
    version: int,
    build: Callable[[dict[str, Any]], nn.Module],
) -> tuple[nn.Module, str, dict[str, Any]]:
    """``(network, SHA-256 of the weights file, the config file's dict)`` of a checkpoint folder.

    Args:
        path: the folder.
        what: the method's name with its article ("an IDDiffuse"), for error messages.
        config_file, weights_file: file names inside the folder.
        format_name, version: what the config file must declare.
        build: ``f(meta["network"]) -> nn.Module`` with the layout the weights were saved from.

    Raises:
        ModelLoadError: a file is missing, the format or version differs, or the weights do not
            fit the config.
    """
    from safetensors.torch import load_file

    path = Path(path)
    config_path, weights_path = path / config_file, path / weights_file
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelLoadError(f"{path} is not {what} checkpoint: expected {config_file} and {weights_file}")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != format_name or meta.get("version") != version:
        raise ModelLoadError(f"{config_path} has format {meta.get('format')!r} v{meta.get('version')}; expected {format_name} v{version}")
    network = build(meta["network"])
    try:
        network.load_state_dict(load_file(str(weights_path)))
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in {weights_path} do not match the config in {config_path}: {exc}") from exc
    return network, hashlib.sha256(weights_path.read_bytes()).hexdigest(), meta
