"""Banks from folders of faces and from methods, with the real detector and recognizer (dlib):
unaligned faces are detected and aligned like the pipeline does it, near-duplicates and faces
close to a deny list of real people are left out.

Same-person cases: t1.jpg's six people cut out of the photo and of a changed copy (rescaled,
brightened, rotated: other pixels, same person) — no package ships several photos per person."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("dlib")

from _identity_faces import aligned_crops, changed_photo, detect_faces  # noqa: E402

from anonloader.errors import IdentityError  # noqa: E402
from anonloader.identity.bank import IdentityBank, embed_crops, embed_photos  # noqa: E402
from anonloader.identity.embedders import load_embedder  # noqa: E402
from anonloader.types import FaceConditions  # noqa: E402


def save_image(image: torch.Tensor, path) -> None:
    from PIL import Image

    Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(path)


def cut_out_people(image: torch.Tensor, folder, prefix: str) -> None:
    """One photo per person of ``image`` (left to right), each the face with a face-width border."""
    folder.mkdir(parents=True, exist_ok=True)
    for person, (x1, y1, x2, y2) in enumerate(detect_faces(image).boxes.tolist()):
        pad = x2 - x1
        top, left = max(0, int(y1 - pad)), max(0, int(x1 - pad))
        save_image(image[:, top : int(y2 + pad), left : int(x2 + pad)], folder / f"{prefix}_{person}.png")


@pytest.fixture(scope="module")
def embedder():
    return load_embedder("dlib")


def _pairwise_max(embeddings: torch.Tensor) -> float:
    sims = embeddings @ embeddings.T
    return float((sims - 2 * torch.eye(len(sims))).max())


def test_from_folder_detects_aligns_and_drops_the_same_person_twice(t1_image, embedder, tmp_path):
    folder = tmp_path / "generated"
    cut_out_people(t1_image, folder, "a")
    cut_out_people(changed_photo(t1_image), folder, "b")  # the same six people again
    save_image(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)), folder / "c_noise.png")
    bank = IdentityBank.from_folder(folder, embedder)
    assert bank.names == [f"a_{i}.png" for i in range(6)]  # the b_ photos are the same people: near-duplicates
    assert bank.meta["dropped_duplicates"] == 6 and bank.meta["no_face"] == ["c_noise.png"]
    assert bank.meta["template"] == "arcface" and bank.images.shape == (6, 3, 112, 112)
    assert _pairwise_max(bank.embeddings) < embedder.threshold
    # the stored faces are aligned as the pipeline aligns them for the recognizer: the crops of the
    # full photo give the same people (same recognizer identity, well within the threshold)
    direct = embed_crops(aligned_crops(t1_image), embedder)
    assert float((bank.embeddings * direct).sum(1).min()) >= embedder.threshold

    # aligned crops as they are (today's behaviour, DCFace-style folders): resized, not detected
    crops_folder = tmp_path / "aligned"
    crops_folder.mkdir()
    for i, crop in enumerate(aligned_crops(t1_image)):
        save_image(crop, crops_folder / f"{i}.png")
    aligned = IdentityBank.from_folder(crops_folder, embedder, aligned=True)
    assert aligned.meta["aligned_by"] == "given" and len(aligned) == 6
    torch.testing.assert_close(aligned.embeddings, embed_crops(aligned.images, embedder))


def test_deny_list_keeps_every_identity_away_from_real_faces(t1_image, astronaut_image, embedder, tmp_path):
    folder = tmp_path / "generated"
    cut_out_people(t1_image, folder, "t1")
    save_image(astronaut_image, folder / "zz_astronaut.png")
    deny_folder = tmp_path / "real"
    cut_out_people(changed_photo(t1_image), deny_folder, "real")  # other photos of two of the people
    for path in deny_folder.iterdir():
        if path.name not in ("real_0.png", "real_2.png"):
            path.unlink()
    denied = embed_photos(deny_folder, embedder)
    assert len(denied) == 2
    bank = IdentityBank.from_folder(folder, embedder, avoid=denied)
    assert bank.names == ["t1_1.png", "t1_3.png", "t1_4.png", "t1_5.png", "zz_astronaut.png"]
    assert bank.meta["rejected"]["denied"] == 2 and bank.meta["deny"]["count"] == 2
    assert float((bank.embeddings @ denied.T).max()) < embedder.threshold  # every identity, every denied face
    with pytest.raises(IdentityError, match="denied real face"):
        IdentityBank.from_folder(folder, embedder, avoid=embed_photos([t1_image, astronaut_image], embedder))


def test_from_method_rejects_denied_faces_and_near_duplicates(t1_image, embedder):
    people = aligned_crops(t1_image)  # six real people, arcface-aligned

    def generator(crops: torch.Tensor, conditions: FaceConditions) -> torch.Tensor:
        """A face generator over a fixed set of six faces: seed s gives face s mod 6."""
        return people[[s % 6 for s in conditions.seeds]]

    generator.crop_size, generator.template, generator.name = 112, "arcface", "six_faces"
    denied = embed_crops(people[[1, 4]], embedder)
    bank = IdentityBank.from_method(generator, 4, embedder, avoid=denied, batch_size=3)
    assert bank.names == ["six_faces_seed0", "six_faces_seed2", "six_faces_seed3", "six_faces_seed5"]
    assert _pairwise_max(bank.embeddings) < embedder.threshold
    assert float((bank.embeddings @ denied.T).max()) < embedder.threshold
    assert bank.meta["rejected"] == {"duplicate": 0, "denied": 2} and bank.meta["template"] == "arcface"
    # real images as the deny list instead of embeddings: the same bank
    same = IdentityBank.from_method(generator, 4, embedder, avoid_images=people[[1, 4]], batch_size=3)
    assert same.names == bank.names
    # only four people are allowed: a fifth is always a duplicate or denied
    with pytest.raises(IdentityError, match=r"4 distinct identities of 5 .*near-duplicates, .* too close to the deny list"):
        IdentityBank.from_method(generator, 5, embedder, avoid=denied, batch_size=3, max_attempts=12)
