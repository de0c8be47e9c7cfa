"""Encrypted recovery keys: Argon2id + HKDF + AES-256-GCM in their own LMDB store; wrong
passwords, tampered and moved blobs refused; the password stored, logged and pickled nowhere."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch

pytest.importorskip("cryptography")
pytest.importorskip("lmdb")

from anonloader.errors import CacheError, ConfigError, SecretError
from anonloader.methods.diffprivacy.crypto import KdfParams, Secret, derive_cipher
from anonloader.methods.diffprivacy.keys import RecoveryKey
from anonloader.methods.diffprivacy.store import RECOVERY_DB, RecoveryKeyStore

PASSWORD = "correct horse battery staple 7f3a"
FAST_KDF = {"memory_cost": 1024, "iterations": 1, "lanes": 1}  # tests only; the default is RFC 9106's 64 MiB, t=3, p=4


def _key(seed: int = 0) -> RecoveryKey:
    generator = torch.Generator().manual_seed(seed)
    return RecoveryKey(torch.randn(4, 8, 8, generator=generator), torch.randn(10, 16, generator=generator), "words", {"num_inference_steps": 10})


@pytest.fixture()
def store(tmp_path):
    store = RecoveryKeyStore.create(tmp_path, PASSWORD, fingerprint="fp-1", kdf=KdfParams.new(**FAST_KDF))
    store.put("entry-a", 0, _key(0))
    store.put("entry-a", 1, _key(1))
    store.put("entry-b", 0, _key(2))
    store.close()
    return store


def test_round_trip_and_listing(store, tmp_path):
    opened = RecoveryKeyStore.open(tmp_path, PASSWORD)
    assert opened.faces("entry-a") == [0, 1] and opened.faces("entry-b") == [0]
    assert sorted(opened.entries()) == [("entry-a", 0), ("entry-a", 1), ("entry-b", 0)]
    got = opened.get("entry-a", 1)
    assert torch.equal(got.z_T, _key(1).z_T) and torch.equal(got.key_e, _key(1).key_e) and got.meta == _key(1).meta
    with pytest.raises(CacheError, match="read-only"):
        opened.put("entry-c", 0, _key(3))
    # reopening for writing with the same password keeps the salt and the keys
    again = RecoveryKeyStore.create(tmp_path, PASSWORD, fingerprint="fp-1")
    assert again.faces("entry-a") == [0, 1]
    default = KdfParams.new()
    assert (default.memory_cost, default.iterations, default.lanes, len(default.salt)) == (65536, 3, 4, 16)


def test_wrong_password_fails_at_open(store, tmp_path):
    with pytest.raises(SecretError, match="wrong key password"):
        RecoveryKeyStore.open(tmp_path, PASSWORD + "x")
    with pytest.raises(SecretError, match="wrong key password"):
        RecoveryKeyStore.create(tmp_path, "another password", fingerprint="fp-1")
    with pytest.raises(ConfigError, match="another pipeline"):
        RecoveryKeyStore.open(tmp_path, PASSWORD, fingerprint="fp-2")
    # a cipher derived from the wrong password cannot decrypt either
    meta = RecoveryKeyStore.read_meta(tmp_path)
    wrong = RecoveryKeyStore(tmp_path, derive_cipher(Secret("nope"), KdfParams.from_dict(meta["kdf"]), "fp-1"), readonly=True)
    with pytest.raises(SecretError, match="entry-a, face 0"):
        wrong.get("entry-a", 0)


def test_tampered_or_moved_blobs_are_refused(store, tmp_path):
    opened = RecoveryKeyStore.open(tmp_path, PASSWORD, readonly=False)
    with opened.env.begin() as txn:
        blob = bytes(txn.get(b"k/entry-a/00000000"))
    flipped = bytearray(blob)
    flipped[40] ^= 0x01
    with opened.env.begin(write=True) as txn:
        txn.put(b"k/entry-a/00000001", blob)  # face 0's blob moved to face 1
        txn.put(b"k/entry-b/00000000", blob)  # ... and to another entry
        txn.put(b"k/entry-a/00000000", bytes(flipped))
    for entry, face in (("entry-a", 1), ("entry-b", 0), ("entry-a", 0)):
        with pytest.raises(SecretError, match="authentication failed"):
            opened.get(entry, face)


def test_two_encryptions_differ_and_decrypt_equal(tmp_path):
    cipher = derive_cipher(Secret(PASSWORD), KdfParams.new(**FAST_KDF), "fp")
    data = _key(5).to_bytes()
    one, two = cipher.encrypt("e", 0, data), cipher.encrypt("e", 0, data)
    assert one != two and one[:12] != two[:12]
    assert cipher.decrypt("e", 0, one) == cipher.decrypt("e", 0, two) == data
    # the derived key pickles for workers; it decrypts the same
    assert pickle.loads(pickle.dumps(cipher)).decrypt("e", 0, one) == data


def test_password_appears_nowhere(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    secret = Secret(PASSWORD)
    store = RecoveryKeyStore.create(tmp_path, secret, fingerprint="fp", kdf=KdfParams.new(**FAST_KDF))
    store.put("entry", 0, _key(7))
    with pytest.raises(SecretError) as wrong:
        RecoveryKeyStore.open(tmp_path, PASSWORD[::-1])
    texts = [repr(store), str(store.cipher), repr(secret), str(secret), str(wrong.value), caplog.text, repr(RecoveryKeyStore.read_meta(tmp_path))]
    blobs = [pickle.dumps(store), pickle.dumps(store.cipher)]
    blobs += [p.read_bytes() for p in (tmp_path / RECOVERY_DB).iterdir() if p.is_file()]
    needles = [PASSWORD.encode(), PASSWORD.encode("utf-16-le"), PASSWORD[::-1].encode()]
    for needle in needles:
        assert not any(needle.decode("utf-8", "ignore") in text for text in texts if needle.decode("utf-8", "ignore"))
        assert not any(needle in blob for blob in blobs)
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(secret)


def test_password_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("ANONLOADER_KEY_PASSWORD", raising=False)
    with pytest.raises(SecretError, match="key_password"):
        Secret.from_sources()
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    assert Secret.from_sources(key_password_file=tmp_path / "pw") == Secret(PASSWORD)
    monkeypatch.setenv("ANONLOADER_KEY_PASSWORD", PASSWORD)
    assert Secret.from_sources() == Secret(PASSWORD)
    with pytest.raises(SecretError, match="cannot read") as missing:
        Secret.from_sources(key_password_file=tmp_path / "absent")
    assert PASSWORD not in str(missing.value)
    with pytest.raises(CacheError, match="no recovery keys"):
        RecoveryKeyStore.read_meta(tmp_path / "nothing-here")
