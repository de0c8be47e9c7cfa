"""ArcFaceEmbedder on an ONNX model this test builds with ArcFace's signature
(input ``1,3,112,112`` normalised (x-127.5)/127.5, output ``1,512``): a fixed random projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from anonloader.errors import ModelLoadError  # noqa: E402
from anonloader.identity.embedders import ArcFaceEmbedder, load_embedder  # noqa: E402


def _export(path, weight: np.ndarray) -> None:
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input.1"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["683"])],
        "arcface_like",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_arcface_embedder_matches_the_model_and_normalises(tmp_path):
    weight = np.random.default_rng(0).standard_normal((3 * 112 * 112, 512)).astype(np.float32) / 100
    root = tmp_path / "buffalo_test"
    root.mkdir()
    _export(root / "w600k_test.onnx", weight)
    embedder = load_embedder("arcface", model_path=root)
    crops = torch.rand(3, 3, 112, 112)
    out = embedder(crops)
    expected = ((crops * 255 - 127.5) / 127.5).reshape(3, -1).numpy() @ weight
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert out.shape == (3, 512) and np.allclose(out.numpy(), expected, atol=1e-4)
    assert embedder(torch.nn.functional.interpolate(crops, size=224)).shape == (3, 512)
    assert embedder.config()["name"] == "arcface" and isinstance(embedder.threshold, float)
    with pytest.raises(ModelLoadError):
        ArcFaceEmbedder(tmp_path / "missing").onnx_file()
