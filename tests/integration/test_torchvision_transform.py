"""AnonymizeFaces inside transforms.v2.Compose: PIL, plain tensors and tv_tensors.Image are
anonymized; boxes, keypoints and masks pass through untouched."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from anonloader.integrations.torchvision import AnonymizeFaces
from tests.integration._small_faces import face_region, small_faces, to_uint8_tensor

PHOTO = small_faces(1)[0]
ROWS, COLS = face_region()


@pytest.fixture(scope="module")
def transform():
    return AnonymizeFaces("pixelate")


def _face_change(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((before[:, ROWS, COLS].float() - after[:, ROWS, COLS].float()).abs().mean())


def test_pil_in_compose_then_to_tensor(transform):
    pipeline = v2.Compose([transform, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    out = pipeline(PHOTO)
    assert isinstance(out, tv_tensors.Image) and out.dtype == torch.float32 and out.shape == (3, 128, 128)
    original = to_uint8_tensor(PHOTO).float() / 255
    assert _face_change(original * 255, out * 255) > 3
    assert torch.allclose(original[:, -20:], out[:, -20:], atol=1 / 255)  # below the face: as it was


def test_tv_image_with_boxes_keypoints_and_mask(transform):
    image = tv_tensors.Image(to_uint8_tensor(PHOTO))
    boxes = tv_tensors.BoundingBoxes([[40, 10, 90, 50]], format="XYXY", canvas_size=(128, 128))
    mask = tv_tensors.Mask(torch.zeros(128, 128, dtype=torch.uint8))
    keypoints = tv_tensors.KeyPoints([[50.0, 20.0], [70.0, 20.0]], canvas_size=(128, 128))
    sample = {"image": image, "boxes": boxes, "mask": mask, "keypoints": keypoints, "label": 7}
    out = v2.Compose([transform])(sample)
    assert type(out["image"]) is tv_tensors.Image and out["image"].dtype == torch.uint8
    assert _face_change(image, out["image"]) > 3
    assert out["boxes"] is boxes and out["mask"] is mask and out["keypoints"] is keypoints and out["label"] == 7


def test_plain_tensor_and_batched_tv_image(transform):
    tensor = to_uint8_tensor(PHOTO)
    single = transform(tensor)
    assert type(single) is torch.Tensor and single.dtype == torch.uint8 and _face_change(tensor, single) > 3
    batch = tv_tensors.Image(torch.stack([tensor, tensor.flip(-1)]))
    out = transform(batch)
    assert type(out) is tv_tensors.Image and out.shape == batch.shape
    assert torch.equal(out[0], single)
    assert _face_change(tensor.flip(-1), out[1].flip(-1)) > 3


def test_grayscale_pil_keeps_mode_and_transform_pickles(transform):
    gray = PHOTO.convert("L")
    out = transform(gray)
    assert isinstance(out, Image.Image) and out.mode == "L" and out.size == gray.size
    before, after = np.asarray(gray).astype(float), np.asarray(out).astype(float)
    assert np.abs(before[ROWS, COLS] - after[ROWS, COLS]).mean() > 3
    clone = pickle.loads(pickle.dumps(transform))
    assert np.array_equal(np.asarray(clone(PHOTO)), np.asarray(transform(PHOTO)))


def test_normalised_tensor_is_refused_with_advice(transform):
    normalised = (to_uint8_tensor(PHOTO).float() / 255 - 0.5) / 0.25
    with pytest.raises(Exception, match="normalise after anonymization"):
        transform(normalised)
