"""Every network fetch in library code sits behind ``allow_download=True``.

Two checks: a static scan (every call of a known fetch function carries a ``# network-ok:``
marker saying why it cannot fetch unasked), and the loaders themselves, run with every socket
connection refused, must raise :class:`ModelLoadError` without having tried the network.
"""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest

from anonloader.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = [ROOT / "anonloader", ROOT / "integrations", ROOT / "kernels"]
#: functions that reach the network when what they fetch is missing
FETCHERS = {
    "snapshot_download", "hf_hub_download", "urlopen", "urlretrieve", "download_onnx", "ensure_available",
    "load_state_dict_from_url", "download_url_to_file", "download_url", "get_model", "FaceAnalysis",
}
MARKER = "network-ok:"


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        base = func.value
        prefix = f"{base.id}." if isinstance(base, ast.Name) else ""
        return prefix + func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _fetches(node: ast.Call) -> bool:
    name = _call_name(node)
    if name.split(".")[-1] in FETCHERS or name in ("requests.get", "requests.post", "hub.load", "torch.hub.load"):
        return True
    if name.endswith("InceptionResnetV1"):  # facenet-pytorch downloads when pretrained is not None
        pretrained = next((k.value for k in node.keywords if k.arg == "pretrained"), None)
        return not (isinstance(pretrained, ast.Constant) and pretrained.value is None)
    return False


def _unmarked_fetches(folders: list[Path]) -> list[str]:
    found = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            lines = source.splitlines()
            for node in ast.walk(ast.parse(source, filename=str(path))):
                if isinstance(node, ast.Call) and _fetches(node):
                    span = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
                    if not any(MARKER in line for line in span):
                        found.append(f"{path.relative_to(folder.parent)}:{node.lineno}: {_call_name(node)}")
    return found


def test_every_fetch_in_library_code_is_marked_as_gated():
    unmarked = _unmarked_fetches(LIBRARY)
    assert not unmarked, (
        "network fetches without a '# network-ok: <why it only runs with allow_download>' marker:\n" + "\n".join(unmarked)
    )


def test_the_scan_sees_an_unmarked_fetch(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text(
        "from huggingface_hub import snapshot_download\n"
        "from facenet_pytorch import InceptionResnetV1\n\n"
        "def f():\n    InceptionResnetV1(pretrained=None)\n    return snapshot_download('x/y')\n\n"
        "def g(allow_download):\n    return snapshot_download('x/y', local_files_only=not allow_download)  # network-ok: gated\n"
    )
    assert _unmarked_fetches([package]) == ["pkg/m.py:6: snapshot_download"]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Every socket connection refused and recorded; empty model caches."""
    attempts: list[object] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return attempts


def test_facenet_recognizer_refuses_to_download(offline):
    pytest.importorskip("facenet_pytorch")
    from anonloader.methods.iddiffuse.recognizers import build_recognizer

    with pytest.raises(ModelLoadError, match="allow_download"):
        build_recognizer({"kind": "facenet", "pretrained": "vggface2"})
    assert offline == []


def test_scrfd_refuses_to_download(offline, tmp_path):
    pytest.importorskip("onnxruntime")
    from anonloader.detect.scrfd import SCRFDDetector

    with pytest.raises(ModelLoadError, match="allow_download"):
        SCRFDDetector(model_root=tmp_path / "insightface")
    assert offline == []


def test_fams_hub_id_refuses_to_download(offline):
    pytest.importorskip("diffusers")
    from anonloader.methods.fams.model import FAMS

    with pytest.raises(ModelLoadError, match="allow_download"):
        FAMS.from_pretrained("hkung/face-anon-simple").load()
    assert offline == []
