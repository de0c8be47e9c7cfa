"""Shards and the manifest that makes several shards one cache.

A sharded cache is a folder::

    cache/
      manifest.json                 fingerprint, counts, key ranges, checksums of every shard
      shard-00000-of-00002/         one LMDB per rank / machine (data.mdb)
      shard-00001-of-00002/

Each shard's summary has its entry and sample counts, its smallest and largest key (hex),
its smallest and largest sample index, its failures (index, source path, reason), and a
content checksum: the xxh3-128 over every key and every stored value's tag in key order, so
``anonloader cache verify`` can tell a shard that changed since the manifest was written.
The manifest lists every failed sample of every shard under ``failures``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from anonloader.errors import CacheError, CacheFingerprintError

__all__ = [
    "MANIFEST_NAME",
    "combine_summaries",
    "read_manifest",
    "resolve_cache_path",
    "shard_name",
    "write_manifest",
    "write_json_atomically",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 2


def shard_name(rank: int, world_size: int) -> str:
    """Folder name of rank ``rank``'s shard out of ``world_size``."""
    return f"shard-{rank:05d}-of-{world_size:05d}"


def write_json_atomically(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Writes ``data`` as JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest at ``path`` (the JSON file, or the folder holding ``manifest.json``).

    Raises:
        CacheError: the file is missing, unreadable or not an anonloader manifest.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise CacheError(f"no cache manifest at {path}; run anonloader precompute, or pass the shard folder") from error
    except (OSError, ValueError) as error:
        raise CacheError(f"cannot read the cache manifest {path} ({error}); rewrite it with anonloader cache merge") from error
    if not isinstance(manifest, dict) or manifest.get("kind") != "anonloader-cache-manifest":
        raise CacheError(f"{path} is not an anonloader cache manifest")
    return manifest


def resolve_cache_path(path: str | os.PathLike[str]) -> tuple[Path, list[Path], dict[str, Any] | None]:
    """Where a cache's LMDB shards are.

    Returns ``(root, shard_paths, manifest)``: a manifest file or a folder with
    ``manifest.json`` gives its shards; a folder with ``data.mdb`` is one shard.

    Raises:
        CacheError: nothing at ``path`` is an anonloader cache.
    """
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".json":
        manifest = read_manifest(path)
        root = path.parent
    elif path.is_dir() and (path / MANIFEST_NAME).is_file():
        manifest = read_manifest(path)
        root = path
    elif path.is_dir() and (path / "data.mdb").is_file():
        return path, [path], None
    elif not path.exists():
        raise CacheError(f"no anonloader cache at {path}: the path does not exist; run anonloader precompute first")
    else:
        raise CacheError(
            f"{path} is not an anonloader cache (no data.mdb and no {MANIFEST_NAME}); "
            "pass the folder anonloader precompute wrote"
        )
    shards = [root / shard["path"] for shard in manifest["shards"]]
    missing = [str(p) for p in shards if not (p / "data.mdb").is_file()]
    if missing:
        raise CacheError(f"the manifest {root / MANIFEST_NAME} names shards that are missing: {', '.join(missing)}")
    return root, shards, manifest


def combine_summaries(summaries: list[dict[str, Any]], root: str | os.PathLike[str]) -> dict[str, Any]:
    """One manifest from per-shard summaries (see ``AnonCache.summary``); shard paths made relative.

    Raises:
        CacheFingerprintError: the shards were written by pipelines with different fingerprints.
    """
    root = Path(root)
    fingerprints = {s["fingerprint"] for s in summaries}
    if len(fingerprints) > 1:
        raise CacheFingerprintError(
            f"shards under {root} were written by {len(fingerprints)} different pipelines; "
            "precompute them again with one configuration"
        )
    salt_checks = {s["salt_check"] for s in summaries}
    if len(salt_checks) > 1:
        raise CacheFingerprintError(f"shards under {root} were written with different secrets")
    shards = []
    for summary in sorted(summaries, key=lambda s: str(s["path"])):
        entry = dict(summary)
        entry["path"] = os.path.relpath(Path(summary["path"]), root)
        for field in ("fingerprint", "salt_check", "anonloader_version", "method", "source_size", "codec", "keyed", "failures"):
            entry.pop(field, None)
        entry["failed_samples"] = len(summary.get("failures", []))
        shards.append(entry)
    first = summaries[0] if summaries else {}
    source_sizes = {s.get("source_size") for s in summaries} - {None}
    return {
        "kind": "anonloader-cache-manifest",
        "format": MANIFEST_FORMAT,
        "fingerprint": first.get("fingerprint"),
        "salt_check": first.get("salt_check"),
        "anonloader_version": first.get("anonloader_version"),
        "method": first.get("method"),
        "codec": first.get("codec"),
        "source_size": max(source_sizes) if source_sizes else None,
        "keyed": bool(first.get("keyed", False)),
        "entries": sum(s["entries"] for s in summaries),
        "samples": sum(s["samples"] for s in summaries),
        "failures": sorted((f for s in summaries for f in s.get("failures", [])), key=lambda f: f["index"]),
        "shards": shards,
    }


def write_manifest(
    root: str | os.PathLike[str], shard_paths: list[str | os.PathLike[str]] | None = None, *, secret: Any = None
) -> Path:
    """Summarizes every shard under ``root`` (or ``shard_paths``) into ``root/manifest.json``
    (``secret``: the secret or :class:`~anonloader.cache.keys.CacheKeys` of keyed shards)."""
    from anonloader.cache.store import AnonCache

    root = Path(root)
    if shard_paths is None:
        shard_paths = sorted(p for p in root.glob("shard-*") if (p / "data.mdb").is_file())
    if not shard_paths:
        raise CacheError(f"no shards under {root} to write a manifest for")
    summaries = []
    for shard in shard_paths:
        cache = AnonCache(shard, secret=secret)
        try:
            summaries.append(cache.summary())
        finally:
            cache.close()
    return write_json_atomically(root / MANIFEST_NAME, combine_summaries(summaries, root))
