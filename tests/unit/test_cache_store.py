"""AnonCache on a real LMDB in tmp_path: round trips, map growth, errors, corruption, shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anonloader.cache import store as store_module
from anonloader.cache.commands import merge_caches
from anonloader.cache.keys import cache_key
from anonloader.cache.manifest import shard_name, write_manifest
from anonloader.cache.store import AnonCache, SampleRecord
from anonloader.errors import CacheCorruptError, CacheError, CacheFingerprintError, CacheMissError
from anonloader.types import FaceRecord

FP = "f" * 64


def _crops(astronaut_image: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [astronaut_image[:, 8 * i : 8 * i + 96, 150 + 4 * i : 246 + 4 * i].contiguous() for i in range(n)]


def _record() -> FaceRecord:
    return FaceRecord(box=(1.5, 2.25, 30.0, 40.0), landmarks=((3.0, 4.0),) * 5, score=0.99, status="anonymized", synthetic_id=7)


def corrupt_value_on_disk(path: Path, value: bytes) -> None:
    """Flips one byte in the middle of ``value`` inside ``path/data.mdb``."""
    data = bytearray((path / "data.mdb").read_bytes())
    at = data.find(value)
    assert at >= 0, "value not found contiguously in data.mdb"
    data[at + len(value) // 2] ^= 0xFF
    (path / "data.mdb").write_bytes(bytes(data))


def test_put_get_round_trip_with_metadata(tmp_path, astronaut_image):
    image = _crops(astronaut_image, 1)[0]
    cache = AnonCache(tmp_path / "c", writable=True, fingerprint=FP, method="blur")
    assert store_module._OPEN_ENVS.get(str((tmp_path / "c").resolve())) is None  # nothing opened in __init__
    key = cache_key(b"src", FP)
    cache.put(key, image, [_record()])
    cache.put(cache_key(b"gone", FP), None, [])
    cache.close()
    reader = AnonCache(tmp_path / "c")
    entry = reader.get(key)
    assert torch.equal(entry.image(), image)
    assert entry.records() == [_record()]
    assert entry.meta["fingerprint"] == FP and entry.meta["method"] == "blur" and entry.meta["anonloader_version"]
    assert reader.get(cache_key(b"gone", FP)).image() is None
    assert reader.get(cache_key(b"absent", FP)) is None
    assert reader.stats()["entries"] == 2
    with pytest.raises(CacheError, match="read-only"):
        reader.put(key, image)


def test_map_size_grows_when_full(tmp_path, astronaut_image):
    cache = AnonCache(tmp_path / "small", writable=True, fingerprint=FP, codec="raw", map_size=64 * 1024)
    crops = _crops(astronaut_image, 12)  # 12 x 27 KiB raw: well over 64 KiB
    cache.write([(cache_key(bytes([i]), FP), crop, []) for i, crop in enumerate(crops)])
    env = cache._shards[0].env()
    assert env.info()["map_size"] > 64 * 1024
    assert all(torch.equal(cache.get(cache_key(bytes([i]), FP)).image(), c) for i, c in enumerate(crops))
    cache.close()


def test_bad_paths_and_other_fingerprints_give_clear_errors(tmp_path, astronaut_image):
    with pytest.raises(CacheError, match="does not exist; run anonloader precompute"):
        AnonCache(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    with pytest.raises(CacheError, match="not an anonloader cache"):
        AnonCache(tmp_path / "plain")
    with pytest.raises(CacheError, match="not an anonloader cache"):
        AnonCache(tmp_path / "plain", writable=True, fingerprint=FP)
    cache = AnonCache(tmp_path / "c", writable=True, fingerprint=FP, salt_check="abc", method="blur")
    cache.put(cache_key(b"x", FP), _crops(astronaut_image, 1)[0])
    cache.close()
    with pytest.raises(CacheFingerprintError, match="another pipeline.*method 'blur'"):
        AnonCache(tmp_path / "c", writable=True, fingerprint="0" * 64).get(cache_key(b"x", FP))
    with pytest.raises(CacheFingerprintError, match="another secret"):
        AnonCache(tmp_path / "c", salt_check="def").get(cache_key(b"x", FP))


def test_corrupt_entry_is_reported_and_never_served(tmp_path, astronaut_image):
    cache = AnonCache(tmp_path / "c", writable=True, fingerprint=FP)
    keys = [cache_key(bytes([i]), FP) for i in range(3)]
    cache.write([(k, c, []) for k, c in zip(keys, _crops(astronaut_image, 3))])
    value = cache.get_raw(keys[1])
    cache.close()
    corrupt_value_on_disk(tmp_path / "c", value)
    reader = AnonCache(tmp_path / "c")
    report = reader.verify()
    assert report.entries == 3 and len(report.corrupt) == 1 and keys[1].hex() in report.corrupt[0]
    with pytest.raises(CacheCorruptError, match="checksum mismatch"):
        reader.get(keys[1])
    assert reader.get(keys[0]) is not None


def test_sample_records_and_partial_as_dataset(tmp_path, astronaut_image):
    crops = _crops(astronaut_image, 3)
    cache = AnonCache(tmp_path / "c", writable=True, fingerprint=FP)
    cache.set_source_size(4)
    from anonloader.data.adapters import split_sample

    for i, crop in enumerate(crops):
        images, skeleton = split_sample({"image": (crop * 255).round().to(torch.uint8), "label": i})
        key = cache_key(images[0].content_bytes(), FP)
        cache.write([(key, crop, [])], [(i, SampleRecord(skeleton, [key]))])
    cache.close()
    reader = AnonCache(tmp_path / "c")
    with pytest.raises(CacheMissError, match="1 of 4 samples are not in the cache.*run anonloader precompute"):
        reader.as_dataset()
    dataset = reader.as_dataset(allow_partial=True)
    assert len(dataset) == 3
    assert [dataset[i]["label"] for i in range(3)] == [0, 1, 2]
    assert torch.equal(dataset[2]["image"], (crops[2] * 255).round().to(torch.uint8))


def test_shards_open_as_one_cache_and_merge(tmp_path, astronaut_image):
    crops = _crops(astronaut_image, 4)
    keys = [cache_key(bytes([i]), FP) for i in range(4)]
    root = tmp_path / "sharded"
    for rank in range(2):
        shard = AnonCache(root / shard_name(rank, 2), writable=True, fingerprint=FP, method="blur")
        shard.write([(keys[i], crops[i], []) for i in (2 * rank, 2 * rank + 1)])
        shard.close()
    manifest_path = write_manifest(root)
    whole = AnonCache(root)
    assert whole.manifest["entries"] == 4 and len(whole.manifest["shards"]) == 2
    assert all(s["key_min"] <= s["key_max"] for s in whole.manifest["shards"])
    assert all(torch.equal(whole.get(k).image(), c) for k, c in zip(keys, crops))
    assert whole.verify().ok and AnonCache(manifest_path).stats()["entries"] == 4
    counts = merge_caches([root], tmp_path / "merged")
    assert counts == {"entries": 4, "samples": 0}
    merged = AnonCache(tmp_path / "merged")
    assert sorted(k for _, k, _ in merged.iter_entries()) == sorted(keys)
    assert merged.verify().ok
    # a shard changed after the manifest was written is reported
    extra = AnonCache(root / shard_name(0, 2), writable=True, fingerprint=FP)
    extra.put(cache_key(b"late", FP), crops[0])
    extra.close()
    assert any("changed since the manifest" in p for p in AnonCache(root).verify().corrupt)
    # shards of another pipeline cannot be merged into one cache
    other = AnonCache(tmp_path / "other", writable=True, fingerprint="0" * 64)
    other.put(cache_key(b"o", "0" * 64), crops[0])
    other.close()
    with pytest.raises(CacheFingerprintError, match="different pipelines"):
        merge_caches([tmp_path / "merged", tmp_path / "other"], tmp_path / "bad")
