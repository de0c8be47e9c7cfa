"""The cache's on-disk format: typed records without pickle, authentication, old formats.

Crafted values are written straight into a real LMDB (as an attacker with write access to a
shipped cache would) and read back through every public path.
"""

from __future__ import annotations

import collections
import pickle
import struct
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
import xxhash

from anonloader.cache.commands import merge_caches
from anonloader.cache.format import SAMPLE_MAGIC, SampleRecord, Sealer, StoredImage, index_key, pack_value, unpack_value
from anonloader.cache.keys import CacheKeys, cache_key
from anonloader.cache.store import AnonCache
from anonloader.data.adapters import split_sample
from anonloader.errors import CacheCorruptError, CacheError, CacheFingerprintError, InputError

FP = "f" * 64
SECRET = "a test secret of thirty-two bytes"


class _CreatesFile:
    """Unpickling this creates ``path`` (what a malicious cache value would do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_cache(path: Path, image: torch.Tensor, secret: str | None = None) -> bytes:
    """One sample ``{"image": uint8, "label": 3}`` stored as precompute stores it; returns its key."""
    cache = AnonCache(path, writable=True, fingerprint=FP, secret=secret)
    images, skeleton = split_sample({"image": (image * 255).round().to(torch.uint8), "label": 3})
    key = cache_key(images[0].content_bytes(), FP, CacheKeys.from_secret(secret).salt)
    stored = StoredImage("ok", None, cache.codec.name, cache.codec.encode(image))
    cache.set_source_size(1)
    cache.write([(key, image, [])], [(0, SampleRecord(skeleton, [key], [stored]))])
    cache.close()
    return key


def _replace(path: Path, db: bytes, key: bytes, value: bytes) -> None:
    """Overwrites one stored value (this process's reader handles are closed first: LMDB allows
    one handle per path and process)."""
    AnonCache(path, writable=True).close()
    env = lmdb.open(str(path), max_dbs=4, subdir=True)
    with env.begin(write=True) as txn:
        txn.put(key, value, db=env.open_db(db, txn=txn, create=False))
    env.close()


def _crafted_values(marker: Path) -> dict[str, bytes]:
    body = pickle.dumps(_CreatesFile(str(marker)), protocol=4)
    old_frame = b"ALS1" + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)) + body
    new_frame = Sealer(None).seal(SAMPLE_MAGIC, b"samples/" + index_key(0), body)  # valid checksum, pickle body
    return {"bare pickle": body, "format 1 record": old_frame, "checksummed pickle": new_frame}


@pytest.mark.parametrize("kind", ["bare pickle", "format 1 record", "checksummed pickle"])
def test_a_crafted_pickle_is_refused_by_verify_as_dataset_and_merge(tmp_path, astronaut_image, kind):
    marker = tmp_path / "pwned"
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_CreatesFile(str(live))))  # the payload is live: unpickling it creates a file
    assert live.exists()
    _write_cache(tmp_path / "c", astronaut_image[:, :64, :64])
    _replace(tmp_path / "c", b"samples", index_key(0), _crafted_values(marker)[kind])
    report = AnonCache(tmp_path / "c").verify()
    assert not report.ok and "sample 0" in report.corrupt[0]
    with pytest.raises(CacheError):  # CacheCorruptError, or the format 1 error
        AnonCache(tmp_path / "c").as_dataset()[0]
    with pytest.raises(CacheError):
        merge_caches([tmp_path / "c"], tmp_path / "merged")
    assert not marker.exists()


def test_a_crafted_entry_is_refused_too(tmp_path, astronaut_image):
    marker = tmp_path / "pwned"
    key = _write_cache(tmp_path / "c", astronaut_image[:, :64, :64])
    _replace(tmp_path / "c", b"entries", key, pickle.dumps(_CreatesFile(str(marker))))
    with pytest.raises(CacheCorruptError, match="bad header"):
        AnonCache(tmp_path / "c").get(key)
    assert not AnonCache(tmp_path / "c").verify().ok
    assert not marker.exists()


def test_a_tampered_keyed_value_is_refused(tmp_path, astronaut_image):
    image = astronaut_image[:, :64, :64].contiguous()
    key = _write_cache(tmp_path / "c", image, secret=SECRET)
    reader = AnonCache(tmp_path / "c", secret=SECRET)
    assert torch.equal(reader.as_dataset()[0]["image"], (image * 255).round().to(torch.uint8))
    value = reader._shards[0].read(lambda txn: txn.get(index_key(0), db=reader._shards[0].db(b"samples")))
    reader.close()
    # 1. one flipped pixel byte: the tag no longer matches
    flipped = bytearray(value)
    flipped[-10] ^= 0x01
    _replace(tmp_path / "c", b"samples", index_key(0), bytes(flipped))
    with pytest.raises(CacheCorruptError, match="authentication tag mismatch"):
        AnonCache(tmp_path / "c", secret=SECRET).as_dataset()[0]
    # 2. the same edit with a recomputed checksum (all an attacker without the key can do)
    body = bytes(flipped[5 + 32 :])
    _replace(tmp_path / "c", b"samples", index_key(0), Sealer(None).seal(SAMPLE_MAGIC, b"samples/" + index_key(0), body))
    with pytest.raises(CacheCorruptError, match="not authenticated"):
        AnonCache(tmp_path / "c", secret=SECRET).as_dataset()[0]
    assert not AnonCache(tmp_path / "c", secret=SECRET).verify().ok
    # 3. an authentic value moved under another key is refused (the key is in the tag)
    _replace(tmp_path / "c", b"samples", index_key(0), value)
    _replace(tmp_path / "c", b"samples", index_key(5), value)
    with pytest.raises(CacheCorruptError, match="sample 5.*authentication tag mismatch"):
        AnonCache(tmp_path / "c", secret=SECRET).get_sample(5)
    # 4. entries are authenticated too
    with AnonCache(tmp_path / "c", secret=SECRET) as probe:
        entry = probe.get_raw(key)
    edited = bytearray(entry)
    edited[-1] ^= 0x01
    _replace(tmp_path / "c", b"entries", key, bytes(edited))
    with pytest.raises(CacheCorruptError, match="authentication tag mismatch"):
        AnonCache(tmp_path / "c", secret=SECRET).get(key)


def test_an_old_format_cache_gives_the_command_that_rebuilds_it(tmp_path):
    path = tmp_path / "old"
    path.mkdir()
    env = lmdb.open(str(path), max_dbs=3, subdir=True)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        env.open_db(b"entries", txn=txn)
        env.open_db(b"samples", txn=txn)
        for name, value in (("fingerprint", FP), ("salt_check", "none"), ("cache_format", 1), ("method", "blur")):
            txn.put(name.encode(), f"{value!r}".replace("'", '"').encode(), db=meta)
    env.close()
    for action in (lambda c: c.as_dataset(), lambda c: c.stats(), lambda c: c.verify()):
        with pytest.raises(CacheFingerprintError, match=r"format 1.*never loaded.*rebuild it with `anonloader precompute SOURCE"):
            action(AnonCache(path))


Point = collections.namedtuple("Point", ["x", "y"])


def test_typed_records_round_trip_every_supported_type():
    value = {
        "label": 3,
        "big": 2**63 + 5,
        "score": 0.25,
        "name": "ünïcode",
        "raw": b"\x00\xff",
        "none": None,
        "flags": [True, False],
        "pair": (1, (2.5, "x")),
        (1, 2): "tuple key",
        7: "int key",
        "point": Point(1, 2.0),
        "array": np.arange(12, dtype=">i4").reshape(3, 4),
        "floats": np.linspace(0, 1, 5, dtype=np.float16),
        "scalar": np.float32(1.5),
        "tensor": torch.arange(6, dtype=torch.int64).view(2, 3),
        "bf16": torch.tensor([1.0, -2.5], dtype=torch.bfloat16),
        "bool_tensor": torch.tensor([True, False]),
    }
    back = unpack_value(pack_value(value))
    assert list(back) == list(value)
    for name in ("label", "big", "score", "name", "raw", "none", "flags", "pair", (1, 2), 7):
        assert back[name] == value[name] and type(back[name]) is type(value[name])
    assert back["point"] == (1, 2.0) and back["point"].x == 1 and type(back["point"]).__name__ == "Point"
    assert np.array_equal(back["array"], value["array"]) and back["array"].shape == (3, 4)
    assert back["floats"].dtype == np.float16 and np.array_equal(back["floats"], value["floats"])
    assert isinstance(back["scalar"], np.float32) and back["scalar"] == 1.5
    for name in ("tensor", "bf16", "bool_tensor"):
        assert back[name].dtype == value[name].dtype and torch.equal(back[name], value[name])


def test_an_unknown_type_is_an_error_at_write_time_naming_the_field():
    class Opaque:
        pass

    with pytest.raises(InputError, match=r"field sample 4\['meta'\]\[1\] holds a .*Opaque.*never pickles"):
        pack_value({"meta": [1, Opaque()]}, "sample 4")
    with pytest.raises(InputError, match=r"field sample\['objs'\] is a numpy array of dtype object"):
        pack_value({"objs": np.array([object()])})
    with pytest.raises(CacheCorruptError, match="malformed typed record"):
        unpack_value(b"\xc7\x03\x63abc")  # an extension type the format does not define


def test_workers_get_subkeys_never_the_secret(tmp_path):
    from anonloader.cache.stage import CachedStage
    from anonloader.data.stage import PipelineStage
    from anonloader.identity.mapper import Secret
    from anonloader.pipeline import Anonymizer

    raw = SECRET.encode()
    keys = CacheKeys.from_secret(SECRET)
    assert keys == CacheKeys.from_secret(raw) == CacheKeys.from_secret(Secret(raw))  # the Secret's public digest
    assert raw not in keys.salt + keys.mac_key and keys.salt != keys.mac_key and SECRET not in repr(keys)
    stage = CachedStage(PipelineStage(Anonymizer("blur", detector=None)), tmp_path / "c", secret=SECRET)
    for payload in (pickle.dumps(stage), pickle.dumps(stage.cache), pickle.dumps(keys)):
        assert raw not in payload and SECRET.encode("utf-16-le") not in payload
