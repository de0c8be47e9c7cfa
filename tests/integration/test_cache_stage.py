"""``anonymize(..., cache=PATH, cache_mode=...)`` over a real LMDB and real photo crops."""

from __future__ import annotations

import pytest
import torch
from _cache_faces import face_annotations, make_dataset
from torch.utils.data import DataLoader

import anonloader
from anonloader.cache.precompute import precompute
from anonloader.cache.stage import CachedStage
from anonloader.cache.store import AnonCache
from anonloader.data.adapters import split_sample
from anonloader.data.stage import PipelineStage
from anonloader.detect.annotations import detections_from_annotations
from anonloader.errors import CacheCorruptError, CacheFingerprintError, CacheMissError
from anonloader.pipeline import Anonymizer


def _wrap(dataset, path, mode="read-through", method="blur", **kwargs):
    return anonloader.anonymize(dataset, method, annotations=face_annotations, cache=path, cache_mode=mode, **kwargs)


def _stage(wrapped) -> CachedStage:
    return wrapped.stage


def test_hit_is_byte_identical_to_the_first_computation(tmp_path):
    source = make_dataset(4)
    first = _wrap(source, tmp_path / "c")
    computed = [first[i] for i in range(4)]
    assert _stage(first).counters["computed"] == 4
    again = _wrap(source, tmp_path / "c")
    served = [again[i] for i in range(4)]
    assert _stage(again).counters == {"hits": 4}
    for a, b in zip(computed, served):
        assert torch.equal(a["image"], b["image"]) and a["label"] == b["label"] and torch.equal(a["box"], b["box"])
    assert not torch.equal(served[0]["image"], source[0]["image"])  # the face was anonymized


def test_a_changed_fingerprint_misses(tmp_path):
    images, _ = split_sample(make_dataset(1)[0])
    blur = PipelineStage(Anonymizer("blur", detector=None))
    pixelate = PipelineStage(Anonymizer("pixelate", detector=None))
    wider = PipelineStage(Anonymizer("blur", detector=None, feather=0.2))
    keys = {CachedStage(s, tmp_path / name).keys_of(images)[0] for s, name in ((blur, "a"), (pixelate, "b"), (wider, "c"))}
    assert len(keys) == 3
    _wrap(make_dataset(1), tmp_path / "a")[0]
    with pytest.raises(CacheFingerprintError, match="another pipeline"):
        _wrap(make_dataset(1), tmp_path / "a", method="pixelate")[0]


def test_read_only_miss_fails_closed_with_counts(tmp_path):
    precompute(make_dataset(6), tmp_path / "c", method="blur", annotations=face_annotations, limit=4, progress=False)
    with AnonCache(tmp_path / "c", writable=True, fingerprint=None) as cache:
        cache.set_source_size(6)
    wrapped = _wrap(make_dataset(6), tmp_path / "c", mode="read-only")
    assert wrapped[3] is not None
    with pytest.raises(CacheMissError, match="2 of 6 samples are not in the cache.*run anonloader precompute"):
        wrapped[5]
    assert _stage(wrapped).counters["computed"] == 0


def test_corrupt_entry_read_through_recomputes_read_only_refuses(tmp_path):
    from _cache_corrupt import corrupt_value_on_disk

    source = make_dataset(2)
    original = _wrap(source, tmp_path / "c")[1]
    stage = _stage(_wrap(source, tmp_path / "c"))
    faces = [detections_from_annotations(*face_annotations(source[1]))]
    key = stage.keys_of(split_sample(source[1])[0], None, faces)[0]
    value = stage.cache.get_raw(key)
    stage.cache.close()
    corrupt_value_on_disk(tmp_path / "c", value)
    assert not AnonCache(tmp_path / "c").verify().ok
    with pytest.raises(CacheCorruptError, match="checksum mismatch"):
        _wrap(source, tmp_path / "c", mode="read-only")[1]
    healing = _wrap(source, tmp_path / "c")
    assert torch.equal(healing[1]["image"], original["image"])
    assert _stage(healing).counters["corrupt"] == 1 and _stage(healing).counters["computed"] == 1
    _stage(healing).cache.close()
    assert AnonCache(tmp_path / "c").verify().ok


def test_dataloader_workers_read_the_cache(tmp_path):
    secret = "worker test secret"  # keyed: every read in every worker checks an HMAC
    precompute(make_dataset(8), tmp_path / "c", method="blur", annotations=face_annotations, progress=False, secret=secret)
    dataset = AnonCache(tmp_path / "c", secret=secret).as_dataset()
    direct = [dataset[i] for i in range(8)]
    loader = DataLoader(dataset, batch_size=3, num_workers=2, multiprocessing_context="fork")
    batches = list(loader)
    images = torch.cat([b["image"] for b in batches])
    assert torch.equal(images, torch.stack([d["image"] for d in direct]))
    assert torch.cat([b["label"] for b in batches]).tolist() == [i % 3 for i in range(8)]
    # the read-through wrapper in workers too (each worker opens its own writable handle)
    wrapped = _wrap(make_dataset(8), tmp_path / "c", secret=secret)
    via_wrapper = torch.cat([b["image"] for b in DataLoader(wrapped, batch_size=4, num_workers=2)])
    assert torch.equal(via_wrapper, images)
