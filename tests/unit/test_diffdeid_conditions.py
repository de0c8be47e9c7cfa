"""DiffDeID condition models: the real loaders (an ONNX parser built here, a D3DFR checkpoint
written from our module) and the offline stand-ins (dlib 68 points on scikit-image's astronaut),
each checked against a value computed a second way."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from anonloader.errors import ModelLoadError
from anonloader.methods.diffdeid.conditions import (
    ContourRenderer,
    D3DFRNet,
    D3DFRReconstructor,
    HullMasker,
    LandmarkFaceModel,
    OnnxFaceParser,
    RhoLayout,
    gaze_vectors,
    landmarks_68,
)


@functools.lru_cache(maxsize=1)
def _astronaut_face() -> tuple[torch.Tensor, torch.Tensor]:
    """The astronaut's face: ``1,3,128,128`` ffhq-aligned crop (MTCNN landmarks) and its 68 points."""
    from facenet_pytorch import MTCNN
    from skimage import data

    from anonloader.align import align_faces, template_points
    from anonloader.types import Detections

    array = data.astronaut()
    boxes, scores, points = MTCNN(keep_all=True, device="cpu").detect(array, landmarks=True)
    best = int(np.argmax(scores))
    image = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
    det = Detections(torch.tensor(np.asarray(boxes[best], dtype=np.float32))[None], torch.tensor(np.asarray(points[best], dtype=np.float32))[None], torch.ones(1))
    crops = align_faces([image], [det], crop_size=128, template="ffhq").crops
    return crops, landmarks_68(crops, template_points(128, "ffhq")[None])


def test_hull_masker_covers_eyes_and_nose_and_keeps_the_mouth():
    crops, points = _astronaut_face()
    mask = HullMasker()(crops, points)[0, 0]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for index in [*range(37, 41), *range(43, 47), *range(28, 36)]:  # eye and nose points (inner)
        x, y = points[0, index].round().long().tolist()
        assert mask[y, x] == 1, index
    mouth_centre = points[0, 48:60].mean(0).round().long().tolist()
    assert mask[mouth_centre[1], mouth_centre[0]] == 0
    assert mask[2, 2] == 0 and mask[125, 125] == 0  # background corners


def test_hull_masker_falls_back_to_the_five_point_ellipse():
    points = torch.full((1, 68, 2), 16.0)  # degenerate hull
    points[0, 36:42] = torch.tensor([10.0, 14.0])
    points[0, 42:48] = torch.tensor([22.0, 14.0])
    mask = HullMasker()(torch.zeros(1, 3, 32, 32), points)[0, 0]
    expected = HullMasker.ellipse(np.array([[10, 14], [22, 14], [16, 16], [16, 16], [16, 16]], dtype=np.float64), 32)
    expected[16, 16] = 0  # the (degenerate) mouth polygon, all at (16, 16), stays unmasked
    assert torch.equal(mask, torch.from_numpy(expected).float())


def test_gaze_is_the_dark_pixel_centroid_offset():
    size = 64
    image = torch.ones(1, 3, size, size)
    points = torch.zeros(1, 68, 2)
    for eye, cx in ((range(36, 42), 20.0), (range(42, 48), 44.0)):
        angles = torch.linspace(0, 2 * np.pi, 7)[:-1] + np.pi  # starts at the outer corner
        points[0, list(eye)] = torch.stack([cx + 8 * angles.cos(), 30 + 4 * angles.sin()], 1)
    image[:, :, 29:32, 21:24] = 0.0  # left pupil at (22, 30)
    image[:, :, 30:33, 40:43] = 0.0  # right pupil at (41, 31)
    omega = gaze_vectors(image, points)[0]
    for j, eye, pupil in ((0, range(36, 42), (22.0, 30.0)), (1, range(42, 48), (41.0, 31.0))):
        contour = points[0, list(eye)]
        width = float((contour[3] - contour[0]).norm())
        expected = (torch.tensor(pupil) - contour.mean(0)) / width
        assert torch.allclose(omega[2 * j:2 * j + 2], expected, atol=1e-6), (omega, expected)


def _two_identity_points(n: int = 8) -> tuple[torch.Tensor, list[int]]:
    """Two 'people' (mean shapes differing by a jaw widening) each with small expression
    changes (mouth opening), rotated, scaled and shifted."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(68, 2, generator=g) * 40 + 44
    base[36], base[45] = torch.tensor([60.0, 60.0]), torch.tensor([100.0, 60.0])
    points, labels = [], []
    for person in range(2):
        for k in range(n):
            p = base.clone()
            p[0:17, 0] += (p[0:17, 0] - 64) * (0.3 * person)
            p[57, 1] += 4 * torch.rand((), generator=g)
            angle = 0.2 * (torch.rand((), generator=g) - 0.5)
            rot = torch.tensor([[angle.cos(), -angle.sin()], [angle.sin(), angle.cos()]])
            p = (p - 64) @ rot.T * (0.8 + 0.4 * torch.rand((), generator=g)) + 64 + 4 * torch.randn(2, generator=g)
            points.append(p)
            labels.append(person)
    return torch.stack(points), labels


def test_landmark_model_normalise_roundtrip_and_pca_split():
    points, labels = _two_identity_points()
    model = LandmarkFaceModel().fit(points, labels, 128)
    normal, sim = model.normalise(points, 128)
    assert torch.allclose(model.denormalise(normal, sim, 128), points, atol=1e-3)
    alpha, beta = model._coefficients(normal)
    # one between-identity direction: α's first component separates the two people, the rest is 0
    assert torch.all(alpha[:, 1:] == 0)
    a0 = alpha[:, 0]
    assert (a0[:8].max() < a0[8:].min()) or (a0[8:].max() < a0[:8].min())
    # S̄ + P_id α + P_exp β rebuilds every training shape (rank of the data < 64 + 1)
    assert torch.allclose(model.shape(alpha, beta), normal, atol=1e-4)


def test_landmark_model_rho_on_a_real_face_and_renderer_places_its_shape():
    crops, points = _astronaut_face()
    jitter = torch.randn(6, 68, 2, generator=torch.Generator().manual_seed(1))
    model = LandmarkFaceModel().fit(torch.cat([points + jitter[:3], points * 0.95 + 3 + jitter[3:]]), [0, 0, 0, 1, 1, 1], 128)
    rho = model(crops, points)
    layout = RhoLayout()
    assert rho.shape == (1, 261) and torch.isfinite(rho).all()
    renderer = ContourRenderer(model)
    normal, sim = model.normalise(points, 128)
    expected = model.denormalise(model.shape(*model._coefficients(normal)), sim, 128)
    assert torch.allclose(renderer.points(rho, 128), expected, atol=1e-3)
    image = renderer(rho, 128)
    assert image.shape == (1, 3, 128, 128) and image.min() >= 0 and image.max() <= 1
    assert image[0, :, 2, 2].abs().sum() == 0 and image[0].sum(0)[points[0, 30, 1].long(), points[0, 30, 0].long()] > 0
    new_alpha = torch.randn(1, 80)
    rho2 = layout.replace(rho, "alpha", new_alpha)  # eq. 4: exactly α replaced
    changed = (rho2 != rho)[0].nonzero().flatten()
    assert changed.min() >= 0 and changed.max() < 80 and torch.equal(rho2[:, :80], new_alpha)
    assert torch.equal(rho2[:, 80:], rho[:, 80:])


def test_unfitted_landmark_model_is_an_error():
    from anonloader.errors import MethodError

    with pytest.raises(MethodError, match="face-model"):
        LandmarkFaceModel()(torch.zeros(1, 3, 32, 32), torch.zeros(1, 68, 2))


def test_onnx_face_parser_built_here_loads_and_masks(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # 1x1 conv: class k's score is the (ImageNet-normalised) channel k -> argmax = dominant colour
    weight = numpy_helper.from_array(np.eye(3, dtype=np.float32)[:, :, None, None], "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "parser",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "parser.onnx"
    onnx.save(model, str(path))
    parser = OnnxFaceParser(path, face_classes=[0, 1], mouth_classes=[1], input_size=8)
    crops = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    normalised = (crops - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    expected = (normalised.argmax(1, keepdim=True) == 0).float()  # class 0 face, class 1 mouth kept, class 2 other
    assert torch.equal(parser(crops), expected)
    assert parser.config()["sha256"] and parser.kind == "onnx-parser"
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelLoadError):
        OnnxFaceParser(tmp_path / "bad.onnx", [0], [1])


def test_d3dfr_checkpoint_written_from_our_module_loads(tmp_path):
    torch.manual_seed(0)
    net = D3DFRNet("resnet18").eval()
    torch.save({"net_recon": net.state_dict()}, tmp_path / "epoch_20.pth")
    recon = D3DFRReconstructor(tmp_path / "epoch_20.pth", backbone="resnet18")
    crops = torch.rand(2, 3, 64, 64)
    points = torch.rand(2, 68, 2) * 40 + 12
    rho = recon(crops, points)
    with torch.no_grad():
        raw = net(torch.nn.functional.interpolate(crops, size=(224, 224), mode="bilinear", align_corners=False))
    assert raw.shape == (2, 257)
    layout = RhoLayout()
    assert torch.equal(rho[:, layout.slice("alpha")], raw[:, :80])
    assert torch.equal(rho[:, layout.slice("beta")], raw[:, 80:144])
    assert torch.equal(rho[:, layout.slice("delta")], raw[:, 144:224])
    assert torch.equal(rho[:, layout.slice("gamma")], raw[:, 227:254])
    assert torch.equal(rho[:, layout.slice("pose")], torch.cat([raw[:, 224:227], raw[:, 254:257]], 1))
    assert torch.equal(rho[:, layout.slice("omega")], gaze_vectors(crops, points))
    torch.save({"net_recon": D3DFRNet("resnet34").state_dict()}, tmp_path / "other.pth")
    with pytest.raises(ModelLoadError, match="resnet18"):
        D3DFRReconstructor(tmp_path / "other.pth", backbone="resnet18")


def _grid(half: float, z: float, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """An n x n vertex grid over [-half, half]² at depth z and its triangles (0-based), wound so
    the normals point to +z (towards the camera)."""
    xs = np.linspace(-half, half, n)
    vertices = np.array([[x, y, z] for y in xs for x in xs])
    tri = []
    for r in range(n - 1):
        for c in range(n - 1):
            i = r * n + c
            tri += [[i, i + 1, i + n + 1], [i, i + n + 1, i + n]]
    return vertices, np.array(tri)


def _write_bfm(path, seed: int = 0) -> None:
    import scipy.io

    front, tri_f = _grid(0.3, 0.4)
    back, tri_b = _grid(0.6, 0.0)
    vertices = np.concatenate([front, back])
    tri = np.concatenate([tri_f, tri_b + len(front)]) + 1  # 1-based, as the BFM files
    tex = np.concatenate([np.tile([255.0, 0, 0], (len(front), 1)), np.tile([0, 0, 255.0], (len(back), 1))])
    rng = np.random.default_rng(seed)
    n3 = 3 * len(vertices)
    scipy.io.savemat(str(path), {"meanshape": vertices.reshape(1, -1), "idBase": rng.normal(0, 1e-3, (n3, 80)),
                                 "exBase": rng.normal(0, 1e-3, (n3, 64)), "meantex": tex.reshape(1, -1),
                                 "texBase": rng.normal(0, 1e-2, (n3, 80)), "tri": tri})


def test_bfm_renderer_z_buffer_and_sh_shading(tmp_path):
    import math

    from anonloader.methods.diffdeid.conditions import BFMRenderer

    _write_bfm(tmp_path / "bfm.mat")
    renderer = BFMRenderer(tmp_path / "bfm.mat", radius=1)
    rho = torch.zeros(1, 261)
    layout = RhoLayout()
    image = renderer(rho, 224)[0]
    # the mean shape is centred: front layer at z = 0.2, back at -0.2; the camera sits at z = 10
    centre_x = 1015 * 0.0 / (10 - 0.2) + 112
    ambient = 0.8 * math.pi / math.sqrt(4 * math.pi)  # band 0 only: 0.8 * a0 * c0
    pixel = image[:, round(224 - centre_x), round(centre_x)]
    assert torch.allclose(pixel, torch.tensor([ambient, 0.0, 0.0]), atol=1e-5)  # the nearer (red) layer wins
    corner = 1015 * 0.6 / (10 + 0.2) + 112  # a back-layer corner, outside the front layer
    assert torch.allclose(image[:, round(224 - corner), round(corner)], torch.tensor([0.0, 0.0, ambient]), atol=1e-5)
    assert image[:, 2, 2].abs().sum() == 0
    # SH: normals (0, 0, 1); band 2 (a1 c1 n_z) of the red channel adds 0.1 a1 c1
    rho2 = rho.clone()
    rho2[0, layout.slice("gamma").start + 2] = 0.1
    a1c1 = (2 * math.pi / math.sqrt(3)) * (math.sqrt(3) / math.sqrt(4 * math.pi))
    shaded = renderer(rho2, 224)[0][:, round(224 - centre_x), round(centre_x)]
    assert ambient + 0.1 * a1c1 < 1 and shaded[0] == pytest.approx(ambient + 0.1 * a1c1, abs=1e-5)
    # translation along x moves the render by 1015 * tx / depth pixels
    rho3 = rho.clone()
    rho3[0, layout.slice("pose").start + 3] = 0.1
    moved = renderer(rho3, 224)[0]
    shift = round(1015 * 0.1 / (10 - 0.2))
    assert torch.allclose(moved[:, round(224 - centre_x), round(centre_x) + shift], pixel, atol=1e-5)
    (tmp_path / "bad.mat").write_bytes(b"nope")
    with pytest.raises(ModelLoadError):
        BFMRenderer(tmp_path / "bad.mat")


def test_d3dfr_and_bfm_drive_diffdeid(tmp_path):
    from anonloader.identity.sampler import LatentIDSampler
    from anonloader.methods.diffdeid.conditions import BFMRenderer
    from anonloader.methods.diffdeid.model import DiffDeID

    torch.manual_seed(0)
    torch.save({"net_recon": D3DFRNet("resnet18").state_dict()}, tmp_path / "d3dfr.pth")
    _write_bfm(tmp_path / "bfm.mat")
    shapes = LatentIDSampler(80, timesteps=20, hidden=16, depth=1, unit_norm=False)
    shapes.fit(torch.randn(32, 80) * 0.1, steps=5, batch_size=8)
    ids = LatentIDSampler(128, timesteps=20, hidden=16, depth=1, space="dlib")
    ids.fit(torch.randn(32, 128), steps=5, batch_size=8)
    method = DiffDeID(config="tiny", face_model=D3DFRReconstructor(tmp_path / "d3dfr.pth", backbone="resnet18"),
                      renderer=BFMRenderer(tmp_path / "bfm.mat"), id_sampler=ids, shape_sampler=shapes, num_inference_steps=1)
    crops, _ = _astronaut_face()
    from anonloader.align import template_points
    from anonloader.types import FaceConditions

    small = torch.nn.functional.interpolate(crops, size=(32, 32), mode="bilinear", antialias=True)
    out = method(small, FaceConditions([1], [None], [None], template_points(32, "ffhq")[None]))
    assert out.shape == (1, 3, 32, 32)
    config = method.config()
    assert config["face_model"]["kind"] == "d3dfr" and config["renderer"]["kind"] == "bfm"
    with pytest.raises(Exception, match="renderer"):
        DiffDeID(config="tiny", face_model=D3DFRReconstructor(tmp_path / "d3dfr.pth", backbone="resnet18"))
