"""The :class:`Anonymizer`: detect -> align -> identify -> method -> paste back, batch-first.

Fail closed: a face that could not be anonymized (detector error, model error, bad crop) never
leaves as it was. Per image, ``on_error`` decides:

- ``"obscure"`` (default): the whole image is replaced by a coarse mosaic (no face survives);
- ``"drop"``: the image is dropped (its slot in the result is ``None``);
- ``"raise"``: :class:`~anonloader.errors.AnonymizationFailed` names the image and the cause.

``on_no_face`` decides what happens to images where the detector found nothing: ``"keep"``
(default; there is no face to hide), ``"drop"`` or ``"obscure"``. ``"keep"`` stays the default
because revalidation (below) checks every kept image, faces or not, with a detector of its own.

Revalidation (``revalidate``, on by default): after paste-back a detector runs on the *output*.
A face found there that overlaps no face the pipeline anonymized gets a second round (counted
in ``counters["revalidated"]``, its record has ``revalidated=True``); if a detector still finds
it after that, the image follows ``on_error``. It costs one more detector pass per image (the
``"default"`` stage: about as long as detection itself) and a second round only where a face
was missed; ``revalidate=False`` turns it off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from anonloader import __version__
from anonloader.align import align_faces, estimate_affine
from anonloader.detect.base import Detector
from anonloader.errors import AnonloaderError, AnonymizationFailed, ConfigError, UnsupportedImageError
from anonloader.fingerprint import CACHE_FORMAT_VERSION, fingerprint_of
from anonloader.identity.base import IdentityAssigner
from anonloader.methods import Method, get_method
from anonloader.types import AlignedFaces, Detections, FaceConditions, FaceRecord

__all__ = ["AnonymizationResult", "Anonymizer", "FaceKey", "obscure_image"]

logger = logging.getLogger(__name__)

OnError = Literal["obscure", "drop", "raise"]
OnNoFace = Literal["keep", "drop", "obscure"]
_SEED_MASK = (1 << 63) - 1
#: CenterFace threshold of the revalidation detector (``revalidate=True``)
REVALIDATE_MIN_SCORE = 0.5
#: what :attr:`Anonymizer.counters` counts
COUNTERS = ("images", "faces", "anonymized", "failed", "dropped", "obscured", "detector_errors", "revalidated")


def _new_counters() -> Counter[str]:
    return Counter(dict.fromkeys(COUNTERS, 0))


class FaceKey(NamedTuple):
    """One face's recovery key from a recoverable method (``want_keys=True``).

    Attributes:
        key: the method's plaintext key (Diff-Privacy: a
            :class:`~anonloader.methods.diffprivacy.keys.RecoveryKey`); encrypt it before it
            leaves memory (:class:`~anonloader.methods.diffprivacy.store.RecoveryKeyStore`).
        affine: ``2,3`` float32, image pixels -> crop pixels, as the face was aligned.
    """

    key: Any
    affine: torch.Tensor


@dataclass
class AnonymizationResult:
    """What :meth:`Anonymizer.__call__` returns for a batch.

    Attributes:
        images: per input image a ``3,H,W float32 in [0,1]`` tensor quantized to multiples of
            1/255 (so a uint8 round trip is exact), or ``None`` where the image was dropped.
        records: per input image, one :class:`FaceRecord` per detected face.
        errors: per input image, the reason it failed (``None`` when it did not).
        keys: ``None`` unless the call asked for keys (``want_keys=True``); then per input
            image one :class:`FaceKey` per anonymized face, in record order (second-round faces
            of revalidation after the first), and ``[]`` for an image that failed closed, was
            dropped or has no face. Keys are plaintext: they never enter records, reports or
            logs, and are left out of ``repr``.
    """

    images: list[torch.Tensor | None]
    records: list[list[FaceRecord]]
    errors: list[str | None]
    keys: list[list[FaceKey]] | None = field(default=None, repr=False)


def obscure_image(image: torch.Tensor, cells: int = 12) -> torch.Tensor:
    """A coarse mosaic of a whole image: what fail-closed ``"obscure"`` returns.

    Args:
        image: ``3,H,W float in [0,1]``.
        cells: mosaic cells along the longer side.
    """
    _, height, width = image.shape
    scale = cells / max(height, width, 1)
    grid = (max(1, round(height * scale)), max(1, round(width * scale)))
    small = F.adaptive_avg_pool2d(image.unsqueeze(0), grid)
    return F.interpolate(small, size=(height, width), mode="nearest").squeeze(0)


def _quantize(image: torch.Tensor) -> torch.Tensor:
    return image.clamp(0, 1).mul(255).round().div(255)


def _content_seed(crop: torch.Tensor) -> int:
    data = crop.mul(255).round().to(torch.uint8).cpu().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _SEED_MASK


def _face_record(faces: Detections, f: int, status: str, **extra: Any) -> FaceRecord:
    """The record of face ``f`` of ``faces``."""
    return FaceRecord(
        box=tuple(float(v) for v in faces.boxes[f]),
        landmarks=tuple((float(x), float(y)) for x, y in faces.landmarks[f]),
        score=float(faces.scores[f]),
        status=status,
        **extra,
    )


def _to_crop(landmarks: torch.Tensor, crop_size: int, template: str, margin: float) -> torch.Tensor:
    """``N,5,2`` image-pixel landmarks -> the same points in crop pixels."""
    landmarks = landmarks.float().cpu()
    affine = estimate_affine(landmarks, crop_size, template, margin)
    points = torch.cat([landmarks, torch.ones(len(landmarks), 5, 1)], dim=2)
    return points @ affine.transpose(1, 2)


def _overlaps(boxes: torch.Tensor, others: torch.Tensor, share: float = 0.3) -> torch.Tensor:
    """``N bool``: whether each of ``boxes`` (``N,4``) overlaps one of ``others`` (``M,4``) by
    more than ``share`` of the smaller box's area."""
    if boxes.shape[0] == 0 or others.shape[0] == 0:
        return torch.zeros(boxes.shape[0], dtype=torch.bool)
    top_left = torch.maximum(boxes[:, None, :2], others[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    area_a = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (others[:, 2:] - others[:, :2]).clamp(min=0).prod(dim=1)
    smaller = torch.minimum(area_a[:, None], area_b[None, :]).clamp(min=1e-6)
    return (inter / smaller > share).any(dim=1)


def _check_image(image: Any, index: int) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise UnsupportedImageError(
            f"expected a 3,H,W float tensor in [0,1], got {type(image).__name__}; "
            "wrap datasets with anonloader.anonymize, which converts PIL/numpy/uint8 images",
            index=index,
        )
    if image.ndim != 3 or image.shape[0] != 3:
        raise UnsupportedImageError(f"expected shape 3,H,W (RGB), got {tuple(image.shape)}", index=index)
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise UnsupportedImageError(f"image has zero size {tuple(image.shape)}; remove it from the dataset", index=index)
    if not image.is_floating_point():
        raise UnsupportedImageError(f"expected a float tensor in [0,1], got {image.dtype}", index=index)
    if not bool(torch.isfinite(image).all()) or float(image.min()) < 0 or float(image.max()) > 1:
        raise UnsupportedImageError("pixel values must be finite and in [0,1]; divide uint8 images by 255", index=index)
    return image.float()


class Anonymizer:
    """Replaces every face in a batch of images.

    Args:
        method: a registry name (``"blur"``, ``"pixelate"``, ``"mask"``, ``"fams"``,
            ``"iddiffuse"``) or a :class:`~anonloader.methods.Method` instance.
        detector: a name from :data:`anonloader.detect.DETECTORS` (``"default"``: CenterFace
            with recall passes; ``"fast"``, ``"strong"``, ``"mtcnn"``, ``"centerface"``,
            ``"ensemble"``, ``"scrfd"``), a :class:`~anonloader.detect.base.Detector`, or
            ``None`` when every call passes ``detections`` (faces from the dataset's own
            annotations).
        revalidate: run a detector on the output and give faces it finds a second round (see
            the module docstring): ``True`` (the ``"default"`` stage at CenterFace threshold
            :data:`REVALIDATE_MIN_SCORE`), a detector name or object, or ``False``.
        identity: an :class:`~anonloader.identity.base.IdentityAssigner` giving each face its
            stable synthetic identity and seed. ``None`` (default): the method's own default
            when it has one (``method.default_identity()``; IDDiffuse with a bank: a keyed
            assigner that needs ``$ANONLOADER_SECRET``, see :mod:`anonloader.methods.iddiffuse.model`),
            else none. ``False``: none. Without an assigner, seeds come from the crop's content.
        secret: keys that default identity mapping (else ``$ANONLOADER_SECRET`` /
            ``$ANONLOADER_SECRET_FILE``); used once here, never kept.
        on_error, on_no_face: fail-closed policies (see the module docstring).
        feather: width of the paste-back mask's soft edge, as a fraction of the crop side.
        color_match: match the generated face's colour statistics to the original's; ``None``
            lets the method decide (classical baselines keep their own colours).
        device: where the method runs (``"cpu"``, ``"cuda"``, ...).
        batch_size: the most crops sent to the method at once.
        **method_kwargs: options of the named method.

    The object is cheap to pickle: models load lazily, in the process that first uses them.
    """

    def __init__(
        self,
        method: str | Method = "blur",
        *,
        detector: str | Detector | None = "default",
        revalidate: bool | str | Detector = True,
        identity: IdentityAssigner | Literal[False] | None = None,
        on_error: OnError = "obscure",
        on_no_face: OnNoFace = "keep",
        feather: float = 0.1,
        color_match: bool | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        secret: Any = None,
        **method_kwargs: Any,
    ) -> None:
        if on_error not in ("obscure", "drop", "raise"):
            raise ConfigError(f"on_error must be 'obscure', 'drop' or 'raise', got {on_error!r}")
        if on_no_face not in ("keep", "drop", "obscure"):
            raise ConfigError(f"on_no_face must be 'keep', 'drop' or 'obscure', got {on_no_face!r}")
        if not 0 <= feather <= 0.5:
            raise ConfigError(f"feather must be in [0, 0.5] of the crop side, got {feather}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        from anonloader.detect import load_detector

        self.method = get_method(method, **method_kwargs)
        self.detector = load_detector(detector) if detector is not None else None
        if revalidate is None or revalidate is False:
            self.revalidator: Detector | None = None
        else:
            # True: the default stage at a higher threshold, so that a method's own artefacts (pixel
            # blocks, mask edges) that score ~0.3 do not trigger second rounds; a real face the
            # detector missed scores far above it
            self.revalidator = load_detector("default", min_score=REVALIDATE_MIN_SCORE) if revalidate is True else load_detector(revalidate)
        if identity is None and callable(getattr(self.method, "default_identity", None)):
            identity = self.method.default_identity(secret=secret)  # type: ignore[attr-defined]
        self.identity: IdentityAssigner | None = None if identity is False else identity
        self.on_error: OnError = on_error
        self.on_no_face: OnNoFace = on_no_face
        self.feather = float(feather)
        self.color_match = color_match
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.counters: Counter[str] = _new_counters()
        self._logged_causes: set[str] = set()

    # -- settings ---------------------------------------------------------------------------
    @property
    def uses_color_match(self) -> bool:
        if self.color_match is not None:
            return self.color_match
        return bool(getattr(self.method, "paste_color_match", True))

    def config(self) -> dict[str, Any]:
        """Every setting that changes output pixels, as JSON-able data."""
        return {
            "anonloader": __version__,
            "cache_format": CACHE_FORMAT_VERSION,
            "method": {"name": self.method.name, **self.method.config()},
            "detector": None if self.detector is None else {"name": self.detector.name, **self.detector.config()},
            "identity": None if self.identity is None else self.identity.config(),
            "align": {
                "crop_size": self.method.crop_size,
                "template": self.method.template,
                "margin": float(getattr(self.method, "margin", 0.0)),
            },
            "paste": {"feather": self.feather, "color_match": self.uses_color_match},
            "policy": {"on_error": self.on_error, "on_no_face": self.on_no_face},
            "revalidate": None
            if self.revalidator is None
            else {"name": self.revalidator.name, **self.revalidator.config()},
        }

    def fingerprint(self) -> str:
        """SHA-256 hex of :meth:`config`: equal fingerprints mean equal output bytes."""
        return fingerprint_of(self.config())

    # -- the pipeline -----------------------------------------------------------------------
    def __call__(
        self,
        images: Sequence[torch.Tensor],
        *,
        detections: Sequence[Detections] | None = None,
        labels: Sequence[Any] | None = None,
        want_keys: bool = False,
    ) -> AnonymizationResult:
        """Anonymizes a batch.

        Args:
            images: ``3,H,W float in [0,1]`` tensors, sizes may differ.
            detections: faces per image (pixels), e.g. from the dataset's annotations; when
                given the detector is not run.
            labels: one identity label per image for the ``label`` identity strategy.
            want_keys: also return each face's recovery key (``result.keys``); needs a method
                with ``anonymize_with_keys`` built recoverable (Diff-Privacy). The output
                pixels are the same as without keys.

        Raises:
            ConfigError: ``want_keys`` with a method that gives no recovery keys.
            AnonymizationFailed: an image failed and ``on_error="raise"``.
            UnsupportedImageError: an image is not ``3,H,W float in [0,1]`` and
                ``on_error="raise"``.
        """
        n = len(images)
        if want_keys and not (callable(getattr(self.method, "anonymize_with_keys", None)) and getattr(self.method, "recoverable", True)):
            raise ConfigError(
                f"want_keys=True: method {self.method.name!r} gives no recovery keys (it needs anonymize_with_keys "
                "and recoverable=True, e.g. method='diffprivacy')"
            )
        if detections is not None and len(detections) != n:
            raise ConfigError(f"got {n} images but {len(detections)} detection lists")
        if labels is not None and len(labels) != n:
            raise ConfigError(f"got {n} images but {len(labels)} identity labels")
        self.counters["images"] += n
        errors: list[str | None] = [None] * n
        checked: list[torch.Tensor | None] = [None] * n
        for i, image in enumerate(images):
            try:
                checked[i] = _check_image(image, i)
            except UnsupportedImageError as error:
                if self.on_error == "raise":
                    raise
                errors[i] = str(error)

        found = self._detect(checked, detections, errors)
        self._check_detections(found, errors, checked, given=detections is not None)
        records: list[list[FaceRecord]] = [[] for _ in range(n)]
        outputs: list[torch.Tensor | None] = list(checked)
        keys: list[list[FaceKey]] | None = [[] for _ in range(n)] if want_keys else None
        ok = [i for i in range(n) if errors[i] is None and len(found[i]) > 0]
        if ok:
            self._anonymize_faces(checked, found, ok, labels, outputs, records, errors, keys)
        if self.revalidator is not None:
            self._revalidate(found, labels, outputs, records, errors, keys)
        result = self._apply_policies(checked, found, outputs, records, errors)
        if keys is not None:  # fail closed: an image that failed, was dropped or obscured carries no key
            result.keys = [k if result.errors[i] is None and result.images[i] is not None else [] for i, k in enumerate(keys)]
        return result

    def _revalidate(
        self,
        found: list[Detections],
        labels: Sequence[Any] | None,
        outputs: list[torch.Tensor | None],
        records: list[list[FaceRecord]],
        errors: list[str | None],
        keys: list[list[FaceKey]] | None = None,
    ) -> None:
        """Detect on the outputs; a face overlapping no anonymized face gets a second round,
        and an image where one survives that fails closed (``errors`` set)."""
        todo = [i for i, out in enumerate(outputs) if out is not None and errors[i] is None]
        missed = self._residual_faces(outputs, todo, found, errors)
        again = [i for i in todo if errors[i] is None and len(missed[i])]
        if not again:
            return
        self.counters["revalidated"] += sum(len(missed[i]) for i in again)
        second: list[list[FaceRecord]] = [[] for _ in outputs]
        before = list(outputs)
        self._anonymize_faces(before, missed, again, labels, outputs, second, errors, keys)
        survivors = self._residual_faces(outputs, [i for i in again if errors[i] is None], found, errors, missed)
        for i in again:
            found[i] = Detections(
                torch.cat([found[i].boxes.cpu(), missed[i].boxes.cpu()]),
                torch.cat([found[i].landmarks.cpu(), missed[i].landmarks.cpu()]),
                torch.cat([found[i].scores.cpu(), missed[i].scores.cpu()]),
            )
            records[i].extend(dataclasses.replace(r, revalidated=True) for r in second[i])
            if errors[i] is None and len(survivors[i]):
                errors[i] = (
                    f"image {i}: {len(survivors[i])} face(s) the detector missed were still found after a second "
                    f"round (revalidation), e.g. at box {[round(float(v)) for v in survivors[i].boxes[0]]}; "
                    "use a stronger method or detector, or on_error='drop'"
                )

    def _residual_faces(
        self,
        outputs: list[torch.Tensor | None],
        todo: list[int],
        found: list[Detections],
        errors: list[str | None],
        only: list[Detections] | None = None,
    ) -> list[Detections]:
        """Faces the revalidator finds in ``outputs[todo]`` overlapping none of ``found``
        (or, with ``only``, overlapping those); detector failures fail the image closed."""
        residual = [Detections.empty() for _ in outputs]
        if not todo:
            return residual
        assert self.revalidator is not None
        batch = [outputs[i].clamp(0, 1).float().cpu() for i in todo]  # type: ignore[union-attr]
        try:
            results = self.revalidator(batch)
        except Exception:  # noqa: BLE001 - isolate the failing image below
            results = []
            for i, image in zip(todo, batch):
                try:
                    results.append(self.revalidator([image])[0])
                except Exception as error:  # noqa: BLE001 - fail closed
                    self.counters["detector_errors"] += 1
                    errors[i] = f"image {i}: revalidation failed: {type(error).__name__}: {error}"
                    results.append(Detections.empty())
        for i, faces in zip(todo, results, strict=True):
            if not len(faces):
                continue
            boxes = faces.boxes.float().cpu()
            if only is not None:
                keep = _overlaps(boxes, only[i].boxes.float().cpu())
            else:
                keep = ~_overlaps(boxes, found[i].boxes.float().cpu())
            residual[i] = Detections(boxes[keep], faces.landmarks.float().cpu()[keep], faces.scores.float().cpu()[keep])
        return residual

    def _detect(
        self,
        images: list[torch.Tensor | None],
        given: Sequence[Detections] | None,
        errors: list[str | None],
    ) -> list[Detections]:
        found = [Detections.empty() for _ in images]
        todo = [i for i, image in enumerate(images) if image is not None]
        if given is not None:
            for i in todo:
                found[i] = given[i]
            return found
        if self.detector is None:
            raise ConfigError("detector=None needs detections passed with every call (e.g. from annotations)")
        if not todo:
            return found
        try:
            results = self.detector([images[i] for i in todo])
        except Exception as error:  # noqa: BLE001 - isolate the failing image below
            self._log_detector_error(error, todo)
            results = None
        if results is None:  # retry one by one so one bad image does not fail the batch
            for i in todo:
                try:
                    found[i] = self.detector([images[i]])[0]
                except Exception as error:  # noqa: BLE001 - recorded, then fail closed
                    self._log_detector_error(error, [i])
                    self.counters["detector_errors"] += 1
                    errors[i] = f"image {i}: detection failed: {type(error).__name__}: {error}"
            return found
        for i, faces in zip(todo, results, strict=True):
            found[i] = faces
        return found

    @staticmethod
    def _check_detections(
        found: list[Detections],
        errors: list[str | None],
        images: list[torch.Tensor | None],
        given: bool,
    ) -> None:
        """Untrustworthy faces fail their image closed.

        Detector output must be finite (a custom detector may give NaN). Detections handed in
        (annotations) get the full :func:`~anonloader.detect.annotations.check_detections`:
        finite, in pixels rather than [0,1] units, inside the image, landmarks near their box —
        faces in the wrong units would otherwise be left untouched and called anonymized.
        """
        from anonloader.detect.annotations import check_detections

        for i, faces in enumerate(found):
            if errors[i] is not None or not len(faces):
                continue
            if given and images[i] is not None:
                try:
                    check_detections(faces, tuple(images[i].shape[-2:]), index=i)  # type: ignore[union-attr]
                except AnonloaderError as error:
                    errors[i] = f"image {i}: {error}"
                continue
            if not all(bool(torch.isfinite(t).all()) for t in (faces.boxes, faces.landmarks)):
                errors[i] = (
                    f"image {i}: the detector gave non-finite boxes or landmarks; "
                    "fix the custom detector or use a built-in one"
                )

    def _log_detector_error(self, error: BaseException, indices: list[int]) -> None:
        """A warning with the cause, once per distinct cause (a broken detector is not silent)."""
        cause = f"{type(error).__name__}: {error}"
        if cause in self._logged_causes:
            return
        self._logged_causes.add(cause)
        detector = getattr(self.detector, "name", type(self.detector).__name__)
        logger.warning(
            "detector %r failed on images %s (%s); images it cannot detect fail closed (on_error=%r). "
            "Check the detector's model files and inputs; this message is shown once per cause.",
            detector,
            indices,
            cause,
            self.on_error,
        )

    def _anonymize_faces(
        self,
        images: list[torch.Tensor | None],
        found: list[Detections],
        ok: list[int],
        labels: Sequence[Any] | None,
        outputs: list[torch.Tensor | None],
        records: list[list[FaceRecord]],
        errors: list[str | None],
        keys: list[list[FaceKey]] | None = None,
    ) -> None:
        from anonloader.kernels.paste_back import paste_back

        batch = [images[i].to(self.device) for i in ok]  # type: ignore[union-attr]
        faces = [found[i] for i in ok]
        try:
            aligned = align_faces(
                batch,
                faces,
                crop_size=self.method.crop_size,
                template=self.method.template,
                margin=float(getattr(self.method, "margin", 0.0)),
            )
            conditions = self._conditions(batch, aligned, faces, [labels[i] for i in ok] if labels else None)
            if hasattr(self.method, "clip_faces"):  # a video method sees the batch as one clip, in frame order
                conditions.extra["frame_index"] = [ok[int(j)] for j in aligned.image_index]
            face_keys: list[Any] | None = [] if keys is not None else None
            generated = self._run_method(aligned.crops, conditions, face_keys)
            pasted = paste_back(
                batch,
                generated,
                aligned.affines,
                aligned.image_index.to(self.device),
                feather=self.feather,
                color_match=self.uses_color_match,
            )
        except Exception as error:  # noqa: BLE001 - isolate the failing image, then fail closed
            if len(ok) > 1:  # one bad face must not cost the other images of the batch
                for i in ok:
                    self._anonymize_faces(images, found, [i], labels, outputs, records, errors, keys)
                return
            if self.on_error == "raise":
                raise AnonymizationFailed(
                    f"images {ok}: anonymization failed ({type(error).__name__}: {error}); "
                    "fix the cause or choose on_error='obscure' or 'drop'"
                ) from error
            logger.warning("anonymization failed for images %s: %s", ok, error)
            for i in ok:
                errors[i] = f"image {i}: anonymization failed: {type(error).__name__}: {error}"
            return
        face_cursor = 0
        for slot, i in enumerate(ok):
            if not bool(torch.isfinite(pasted[slot]).all()):  # e.g. NaN landmarks from a custom detector
                errors[i] = (
                    f"image {i}: paste-back produced non-finite pixels (check the detector's or "
                    "annotations' boxes and landmarks for NaN/inf)"
                )
                face_cursor += len(found[i])
                continue
            outputs[i] = pasted[slot].to(images[i].device)  # type: ignore[union-attr]
            for f in range(len(found[i])):
                records[i].append(_face_record(found[i], f, "anonymized", synthetic_id=conditions.synthetic_ids[face_cursor]))
                if keys is not None and face_keys is not None:
                    keys[i].append(FaceKey(face_keys[face_cursor], aligned.affines[face_cursor].detach().float().cpu()))
                face_cursor += 1

    def _conditions(
        self,
        images: list[torch.Tensor],
        aligned: AlignedFaces,
        faces: list[Detections],
        labels: list[Any] | None,
    ) -> FaceConditions:
        """Seeds, identity keys and synthetic ids per face, plus landmarks in crop pixels."""
        margin = float(getattr(self.method, "margin", 0.0))
        crop_landmarks = torch.cat(
            [
                _to_crop(image_faces.landmarks, self.method.crop_size, self.method.template, margin)
                for image_faces in faces
                if len(image_faces)
            ]
        )
        if self.identity is None:
            seeds = [_content_seed(crop) for crop in aligned.crops]
            return FaceConditions(seeds, [None] * len(seeds), [None] * len(seeds), crop_landmarks)
        crops = aligned.crops
        wanted = getattr(self.identity, "crop_size", None)
        if wanted is not None:  # the recognizer's own alignment, whatever the method's is
            crops = align_faces(
                images,
                faces,
                crop_size=int(wanted),
                template=str(getattr(self.identity, "template", "arcface")),
                margin=float(getattr(self.identity, "margin", 0.0)),
            ).crops
        assignments = self.identity.assign(crops, aligned.image_index, labels)
        return FaceConditions(
            seeds=[a.seed for a in assignments],
            identity_keys=[a.key_digest for a in assignments],
            synthetic_ids=[a.synthetic_id for a in assignments],
            landmarks=crop_landmarks,
        )

    def _run_method(self, crops: torch.Tensor, conditions: FaceConditions, keys: list[Any] | None = None) -> torch.Tensor:
        """The method's output for ``crops``; with ``keys`` (a list), the method's
        ``anonymize_with_keys`` runs instead and one key per crop is appended to it."""
        clip_faces = getattr(self.method, "clip_faces", None)
        if clip_faces is not None and "frame_index" in conditions.extra and keys is None:
            # a clip method keeps one identity and texture per track across the whole call
            frame_index = conditions.extra.pop("frame_index")
            with torch.no_grad():
                out = clip_faces(crops, conditions, frame_index)
            self._check_method_output(out, crops)
            return out.clamp(0, 1)
        outputs = []
        for start in range(0, crops.shape[0], self.batch_size):
            stop = start + self.batch_size
            part = FaceConditions(
                seeds=conditions.seeds[start:stop],
                identity_keys=conditions.identity_keys[start:stop],
                synthetic_ids=conditions.synthetic_ids[start:stop],
                landmarks=conditions.landmarks[start:stop],
                extra={k: v[start:stop] for k, v in conditions.extra.items()},
            )
            chunk = crops[start:stop]
            with torch.no_grad():
                if keys is None:
                    out = self.method(chunk, part)
                else:
                    out, chunk_keys = self.method.anonymize_with_keys(chunk, part)  # type: ignore[attr-defined]
                    if len(chunk_keys) != chunk.shape[0]:
                        raise AnonymizationFailed(
                            f"method {self.method.name!r} returned {len(chunk_keys)} recovery keys for {chunk.shape[0]} crops"
                        )
                    keys.extend(chunk_keys)
            self._check_method_output(out, chunk)
            outputs.append(out.clamp(0, 1))
        return torch.cat(outputs)

    def _check_method_output(self, out: torch.Tensor, crops: torch.Tensor) -> None:
        if out.shape != crops.shape or not bool(torch.isfinite(out).all()):
            raise AnonymizationFailed(
                f"method {self.method.name!r} returned {tuple(out.shape)} (or non-finite values) "
                f"for crops {tuple(crops.shape)}"
            )

    def _apply_policies(
        self,
        images: list[torch.Tensor | None],
        found: list[Detections],
        outputs: list[torch.Tensor | None],
        records: list[list[FaceRecord]],
        errors: list[str | None],
    ) -> AnonymizationResult:
        result: list[torch.Tensor | None] = []
        for i, image in enumerate(images):
            n_faces = len(found[i])
            self.counters["faces"] += n_faces
            if errors[i] is not None:
                self.counters["failed"] += 1
                if self.on_error == "raise":
                    raise AnonymizationFailed(
                        f"{errors[i]}; fix the cause or choose on_error='obscure' or 'drop'"
                    )
                status = "failed" if self.on_error == "drop" or image is None else "obscured"
                records[i] = [_face_record(found[i], f, status, error=errors[i]) for f in range(n_faces)]
                if self.on_error == "drop" or image is None:
                    self.counters["dropped"] += 1
                    result.append(None)
                else:
                    self.counters["obscured"] += 1
                    result.append(_quantize(obscure_image(image)))
                continue
            if n_faces == 0 and self.on_no_face != "keep":
                if self.on_no_face == "drop":
                    self.counters["dropped"] += 1
                    result.append(None)
                else:
                    self.counters["obscured"] += 1
                    result.append(_quantize(obscure_image(image)))  # type: ignore[arg-type]
                continue
            self.counters["anonymized"] += n_faces
            result.append(_quantize(outputs[i]))  # type: ignore[arg-type]
        return AnonymizationResult(result, records, errors)

    # -- pickling: models stay behind, each process loads its own ---------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["counters"] = _new_counters()
        state["_logged_causes"] = set()
        return state
