"""FAMS identity mode: the bank image of each face's synthetic id is the face-swap source."""

from __future__ import annotations

import pickle

import pytest
import torch

pytest.importorskip("diffusers")

from anonloader.errors import ConfigError, MethodError  # noqa: E402
from anonloader.identity.bank import IdentityBank  # noqa: E402
from anonloader.methods.fams import FAMS, build_tiny_components  # noqa: E402
from anonloader.methods.fams.pipeline import encode_images  # noqa: E402
from anonloader.types import FaceConditions  # noqa: E402

_SHARED = {}


def _components():
    if "components" not in _SHARED:
        _SHARED["components"] = build_tiny_components(0)
    return _SHARED["components"]


def _bank(seed=0, n=3, images=True, size=24, meta=None):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, 8, generator=generator)
    faces = torch.rand(n, 3, size, size, generator=generator) if images else None
    return IdentityBank(embeddings, faces, meta=meta)


def _fams(bank, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    return FAMS.from_components(_components(), crop_size=16, resolution=16, bank=bank, **kwargs)


def _conditions(seeds, ids):
    n = len(seeds)
    return FaceConditions(list(seeds), ["k"] * n, list(ids), torch.zeros(n, 5, 2))


@pytest.fixture(scope="module")
def crops():
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))


class _SourceSpy:
    """Records what the source ReferenceNet is given (latents, image embeddings) per call."""

    def __init__(self, network):
        self.calls = []
        self.handle = network.register_forward_pre_hook(lambda module, args: self.calls.append([a.clone() for a in args]))

    def close(self):
        self.handle.remove()


def test_one_identity_one_source_another_identity_another(crops):
    fams = _fams(_bank())
    spy = _SourceSpy(fams.components.referencenet)
    try:
        # three crops of one real person (same synthetic id and, from the assigner, same seed), one of another
        out = fams(crops, _conditions([5, 5, 5, 9], [1, 1, 1, 2]))
    finally:
        spy.close()
    latents, embeds = [c for c in spy.calls if c[0].shape[0] == 4][0]
    for i in (1, 2):
        assert torch.equal(latents[i], latents[0]) and torch.equal(embeds[i], embeds[0])
    assert not torch.equal(latents[3], latents[0]) and not torch.equal(embeds[3], embeds[0])
    # the source is the bank image of the synthetic id, aligned to FAMS's template
    sources = fams.bank_sources([1, 2])
    expected = encode_images(fams.components, sources)
    assert torch.equal(latents[0], expected[0]) and torch.equal(latents[3], expected[1])
    # identity mode is exactly the face swap with those sources
    assert torch.equal(out, fams.generate(crops, [5, 5, 5, 9], source=fams.bank_sources([1, 1, 1, 2])))


def test_bank_images_are_aligned_from_their_template_to_ffhq():
    from anonloader.align import template_points

    # a 112 px bank face in the arcface template: bright blobs on its five landmarks
    points = template_points(112, "arcface")
    ys, xs = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
    blobs = sum(torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 4.0**2)) for x, y in points.tolist())
    bank = IdentityBank(torch.randn(1, 8), blobs.clamp(0, 1).expand(1, 3, 112, 112).clone())
    fams = FAMS.from_components(_components(), crop_size=64, resolution=64, bank=bank)
    assert fams.bank_template == "arcface"  # no template recorded: a recognizer-aligned face folder
    aligned = fams.bank_sources([0])
    assert aligned.shape == (1, 3, 64, 64)
    for x, y in template_points(64, "ffhq").round().long().tolist():  # the blobs land on FAMS's template
        assert aligned[0, 0, y, x] > 0.6, (x, y)
    assert aligned[0, 0, 4, 32] < 0.05 and aligned[0, 0, 32, 4] < 0.05  # forehead / cheek stay dark
    # a bank made by FAMS itself is in FAMS's template already: used as is
    own = _fams(_bank(size=32, meta={"source": "method", "method": {"template": "ffhq"}}))
    assert own.bank_template == "ffhq" and torch.equal(own.bank_sources([2]), own.bank.images[2:3])


def test_bank_without_images_is_refused_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="embeddings only"):
        FAMS(tiny=True, bank=_bank(images=False))
    _bank(images=False).save(tmp_path / "embeddings_only")
    with pytest.raises(ConfigError, match="embeddings only"):
        FAMS(tiny=True, bank=tmp_path / "embeddings_only")
    with pytest.raises(ConfigError, match="bank="):
        FAMS(tiny=True, bank_template="ffhq")


def test_faces_without_synthetic_ids_or_outside_the_bank_fail(crops):
    fams = _fams(_bank())
    with pytest.raises(MethodError, match="identity assigner"):
        fams(crops[:2], _conditions([1, 2], [0, None]))
    with pytest.raises(MethodError, match="outside the bank"):
        fams(crops[:2], _conditions([1, 2], [0, 3]))
    with pytest.raises(MethodError, match="one or the other"):
        fams(crops[:1], FaceConditions([1], ["k"], [0], torch.zeros(1, 5, 2), {"source_images": crops[:1]}))


def test_bank_is_in_the_fingerprint_and_reloads_after_pickling(tmp_path, crops):
    bank = _bank()
    config = _fams(bank).config()
    assert config["identity"]["bank"] == bank.fingerprint()
    assert _fams(_bank(seed=1)).config() != config
    assert _fams(None).config()["identity"] is None
    bank.save(tmp_path / "bank")
    fams = FAMS(tiny=True, crop_size=16, num_inference_steps=2, bank=tmp_path / "bank")
    out = fams(crops[:2], _conditions([3, 4], [0, 2]))
    clone = pickle.loads(pickle.dumps(fams))
    assert clone._bank is None and clone.bank_path == str(tmp_path / "bank")
    assert torch.equal(clone(crops[:2], _conditions([3, 4], [0, 2])), out)
    assert clone.config()["identity"] == fams.config()["identity"]


def test_a_bank_alone_gets_the_keyed_default_assigner(monkeypatch):
    """Identity mode without identity=: the pipeline uses FAMS.default_identity (keyed online
    strategy over the bank in its recorded recognizer's space); no secret is a ConfigError."""
    from anonloader.identity.assigner import KeyedIdentityAssigner
    from anonloader.pipeline import Anonymizer

    bank = IdentityBank(
        torch.nn.functional.normalize(torch.randn(3, 128, generator=torch.Generator().manual_seed(1)), dim=1),
        torch.rand(3, 3, 24, 24), meta={"recognizer": {"name": "dlib"}},
    )
    model = _fams(bank)
    monkeypatch.delenv("ANONLOADER_SECRET", raising=False)
    monkeypatch.delenv("ANONLOADER_SECRET_FILE", raising=False)
    with pytest.raises(ConfigError, match="FAMS keeps one synthetic identity.*ANONLOADER_SECRET"):
        Anonymizer(model, detector=None, revalidate=False)
    assert Anonymizer(model, detector=None, revalidate=False, identity=False).identity is None
    assigner = Anonymizer(model, detector=None, revalidate=False, secret="fams default secret").identity
    assert isinstance(assigner, KeyedIdentityAssigner) and assigner.strategy == "online"
    assert assigner.embedder.name == "dlib" and assigner.mapper.bank is bank
    assert _fams(None).default_identity(secret="s") is None  # no bank: anonymize with the degree d
    other = IdentityBank(torch.randn(3, 8), torch.rand(3, 3, 24, 24), meta={"recognizer": {"name": "dlib"}})
    with pytest.raises(ConfigError, match="not in the space"):
        _fams(other).default_identity(secret="s")
