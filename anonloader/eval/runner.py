"""Compare original images with their anonymized versions: privacy, consistency, utility.

For every face of the originals (given boxes + landmarks, or the detector's), the same region
is aligned in both images with the original's landmarks and embedded by the recognizer:

- privacy: re-identification rate, protection success rate at the recognizer threshold, TPR at
  FPR = 1e-3 on original/anonymized pairs, leak count (faces whose pixels did not change);
- detection on the anonymized images: recall against the original boxes;
- utility: 5-point landmark displacement / inter-ocular distance and head-pose difference
  (from landmarks) between the original faces and the faces detected in the anonymized images;
  and, with the offline attribute models of :mod:`anonloader.eval.utility_models` read inside
  the original's boxes in both images, dlib's 68-point displacement, the head-pose difference
  from those 68 points, and the expression agreement (same top emotion);
- consistency (with identity labels per face): same synthetic id fraction and recognizer
  similarity among the anonymized versions of one person.

Entry points: :func:`evaluate_pairs` (tensors), :func:`evaluate_folders` (two folders matched by
file name), :func:`evaluate_anonymizer` (images + an :class:`~anonloader.pipeline.Anonymizer`),
:func:`format_table` for a text table of several reports.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anonloader.errors import ConfigError
from anonloader.eval import metrics
from anonloader.types import Detections

__all__ = ["COLUMNS", "evaluate_anonymizer", "evaluate_folders", "evaluate_pairs", "format_table", "load_image"]

#: report keys shown by :func:`format_table`, with their headers
COLUMNS = (
    ("faces", "faces"),
    ("reidentification_rate", "re-id"),
    ("protection_success_rate", "PSR"),
    ("tpr_at_fpr_1e-3", "TPR@1e-3"),
    ("detection_recall", "det.recall"),
    ("leaks", "leaks"),
    ("landmark_displacement", "lmk/IOD"),
    ("head_pose_difference", "pose(deg)"),
    ("landmark68_displacement", "lmk68/IOD"),
    ("head_pose68_difference", "pose68(deg)"),
    ("expression_agreement", "expr.agree"),
    ("same_synthetic_id", "same-id"),
)


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """An image file as ``3,H,W float32 in [0,1]`` RGB."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def _mean(values: torch.Tensor | list[float]) -> float:
    tensor = torch.as_tensor(values, dtype=torch.float32)
    return float(tensor.mean()) if tensor.numel() else float("nan")


def evaluate_pairs(
    originals: Sequence[torch.Tensor],
    anonymized: Sequence[torch.Tensor | None],
    *,
    faces: Sequence[Detections] | None = None,
    detector: Any = "mtcnn",
    embedder: Any = "dlib",
    identities: Sequence[Any] | None = None,
    synthetic_ids: Sequence[Any] | None = None,
    name: str = "",
    attribute_models: str | Sequence[str] | None = "auto",
) -> dict[str, Any]:
    """Metrics of one anonymization over a set of images.

    Args:
        originals: ``3,H,W float in [0,1]`` images.
        anonymized: their anonymized versions (same sizes), None for dropped images.
        faces: the faces of each original (boxes + landmarks); default: the detector's.
        detector: a detector (or name) for the anonymized images (and originals without ``faces``).
        embedder: the recognizer (or name).
        identities: one real-identity label per face (flattened in image order), for consistency.
        synthetic_ids: the synthetic id given to each face (flattened), for consistency.
        attribute_models: offline utility models to compare with (names from
            :data:`anonloader.eval.utility_models.ATTRIBUTE_MODELS`), ``"auto"`` for those
            installed here, or None for none.
    """
    from anonloader.align import align_faces
    from anonloader.detect import load_detector
    from anonloader.identity.embedders import load_embedder

    if len(originals) != len(anonymized):
        raise ConfigError(f"{len(originals)} originals but {len(anonymized)} anonymized images")
    embedder = load_embedder(embedder)
    detector = load_detector(detector)
    if faces is None:
        if detector is None:
            raise ConfigError("evaluate_pairs needs faces=... or a detector")
        faces = detector(list(originals))
    kept = [i for i, a in enumerate(anonymized) if a is not None]
    report: dict[str, Any] = {"name": name, "images": len(originals), "dropped": len(originals) - len(kept)}
    report["faces"] = sum(len(f) for f in faces)
    kept_faces = [faces[i] for i in kept]
    if any(len(f) for f in kept_faces):
        template = getattr(embedder, "template", "arcface")
        crop_size = getattr(embedder, "crop_size", 112)
        orig_crops = align_faces([originals[i] for i in kept], kept_faces, crop_size=crop_size, template=template).crops
        anon_crops = align_faces([anonymized[i] for i in kept], kept_faces, crop_size=crop_size, template=template).crops  # type: ignore[misc]
        orig_emb, anon_emb = embedder(orig_crops), embedder(anon_crops)
        report["reidentification_rate"] = metrics.reidentification_rate(orig_emb, anon_emb)
        report["protection_success_rate"] = metrics.protection_success_rate(orig_emb, anon_emb, embedder.threshold)
        face_ids = None
        if identities is not None:
            flat_index = [i for i, f in enumerate(faces) for _ in range(len(f))]
            face_ids = [identities[k] for k, i in enumerate(flat_index) if i in kept]
        genuine, impostor = metrics.verification_scores(orig_emb, anon_emb, face_ids)
        report["tpr_at_fpr_1e-3"] = metrics.tpr_at_fpr(genuine, impostor, 1e-3)
        report["mean_cosine_to_original"] = _mean((torch.nn.functional.normalize(orig_emb, dim=1) * anon_emb).sum(1))
        if face_ids is not None:
            ids = None
            if synthetic_ids is not None:
                flat_index = [i for i, f in enumerate(faces) for _ in range(len(f))]
                ids = [synthetic_ids[k] for k, i in enumerate(flat_index) if i in kept]
            report.update(metrics.consistency(face_ids, ids, anon_emb))
    else:
        for key in ("reidentification_rate", "protection_success_rate", "tpr_at_fpr_1e-3"):
            report[key] = float("nan")
    report["leaks"] = metrics.leak_count(originals, anonymized, [f.boxes for f in faces])
    # utility: detection, landmarks and pose on the anonymized images
    if detector is not None and kept:
        found = detector([anonymized[i] for i in kept])  # type: ignore[misc]
        report["detection_recall"] = metrics.detection_recall([f.boxes for f in kept_faces], [d.boxes for d in found])
        displacement, pose = [], []
        for reference, detected in zip(kept_faces, found):
            pairs = metrics.match_boxes(reference.boxes, detected.boxes)
            if pairs:
                r = torch.tensor([p[0] for p in pairs])
                d = torch.tensor([p[1] for p in pairs])
                displacement.append(metrics.landmark_displacement(reference.landmarks[r], detected.landmarks[d]))
                pose.append(metrics.head_pose_difference(reference.landmarks[r], detected.landmarks[d]).mean(dim=1))
        report["landmark_displacement"] = _mean(torch.cat(displacement)) if displacement else float("nan")
        report["head_pose_difference"] = _mean(torch.cat(pose)) if pose else float("nan")
    if attribute_models is not None and kept:
        from anonloader.eval.utility_models import compare_attributes

        report.update(
            compare_attributes(
                [originals[i] for i in kept], [anonymized[i] for i in kept], [f.boxes for f in kept_faces], attribute_models  # type: ignore[misc]
            )
        )
    report["recognizer"] = embedder.config()
    return report


def evaluate_folders(original_dir: str | os.PathLike[str], anonymized_dir: str | os.PathLike[str], **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_pairs` over image files with the same relative path in both folders."""
    from anonloader.identity.bank import IMAGE_SUFFIXES

    root_a, root_b = Path(original_dir), Path(anonymized_dir)
    names = sorted(p.relative_to(root_a) for p in root_a.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    pairs = [n for n in names if (root_b / n).is_file()]
    if not pairs:
        raise ConfigError(f"no image in {root_a} has a counterpart with the same name in {root_b}")
    originals = [load_image(root_a / n) for n in pairs]
    anonymized = [load_image(root_b / n) for n in pairs]
    for n, a, b in zip(pairs, originals, anonymized):
        if a.shape != b.shape:
            raise ConfigError(f"{n}: original {tuple(a.shape)} and anonymized {tuple(b.shape)} differ in size")
    kwargs.setdefault("name", root_b.name)
    report = evaluate_pairs(originals, anonymized, **kwargs)
    report["missing"] = len(names) - len(pairs)
    return report


def evaluate_anonymizer(
    images: Sequence[torch.Tensor],
    anonymizer: Any,
    *,
    labels: Sequence[Any] | None = None,
    embedder: Any = "dlib",
    detector: Any = None,
    name: str | None = None,
    attribute_models: str | Sequence[str] | None = "auto",
) -> dict[str, Any]:
    """Run ``anonymizer`` (an :class:`~anonloader.pipeline.Anonymizer`) on ``images`` and
    evaluate. The faces it found (its records) are the reference faces; ``labels`` (one per
    image) are passed to it and give each face's real identity for consistency."""
    result = anonymizer(list(images), labels=list(labels) if labels is not None else None)
    faces = []
    identities, synthetic_ids = [], []
    for i, records in enumerate(result.records):
        if records:
            faces.append(
                Detections(
                    torch.tensor([r.box for r in records], dtype=torch.float32),
                    torch.tensor([r.landmarks for r in records], dtype=torch.float32),
                    torch.tensor([r.score for r in records], dtype=torch.float32),
                )
            )
        else:
            faces.append(Detections.empty())
        for r in records:
            identities.append(labels[i] if labels is not None else None)
            synthetic_ids.append(r.synthetic_id)
    if detector is None:
        detector = getattr(anonymizer, "detector", None) or "mtcnn"
    method = getattr(anonymizer, "method", None)
    report = evaluate_pairs(
        images,
        result.images,
        faces=faces,
        detector=detector,
        embedder=embedder,
        identities=identities if labels is not None else None,
        synthetic_ids=synthetic_ids if labels is not None else None,
        name=name or getattr(method, "name", "anonymizer"),
        attribute_models=attribute_models,
    )
    report["anonymizer"] = anonymizer.fingerprint()[:16] if hasattr(anonymizer, "fingerprint") else None
    return report


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return "-" if value is None else str(value)


def format_table(reports: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table, one row per report, columns :data:`COLUMNS`."""
    headers = ["method"] + [h for _, h in COLUMNS]
    rows = [[str(r.get("name", ""))] + [_cell(r.get(k)) for k, _ in COLUMNS] for r in reports]
    widths = [max(len(h), *(len(row[c]) for row in rows)) if rows else len(h) for c, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
