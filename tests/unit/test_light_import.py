"""``import anonloader`` stays light: no model code, no triton / lmdb / diffusers / lightning."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("triton", "lmdb", "diffusers", "transformers", "lightning", "pytorch_lightning", "ray", "datasets", "insightface", "onnxruntime", "dlib", "kornia")


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return {name.split(".")[0] for name in json.loads(out)}


def test_import_anonloader_loads_no_heavy_dependency():
    loaded = _modules_after("import anonloader")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_public_names_resolve_lazily_without_heavy_dependencies():
    loaded = _modules_after("import anonloader; anonloader.Anonymizer; anonloader.anonymize; anonloader.errors.AnonloaderError")
    assert not loaded & {"triton", "lmdb", "diffusers", "transformers", "lightning", "ray", "datasets"}


def test_public_surface():
    import anonloader

    for name in anonloader.__all__:
        assert getattr(anonloader, name) is not None
