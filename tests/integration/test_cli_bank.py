"""``anonloader bank build``: each builder (FAMS renders, a folder of faces, IDDiffuse) writes a
bank ``IdentityBank.load`` reads, with identities farther apart than the recognizer threshold and
from every face of a deny list."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("dlib")

from anonloader.cli import main  # noqa: E402
from anonloader.identity.bank import IdentityBank  # noqa: E402


def test_bank_build_with_tiny_fams_writes_a_loadable_bank(tmp_path, capsys):
    out = tmp_path / "bank"
    code = main(["bank", "build", "--method", "fams", str(out), "--n", "1", "--tiny", "--resolution", "16", "--steps", "2"])
    assert code == 0 and f"bank: {out}" in capsys.readouterr().out
    bank = IdentityBank.load(out)
    assert len(bank) == 1 and bank.images is not None and bank.images.shape[-2:] == (16, 16)


def test_unknown_method_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["bank", "build", "--method", "blur", str(tmp_path / "b"), "--n", "1"])


def _photos(images, folder):
    from test_identity_bank_sources import save_image

    folder.mkdir()
    for name, image in images.items():
        save_image(image, folder / f"{name}.png")
    return folder


def test_bank_build_with_tiny_fams_keeps_identities_apart_and_away_from_denied_faces(t1_image, tmp_path, capsys):
    from anonloader.identity.bank import embed_photos
    from anonloader.identity.embedders import load_embedder

    embedder = load_embedder("dlib")
    deny = _photos({"t1": t1_image}, tmp_path / "real")  # six real people no identity may resemble
    out = tmp_path / "bank"
    # random tiny networks draw blobs, not people; at d = 0 the blobs follow their driving faces
    # (the packaged photos) enough for the recognizer to tell three of them apart
    options = ["--n", "3", "--tiny", "--resolution", "16", "--steps", "2", "--degree", "0"]
    assert main(["bank", "build", "--method", "fams", str(out), *options, "--deny", str(deny)]) == 0
    bank = IdentityBank.load(out)
    assert len(bank) == 3 and bank.images.shape == (3, 3, 16, 16) and bank.meta["deny"]["count"] == 6
    sims = bank.embeddings @ bank.embeddings.T
    assert float((sims - 2 * torch.eye(3)).max()) < embedder.threshold  # pairwise farther than the threshold
    denied = embed_photos(deny, embedder)
    assert float((bank.embeddings @ denied.T).max()) < embedder.threshold  # and from each denied face


def test_bank_build_from_a_folder_for_any_method_and_for_iddiffuse(t1_image, astronaut_image, tmp_path, capsys):
    pytest.importorskip("diffusers")
    from _identity_faces import changed_photo
    from test_identity_bank_sources import cut_out_people, save_image

    from anonloader.methods.iddiffuse.model import IDDiffuse

    faces = tmp_path / "generated"
    cut_out_people(t1_image, faces, "t1")
    deny = tmp_path / "real"
    cut_out_people(changed_photo(t1_image), deny, "real")  # another photo of person 2 ...
    for path in deny.iterdir():
        if path.name != "real_2.png":
            path.unlink()
    save_image(astronaut_image, deny / "astronaut.png")  # ... and someone not in the folder
    out = tmp_path / "folder_bank"
    assert main(["bank", "build", "--method", "folder", str(out), "--from-folder", str(faces), "--deny", str(deny)]) == 0
    bank = IdentityBank.load(out)
    assert bank.meta["template"] == "arcface" and bank.meta["deny"]["count"] == 2
    assert bank.names == ["t1_0.png", "t1_1.png", "t1_3.png", "t1_4.png", "t1_5.png"]  # person 2 is left out
    assert bank.meta["rejected"]["denied"] == 1

    out = tmp_path / "iddiffuse_bank"
    assert main(["bank", "build", "--method", "iddiffuse", str(out), "--tiny", "--from-folder", str(faces)]) == 0
    bank = IdentityBank.load(out)
    assert len(bank) == 6 and bank.features is not None
    torch.manual_seed(0)  # the builder's --tiny network (seed 0)
    model = IDDiffuse(config="tiny", bank=bank)
    assert bank.meta["features"] == model.feature_config()  # E_I of these weights: the default mapping uses them as they are
    assert model.default_identity(secret="s3cret").mapper.bank is bank

    # IDDiffuse's own renders through its bank/seed path: render k conditions on source identity k mod 6
    rendered = tmp_path / "rendered_bank"
    options = ["--tiny", "--source-bank", str(out), "--n", "1", "--steps", "2", "--deny", str(deny)]
    assert main(["bank", "build", "--method", "iddiffuse", str(rendered), *options]) == 0
    bank = IdentityBank.load(rendered)
    assert bank.names == ["iddiffuse_seed0"] and bank.images.shape == (1, 3, 32, 32) and bank.features is not None
    assert bank.meta["template"] == "arcface" and bank.meta["deny"]["count"] == 2 and bank.meta["method"]["bank"] is not None
