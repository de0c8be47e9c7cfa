"""AnonCache on a real LMDB in tmp_path: round trips, map growth, errors, corruption, shards."""

from __future__ import annotations

import logging

import pytest
import torch

from anonloader import lmdb_envs
from anonloader.cache.codecs import get_codec
from anonloader.cache.commands import merge_caches
from anonloader.cache.format import SampleRecord, StoredImage, image_status
from anonloader.cache.keys import cache_key
from anonloader.cache.manifest import shard_name, write_manifest
from anonloader.cache.store import AnonCache
from anonloader.errors import CacheCorruptError, CacheError, CacheFingerprintError, CacheMissError
from anonloader.types import FaceRecord

FP = "f" * 64


def _crops(astronaut_image: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [astronaut_image[:, 8 * i : 8 * i + 96, 150 + 4 * i : 246 + 4 * i].contiguous() for i in range(n)]


def _record() -> FaceRecord:
    return FaceRecord(box=(1.5, 2.25, 30.0, 40.0), landmarks=((3.0, 4.0),) * 5, score=0.99, status="anonymized", synthetic_id=7, revalidated=True)


def corrupt_value_on_disk(path, value: bytes, at: float = 0.5) -> None:
    """Flips one byte of ``value`` (at fraction ``at`` of its length) inside ``path/data.mdb``."""
    data = bytearray((path / "data.mdb").read_bytes())
    start = data.find(value)
    assert start >= 0, "value not found contiguously in data.mdb"
    data[start + int(len(value) * at)] ^= 0xFF
    (path / "data.mdb").write_bytes(bytes(data))


def _sample(cache: AnonCache, index: int, image: torch.Tensor | None, fields: dict, error: str | None = None) -> tuple:
    """``(entries, samples)`` for :meth:`AnonCache.write` of a ``{"image": 3,H,W uint8, **fields}`` sample."""
    from anonloader.data.adapters import split_sample

    pixels = (image * 255).round().to(torch.uint8) if image is not None else torch.zeros(3, 32, 32, dtype=torch.uint8)
    images, skeleton = split_sample({"image": pixels, **fields})
    key = cache_key(images[0].content_bytes(), FP)
    payload = b"" if image is None else cache.codec.encode(image)
    stored = StoredImage(image_status(image, error), error, None if image is None else cache.codec.name, payload)
    return [(key, image, [], error)], [(index, SampleRecord(skeleton, [key], [stored]))]


def test_put_get_round_trip_with_metadata(tmp_path, astronaut_image, caplog):
    image = _crops(astronaut_image, 1)[0]
    cache = AnonCache(tmp_path / "c", writable=True, fingerprint=FP, method="blur")
    assert not lmdb_envs.is_open(tmp_path / "c")  # nothing opened in __init__
    key = cache_key(b"src", FP)
    with caplog.at_level(logging.WARNING, logger="anonloader.cache.store"):
        cache.put(key, image, [_record()])
    assert "membership test" in caplog.text and "without a secret" in caplog.text
    cache.put(cache_key(b"gone", FP), None, [])
    cache.put(cache_key(b"failed", FP), image * 0 + 0.5, [], error="image 0: detection failed: RuntimeError: outage")
    cache.close()
    reader = AnonCache(tmp_path / "c")
    entry = reader.get(key)
    assert torch.equal(entry.image(), image) and entry.status == "ok" and not entry.failed
    assert entry.records() == [_record()]
    assert entry.meta["fingerprint"] == FP and entry.meta["method"] == "blur" and entry.meta["anonloader_version"]
    assert reader.get(cache_key(b"gone", FP)).image() is None and reader.get(cache_key(b"gone", FP)).status == "dropped"
    failed = reader.get(cache_key(b"failed", FP))
    assert failed.failed and "outage" in failed.error and failed.image() is not None  # stored as a failure
    assert reader.get(cache_key(b"absent", FP)) is None
    stats = reader.stats()
    assert (stats["entries"], stats["failed_entries"], stats["dropped_entries"], stats["keyed"]) == (3, 1, 1, False)
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


def test_bad_paths_other_fingerprints_and_secrets_give_clear_errors(tmp_path, astronaut_image):
    with pytest.raises(CacheError, match="does not exist; run anonloader precompute"):
        AnonCache(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    with pytest.raises(CacheError, match="not an anonloader cache"):
        AnonCache(tmp_path / "plain")
    with pytest.raises(CacheError, match="not an anonloader cache"):
        AnonCache(tmp_path / "plain", writable=True, fingerprint=FP)
    cache = AnonCache(tmp_path / "c", writable=True, fingerprint=FP, secret="first secret", method="blur")
    cache.put(cache_key(b"x", FP), _crops(astronaut_image, 1)[0])
    cache.close()
    with pytest.raises(CacheFingerprintError, match="another pipeline.*method 'blur'"):
        AnonCache(tmp_path / "c", writable=True, fingerprint="0" * 64, secret="first secret").get(cache_key(b"x", FP))
    with pytest.raises(CacheFingerprintError, match="another secret"):
        AnonCache(tmp_path / "c", secret="second secret").get(cache_key(b"x", FP))
    with pytest.raises(CacheError, match="authenticated with a secret: pass the secret"):
        AnonCache(tmp_path / "c").get(cache_key(b"x", FP))
    assert AnonCache(tmp_path / "c", secret="first secret").get(cache_key(b"x", FP)) is not None


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
    for i, crop in enumerate(crops):
        cache.write(*_sample(cache, i, crop, {"label": i}))
    cache.close()
    reader = AnonCache(tmp_path / "c")
    with pytest.raises(CacheMissError, match="1 of 4 samples are not in the cache.*run anonloader precompute"):
        reader.as_dataset()
    dataset = reader.as_dataset(allow_partial=True)
    assert len(dataset) == 3
    assert [dataset[i]["label"] for i in range(3)] == [0, 1, 2]
    assert torch.equal(dataset[2]["image"], (crops[2] * 255).round().to(torch.uint8))


def test_getitems_equals_per_item_reads_and_tensors_are_owned(tmp_path, astronaut_image):
    crops = _crops(astronaut_image, 5)
    cache = AnonCache(tmp_path / "c", writable=True, fingerprint=FP, codec="raw")
    fields = [{"label": i, "name": f"s{i}", "extra": (i, [1.5, None]), "mask": torch.arange(i + 1)} for i in range(5)]
    for i, crop in enumerate(crops):
        image = None if i == 2 else crop  # sample 2 was dropped by the pipeline
        cache.write(*_sample(cache, i, image, fields[i]))
    cache.close()
    dataset = AnonCache(tmp_path / "c").as_dataset()
    order = [4, 0, 2, 3, 1, 0]
    batch = dataset.__getitems__(order)
    singles = [dataset[i] for i in order]
    assert batch[2] is None and singles[2] is None
    for got, one, i in zip(batch, singles, order):
        if i == 2:
            continue
        assert torch.equal(got["image"], one["image"]) and torch.equal(got["image"], (crops[i] * 255).round().to(torch.uint8))
        assert (got["label"], got["name"], got["extra"]) == (i, f"s{i}", (i, [1.5, None]))
        assert torch.equal(got["mask"], torch.arange(i + 1)) and torch.equal(got["mask"], one["mask"])
    # the served pixels are the caller's: writing into one changes nothing stored, nor any other
    # image served (each sample's pixels are a view of that read's own checked copy)
    before = (tmp_path / "c" / "data.mdb").read_bytes()
    batch[0]["image"].fill_(7)
    assert torch.equal(batch[5]["image"], (crops[0] * 255).round().to(torch.uint8))
    assert torch.equal(batch[1]["image"], singles[1]["image"])
    assert torch.equal(dataset[4]["image"], (crops[4] * 255).round().to(torch.uint8))
    assert (tmp_path / "c" / "data.mdb").read_bytes() == before
    assert AnonCache(tmp_path / "c").verify().ok


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
    assert whole.manifest["entries"] == 4 and len(whole.manifest["shards"]) == 2 and whole.manifest["failures"] == []
    assert all(s["key_min"] <= s["key_max"] for s in whole.manifest["shards"])
    assert all(torch.equal(whole.get(k).image(), c) for k, c in zip(keys, crops))
    assert whole.verify().ok and AnonCache(manifest_path).stats()["entries"] == 4
    counts = merge_caches([root], tmp_path / "merged")
    assert counts == {"entries": 4, "samples": 0, "failures": 0}
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


def test_every_codec_is_recorded_per_entry(tmp_path, astronaut_image):
    image = _crops(astronaut_image, 1)[0]
    cache = AnonCache(tmp_path / "c", writable=True, fingerprint=FP)
    assert cache.meta["codec"]["name"] == "raw"  # the default
    for name in ("zstd", "lz4", "raw", "qoi", "png", "webp"):
        cache.codec = get_codec(name)
        cache.put(cache_key(name.encode(), FP), image)
    cache.close()
    reader = AnonCache(tmp_path / "c")
    for name in ("zstd", "lz4", "raw", "qoi", "png", "webp"):
        entry = reader.get(cache_key(name.encode(), FP))
        assert entry.codec == name and torch.equal(entry.image(), image)
