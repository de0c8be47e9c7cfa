"""SCRFD loader and decoding, run for real on small ONNX models these tests export themselves.

The exported graphs have SCRFD's exact signature (input ``1,3,H,W``; 9 outputs: scores
``N_s,1``, bbox ``N_s,4``, kps ``N_s,10`` for strides 8, 16, 32 in insightface's order) and
outputs that place known faces at known anchors, so every decoded number is computed by hand
below from the anchor layout (centre ``(x * s, y * s)``, 2 anchors per location).
"""

from __future__ import annotations

import pickle
import socket

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from anonloader.detect import Detector, SCRFDDetector, load_detector
from anonloader.detect.scrfd import decode_scrfd_outputs, find_scrfd_model, preprocess_for_scrfd
from anonloader.errors import ConfigError, DetectionError, ModelLoadError, UnsupportedImageError
from anonloader.fingerprint import fingerprint_of, hash_file

DET = 160  # network input side of the test models
STRIDES = (8, 16, 32)
ANCHORS = 2


def anchor_index(stride: int, row: int, col: int, anchor: int, side: int = DET) -> int:
    return (row * (side // stride) + col) * ANCHORS + anchor


# (stride, row, col, anchor, score, distances l,t,r,b in strides, kps offsets in strides)
FACE_A = (16, 3, 5, 1, 0.9, (1.5, 2.0, 1.5, 2.5),
          ((-0.75, -0.5), (0.75, -0.5), (0.0, 0.25), (-0.5, 1.25), (0.5, 1.25)))
# the same face seen again at stride 8 with a lower score: NMS must remove it
FACE_A_DUPLICATE = (8, 6, 10, 0, 0.8, (3.0, 4.0, 3.25, 5.0),
                    ((-1.5, -1.0), (1.5, -1.0), (0.0, 0.5), (-1.0, 2.5), (1.0, 2.5)))
FACE_B = (32, 3, 4, 1, 0.7, (0.5, 0.5, 0.5, 0.5),
          ((-0.2, -0.1), (0.2, -0.1), (0.0, 0.05), (-0.15, 0.3), (0.15, 0.3)))
FACE_LOW = (32, 1, 1, 0, 0.3, (0.25, 0.25, 0.25, 0.25), ((0.0, 0.0),) * 5)
FACES = (FACE_A, FACE_A_DUPLICATE, FACE_B, FACE_LOW)

# by hand, in network-input pixels (160x160): face A centre (5*16, 3*16) = (80, 48)
FACE_A_BOX_INPUT = (80 - 24, 48 - 32, 80 + 24, 48 + 40)
FACE_A_KPS_INPUT = ((68, 40), (92, 40), (80, 52), (72, 68), (88, 68))
# face B centre (4*32, 3*32) = (128, 96)
FACE_B_BOX_INPUT = (112, 80, 144, 112)
FACE_B_KPS_INPUT = ((121.6, 92.8), (134.4, 92.8), (128, 97.6), (123.2, 105.6), (132.8, 105.6))


def scrfd_outputs(faces=FACES, side: int = DET) -> list[np.ndarray]:
    """The 9 output arrays of an SCRFD graph on a ``side x side`` input with ``faces`` planted."""
    scores, boxes, kps = [], [], []
    for stride in STRIDES:
        rows = (side // stride) ** 2 * ANCHORS
        scores.append(np.zeros((rows, 1), np.float32))
        boxes.append(np.full((rows, 4), 0.5, np.float32))
        kps.append(np.zeros((rows, 10), np.float32))
    for stride, row, col, anchor, score, distances, points in faces:
        level = STRIDES.index(stride)
        k = anchor_index(stride, row, col, anchor, side)
        scores[level][k, 0] = score
        boxes[level][k] = distances
        kps[level][k] = np.asarray(points, np.float32).reshape(10)
    return scores + boxes + kps


def export_scrfd_like(path, *, faces=FACES, side: int = DET, fixed_input: bool = False) -> str:
    """Write an ONNX graph with SCRFD's signature whose outputs plant ``faces``.

    Each output is its constant plus ``0 * mean(input)``, so the graph consumes its input like
    the real model and onnxruntime checks the input's rank and dtype.
    """
    outputs = scrfd_outputs(faces, side)
    dims = [1, 3, side, side] if fixed_input else [1, 3, "height", "width"]
    graph_input = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, dims)
    nodes = [
        helper.make_node("ReduceMean", ["input.1"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
    ]
    initializers = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    graph_outputs = []
    for i, array in enumerate(outputs):
        name = str(448 + i)  # insightface's graphs have numeric output names too
        initializers.append(numpy_helper.from_array(array, f"planted_{i}"))
        nodes.append(helper.make_node("Add", [f"planted_{i}", "nothing"], [name]))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(array.shape)))
    graph = helper.make_graph(nodes, "scrfd_like", [graph_input], graph_outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    return export_scrfd_like(tmp_path_factory.mktemp("scrfd") / "det_test.onnx")


def test_decode_outputs_by_hand():
    scores, boxes, landmarks = decode_scrfd_outputs(scrfd_outputs(), DET, DET)
    total = sum((DET // s) ** 2 * ANCHORS for s in STRIDES)
    assert scores.shape == (total,) and boxes.shape == (total, 4) and landmarks.shape == (total, 5, 2)
    a = (DET // 8) ** 2 * ANCHORS + anchor_index(16, 3, 5, 1)
    assert scores[a] == pytest.approx(0.9)
    torch.testing.assert_close(boxes[a], torch.tensor(FACE_A_BOX_INPUT, dtype=torch.float32))
    torch.testing.assert_close(landmarks[a], torch.tensor(FACE_A_KPS_INPUT, dtype=torch.float32))
    # an anchor with no face still decodes around its own centre: stride 8, row 2, col 7 -> (56, 16)
    k = anchor_index(8, 2, 7, 1)
    torch.testing.assert_close(boxes[k], torch.tensor([52.0, 12.0, 60.0, 20.0]))


def test_decode_accepts_batched_outputs():
    plain = decode_scrfd_outputs(scrfd_outputs(), DET, DET)
    batched = decode_scrfd_outputs([o[None] for o in scrfd_outputs()], DET, DET)
    for x, y in zip(plain, batched):
        torch.testing.assert_close(x, y)


def test_decode_rejects_wrong_layout():
    with pytest.raises(DetectionError, match="6 outputs"):
        decode_scrfd_outputs(scrfd_outputs()[:6], DET, DET)
    with pytest.raises(DetectionError, match="det_size"):
        decode_scrfd_outputs(scrfd_outputs(), 2 * DET, 2 * DET)


def test_preprocess_keeps_aspect_and_normalises():
    image = torch.ones(3, 240, 320)
    blob, scale_x, scale_y = preprocess_for_scrfd(image, (160, 160))
    assert blob.shape == (1, 3, 160, 160) and blob.dtype == torch.float32
    assert scale_x == pytest.approx(0.5) and scale_y == pytest.approx(0.5)
    assert torch.allclose(blob[:, :, :120], torch.tensor((255 - 127.5) / 128))
    assert torch.allclose(blob[:, :, 120:], torch.tensor(-127.5 / 128))
    tall = preprocess_for_scrfd(torch.zeros(3, 400, 100), (160, 160))
    assert tall[1] == pytest.approx(40 / 100) and tall[2] == pytest.approx(0.4)


def test_detector_decodes_planted_faces_in_image_pixels(model_file):
    detector = SCRFDDetector(model_file, det_size=(DET, DET))
    assert isinstance(detector, Detector)
    image = torch.rand(3, 240, 320)  # scale 0.5: image pixels are twice the input pixels
    (detections,) = detector([image])
    assert len(detections) == 2  # the duplicate is suppressed, the 0.3 face is below min_score
    torch.testing.assert_close(detections.scores, torch.tensor([0.9, 0.7]))
    torch.testing.assert_close(detections.boxes[0], 2 * torch.tensor(FACE_A_BOX_INPUT, dtype=torch.float32))
    torch.testing.assert_close(detections.landmarks[0], 2 * torch.tensor(FACE_A_KPS_INPUT, dtype=torch.float32))
    torch.testing.assert_close(detections.boxes[1], 2 * torch.tensor(FACE_B_BOX_INPUT, dtype=torch.float32))
    torch.testing.assert_close(detections.landmarks[1], 2 * torch.tensor(FACE_B_KPS_INPUT, dtype=torch.float32))
    # eyes left to right as seen in the image, above the mouth
    lm = detections.landmarks[0]
    assert lm[0, 0] < lm[1, 0] and lm[:2, 1].max() < lm[3:, 1].min()


def test_thresholds_change_detections_and_config(model_file):
    strict = SCRFDDetector(model_file, det_size=(DET, DET))
    loose = SCRFDDetector(model_file, det_size=(DET, DET), min_score=0.2, nms_iou=0.99)
    image = torch.rand(3, 160, 160)
    assert len(strict([image])[0]) == 2
    assert len(loose([image])[0]) == 4  # the duplicate survives a 0.99 IoU, the 0.3 face passes
    configs = [strict.config(), loose.config(), SCRFDDetector(model_file, det_size=(320, 320)).config()]
    assert len({fingerprint_of(c) for c in configs}) == 3
    assert strict.config()["model_sha256"] == hash_file(model_file)
    assert fingerprint_of(strict.config()) == fingerprint_of(SCRFDDetector(model_file, det_size=(DET, DET)).config())


def test_batch_of_sizes_and_edge_images(model_file):
    detector = SCRFDDetector(model_file, det_size=(DET, DET))
    results = detector([torch.rand(3, 160, 160), torch.rand(3, 1, 1), torch.zeros(3, 0, 5), torch.rand(3, 80, 40)])
    assert [len(r) for r in results] == [2, 2, 0, 2]
    # 80x40 -> 160x80 on the canvas: scale 2 both ways
    torch.testing.assert_close(results[3].boxes[0], torch.tensor(FACE_A_BOX_INPUT, dtype=torch.float32) / 2)
    with pytest.raises(UnsupportedImageError, match="sample 1"):
        detector([torch.rand(3, 10, 10), torch.rand(1, 10, 10)])


def test_wrong_det_size_is_a_detection_error_naming_the_image(model_file):
    detector = SCRFDDetector(model_file, det_size=(320, 320))
    with pytest.raises(DetectionError, match="image 0"):
        detector([torch.rand(3, 50, 50)])


def test_fixed_input_model_needs_its_size(tmp_path):
    path = export_scrfd_like(tmp_path / "det_fixed.onnx", fixed_input=True)
    with pytest.raises(ConfigError, match=r"det_size=\(160, 160\)"):
        SCRFDDetector(path, det_size=(640, 640))([torch.rand(3, 32, 32)])
    assert len(SCRFDDetector(path, det_size=(DET, DET))([torch.rand(3, 32, 32)])[0]) == 2


def test_pickles_without_session_and_detects_after(model_file):
    detector = SCRFDDetector(model_file, det_size=(DET, DET))
    image = torch.rand(3, 100, 120)
    before = detector([image])[0]
    assert detector._session is not None
    clone = pickle.loads(pickle.dumps(detector))
    assert clone._session is None
    after = clone([image])[0]
    torch.testing.assert_close(before.boxes, after.boxes)
    torch.testing.assert_close(before.landmarks, after.landmarks)


def test_model_zoo_layout(tmp_path):
    pack = tmp_path / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    export_scrfd_like(pack / "det_10g.onnx")
    (pack / "w600k_r50.onnx").write_bytes(b"recognition model, not a detector")
    assert find_scrfd_model("buffalo_l", tmp_path) == pack / "det_10g.onnx"
    assert find_scrfd_model("det_10g.onnx", tmp_path) == pack / "det_10g.onnx"
    assert find_scrfd_model("buffalo_s", tmp_path) is None
    for spec in ("scrfd", "insightface", "retinaface"):
        detector = load_detector(spec, model_root=tmp_path, det_size=(DET, DET))
        assert isinstance(detector, SCRFDDetector) and detector.model_file == pack / "det_10g.onnx"
    assert len(detector([torch.rand(3, 64, 64)])[0]) == 2


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to open a connection or call insightface's downloader."""

    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    import insightface.utils.storage as storage

    monkeypatch.setattr(storage, "download_file", refuse)


def test_missing_model_without_download_raises_offline(tmp_path, no_network):
    with pytest.raises(ModelLoadError) as caught:
        SCRFDDetector(model_root=tmp_path)
    message = str(caught.value)
    assert "allow_download=True" in message and "non-commercial" in message and str(tmp_path) in message
    with pytest.raises(ModelLoadError, match="non-commercial"):
        load_detector("scrfd", model_root=tmp_path, name="det_10g.onnx")
    with pytest.raises(ModelLoadError, match="does not exist"):
        SCRFDDetector(tmp_path / "nope.onnx")
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


def test_allow_download_goes_through_insightface_model_zoo(tmp_path, monkeypatch, model_file):
    """With allow_download the pack is fetched by insightface's own ensure_available, on first use.

    The network is not available to tests: insightface's download function is replaced by one
    that unpacks our exported model where insightface's zip would land, and records the call.
    """
    import insightface.utils.storage as storage

    calls = []

    def fake_ensure_available(sub_dir, name, root="~/.insightface"):
        calls.append((sub_dir, name, root))
        target = tmp_path / sub_dir / name
        target.mkdir(parents=True)
        (target / "det_10g.onnx").write_bytes(open(model_file, "rb").read())
        return str(target)

    monkeypatch.setattr(storage, "ensure_available", fake_ensure_available)
    detector = SCRFDDetector(model_root=tmp_path, allow_download=True, det_size=(DET, DET))
    assert calls == []  # nothing fetched at construction
    assert len(detector([torch.rand(3, 64, 64)])[0]) == 2
    assert calls == [("models", "buffalo_l", str(tmp_path))]


def test_unreadable_model_is_a_load_error(tmp_path):
    path = tmp_path / "det_broken.onnx"
    path.write_bytes(b"not an onnx graph")
    with pytest.raises(ModelLoadError, match="det_broken.onnx"):
        SCRFDDetector(path)([torch.rand(3, 32, 32)])


@pytest.mark.parametrize(
    "kwargs", [{"det_size": (100, 100)}, {"min_score": 1.5}, {"nms_iou": 0.0}, {"det_size": (640,)}]
)
def test_invalid_settings(model_file, kwargs):
    with pytest.raises(ConfigError):
        SCRFDDetector(model_file, **kwargs)
