"""Failures on the cache paths: recorded per sample, never served as successes, retried.

Real JPEG files of real photo crops in ``tmp_path``; a corrupt file is a real truncated JPEG.
The transient detector fault is a real ``Detector`` whose backend is down, then back up (the
outage the fail-closed policy must not make permanent).
"""

from __future__ import annotations

import pytest
import torch
from _cache_faces import face_annotations, make_dataset
from PIL import Image

import anonloader
from anonloader.cache.precompute import ImageFolder, precompute
from anonloader.cache.store import AnonCache
from anonloader.detect.annotations import detections_from_annotations
from anonloader.errors import DetectionError, ImageDecodeError, UnsupportedImageError


def _folder(tmp_path, n: int = 6, corrupt: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """``n`` JPEGs ``img_XX.jpg`` of real photo crops (those in ``corrupt`` truncated); name -> face box."""
    source = make_dataset(n)
    boxes = {}
    for i in range(n):
        name = f"img_{i:02d}.jpg"
        Image.fromarray(source[i]["image"].permute(1, 2, 0).numpy()).save(tmp_path / name, quality=92)
        if i in corrupt:
            data = (tmp_path / name).read_bytes()
            (tmp_path / name).write_bytes(b"\xff\xd8\xff\xe0" + data[len(data) // 2 :])  # a header, then garbage
        boxes[name] = source[i]["box"]
    return boxes


def test_a_corrupt_file_in_the_middle_is_recorded_and_a_resume_retries_it(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    boxes = _folder(photos, 6, corrupt=(3,))
    options = dict(method="pixelate", annotations=lambda s: (boxes[s["path"]],), on_error="drop", revalidate=False, progress=False)
    report = precompute(photos, tmp_path / "out", **options)
    assert (report.total, report.computed, report.failed, report.dropped) == (6, 6, 1, 1)
    [failure] = report.failures
    assert failure.index == 3 and failure.path.endswith("img_03.jpg") and "ImageDecodeError" in failure.reason
    with AnonCache(tmp_path / "out") as cache:
        assert [(f.index, f.path, f.kind) for f in cache.failures()] == [(3, failure.path, "input")]
        stats = cache.stats()
        assert stats["failed_samples"] == 1 and "img_03.jpg" in stats["failures"][0] and stats["missing_samples"] == 0
        dataset = cache.as_dataset()
        assert len(dataset) == 6 and dataset[3] is None
        assert [dataset[i]["path"] for i in (0, 1, 2, 4, 5)] == [f"img_{i:02d}.jpg" for i in (0, 1, 2, 4, 5)]
    # the file is replaced by a good one: the next run computes only it, and the failure is gone
    _folder(photos, 6)
    again = precompute(photos, tmp_path / "out", **options)
    assert (again.computed, again.skipped, again.failed) == (1, 5, 0)
    with AnonCache(tmp_path / "out") as cache:
        assert cache.failures() == [] and cache.stats()["failed_samples"] == 0
        assert cache.as_dataset()[3]["image"].shape == (3, 96, 96)
    # on_error="raise" stops at the bad file instead
    _folder(photos, 6, corrupt=(2,))
    with pytest.raises(ImageDecodeError, match="img_02.jpg"):
        precompute(photos, tmp_path / "strict", **dict(options, on_error="raise"))


def test_the_folder_source_lists_what_it_decodes_and_names_bombs_and_16_bit(tmp_path, monkeypatch):
    source = make_dataset(1)[0]["image"].permute(1, 2, 0).numpy()
    Image.fromarray(source).save(tmp_path / "a.bmp")
    Image.fromarray(source).save(tmp_path / "b.tif")
    Image.fromarray((source[:, :, 0].astype("uint16") * 257)).save(tmp_path / "c16.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "d.svg").write_text("<svg/>")
    folder = ImageFolder(tmp_path)
    assert folder.files == ["a.bmp", "b.tif", "c16.png"]
    assert torch.equal(folder[0]["image"], folder[1]["image"]) and folder[0]["image"].shape == (3, 96, 96)
    with pytest.raises(UnsupportedImageError, match="c16.png.*16-bit"):
        folder[2]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 96 - 1)  # just over: PIL would only warn
    with pytest.raises(UnsupportedImageError, match=r"a.bmp.*MAX_IMAGE_PIXELS \(9215 pixels\)"):
        folder[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # far over: PIL raises
    with pytest.raises(UnsupportedImageError, match="MAX_IMAGE_PIXELS"):
        folder[1]


class OutageDetector:
    """A ``Detector`` whose backend is down (``DetectionError``) until ``up`` is set; when up it
    returns the face box of the photo crops (``make_dataset``: the astronaut's face)."""

    name = "outage"

    def __init__(self) -> None:
        self.up = False

    def config(self) -> dict:
        return {"name": self.name}

    def __call__(self, images: list[torch.Tensor]) -> list:
        if not self.up:
            raise DetectionError("the detection service is unreachable")
        return [detections_from_annotations(face_annotations(make_dataset(1)[0])[0]) for _ in images]


def test_a_stored_failure_is_recomputed_read_through_and_fails_closed_read_only(tmp_path):
    source = make_dataset(2)
    detector = OutageDetector()

    def wrap(mode: str):
        return anonloader.anonymize(source, "blur", detector=detector, cache=tmp_path / "c", cache_mode=mode, revalidate=False)

    down = wrap("read-through")
    obscured = down[0]["image"]
    assert down.stage.counters["computed"] == 1
    with AnonCache(tmp_path / "c") as cache:
        stats = cache.stats()
        assert (stats["entries"], stats["failed_entries"]) == (1, 1)
        [entry] = [cache.get(key) for _, key, _ in cache.iter_entries()]
        assert entry.failed and "unreachable" in entry.error and torch.equal(entry.image_uint8(), obscured)
    # read-only: the failure is served as what the policy made of it (obscured), counted, never computed
    reader = wrap("read-only")
    assert torch.equal(reader[0]["image"], obscured) and not torch.equal(obscured, source[0]["image"])
    assert reader.stage.counters == {"failed": 1, "hits": 1}
    # the service is back: read-through does not serve the stored failure, it computes again
    detector.up = True
    healed = wrap("read-through")
    anonymized = healed[0]["image"]
    assert healed.stage.counters["failed_recomputed"] == 1 and healed.stage.counters["computed"] == 1
    assert not torch.equal(anonymized, obscured) and not torch.equal(anonymized, source[0]["image"])
    with AnonCache(tmp_path / "c") as cache:
        assert cache.stats()["failed_entries"] == 0
    served = wrap("read-only")
    assert torch.equal(served[0]["image"], anonymized) and served.stage.counters == {"hits": 1}
