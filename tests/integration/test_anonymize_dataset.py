"""``anonloader.anonymize(dataset)`` on real photos: same kind of dataset, same labels, same
types, faces changed; DataLoader workers; annotations instead of a detector; bad samples."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

import anonloader
from anonloader.errors import ImageDecodeError
from anonloader.types import Detections


class FaceDataset(Dataset):
    """Real photos as (PIL image, label) samples."""

    def __init__(self, photos, labels):
        self.photos, self.labels = photos, labels

    def __len__(self):
        return len(self.photos)

    def __getitem__(self, i):
        return self.photos[i], self.labels[i]


class FaceStream(IterableDataset):
    def __init__(self, photos):
        self.photos = photos

    def __iter__(self):
        for i, p in enumerate(self.photos):
            yield {"image": torch.from_numpy(np.asarray(p)).permute(2, 0, 1).contiguous(), "label": i}


def _face_change(before: np.ndarray, after: np.ndarray, box) -> float:
    x1, y1, x2, y2 = (max(0, int(v)) for v in box)
    return float(np.abs(before[y1:y2, x1:x2].astype(float) - after[y1:y2, x1:x2].astype(float)).mean())


def test_map_style_pil_tuples(astronaut_pil, t1_pil):
    wrapped = anonloader.anonymize(FaceDataset([astronaut_pil, t1_pil], ["astronaut", "table"]), method="pixelate")
    assert isinstance(wrapped, Dataset) and len(wrapped) == 2
    image, label = wrapped[0]
    assert label == "astronaut" and isinstance(image, Image.Image) and image.size == astronaut_pil.size
    before, after = np.asarray(astronaut_pil), np.asarray(image)
    assert np.abs(before.astype(int) - after.astype(int)).mean() > 0.5
    assert np.array_equal(before[-60:], after[-60:])  # the bottom rows hold no face


def test_iterable_dataset_stays_iterable_and_keeps_dtype(astronaut_pil):
    wrapped = anonloader.anonymize(FaceStream([astronaut_pil, astronaut_pil]), method="blur")
    assert isinstance(wrapped, IterableDataset)
    samples = list(wrapped)
    assert [s["label"] for s in samples] == [0, 1]
    assert samples[0]["image"].dtype == torch.uint8 and samples[0]["image"].shape == (3, 512, 512)
    assert torch.equal(samples[0]["image"], samples[1]["image"])


def test_dataloader_with_two_workers(astronaut_pil, t1_pil):
    photos = [astronaut_pil, t1_pil.resize((512, 354)), astronaut_pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT), astronaut_pil]

    class Tensors(Dataset):
        def __len__(self):
            return len(photos)

        def __getitem__(self, i):
            p = photos[i].resize((256, 256))
            return torch.from_numpy(np.asarray(p)).permute(2, 0, 1).float() / 255, i

    wrapped = anonloader.anonymize(Tensors(), method="blur")
    loader = DataLoader(wrapped, batch_size=2, num_workers=2)
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert labels.tolist() == [0, 1, 2, 3] and images.dtype == torch.float32
    originals = torch.stack([Tensors()[i][0] for i in range(4)])
    assert ((images - originals).abs().flatten(1).mean(1) > 0.002).all()
    assert torch.equal(images[0], images[3])  # same photo, same bytes, from different workers


def test_torchvision_image_folder(tmp_path, astronaut_pil):
    from torchvision.datasets import ImageFolder

    for cls in ("happy", "sad"):
        (tmp_path / cls).mkdir()
        astronaut_pil.save(tmp_path / cls / "a.jpg", quality=95)
    wrapped = anonloader.anonymize(ImageFolder(tmp_path), method="mask")
    assert wrapped.classes == ["happy", "sad"]
    image, target = wrapped[1]
    assert target == 1 and isinstance(image, Image.Image)


def test_annotations_replace_the_detector(astronaut_pil):
    from anonloader.detect.mtcnn import MTCNNDetector

    tensor = torch.from_numpy(np.asarray(astronaut_pil)).permute(2, 0, 1).float() / 255
    (found,) = MTCNNDetector()([tensor])
    boxes, landmarks = found.boxes.tolist(), found.landmarks.tolist()
    wrapped = anonloader.anonymize(
        [{"img": astronaut_pil, "boxes": boxes, "landmarks": landmarks}],
        method="blur",
        image_key="img",
        annotations=lambda s: (s["boxes"], s["landmarks"]),
    )
    assert wrapped.stage.anonymizer.detector is None
    out = wrapped[0]
    assert _face_change(np.asarray(astronaut_pil), np.asarray(out["img"]), boxes[0]) > 1.0
    assert out["boxes"] == boxes


def test_bad_samples_name_their_index_and_drop_policy(astronaut_pil):
    buffer = io.BytesIO()
    astronaut_pil.save(buffer, format="JPEG")
    good, bad = buffer.getvalue(), buffer.getvalue()[:300]
    wrapped = anonloader.anonymize([{"jpg": good}, {"jpg": bad}], image_key="jpg")
    assert isinstance(wrapped[0]["jpg"], bytes)
    with pytest.raises(ImageDecodeError, match="sample 1"):
        wrapped[1]
    assert isinstance(wrapped[0]["jpg"], bytes)  # nothing else lost
    dropping = anonloader.anonymize([{"jpg": good}, {"jpg": bad}], image_key="jpg", on_error="drop")
    assert dropping[1] is None and isinstance(dropping[0]["jpg"], bytes)


def test_collate_skips_dropped_samples(astronaut_pil):
    class Broken:
        name, crop_size, template = "broken", 64, "arcface"

        def __call__(self, crops, conditions):
            raise RuntimeError("boom")

        def config(self):
            return {}

    face = torch.from_numpy(np.asarray(astronaut_pil.resize((256, 256)))).permute(2, 0, 1).contiguous()
    blank = torch.full((3, 256, 256), 128, dtype=torch.uint8)
    wrapped = anonloader.anonymize([(face, 0), (blank, 1)], method=Broken(), on_error="drop")
    assert wrapped[0] is None
    images, labels = anonloader.collate_skip_dropped([wrapped[0], wrapped[1]])
    assert labels.tolist() == [1] and torch.equal(images[0], blank)


def test_given_detections_per_image_type():
    # a picture with no face: the annotations say so, and on_no_face applies (a face the
    # annotations left out would be a revalidation failure instead)
    blank = Image.new("RGB", (96, 96), (120, 130, 140))
    wrapped = anonloader.anonymize([blank], detector=None, annotations=lambda s: Detections.empty(), on_no_face="drop")
    assert wrapped[0] is None


def test_truncated_files_and_raising_callables_are_named_per_sample_errors(tmp_path, astronaut_pil):
    from torchvision.datasets import ImageFolder

    from anonloader.errors import InputError

    (tmp_path / "people").mkdir()
    small = astronaut_pil.resize((64, 64))
    small.save(tmp_path / "people" / "a.jpg", quality=90)
    data = (tmp_path / "people" / "a.jpg").read_bytes()
    (tmp_path / "people" / "b.jpg").write_bytes(data[: len(data) // 2])  # PIL raises inside ImageFolder's loader
    with pytest.raises(ImageDecodeError, match="sample 1: .*corrupt or truncated"):
        anonloader.anonymize(ImageFolder(tmp_path), method="blur")[1]
    assert anonloader.anonymize(ImageFolder(tmp_path), method="blur", on_error="drop")[1] is None

    def broken_label(sample):
        return sample["who"]  # KeyError: the samples have no such field

    wrapped = anonloader.anonymize([{"image": small}], method="blur", identity_label=broken_label)
    with pytest.raises(InputError, match="sample 0: identity_label\\(sample\\) raised KeyError"):
        wrapped[0]


def test_passthrough_keys_and_alpha_channel_through_anonymize(astronaut_pil):
    from anonloader.errors import UnsupportedImageError

    small = np.asarray(astronaut_pil.resize((128, 128)))
    depth = np.linspace(0, 1, 128 * 128, dtype=np.float32).reshape(128, 128)
    rgbx = np.dstack([small, (depth * 255).astype(np.uint8)])
    sample = {"image": rgbx, "depth": depth}
    with pytest.raises(UnsupportedImageError, match="field \\['image'\\]: .*4 channels"):
        anonloader.anonymize([sample], method="pixelate")[0]
    out = anonloader.anonymize([sample], method="pixelate", passthrough_keys=["depth"], alpha_channel=True)[0]
    assert out["depth"] is depth and out["image"].shape == rgbx.shape
    assert np.array_equal(out["image"][:, :, 3], rgbx[:, :, 3])
    assert _face_change(small, out["image"][:, :, :3], (40, 15, 90, 57)) > 2
