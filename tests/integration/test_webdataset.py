"""The WebDataset stage on a tar shard the test writes: before and after decoding, error
handler, picklable, DataLoader workers."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from anonloader.integrations import webdataset as anon_wds
from anonloader.pipeline import Anonymizer
from tests.integration._small_faces import face_region, small_faces

ROWS, COLS = face_region()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("wds") / "faces-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i, photo in enumerate(small_faces(3)):
            sink.write({"__key__": f"face{i:03d}", "png": _png(photo), "cls": str(i).encode()})
        sink.write({"__key__": "broken", "png": b"not an image", "cls": b"9"})
    return str(path)


@pytest.fixture(scope="module")
def anonymizer():
    return Anonymizer("pixelate")


def _change(before: Image.Image, after: Image.Image) -> float:
    a, b = np.asarray(before).astype(float), np.asarray(after).astype(float)
    return float(np.abs(a[ROWS, COLS] - b[ROWS, COLS]).mean())


def test_stage_before_decode_skips_the_broken_sample(shard, anonymizer):
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shard),
        wds.tarfile_to_samples(),
        anon_wds.anonymize(anonymizer, handler=wds.warn_and_continue),
        wds.decode("pil"),
        wds.to_tuple("png", "cls"),
    )
    with pytest.warns(UserWarning, match="broken"):
        samples = list(pipeline)
    originals = small_faces(3)
    assert [label for _, label in samples] == [0, 1, 2]
    for (image, _), original in zip(samples, originals):
        assert image.size == original.size and _change(original, image) > 3
        assert np.array_equal(np.asarray(original)[-20:], np.asarray(image)[-20:])


def test_stage_after_decode_and_reraise_by_default(shard, anonymizer):
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shard),
        wds.tarfile_to_samples(),
        wds.select(lambda s: s["__key__"] != "broken"),
        wds.decode("torchrgb"),
        anon_wds.anonymize(anonymizer),
        wds.to_tuple("png", "cls"),
    )
    samples = list(pipeline)
    assert len(samples) == 3 and samples[0][0].dtype == torch.float32 and samples[0][0].shape == (3, 128, 128)
    raising = wds.DataPipeline(wds.SimpleShardList(shard), wds.tarfile_to_samples(), anon_wds.anonymize(anonymizer))
    with pytest.raises(Exception, match="broken"):
        list(raising)


def test_stage_pickles_into_two_dataloader_workers(shard, anonymizer):
    stage = anon_wds.anonymize(anonymizer, handler=wds.ignore_and_continue)
    assert pickle.loads(pickle.dumps(stage)) is not None
    dataset = wds.DataPipeline(
        wds.SimpleShardList([shard, shard]),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        stage,
        wds.decode("pil"),
        wds.to_tuple("png", "cls"),
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    labels = sorted(label for _, label in loader)
    assert labels == [0, 0, 1, 1, 2, 2]
