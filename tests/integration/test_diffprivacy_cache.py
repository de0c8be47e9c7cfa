"""Diff-Privacy recovery keys through the cache: ``precompute(key_password=)`` writes encrypted
per-face keys into ``<cache>/recovery.lmdb``; training reads never open it; ``AnonCache.recover``
with the right password puts the original faces back, a wrong one raises ``SecretError``; the
password is in no file of the cache and in no pickle."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("cryptography")

from anonloader.kernels.paste_back import paste_back

from anonloader.align import align_faces
from anonloader.cache import AnonCache
from anonloader.cache.precompute import precompute
from anonloader.errors import ConfigError, SecretError
from anonloader.methods.diffprivacy import DiffPrivacy
from anonloader.methods.diffprivacy.store import RECOVERY_DB, RecoveryKeyStore
from anonloader.pipeline import Anonymizer

OPTIONS = {"tiny": True, "num_inference_steps": 10, "group_size": 2, "inversion_iters": 2}
PASSWORD = "cache-recovery pw 91c4e7"


def _needles() -> list[bytes]:
    return [PASSWORD.encode(), PASSWORD.encode("utf-16-le"), PASSWORD.encode("utf-32-le")]


def _open_paths() -> str:
    """Every file this process has mapped or open (what LMDB opening leaves behind)."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return Path("/proc/self/maps").read_text() + "\n".join(fds)


@pytest.fixture(scope="module")
def originals(astronaut_image) -> list[torch.Tensor]:
    """Two one-face photos as stored 8-bit: the astronaut and its mirror image."""
    image = (astronaut_image * 255).round().to(torch.uint8)
    return [image, image.flip(-1).contiguous()]


@pytest.fixture(scope="module")
def precomputed(originals, tmp_path_factory):
    path = tmp_path_factory.mktemp("dpcache") / "cache"
    method = DiffPrivacy(**OPTIONS)
    anonymizer = Anonymizer(method, revalidate=False)
    dataset = [{"image": image, "n": i} for i, image in enumerate(originals)]
    report = precompute(dataset, path, anonymizer, secret="cache secret", key_password=PASSWORD, progress=False)
    assert report.computed == 2 and report.failed == 0
    return path, method, anonymizer, report


def test_training_reads_never_open_the_key_store(precomputed, originals):
    path, _, _, _ = precomputed
    assert (path / RECOVERY_DB / "data.mdb").is_file()
    # this cache's key store (other tests of the process may hold their own stores open)
    store_path = str((path / RECOVERY_DB).resolve())
    assert store_path not in _open_paths()  # precompute closed it
    cache = AnonCache(path, secret="cache secret")
    dataset = cache.as_dataset()
    samples = [dataset[i] for i in range(len(dataset))]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=0, collate_fn=list)
    assert len(next(iter(loader))) == 2
    assert [s["n"] for s in samples] == [0, 1]
    for sample, original in zip(samples, originals, strict=True):
        assert sample["image"].shape == original.shape and sample["image"].dtype == torch.uint8
        assert not torch.equal(sample["image"], original)  # the face was replaced
    cache.get_sample(0)
    assert store_path not in _open_paths(), "a training read opened the recovery-key store"
    cache.close()


def test_recover_with_the_password_gives_back_the_faces(precomputed, originals):
    path, method, anonymizer, _ = precomputed
    cache = AnonCache(path, secret="cache secret")
    record = cache.get_sample(1)
    stored = record.images[0].pixels().float() / 255
    original = originals[1].float() / 255
    recovered = cache.recover(1, PASSWORD, method)
    assert recovered.shape == stored.shape and recovered.dtype == torch.float32
    changed = (stored - original).abs().amax(dim=0) > 2 / 255  # the anonymized face region
    assert changed.sum() > 500
    # with tiny random networks the best any recovery can give is the backbone's own
    # reconstruction D(E(x)) of the original face crop (real SD weights reconstruct faces
    # closely); measure how close each image gets to it, pasted where the face was
    faces = anonymizer.detector([original])[0]
    aligned = align_faces([original], [faces], crop_size=method.crop_size, template=method.template)
    backbone, _, _ = method.load()
    with torch.no_grad():
        reconstruction = backbone.decode(backbone.encode(aligned.crops)).clamp(0, 1)
    ideal = paste_back([stored], reconstruction, aligned.affines, aligned.image_index, feather=0.0, color_match=False)[0]
    region = changed & ((ideal - stored).abs().amax(dim=0) > 0)
    mse_recovered = ((recovered - ideal)[:, region] ** 2).mean()
    mse_anonymized = ((stored - ideal)[:, region] ** 2).mean()
    to_original = ((recovered - original)[:, region] ** 2).mean(), ((stored - original)[:, region] ** 2).mean()
    print(
        f"face region MSE to D(E(x)): recovered {mse_recovered:.4f}, anonymized {mse_anonymized:.4f}; to the original: "
        f"recovered {to_original[0]:.4f}, anonymized {to_original[1]:.4f} (tiny random models, N=10, k=2)"
    )
    assert mse_recovered < mse_anonymized / 2
    moved = (recovered - stored).abs().amax(dim=0) > 0
    assert moved.any()
    rows, cols = torch.nonzero(moved, as_tuple=True)
    crow, ccol = torch.nonzero(changed, as_tuple=True)
    # recovery touches only where the face was (inside the anonymized face's box)
    assert crow.min() - 8 <= rows.min() and rows.max() <= crow.max() + 8
    assert ccol.min() - 8 <= cols.min() and cols.max() <= ccol.max() + 8
    # the other sample has its own key: recovering sample 0 changes sample 0's face only
    recovered0 = cache.recover(0, PASSWORD, method)
    assert not torch.equal(recovered0, recovered)
    cache.close()


def test_wrong_or_missing_password_raises_secret_error(precomputed, monkeypatch):
    path, method, _, _ = precomputed
    monkeypatch.delenv("ANONLOADER_KEY_PASSWORD", raising=False)
    cache = AnonCache(path, secret="cache secret")
    with pytest.raises(SecretError, match="wrong key password") as wrong:
        cache.recover(0, PASSWORD + "!", method)
    assert PASSWORD not in str(wrong.value)
    with pytest.raises(SecretError):
        cache.recover(0, None, method)
    cache.close()
    # resuming the precompute: the wrong password is refused before anything runs; the right one
    # finds every sample done
    _, _, anonymizer, _ = precomputed
    with pytest.raises(SecretError, match="wrong key password"):
        precompute([{"image": torch.zeros(3, 8, 8, dtype=torch.uint8)}] * 2, path, anonymizer, secret="cache secret", key_password="nope", progress=False)
    dataset = [{"image": torch.zeros(3, 8, 8, dtype=torch.uint8)}] * 2  # never read: both indices are stored
    again = precompute(dataset, path, anonymizer, secret="cache secret", key_password=PASSWORD, progress=False)
    assert again.skipped == 2 and again.computed == 0


def test_password_is_in_no_file_and_no_pickle(precomputed, caplog, tmp_path):
    path, method, anonymizer, report = precomputed
    caplog.set_level(logging.DEBUG)
    cache = AnonCache(path, secret="cache secret")
    cache.recover(0, PASSWORD, method)
    files = [p for p in path.rglob("*") if p.is_file()]
    assert any(p.parent.name == RECOVERY_DB for p in files) and any(p.name == "data.mdb" and p.parent == path for p in files)
    blobs = [p.read_bytes() for p in files]
    cache.close()  # an open cache holds LMDB handles; closed, it pickles (as DataLoader workers get it)
    blobs += [pickle.dumps(anonymizer), pickle.dumps(cache), pickle.dumps(report), pickle.dumps(method)]
    for needle in _needles():
        assert not any(needle in blob for blob in blobs)
    assert PASSWORD not in caplog.text and PASSWORD not in repr(report)
    cache.close()


def test_a_recoverable_method_needs_a_password(tmp_path, monkeypatch, originals):
    monkeypatch.delenv("ANONLOADER_KEY_PASSWORD", raising=False)
    dataset = [{"image": originals[0]}]
    anonymizer = Anonymizer(DiffPrivacy(**OPTIONS), revalidate=False)
    with pytest.raises(ConfigError, match="recoverable=False") as missing:
        precompute(dataset, tmp_path / "a", anonymizer, progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="writes no recovery keys"):
        precompute(dataset, tmp_path / "b", Anonymizer("blur", revalidate=False), key_password=PASSWORD, progress=False)
    for engine in ("ray", "torchrun"):  # every engine refuses a recoverable method without a password
        with pytest.raises(ConfigError, match="recoverable=False"):
            precompute(dataset, tmp_path / engine, anonymizer, engine=engine, progress=False)
        assert not (tmp_path / engine).exists()
    assert "key" in str(missing.value)
    # the password may also come from the environment
    monkeypatch.setenv("ANONLOADER_KEY_PASSWORD", PASSWORD)
    precompute(dataset, tmp_path / "d", anonymizer, progress=False)
    assert (tmp_path / "d" / RECOVERY_DB).is_dir()


def test_not_recoverable_writes_no_key_store(tmp_path, monkeypatch, originals):
    monkeypatch.delenv("ANONLOADER_KEY_PASSWORD", raising=False)
    anonymizer = Anonymizer(DiffPrivacy(recoverable=False, **OPTIONS), revalidate=False)
    report = precompute([{"image": originals[0]}], tmp_path / "plain", anonymizer, progress=False)
    assert report.computed == 1 and not (tmp_path / "plain" / RECOVERY_DB).exists()
    with pytest.raises(ConfigError, match="want_keys"):
        anonymizer([originals[0].float() / 255], want_keys=True)


def test_pipeline_keys_per_image_and_none_for_failed(originals):
    method = DiffPrivacy(**OPTIONS)
    anonymizer = Anonymizer(method, revalidate=False)
    images = [originals[0].float() / 255, torch.full((3, 64, 64), float("nan"))]
    result = anonymizer(images, want_keys=True)
    assert result.errors[0] is None and result.errors[1] is not None
    assert len(result.keys[0]) == len(result.records[0]) >= 1 and result.keys[1] == []
    face = result.keys[0][0]
    assert face.affine.shape == (2, 3) and face.key.z_T.ndim == 3
    assert "key" not in repr(result) and all("z_T" not in repr(r) for r in result.records[0])
    plain = anonymizer(images)
    assert plain.keys is None and torch.equal(plain.images[0], result.images[0])


def test_cli_precompute_recover_and_strip_keys(tmp_path, monkeypatch, originals, capsys):
    """The command line: precompute with --method-options and --key-password-file on tiny
    weights directories, cache recover with the models loaded from those directories, cache
    strip-keys."""
    from PIL import Image

    from anonloader.cli import main

    tiny = DiffPrivacy(**OPTIONS)
    _, _, recognizer = tiny.load()
    tiny.save_pretrained(tmp_path / "dp", with_backbone=True)
    torch.save(recognizer.state_dict(), tmp_path / "rec.pth")
    spec = {"kind": "iresnet", "weights": str(tmp_path / "rec.pth"), **{k: v for k, v in recognizer.arch.items() if k != "feature_stage"}}
    method = DiffPrivacy(tmp_path / "dp", base_model=tmp_path / "dp", recognizer=spec, recognizer_size=16, crop_size=32, resolution=32,
                         **{k: v for k, v in OPTIONS.items() if k != "tiny"})
    assert not method.tiny
    (tmp_path / "images").mkdir()
    Image.fromarray(originals[1].permute(1, 2, 0).numpy()).save(tmp_path / "images" / "a.png")
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    monkeypatch.delenv("ANONLOADER_KEY_PASSWORD", raising=False)
    monkeypatch.delenv("ANONLOADER_SECRET", raising=False)
    # the precompute command builds the method from --method-options / --method-option (the
    # registry constructor's keywords); unknown keys and malformed JSON are refused by name
    fast = {k: v for k, v in OPTIONS.items() if k not in ("tiny", "inversion_iters")}
    method_options = {"weights": str(tmp_path / "dp"), "base_model": str(tmp_path / "dp"), "recognizer": spec, "recognizer_size": 16,
                      "crop_size": 32, "resolution": 32, **fast}
    command = ["precompute", str(tmp_path / "images"), str(tmp_path / "cache"), "--method", "diffprivacy", "-q",
               "--method-options", json.dumps(method_options), "--key-password-file", str(tmp_path / "pw")]
    assert main([*command, "--method-option", "no_such_option=1"]) == 2
    error = capsys.readouterr().err
    assert "has no option(s) no_such_option" in error and "inversion_iters" in error and not (tmp_path / "cache").exists()
    assert main([*command[:-4], "--method-options", "{not json", "--key-password-file", str(tmp_path / "pw")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(command[:-2]) == 2  # a recoverable method without a password
    assert "--key-password-file" in capsys.readouterr().err
    assert main([*command, "--method-option", f"inversion_iters={OPTIONS['inversion_iters']}"]) == 0
    capsys.readouterr()
    store = RecoveryKeyStore.open(tmp_path / "cache", key_password_file=tmp_path / "pw")
    (entry, face), = store.entries()
    assert store.get(entry, face).meta["inversion_iters"] == OPTIONS["inversion_iters"] and store.get(entry, face).meta["num_inference_steps"] == 10
    store.close()
    assert main(["cache", "recover", str(tmp_path / "cache"), "0", str(tmp_path / "out.png"), "--method-dir", str(tmp_path / "dp"),
                 "--key-password-file", str(tmp_path / "pw")]) == 0
    with Image.open(tmp_path / "out.png") as opened:
        written = torch.from_numpy(__import__("numpy").asarray(opened).copy()).permute(2, 0, 1)
    cache = AnonCache(tmp_path / "cache")
    expected = cache.recover(0, PASSWORD, method).mul(255).round().byte()
    assert torch.equal(written, expected)
    stored = cache.get_sample(0).images[0].pixels()
    assert not torch.equal(written, stored)
    (tmp_path / "bad").write_text("not it\n")
    assert main(["cache", "recover", str(tmp_path / "cache"), "0", str(tmp_path / "x.png"), "--method-dir", str(tmp_path / "dp"),
                 "--key-password-file", str(tmp_path / "bad")]) == 2
    assert "wrong key password" in capsys.readouterr().err and not (tmp_path / "x.png").exists()

    assert main(["cache", "strip-keys", str(tmp_path / "cache"), str(tmp_path / "stripped")]) == 0
    assert not (tmp_path / "stripped" / RECOVERY_DB).exists()
    stripped = AnonCache(tmp_path / "stripped")
    assert torch.equal(stripped.as_dataset()[0]["image"], cache.as_dataset()[0]["image"])
    with pytest.raises(Exception, match="no recovery keys"):
        stripped.recover(0, PASSWORD, method)
    # the precompute CLI hands --key-password-file to precompute, which refuses it for a method
    # that writes no keys
    assert main(["precompute", str(tmp_path / "images"), str(tmp_path / "cli-cache"), "--method", "blur",
                 "--key-password-file", str(tmp_path / "pw"), "-q"]) == 2
    error = capsys.readouterr().err
    assert "writes no recovery keys" in error and PASSWORD not in error
    cache.close()
    stripped.close()


def test_worker_processes_encrypt_keys_the_writer_stores(precomputed, originals, tmp_path):
    """workers=2: the forked workers hold the derived cipher only; the keys they seal recover
    the same image as the single-process run's."""
    path, method, anonymizer, _ = precomputed
    dataset = [{"image": image, "n": i} for i, image in enumerate(originals)]
    report = precompute(dataset, tmp_path / "w2", anonymizer, secret="cache secret", key_password=PASSWORD, workers=2, batch_size=1, progress=False)
    assert report.computed == 2
    one, two = AnonCache(path, secret="cache secret"), AnonCache(tmp_path / "w2", secret="cache secret")
    assert torch.equal(two.recover(1, PASSWORD, method), one.recover(1, PASSWORD, method))
    for needle in _needles():
        assert not any(needle in p.read_bytes() for p in (tmp_path / "w2").rglob("*") if p.is_file())
    one.close()
    two.close()
