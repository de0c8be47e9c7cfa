"""The keyed identity mapping end to end, with the real dlib recognizer on real photos.

Same-person cases are built from one photo (t1.jpg's six people) with a geometric and
photometric change: the whole photo rescaled to 80 %, brightened (x1.15 + 0.03) and rotated by
3 degrees, then detected and aligned again. Different people are three of t1's faces.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("dlib")
from _identity_faces import t1_crops  # noqa: E402

from anonloader.errors import SecretError  # noqa: E402
from anonloader.identity.assigner import KeyedIdentityAssigner  # noqa: E402
from anonloader.identity.bank import IdentityBank  # noqa: E402
from anonloader.identity.embedders import DlibEmbedder  # noqa: E402

SECRET = "integration-test-secret-0123456789"


@pytest.fixture(scope="module")
def faces():
    """Three of t1's people in the original photo and in the changed photo, same order."""
    original, changed = t1_crops(False), t1_crops(True)
    assert len(original) == len(changed) == 6
    return original[:3], changed[:3]


@pytest.fixture(scope="module")
def bank():
    generator = torch.Generator().manual_seed(7)
    return IdentityBank(torch.randn(64, 128, generator=generator))


def test_same_person_close_and_different_people_apart(faces):
    original, changed = faces
    embedder = DlibEmbedder()
    a, b = embedder(original), embedder(changed)
    same = (a * b).sum(1)
    cross = a @ a.T - 2 * torch.eye(3)
    assert same.min() >= embedder.threshold, same
    assert cross.max() < embedder.threshold, cross


def _cluster_ids(crops, bank, secret, store=None):
    assigner = KeyedIdentityAssigner("cluster", secret=secret, bank=bank, store=store)
    assigner.fit(crops)
    assignments = assigner.assign(crops, torch.arange(len(crops)), None)
    if store is not None:
        assigner.save()
    return [a.synthetic_id for a in assignments], [a.seed for a in assignments]


def test_cluster_strategy_same_person_same_id_shuffled_and_other_secret(faces, bank):
    original, changed = faces
    crops = torch.cat([original, changed])
    ids, seeds = _cluster_ids(crops, bank, SECRET)
    assert ids[:3] == ids[3:] and seeds[:3] == seeds[3:]
    assert len(set(ids[:3])) == 3
    order = list(range(6))
    random.Random(3).shuffle(order)
    shuffled_ids, _ = _cluster_ids(crops[order], bank, SECRET)
    assert [shuffled_ids[order.index(i)] for i in range(6)] == ids
    other_ids, _ = _cluster_ids(crops, bank, "another-secret-entirely-987654")
    assert other_ids != ids


def test_mapping_is_the_same_in_a_separate_process_and_store_has_no_embedding(faces, bank, tmp_path):
    original, changed = faces
    crops = torch.cat([original, changed])
    torch.save(crops, tmp_path / "crops.pt")
    bank.save(tmp_path / "bank")
    ids, _ = _cluster_ids(crops, bank, SECRET, store=tmp_path / "map.json")
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from anonloader.identity.assigner import KeyedIdentityAssigner
        from anonloader.identity.bank import IdentityBank
        crops = torch.load({str(tmp_path / 'crops.pt')!r})
        order = list(reversed(range(len(crops))))
        assigner = KeyedIdentityAssigner("cluster", bank=IdentityBank.load({str(tmp_path / 'bank')!r}))
        assigner.fit(crops[order])
        out = assigner.assign(crops[order], torch.arange(len(crops)), None)
        ids = [None] * len(crops)
        for slot, i in enumerate(order):
            ids[i] = out[slot].synthetic_id
        print(json.dumps(ids))
        """
    )
    env = {**__import__("os").environ, "ANONLOADER_SECRET": SECRET}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ids
    # the store: keyed digests and ids only; no embedding of any real face in its bytes
    store = (tmp_path / "map.json").read_bytes()
    embeddings = DlibEmbedder()(crops)
    for vector in embeddings:
        for value in vector[:8].tolist():
            assert f"{value:.6f}".encode()[:8] not in store
            assert torch.tensor(value).numpy().tobytes() not in store
    state = json.loads(store)
    assert set(state) == {"format", "version", "check", "bank", "threshold", "margin", "assignments"}
    assert len(state["assignments"]) == 3 and all(len(d) == 64 for d in state["assignments"])


def test_wrong_or_missing_secret_raises(faces, bank, tmp_path, monkeypatch):
    original, _ = faces
    _cluster_ids(original, bank, SECRET, store=tmp_path / "map.json")
    with pytest.raises(SecretError) as caught:
        KeyedIdentityAssigner("cluster", secret="not-the-secret-000000", bank=bank, store=tmp_path / "map.json")
    assert "not-the-secret" not in str(caught.value) and SECRET not in str(caught.value)
    monkeypatch.delenv("ANONLOADER_SECRET", raising=False)
    monkeypatch.delenv("ANONLOADER_SECRET_FILE", raising=False)
    with pytest.raises(SecretError, match="ANONLOADER_SECRET"):
        KeyedIdentityAssigner("cluster", bank=bank)


def test_label_and_track_strategies(faces, bank):
    original, changed = faces
    embedder = DlibEmbedder()
    labels = ["alice", "bob"]
    crops = torch.stack([original[0], original[1], changed[0]])
    by_label = KeyedIdentityAssigner("label", secret=SECRET, bank=bank, embedder=embedder)
    out = by_label.assign(crops, torch.tensor([0, 1, 0]), labels)
    assert out[0] == out[2] and out[0].synthetic_id != out[1].synthetic_id
    tracking = KeyedIdentityAssigner("track", secret=SECRET, bank=bank, embedder=embedder)
    frame1 = tracking.assign(original, torch.zeros(3, dtype=torch.long), ["clip"])
    frame2 = tracking.assign(changed.flip(0), torch.zeros(3, dtype=torch.long), ["clip"])
    assert [a.synthetic_id for a in frame2] == [a.synthetic_id for a in frame1][::-1]
    assert len({a.synthetic_id for a in frame1}) == 3


def test_bank_identity_within_threshold_of_the_real_face_is_skipped(faces):
    original, _ = faces
    embedder = DlibEmbedder()
    real = embedder(original)
    # a bank whose every identity but one is (a near copy of) a real face from t1
    look_alikes = torch.nn.functional.normalize(real + 0.01 * torch.randn(real.shape), dim=1)
    stranger = torch.nn.functional.normalize(torch.randn(1, 128), dim=1)
    bank = IdentityBank(torch.cat([look_alikes, stranger]))
    assigner = KeyedIdentityAssigner("cluster", secret=SECRET, bank=bank, embedder=embedder)
    assigner.fit(original)
    for assignment, vector in zip(assigner.assign(original, torch.arange(3), None), real):
        assert float(bank.embeddings[assignment.synthetic_id] @ vector) < embedder.threshold


def test_graph_clustering_on_real_photos_is_not_worse_than_leader():
    """t1's six people, original and changed photo (12 faces, truth = position left to right):
    pairwise precision / recall of the previous leader clustering and of the k-NN graph at
    dlib's threshold; the graph is not worse on either."""
    from anonloader.identity.clustering import pairwise_precision_recall
    from anonloader.identity.keys import cluster_embeddings, face_content_hash

    crops = torch.cat([t1_crops(False), t1_crops(True)])
    truth = list(range(6)) * 2
    embeddings = DlibEmbedder()(crops)
    hashes = [face_content_hash(c) for c in crops]
    scores = {m: pairwise_precision_recall(cluster_embeddings(embeddings, hashes, DlibEmbedder.threshold, method=m).keys, truth)
              for m in ("leader", "graph")}
    # measured here (dlib-bin 20): both (0.714, 0.833): the fourth person's changed face is at
    # cosine 0.888 to its original and within dlib's threshold of the first person: the
    # recognizer's error, which no clustering at its threshold undoes
    assert scores["graph"][0] >= scores["leader"][0] and scores["graph"][1] >= scores["leader"][1], scores
