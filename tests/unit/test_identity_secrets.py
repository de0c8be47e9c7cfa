"""The raw secret never reaches a pickle; derived keys are deterministic; recognizers never
download unless allowed."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch

from anonloader.errors import IdentityError, ModelLoadError, SecretError
from anonloader.identity.mapper import MAPPING_PURPOSE, REGISTRY_PURPOSE, KeyedMapper, Secret, SubKey, resolve_secret

SECRET = "pickle-test secret 6f1d2a9b8c7e"


def _assert_no_secret(payload: bytes) -> None:
    for form in (SECRET.encode(), SECRET.encode("utf-16-le"), SECRET.encode().hex().encode()):
        assert form not in payload


def test_secret_refuses_to_pickle_and_derives_independent_subkeys():
    secret = resolve_secret(SECRET)
    with pytest.raises(SecretError, match="derive") as caught:
        pickle.dumps(secret)
    assert SECRET not in str(caught.value)
    mapping, registry = secret.derive(MAPPING_PURPOSE), secret.derive(REGISTRY_PURPOSE)
    assert mapping != registry and mapping.check_value() != registry.check_value()
    assert SECRET not in repr(mapping) and "***" in repr(mapping)
    # the derivation is HMAC-SHA256(secret, context || purpose), computed here a second way
    import hashlib
    import hmac

    expected = hmac.new(SECRET.encode(), b"anonloader/subkey/v1\0" + MAPPING_PURPOSE.encode(), hashlib.sha256).digest()
    assert mapping.digest(b"m") == hmac.new(expected, b"m", hashlib.sha256).digest()
    restored = pickle.loads(pickle.dumps(mapping))
    assert restored == mapping and restored.purpose == MAPPING_PURPOSE
    with pytest.raises(SecretError, match="identity-registry"):
        KeyedMapper(registry, 10)  # a key of another purpose is refused


def test_derived_keys_are_the_same_in_another_process():
    code = (
        "from anonloader.identity.mapper import KeyedMapper;"
        f"m = KeyedMapper({SECRET!r}, 100); print(m.digest('label:7'), m.map('label:7').synthetic_id)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    here = KeyedMapper(SECRET, 100)
    assert out == [here.digest("label:7"), str(here.map("label:7").synthetic_id)]


def test_no_pickled_worker_payload_holds_the_secret(tmp_path):
    """The Anonymizer with a keyed assigner, the assigner, its mapper and registry, and the
    dataset wrapper (with a salted cache): the secret's bytes are in none of their pickles,
    and the unpickled copies map exactly as the originals."""
    from anonloader.data.dataset import anonymize
    from anonloader.identity.assigner import KeyedIdentityAssigner
    from anonloader.pipeline import Anonymizer

    assigner = KeyedIdentityAssigner("online", secret=SECRET, bank=64, embedder=None, registry_path=tmp_path / "reg.json")
    labelled = KeyedIdentityAssigner("label", secret=SECRET, bank=64, embedder=None)
    anonymizer = Anonymizer("blur", identity=labelled)
    dataset = anonymize([torch.zeros(3, 32, 32)], anonymizer, cache=tmp_path / "cache", secret=SECRET)
    payloads = {
        "assigner": pickle.dumps(assigner),
        "label assigner": pickle.dumps(labelled),
        "anonymizer": pickle.dumps(anonymizer),
        "dataset": pickle.dumps(dataset),
        "mapper": pickle.dumps(assigner.mapper),
        "registry": pickle.dumps(assigner.registry),
    }
    try:
        import cloudpickle  # what Ray's object store uses
    except ImportError:  # pragma: no cover - ray brings it
        cloudpickle = None
    if cloudpickle is not None:
        payloads["cloudpickle anonymizer"] = cloudpickle.dumps(anonymizer)
    for payload in payloads.values():
        _assert_no_secret(payload)
    copy = pickle.loads(payloads["label assigner"])
    crops = torch.rand(3, 3, 16, 16)
    labels = ["alice", "bob", "carol"]
    index = torch.arange(3)
    assert copy.assign(crops, index, labels) == labelled.assign(crops, index, labels)
    assert isinstance(copy.mapper.key, SubKey) and copy.mapper.key.purpose == MAPPING_PURPOSE


def test_old_store_format_is_refused_with_what_to_do(tmp_path):
    mapper = KeyedMapper(SECRET, 10, store=tmp_path / "m.json")
    mapper.map("label:a")
    mapper.save()
    state = json.loads((tmp_path / "m.json").read_text())
    state["version"] = 1
    (tmp_path / "m.json").write_text(json.dumps(state))
    with pytest.raises(IdentityError, match="new store path"):
        KeyedMapper(SECRET, 10, store=tmp_path / "m.json")


def test_secret_equality_and_registry_key_needs_the_secret():
    from anonloader.identity.assigner import KeyedIdentityAssigner
    from anonloader.errors import ConfigError

    assert Secret(b"x" * 16) == Secret(b"x" * 16)
    key = resolve_secret(SECRET).derive(MAPPING_PURPOSE)
    assert KeyedIdentityAssigner("label", secret=key, bank=8, embedder=None).mapper.key == key
    with pytest.raises(ConfigError, match="SubKey"):
        KeyedIdentityAssigner("online", secret=key, bank=8, embedder=None)


def test_facenet_pretrained_never_downloads_without_allow_download(tmp_path, monkeypatch):
    from facenet_pytorch.models import inception_resnet_v1 as facenet_module

    from anonloader.methods.iddiffuse.recognizers import build_recognizer, facenet_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    fetched: list[str] = []
    monkeypatch.setattr(facenet_module, "download_url_to_file", lambda url, *a, **k: fetched.append(url))
    with pytest.raises(ModelLoadError, match="allow_download=True") as caught:
        build_recognizer({"kind": "facenet", "pretrained": "vggface2"})
    assert str(facenet_weights_path("vggface2")) in str(caught.value) and fetched == []

    # the released file in facenet-pytorch's cache is read locally (logits layer included)
    torch.manual_seed(0)
    released = facenet_module.InceptionResnetV1(pretrained=None, classify=True, num_classes=8631)
    path = facenet_weights_path("vggface2")
    path.parent.mkdir(parents=True)
    torch.save(released.state_dict(), path)
    module = build_recognizer({"kind": "facenet", "pretrained": "vggface2"})
    assert fetched == [] and module.config() == {"kind": "facenet", "pretrained": "vggface2"}
    released.eval()
    crops = torch.rand(2, 3, 160, 160)
    expected = released.eval()
    expected.classify = False
    with torch.no_grad():
        assert torch.allclose(module(crops)[0], expected((crops * 255.0 - 127.5) / 128.0), atol=1e-6)
