"""Metric code on constructed cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from anonloader.eval import metrics
from anonloader.eval.runner import format_table


def test_reidentification_and_protection_on_a_constructed_case():
    original = torch.eye(4)  # four orthogonal people
    # faces 0 and 1 unchanged, face 2 turned into person 3, face 3 turned halfway to person 0
    anonymized = torch.stack([torch.eye(4)[0], torch.eye(4)[1], torch.eye(4)[3], torch.tensor([1.0, 0, 0, 0.9])])
    # nearest original of each: 0 -> 0, 1 -> 1, 2 -> 3, 3 -> 0 (cos 0.74 vs 0.67)
    assert metrics.reidentification_rate(original, anonymized) == pytest.approx(0.5)
    # cos with own original: 1, 1, 0, 0.9 / sqrt(1.81) = 0.669
    assert metrics.protection_success_rate(original, anonymized, threshold=0.7) == pytest.approx(0.5)
    assert metrics.protection_success_rate(original, anonymized, threshold=0.6) == pytest.approx(0.25)


def test_tpr_at_fpr_known_answer():
    impostor = torch.linspace(0, 0.999, 2000)  # k = floor(1e-3 * 2000) = 2 -> threshold = 3rd largest
    threshold = torch.sort(impostor, descending=True).values[2]
    genuine = torch.tensor([threshold + 0.01, threshold - 0.01, 1.0, 0.0])
    assert metrics.tpr_at_fpr(genuine, impostor, 1e-3) == pytest.approx(0.5)
    genuine_scores, impostor_scores = metrics.verification_scores(torch.eye(3), torch.eye(3))
    assert genuine_scores.tolist() == [1.0, 1.0, 1.0] and len(impostor_scores) == 6
    assert metrics.tpr_at_fpr(genuine_scores, impostor_scores) == 1.0


def test_detection_recall_and_leaks():
    ref = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([[0.0, 0, 4, 4]])]
    found = [torch.tensor([[1.0, 1, 10, 10]]), torch.zeros(0, 4)]  # IoU 0.81 with the first box
    assert metrics.detection_recall(ref, found) == pytest.approx(1 / 3)
    original = torch.rand(3, 40, 40)
    changed = original.clone()
    changed[:, 0:10, 0:10] = 0.5
    assert metrics.leak_count([original, original], [changed, None], [ref[0], ref[1]]) == 1


def test_consistency_known_answer():
    identities = ["a", "a", "a", "b"]
    synthetic = [3, 3, 5, 7]  # pairs of a: (0,1) same, (0,2) (1,2) different -> 1/3
    anonymized = torch.tensor([[1.0, 0], [1.0, 0], [0.0, 1], [1.0, 1]])
    out = metrics.consistency(identities, synthetic, anonymized)
    assert out["pairs"] == 3
    assert out["same_synthetic_id"] == pytest.approx(1 / 3)
    assert out["anonymized_similarity"] == pytest.approx(1 / 3)


def test_landmark_displacement_and_head_pose():
    frontal = torch.tensor([[[30.0, 40], [70, 40], [50, 60], [35, 80], [65, 80]]])
    shifted = frontal + torch.tensor([4.0, 0.0])  # every point moved by 0.1 inter-ocular distance
    assert metrics.landmark_displacement(frontal, shifted).item() == pytest.approx(0.1)
    pose = metrics.head_pose_from_landmarks(frontal)[0]
    assert pose.abs().max() < 1e-4  # yaw, pitch, roll 0 for a symmetric face, nose half-way
    angle = math.radians(30)
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    rolled = frontal @ rotation.T
    diff = metrics.head_pose_difference(frontal, rolled)[0]
    assert diff[2].item() == pytest.approx(30.0, abs=1e-3) and diff[:2].abs().max() < 1e-3
    turned = frontal.clone()
    turned[0, 2, 0] += 10  # nose moved right by half of half the inter-ocular distance
    assert metrics.head_pose_from_landmarks(turned)[0, 0].item() == pytest.approx(30.0, abs=1e-3)


def test_table_formats_nan_as_dash():
    table = format_table([{"name": "x", "faces": 2, "reidentification_rate": float("nan"), "leaks": 0}])
    assert table.splitlines()[2].startswith("x") and " - " in table
