"""Privacy, consistency and utility metrics: pure functions on embeddings, boxes and landmarks.

Embeddings are ``N,D`` (any norm; cosine similarity is used), landmarks ``N,5,2`` pixels in
anonloader's order (left eye, right eye, nose, left mouth corner, right mouth corner), boxes
``N,4`` xyxy pixels. Row ``i`` of an "original" tensor and row ``i`` of an "anonymized" tensor
are the same face before and after anonymization.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "angle_difference",
    "consistency",
    "cosine_matrix",
    "detection_recall",
    "head_pose_from_landmarks",
    "head_pose_difference",
    "landmark68_displacement",
    "landmark_displacement",
    "leak_count",
    "protection_success_rate",
    "reidentification_rate",
    "top_label_agreement",
    "tpr_at_fpr",
    "verification_scores",
]


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``N,M`` cosine similarities of ``N,D`` and ``M,D`` embeddings."""
    return torch.nn.functional.normalize(a.float(), dim=1) @ torch.nn.functional.normalize(b.float(), dim=1).T


def reidentification_rate(original: torch.Tensor, anonymized: torch.Tensor) -> float:
    """Fraction of anonymized faces whose nearest original (cosine) is their own original.

    Args:
        original, anonymized: ``N,D`` embeddings, row ``i`` the same face.
    Returns 1.0 for no protection; about ``1/N`` for an anonymization that hides identity.
    """
    if len(original) == 0:
        return float("nan")
    nearest = cosine_matrix(anonymized, original).argmax(dim=1)
    return float((nearest == torch.arange(len(original))).float().mean())


def protection_success_rate(original: torch.Tensor, anonymized: torch.Tensor, threshold: float) -> float:
    """Fraction of faces whose anonymized version is *not* the same person to the recognizer
    (cosine with its own original ``< threshold``)."""
    if len(original) == 0:
        return float("nan")
    same = (torch.nn.functional.normalize(original.float(), dim=1) * torch.nn.functional.normalize(anonymized.float(), dim=1)).sum(1)
    return float((same < threshold).float().mean())


def verification_scores(
    original: torch.Tensor, anonymized: torch.Tensor, identities: Sequence[Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Genuine and impostor cosine scores of original/anonymized pairs.

    Genuine: ``(original_i, anonymized_j)`` of the same person (``i == j``, or equal
    ``identities``); impostor: every pair of different people (``i != j`` without identities).
    """
    sims = cosine_matrix(original, anonymized)
    n = len(original)
    if identities is None:
        same = torch.eye(n, dtype=torch.bool)
    else:
        ids = list(identities)
        same = torch.tensor([[ids[i] == ids[j] for j in range(n)] for i in range(n)], dtype=torch.bool)
    return sims[same], sims[~same]


def tpr_at_fpr(genuine: torch.Tensor, impostor: torch.Tensor, fpr: float = 1e-3) -> float:
    """True-positive rate at the strictest threshold whose false-positive rate is ``<= fpr``.

    The threshold is the ``k+1``-th largest impostor score with ``k = floor(fpr * n_impostor)``
    (scores strictly above it count as accepted), so at most ``k`` impostors are accepted. With
    fewer than ``1 / fpr`` impostors this means no impostor may be accepted.
    """
    if len(genuine) == 0:
        return float("nan")
    if len(impostor) == 0:
        return 1.0
    k = int(math.floor(fpr * len(impostor)))
    threshold = torch.sort(impostor.float(), descending=True).values[min(k, len(impostor) - 1)]
    return float((genuine.float() > threshold).float().mean())


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from anonloader.identity.keys import box_iou

    return box_iou(a.float(), b.float())


def detection_recall(
    reference_boxes: Sequence[torch.Tensor], found_boxes: Sequence[torch.Tensor], iou: float = 0.5
) -> float:
    """Fraction of reference boxes (per image ``N_i,4``) matched by a found box (``M_i,4``) at
    IoU ``>= iou`` (greedy one-to-one by IoU)."""
    total, hit = 0, 0
    for ref, found in zip(reference_boxes, found_boxes):
        total += len(ref)
        if len(ref) == 0 or len(found) == 0:
            continue
        hit += len(match_boxes(ref, found, iou))
    return float("nan") if total == 0 else hit / total


def match_boxes(reference: torch.Tensor, found: torch.Tensor, iou: float = 0.5) -> list[tuple[int, int]]:
    """Greedy one-to-one ``(reference index, found index)`` pairs with IoU ``>= iou``, best first."""
    if len(reference) == 0 or len(found) == 0:
        return []
    overlaps = _iou(reference, found)
    pairs = sorted(((float(overlaps[i, j]), i, j) for i in range(len(reference)) for j in range(len(found))), key=lambda p: (-p[0], p[1], p[2]))
    used_r, used_f, out = set(), set(), []
    for value, i, j in pairs:
        if value < iou:
            break
        if i in used_r or j in used_f:
            continue
        used_r.add(i)
        used_f.add(j)
        out.append((i, j))
    return sorted(out)


def leak_count(
    originals: Sequence[torch.Tensor], anonymized: Sequence[torch.Tensor | None], boxes: Sequence[torch.Tensor], tolerance: float = 1.0 / 255
) -> int:
    """Annotated faces whose pixels did not change: mean absolute difference inside the box
    (``3,H,W`` images in [0,1], ``N_i,4`` boxes per image) ``<= tolerance``. Dropped images
    (None) leak nothing."""
    leaks = 0
    for original, anon, image_boxes in zip(originals, anonymized, boxes):
        if anon is None:
            continue
        h, w = original.shape[-2:]
        for box in image_boxes:
            x1, y1 = max(0, int(math.floor(float(box[0])))), max(0, int(math.floor(float(box[1]))))
            x2, y2 = min(w, int(math.ceil(float(box[2])))), min(h, int(math.ceil(float(box[3]))))
            if x2 <= x1 or y2 <= y1:
                continue
            diff = (original[:, y1:y2, x1:x2].float() - anon[:, y1:y2, x1:x2].float()).abs().mean()
            leaks += int(float(diff) <= tolerance)
    return leaks


def consistency(identities: Sequence[Any], synthetic_ids: Sequence[Any] | None = None, anonymized: torch.Tensor | None = None) -> dict[str, float]:
    """For pairs of faces sharing a real identity: the fraction with the same synthetic id and
    the mean recognizer cosine between their anonymized versions (``N,D``).

    Returns ``{"same_synthetic_id": ..., "anonymized_similarity": ..., "pairs": ...}`` (NaN when
    not computable)."""
    ids = list(identities)
    pairs = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids)) if ids[i] == ids[j]]
    out = {"pairs": float(len(pairs)), "same_synthetic_id": float("nan"), "anonymized_similarity": float("nan")}
    if not pairs:
        return out
    if synthetic_ids is not None and all(synthetic_ids[i] is not None for p in pairs for i in p):
        out["same_synthetic_id"] = sum(synthetic_ids[i] == synthetic_ids[j] for i, j in pairs) / len(pairs)
    if anonymized is not None:
        sims = cosine_matrix(anonymized, anonymized)
        out["anonymized_similarity"] = float(torch.stack([sims[i, j] for i, j in pairs]).mean())
    return out


def _inter_ocular(landmarks: torch.Tensor) -> torch.Tensor:
    return (landmarks[:, 1] - landmarks[:, 0]).norm(dim=-1).clamp_min(1e-6)


def landmark_displacement(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``N`` mean 5-point displacement between ``N,5,2`` landmark sets, in units of the
    reference's inter-ocular distance (distance between the two eye points)."""
    return (other.float() - reference.float()).norm(dim=-1).mean(dim=1) / _inter_ocular(reference.float())


def head_pose_from_landmarks(landmarks: torch.Tensor) -> torch.Tensor:
    """``N,3`` (yaw, pitch, roll) in degrees, a geometric proxy from 5 landmarks.

    - roll: angle of the eye line against the horizontal;
    - yaw: after undoing roll, the nose's horizontal offset from the midpoint of the eye and
      mouth centres, over half the inter-ocular distance, as ``asin`` (clamped to +-1);
    - pitch: after undoing roll, the nose's vertical position between the eye line (0) and the
      mouth line (1), relative to the frontal value 0.5 (InsightFace's template has ~0.49), as
      ``atan(2 * (ratio - 0.5))``.
    Frontal faces give about (0, 0, 0); signs: yaw > 0 when the nose is right of centre in the
    image, pitch > 0 when the nose is nearer the mouth, roll > 0 clockwise in image coordinates.
    """
    points = landmarks.float()
    eye_vector = points[:, 1] - points[:, 0]
    roll = torch.atan2(eye_vector[:, 1], eye_vector[:, 0])
    cos, sin = torch.cos(-roll), torch.sin(-roll)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # N,2,2
    upright = (points - points[:, :1]) @ rotation.transpose(1, 2)
    eye_mid = (upright[:, 0] + upright[:, 1]) / 2
    mouth_mid = (upright[:, 3] + upright[:, 4]) / 2
    nose = upright[:, 2]
    iod = _inter_ocular(points)
    centre_x = (eye_mid[:, 0] + mouth_mid[:, 0]) / 2
    yaw = torch.asin(((nose[:, 0] - centre_x) / (iod / 2)).clamp(-1, 1))
    ratio = (nose[:, 1] - eye_mid[:, 1]) / (mouth_mid[:, 1] - eye_mid[:, 1]).clamp_min(1e-6)
    pitch = torch.atan(2 * (ratio - 0.5))
    return torch.rad2deg(torch.stack([yaw, pitch, roll], dim=1))


def head_pose_difference(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``N,3`` absolute (yaw, pitch, roll) differences in degrees between ``N,5,2`` landmark sets
    (roll wrapped to [0, 180])."""
    diff = (head_pose_from_landmarks(other) - head_pose_from_landmarks(reference)).abs()
    diff[:, 2] = torch.minimum(diff[:, 2], 360 - diff[:, 2])
    return diff


#: iBUG 300-W indices of the six points around each eye (as seen in the image: left, right)
EYES_68 = (tuple(range(36, 42)), tuple(range(42, 48)))


def landmark68_displacement(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``N`` mean 68-point displacement between ``N,68,2`` landmark sets (iBUG 300-W order), in
    units of the reference's inter-ocular distance (between the centres of its two eyes, each
    the mean of its six points), the same unit as :func:`landmark_displacement`."""
    reference, other = reference.float(), other.float()
    left, right = reference[:, list(EYES_68[0])].mean(dim=1), reference[:, list(EYES_68[1])].mean(dim=1)
    inter_ocular = (right - left).norm(dim=-1).clamp_min(1e-6)
    return (other - reference).norm(dim=-1).mean(dim=1) / inter_ocular


def angle_difference(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Absolute differences of angles in degrees (any shape, e.g. ``N,3`` yaw/pitch/roll),
    wrapped to [0, 180]."""
    diff = torch.remainder(other.float() - reference.float(), 360.0)
    return torch.minimum(diff, 360.0 - diff)


def top_label_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Fraction of rows whose highest-scoring class is the same in ``N,C`` scores (probabilities
    or logits) ``reference`` and ``other``; NaN for no row."""
    if len(reference) == 0:
        return float("nan")
    return float((reference.argmax(dim=1) == other.argmax(dim=1)).float().mean())
