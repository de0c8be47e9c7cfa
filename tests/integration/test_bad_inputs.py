"""The bad-input table: every row either anonymizes every face in the sample or raises a named
:class:`~anonloader.errors.AnonloaderError` — it never returns a raw face.

Each row builds one sample from the packaged astronaut photo at 128 px (real faces, real
MTCNN) and says what must happen. "anonymized" rows check every image field of the output
against the same field of the input: the face region changed, the rows below the face did
not (so it was the face that was replaced, not the whole image obscured). "raises" rows check
the error's class and that it names the sample (and field), then that ``on_error="drop"``
drops the sample instead.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import anonloader
from anonloader.errors import (
    AnnotationError,
    AnonloaderError,
    ImageTooLargeError,
    InputError,
    UnsupportedImageError,
)
from anonloader.pipeline import Anonymizer
from anonloader.types import Detections
from tests.integration._small_faces import face_region, small_faces

SIZE = 128
ROWS, COLS = face_region(SIZE)
PHOTO = small_faces(1, SIZE)[0]
RGB = np.asarray(PHOTO, dtype=np.uint8)  # H,W,3
GRAY = np.asarray(PHOTO.convert("L"), dtype=np.uint8)  # H,W
NIR = np.linspace(0, 255, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint8)  # a 4th band, not alpha


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(value: Any) -> np.ndarray:
    """An image field as ``H,W`` or ``H,W,C`` uint8, whatever its type and layout."""
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    if isinstance(value, Image.Image):
        return np.asarray(value)
    if isinstance(value, torch.Tensor):
        value = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = np.round(array.astype(np.float64) * 255).astype(np.uint8)
    return array


def _face_box() -> tuple[list[float], list[list[float]]]:
    """The astronaut's face at 128 px, as MTCNN finds it (computed once)."""
    tensor = torch.from_numpy(RGB.copy()).permute(2, 0, 1).float() / 255
    from anonloader.detect.mtcnn import MTCNNDetector

    (found,) = MTCNNDetector()([tensor])
    return found.boxes[0].tolist(), found.landmarks[0].tolist()


@dataclass
class Row:
    """One bad input: the sample, how to wrap it, and what must happen."""

    name: str
    sample: Callable[[], Any]
    fields: list[tuple[Any, ...]] = field(default_factory=list)  # paths of the image fields ("anonymized" rows)
    raises: type[AnonloaderError] | None = None
    match: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    annotations: Callable[[Any], Any] | None = None
    check: Callable[[Any, Any], None] | None = None  # extra checks on (sample, output)


def _get(sample: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        sample = sample[part]
    return sample


def _alpha_kept(sample: Any, out: Any) -> None:
    assert np.array_equal(_pixels(out["image"])[..., 3], _pixels(sample["image"])[..., 3])


def _same_types(sample: Any, out: Any) -> None:
    for before, after in zip(sample, out, strict=True):
        assert type(after) is type(before)
        if isinstance(before, (torch.Tensor, np.ndarray)):
            assert after.shape == before.shape and after.dtype == before.dtype


#: the face MTCNN finds in PHOTO, filled by the ``face`` fixture before the rows run
FACE: dict[str, list] = {}


def _annotated(scale: float = 1.0, nan: bool = False) -> Callable[[Any], Any]:
    def annotations(sample: Any) -> Any:
        box = [v * scale for v in FACE["box"]]
        landmarks = torch.tensor([FACE["landmarks"]]) * scale
        if nan:
            landmarks[0, 1, 0] = float("nan")
        return Detections(torch.tensor([box]), landmarks, torch.ones(1))

    return annotations


ROWS_TABLE = [
    Row("2-D grayscale array beside a PIL image in a tuple", lambda: (PHOTO, GRAY.copy(), 7), [(0,), (1,)], check=_same_types),
    Row("channels-last (H,W,C) tensor", lambda: {"image": torch.from_numpy(RGB.copy()), "label": 3}, [("image",)]),
    Row(
        "images in a nested list",
        lambda: {"views": [PHOTO, [torch.from_numpy(RGB.copy()).permute(2, 0, 1).float() / 255]], "label": 1},
        [("views", 0), ("views", 1, 0)],
    ),
    Row("encoded bytes beside a PIL image", lambda: (PHOTO, _png(PHOTO)), [(0,), (1,)]),
    Row(
        "a 4th channel that is not alpha (near infrared)",
        lambda: {"image": np.dstack([RGB, NIR]), "label": 0},
        raises=UnsupportedImageError,
        match=r"sample 0 / field \['image'\]: .*4 channels.*alpha_channel=True",
    ),
    Row(
        "a 4th channel declared alpha (alpha_channel=True)",
        lambda: {"image": np.dstack([RGB, NIR]), "label": 0},
        [("image",)],
        options={"alpha_channel": True},
        check=_alpha_kept,
    ),
    Row("RGBA PIL image", lambda: {"image": Image.fromarray(np.dstack([RGB, NIR]), "RGBA")}, [("image",)], check=_alpha_kept),
    Row(
        "boxes and landmarks in [0,1] units from annotations",
        lambda: {"image": PHOTO},
        raises=AnnotationError,
        match=r"sample 0 / field \['image'\]: .*look normalised.*pass pixels",
        annotations=_annotated(scale=1 / SIZE),
    ),
    Row(
        "NaN landmarks from annotations",
        lambda: {"image": PHOTO},
        raises=AnnotationError,
        match=r"sample 0 / field \['image'\]: .*landmarks of face 0 contain NaN",
        annotations=_annotated(nan=True),
    ),
    Row("the same annotations in pixels", lambda: {"image": PHOTO}, [("image",)], annotations=_annotated()),
    Row(
        "decompression bomb (encoded image over Image.MAX_IMAGE_PIXELS)",
        lambda: (_png(PHOTO), 0),
        raises=ImageTooLargeError,
        match=r"sample 0 / field \[0\]: .*MAX_IMAGE_PIXELS",
    ),
    Row("a bare 2-D array", lambda: GRAY.copy(), [()]),
    Row(
        "a bare 2-D array too small to be an image",
        lambda: np.zeros((5, 2), np.float32),
        raises=InputError,
        match="sample 0: found no image",
    ),
    Row(
        "a bfloat16 tensor",
        lambda: (torch.from_numpy(RGB.copy()).permute(2, 0, 1).to(torch.bfloat16) / 255, 5),
        [(0,)],
        check=_same_types,
    ),
    Row(
        "a 16-bit PNG",
        lambda: {"png": _png(Image.fromarray(GRAY.astype(np.uint16) * 257)), "label": 2},
        raises=UnsupportedImageError,
        match=r"sample 0 / field \['png'\]: .*16 bits per channel.*convert it first",
    ),
    Row(
        "an N,C,H,W clip beside its labels",
        lambda: (torch.from_numpy(np.stack([RGB, RGB[:, ::-1]])).permute(0, 3, 1, 2).contiguous(), np.zeros((2, 5, 2), np.float32)),
        [(0, 0), (0, 1)],
    ),
    Row(
        "an image-like field beside image_key= (a depth map)",
        lambda: {"image": PHOTO, "depth": GRAY.astype(np.float32) / 255},
        raises=UnsupportedImageError,
        match=r"sample 0 / field \['depth'\]: .*image_key= names only",
        options={"image_key": "image"},
    ),
]


@pytest.fixture(scope="module")
def face():
    FACE["box"], FACE["landmarks"] = _face_box()
    return FACE


@pytest.mark.parametrize("row", ROWS_TABLE, ids=[r.name for r in ROWS_TABLE])
def test_bad_input_table(row, face, monkeypatch):
    if "decompression" in row.name:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIZE * SIZE // 4)
    detector_options = {"detector": None} if row.annotations is not None else {}
    wrapped = anonloader.anonymize(
        [row.sample()], method="pixelate", on_error="raise", annotations=row.annotations, **detector_options, **row.options
    )
    if row.raises is not None:
        with pytest.raises(row.raises, match=row.match):
            wrapped[0]
        dropping = anonloader.anonymize(
            [row.sample()], method="pixelate", on_error="drop", annotations=row.annotations, **detector_options, **row.options
        )
        assert dropping[0] is None
        return
    sample = wrapped.dataset[0]
    out = wrapped[0]
    assert row.fields
    for path in row.fields:
        before, after = _pixels(_get(sample, path)).astype(float), _pixels(_get(out, path)).astype(float)
        assert after.shape == before.shape, path
        face_change = np.abs(before[ROWS, COLS] - after[ROWS, COLS]).mean()
        assert face_change > 2, f"{row.name}: field {path} kept its face (mean change {face_change:.2f})"
        assert np.abs(before[-20:] - after[-20:]).max() <= 1, f"{row.name}: field {path} changed below the face"
    if row.check is not None:
        row.check(sample, out)


def test_the_datasets_own_decompression_bomb_is_a_named_error(tmp_path, monkeypatch):
    from torchvision.datasets import ImageFolder

    (tmp_path / "people").mkdir()
    PHOTO.save(tmp_path / "people" / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIZE * SIZE // 4)  # PIL raises in ImageFolder's loader
    wrapped = anonloader.anonymize(ImageFolder(tmp_path), method="pixelate")
    with pytest.raises(ImageTooLargeError, match="sample 0: .*MAX_IMAGE_PIXELS"):
        wrapped[0]
    assert anonloader.anonymize(ImageFolder(tmp_path), method="pixelate", on_error="drop")[0] is None


def test_torchvision_transform_anonymizes_every_image_like_leaf():
    from anonloader.integrations.torchvision import AnonymizeFaces
    from torchvision.transforms import v2

    transform = AnonymizeFaces(Anonymizer("pixelate", on_error="raise"))
    tensor = torch.from_numpy(RGB.copy()).permute(2, 0, 1).contiguous()
    # v2's own rule transforms only the first plain tensor of a sample with no PIL image in it
    out_pil, out_tensor, out_gray = v2.Compose([transform])(PHOTO, tensor, GRAY.copy())
    for before, after in ((PHOTO, out_pil), (tensor, out_tensor), (GRAY, out_gray)):
        change = np.abs(_pixels(before).astype(float)[ROWS, COLS] - _pixels(after).astype(float)[ROWS, COLS]).mean()
        assert change > 2
    with pytest.raises(UnsupportedImageError, match="4 channels"):
        transform((PHOTO, np.dstack([RGB, NIR])))


def _changed(before: Any, after: Any) -> bool:
    before, after = _pixels(before).astype(float), _pixels(after).astype(float)
    return after.shape == before.shape and np.abs(before[ROWS, COLS] - after[ROWS, COLS]).mean() > 2


def test_hugging_face_columns_beside_the_image_column():
    import datasets
    from anonloader.integrations.huggingface import anonymize_hf

    features = datasets.Features(
        {"image": datasets.Image(), "second": datasets.Image(), "array": datasets.Array3D((SIZE, SIZE, 3), "uint8")}
    )
    ds = datasets.Dataset.from_dict({"image": [PHOTO], "second": [PHOTO], "array": [RGB]}, features=features)
    anonymizer = Anonymizer("pixelate", on_error="raise")
    with pytest.raises(UnsupportedImageError, match=r"sample 0 / field \['second'\]: .*image_key= names only"):
        anonymize_hf(ds, "image", anonymizer=anonymizer)[0]
    row = anonymize_hf(ds, ["image", "second", "array"], anonymizer=anonymizer)[0]
    assert all(_changed(PHOTO, row[column]) for column in ("image", "second", "array"))
    assert isinstance(row["array"], np.ndarray) and row["array"].dtype == np.uint8
    kept = anonymize_hf(ds, "image", anonymizer=anonymizer, passthrough_columns=["second", "array"])[0]
    assert _changed(PHOTO, kept["image"]) and not _changed(PHOTO, kept["second"])
    # on_error="drop" applies per row in "map" mode: the 16-bit row goes, the other stays
    deep = Image.fromarray(GRAY.astype(np.uint16) * 257)
    mixed = datasets.Dataset.from_dict({"image": [deep, PHOTO], "label": [0, 1]}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64")}))
    with pytest.raises(UnsupportedImageError, match="sample 0 / field \\['image'\\]: .*16"):
        anonymize_hf(mixed, mode="map", anonymizer=anonymizer)
    mapped = anonymize_hf(mixed, mode="map", anonymizer=Anonymizer("pixelate", on_error="drop"))
    assert mapped["label"] == [1] and _changed(PHOTO, mapped[0]["image"])


def test_webdataset_nested_and_undeclared_entries():
    from anonloader.integrations import webdataset as anon_wds

    stage = anon_wds.anonymize(Anonymizer("pixelate", on_error="raise"))
    sample = {"__key__": "a", "png": _png(PHOTO), "views.pyd": {"left": RGB.copy()}, "cls": b"3"}
    (out,) = list(stage([sample]))
    assert _changed(sample["png"], out["png"]) and _changed(RGB, out["views.pyd"]["left"]) and out["cls"] == b"3"
    strict = anon_wds.anonymize(Anonymizer("pixelate", on_error="raise"), image_key="png")
    with pytest.raises(UnsupportedImageError, match=r"field \['views.pyd'\]\['left'\]: .*\(webdataset sample 'a'\)"):
        list(strict([sample]))
    dropping = anon_wds.anonymize(Anonymizer("pixelate", on_error="drop"), image_key="png")
    other = {"__key__": "b", "png": _png(PHOTO)}
    (kept,) = list(dropping([sample, other]))
    assert kept["__key__"] == "b" and _changed(other["png"], kept["png"])
