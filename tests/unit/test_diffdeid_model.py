"""DiffDeID as a Method (tiny random UNet, 32 px ffhq crop of scikit-image's astronaut): identity
sources, ρ' routing, posterior re-draws, determinism and save/load."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from anonloader.errors import ConfigError, MethodError
from anonloader.identity.bank import IdentityBank
from anonloader.identity.sampler import LatentIDSampler, derive_seed
from anonloader.methods.diffdeid.conditions import (
    LandmarkFaceModel,
    RhoLayout,
    landmarks_68,
)
from anonloader.methods.diffdeid.model import DiffDeID
from anonloader.methods.diffdeid.network import DiffDeIDUNet
from anonloader.types import FaceConditions

S = 32


@functools.lru_cache(maxsize=1)
def _face() -> tuple[torch.Tensor, torch.Tensor]:
    """(``1,3,32,32`` ffhq crop of the astronaut, its ``1,5,2`` crop landmarks)."""
    from facenet_pytorch import MTCNN
    from skimage import data

    from anonloader.align import align_faces, template_points
    from anonloader.types import Detections

    array = data.astronaut()
    boxes, scores, points = MTCNN(keep_all=True, device="cpu").detect(array, landmarks=True)
    best = int(np.argmax(scores))
    image = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
    det = Detections(torch.tensor(np.asarray(boxes[best], dtype=np.float32))[None], torch.tensor(np.asarray(points[best], dtype=np.float32))[None], torch.ones(1))
    crop = align_faces([image], [det], crop_size=S, template="ffhq").crops
    return crop, template_points(S, "ffhq")[None]


@functools.lru_cache(maxsize=1)
def _parts() -> tuple[LandmarkFaceModel, LatentIDSampler, LatentIDSampler]:
    crop, lm = _face()
    points = landmarks_68(crop, lm)
    jitter = torch.randn(6, 68, 2, generator=torch.Generator().manual_seed(1)) * 0.5
    face_model = LandmarkFaceModel().fit(torch.cat([points + jitter[:3], points * 0.95 + 1 + jitter[3:]]), [0, 0, 0, 1, 1, 1], S)
    g = torch.Generator().manual_seed(2)
    ids = LatentIDSampler(128, timesteps=50, hidden=32, depth=1, space="dlib")
    ids.fit(torch.randn(64, 128, generator=g), steps=20, batch_size=32)
    shapes = LatentIDSampler(80, timesteps=50, hidden=32, depth=1, unit_norm=False, space="landmark-standin")
    shapes.fit(torch.randn(64, 80, generator=g) * 0.5, steps=20, batch_size=32)
    return face_model, ids, shapes


def _network(seed: int = 3) -> DiffDeIDUNet:
    torch.manual_seed(seed)
    net = DiffDeIDUNet("tiny")
    with torch.no_grad():  # a non-trivial network: the output conv and τ are zero at init
        net.out.weight.normal_(0, 0.2)
        for module in net.attention.values():
            module.tau.fill_(0.5)
    return net


def _method(**kwargs) -> DiffDeID:
    face_model, ids, shapes = _parts()
    options = dict(network=_network(), face_model=face_model, id_sampler=ids, shape_sampler=shapes, num_inference_steps=2)
    return DiffDeID(**{**options, **kwargs})


def _conditions(n: int = 1, seeds=(123, 456), synthetic_ids=None) -> FaceConditions:
    _, lm = _face()
    return FaceConditions(list(seeds[:n]), [None] * n, list(synthetic_ids or [None] * n), lm.expand(n, 5, 2).clone())


class _Spy:
    """Records what ``generate`` receives, then runs it."""

    def __init__(self, method: DiffDeID) -> None:
        self.calls: list[dict] = []
        self.inner = method.generate
        method.generate = self

    def __call__(self, crops, masks, rendered, rho, identity, seeds):
        self.calls.append(dict(rho=rho.clone(), identity=identity.clone(), seeds=list(seeds), rendered=rendered.clone()))
        return self.inner(crops, masks, rendered, rho, identity, seeds)


def test_lds_identity_and_rho_prime_reach_the_network():
    method = _method()
    spy = _Spy(method)
    crop, lm = _face()
    out = method(crop, _conditions())
    assert out.shape == crop.shape and out.min() >= 0 and out.max() <= 1
    call = spy.calls[0]
    face_model, ids, shapes = _parts()
    real = method.identity_embeddings(crop, lm)
    expected, used = ids.sample_filtered([123], avoid=real, threshold=method.threshold)
    assert torch.equal(call["identity"], expected)
    rho = face_model(crop, landmarks_68(crop, lm))
    layout = RhoLayout()
    alpha = shapes.sample(seeds=[derive_seed(123, 1_000_003 + used[0])])
    assert torch.equal(call["rho"], layout.replace(rho, "alpha", alpha))  # eq. 4: α replaced, the rest as measured
    assert torch.equal(call["rendered"], method.renderer(call["rho"], S))


def test_bank_identity_and_coefficients_are_used_for_assigned_faces():
    g = torch.Generator().manual_seed(4)
    bank = IdentityBank(torch.randn(5, 128, generator=g))
    bank.coefficients = torch.randn(5, 80, generator=g)  # α' of each synthetic identity
    method = _method(bank=bank)
    spy = _Spy(method)
    crop, _ = _face()
    method(crop, _conditions(synthetic_ids=[3]))
    assert torch.equal(spy.calls[0]["identity"][0], bank.embeddings[3])
    assert torch.equal(spy.calls[0]["rho"][0, :80], bank.coefficients[3])


def test_deid_level_picks_the_decile_of_ranked_draws():
    method = _method(deid_level=7, level_draws=2)
    spy = _Spy(method)
    crop, lm = _face()
    method(crop, _conditions())
    real = method.identity_embeddings(crop, lm)[0]
    ranked = _parts()[1].sample_ranked(123, reference=real, threshold=method.threshold, count=20)
    assert torch.equal(spy.calls[0]["identity"][0], ranked[6 * 2 + 1])


class _EchoEmbedder:
    """A stub recognizer that gives every face the same vector, so every output 'is' the real
    person: the posterior check must re-draw, then fail closed."""

    name, dim, threshold, crop_size, template = "dlib", 128, 0.9, 112, "arcface"

    def __call__(self, crops):
        return torch.nn.functional.normalize(torch.ones(len(crops), 128), dim=1)

    def config(self):
        return {"name": "echo"}


def test_posterior_check_redraws_four_times_then_fails_closed():
    method = _method(embedder=_EchoEmbedder())
    spy = _Spy(method)
    starts = []
    inner = method.id_sampler.sample_filtered

    def recording(seeds, **kwargs):
        starts.append(kwargs["start"][0])
        return inner(seeds, **kwargs)

    method.id_sampler.sample_filtered = recording
    crop, _ = _face()
    try:
        with pytest.raises(MethodError, match="after 4 re-draws"):
            method(crop, _conditions())
    finally:
        del method.id_sampler.sample_filtered
    assert len(spy.calls) == 5
    assert starts == sorted(set(starts)) and len(starts) == 5  # a new derived seed each time
    identities = torch.stack([c["identity"][0] for c in spy.calls])
    assert len({tuple(v.tolist()) for v in identities}) == 5


def test_deterministic_and_seed_dependent_and_save_load_bit_exact(tmp_path):
    method = _method()
    crop, _ = _face()
    first = method(crop, _conditions())
    assert torch.equal(method(crop, _conditions()), first)
    assert not torch.equal(method(crop, _conditions(seeds=(999,))), first)
    method.save_pretrained(tmp_path / "ckpt")
    loaded = DiffDeID.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded(crop, _conditions()), first)
    assert loaded.config()["weights_sha256"] and loaded.config()["id_sampler"] == method.config()["id_sampler"]
    assert loaded.config()["face_model"] == method.config()["face_model"]
    assert loaded.num_inference_steps == 2


def test_config_mismatches_are_refused():
    with pytest.raises(ConfigError, match="id_dim"):
        _method(network=DiffDeIDUNet({"preset": "tiny", "id_dim": 64}))
    bank = IdentityBank(torch.randn(3, 128), meta={"recognizer": {"name": "arcface"}})
    with pytest.raises(ConfigError, match="arcface"):
        _method(bank=bank)
    with pytest.raises(ConfigError, match="trained weights"):
        DiffDeID()
