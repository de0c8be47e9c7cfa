"""``anonloader bank build --method fams``: the command writes a bank ``IdentityBank.load`` reads."""

from __future__ import annotations

import pytest

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
