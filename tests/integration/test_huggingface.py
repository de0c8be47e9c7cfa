"""anonymize_hf on a small in-memory datasets.Dataset of real photos: lazy and map modes,
image features of several modes, encoded (decode=False) images, the LMDB cache reused."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
from PIL import Image

from anonloader.integrations.huggingface import anonymize_hf
from anonloader.pipeline import Anonymizer
from tests.integration._small_faces import face_region, small_faces

ROWS, COLS = face_region()


@pytest.fixture(scope="module")
def anonymizer():
    return Anonymizer("pixelate")


@pytest.fixture(scope="module")
def photos():
    return small_faces(3)


def _ds(photos, mode=None):
    images = [p.convert(mode) if mode else p for p in photos]
    feature = datasets.Image(mode=mode) if mode else datasets.Image()
    features = datasets.Features({"image": feature, "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": list(range(len(images)))}, features=features)


def _change(before, after) -> float:
    a, b = np.asarray(before).astype(float), np.asarray(after).astype(float)
    return float(np.abs(a[ROWS, COLS] - b[ROWS, COLS]).mean())


def test_lazy_mode_with_transform(photos, anonymizer):
    ds = _ds(photos)
    lazy = anonymize_hf(ds, "image", anonymizer=anonymizer)
    assert len(lazy) == 3 and lazy.column_names == ds.column_names
    row = lazy[1]
    assert row["label"] == 1 and row["image"].mode == "RGB" and _change(photos[1], row["image"]) > 3
    batch = lazy[0:2]
    assert batch["label"] == [0, 1] and all(_change(p, i) > 3 for p, i in zip(photos, batch["image"]))
    assert _change(photos[1], ds[1]["image"]) == 0  # the source dataset is untouched


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_map_mode_keeps_feature_mode(photos, anonymizer, mode):
    mapped = anonymize_hf(_ds(photos[:2], mode), mode="map", anonymizer=anonymizer)
    assert mapped.features["image"].mode == mode and mapped.column_names == ["image", "label"]
    for original, row in zip(photos, mapped):
        assert row["image"].mode == mode
        assert _change(original.convert(mode), row["image"]) > 3


def test_map_mode_reuses_the_cache_and_drops_nothing(photos, anonymizer, tmp_path):
    ds = _ds(photos[:2])
    first = anonymize_hf(ds, mode="map", anonymizer=anonymizer, cache=tmp_path / "cache")
    before = dict(anonymizer.counters)
    again = anonymize_hf(ds.shuffle(seed=1).sort("label"), mode="map", anonymizer=anonymizer, cache=tmp_path / "cache")
    assert anonymizer.counters["images"] == before["images"]  # every image came from the cache
    for a, b in zip(first, again):
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_encoded_images_and_dropping(photos):
    blank = photos[0].copy()
    blank.paste((128, 128, 128), (0, 0, 128, 128))  # no face left
    ds = _ds([photos[0], blank, photos[1]]).cast_column("image", datasets.Image(decode=False))
    mapped = anonymize_hf(ds, mode="map", anonymizer=Anonymizer("blur", on_no_face="drop"))
    assert mapped["label"] == [0, 2]  # the image without a face was dropped, as configured
    out = Image.open(io.BytesIO(mapped[0]["image"]["bytes"]))
    assert out.format == "PNG" and _change(photos[0], out.convert("RGB")) > 1


def test_map_mode_with_two_processes(photos, anonymizer):
    mapped = anonymize_hf(_ds(photos[:2]), mode="map", num_proc=2, batch_size=1, anonymizer=anonymizer)
    assert mapped["label"] == [0, 1]
    assert all(_change(p, row["image"]) > 3 for p, row in zip(photos, mapped))
