"""Identity banks for IDDiffuse: the synthetic faces x̂ it conditions on, with their E_I features.

Two sources, both keeping identities farther apart than the recognizer's threshold and from a
deny list of real people (``--deny DIR``: every face the pipeline's detector finds in those photos):

- ``--from-folder DIR``: a folder of generated faces (e.g. DCFace's), one identity per image,
  each detected and aligned to the recognizer's template like the pipeline does it
  (``--aligned``: the images are aligned crops already) — :meth:`IdentityBank.from_folder
  <anonloader.identity.bank.IdentityBank.from_folder>`;
- ``--source-bank BANK --n N``: IDDiffuse renders new faces through its bank/seed path (render
  ``k`` conditions on the source bank's identity ``(seed + k) % len(bank)`` and on the texture of
  a driving face, the packaged photos by default) — :meth:`IdentityBank.from_method
  <anonloader.identity.bank.IdentityBank.from_method>`.

The bank then gets the E_I features of the given weights (:meth:`IDDiffuse.with_bank_features
<anonloader.methods.iddiffuse.model.IDDiffuse.with_bank_features>`), so the default identity
mapping ranks it by nearness without computing them at every start. CLI::

    anonloader bank build --method iddiffuse OUT --pretrained RUN --from-folder DIR [--aligned] [--deny PHOTOS]
    anonloader bank build --method iddiffuse OUT --pretrained RUN --source-bank BANK --n 1000 [--driving PHOTOS]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["main"]


def _model(args: argparse.Namespace, bank: Any = None) -> Any:
    from anonloader.methods.iddiffuse.model import IDDiffuse

    options: dict[str, Any] = {"bank": bank, "device": args.device}
    if args.steps is not None:
        options["num_inference_steps"] = args.steps
    if args.tiny:
        torch.manual_seed(args.seed)  # the tiny network's random weights
        return IDDiffuse(config="tiny", **options)
    return IDDiffuse.from_pretrained(args.pretrained, **options)


def main(argv: Sequence[str] | None = None) -> Path:
    """Builds the bank described by ``argv`` (see the module docstring) and returns its folder."""
    from anonloader.commands.bank import add_folder_options, folder_bank
    from anonloader.identity.bank import IdentityBank, embed_photos, face_crops
    from anonloader.identity.embedders import load_embedder

    parser = argparse.ArgumentParser(prog="anonloader bank build --method iddiffuse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="bank folder to write")
    parser.add_argument("--pretrained", default=None, help="IDDiffuse run folder (save_pretrained / train.py output)")
    parser.add_argument("--tiny", action="store_true", help="tiny random IDDiffuse (a dry run)")
    parser.add_argument("--source-bank", default=None, help="bank whose identities IDDiffuse renders from (with --n)")
    parser.add_argument("--driving", default=None, help="folder of photos whose faces drive the renders (default: the packaged photos)")
    parser.add_argument("--n", type=int, default=None, help="identities (renders: required; folder: at most)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps of the renders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    add_folder_options(parser)
    args = parser.parse_args(argv)
    if args.tiny == (args.pretrained is not None):
        parser.error("give either --pretrained RUN or --tiny")
    if (args.from_folder is None) == (args.source_bank is None):
        parser.error("give either --from-folder DIR or --source-bank BANK --n N")
    if args.from_folder is not None:
        bank = folder_bank(args, args.n)
        model = _model(args)
    else:
        if args.n is None:
            parser.error("--source-bank needs --n N")
        model = _model(args, IdentityBank.load(args.source_bank))
        embedder = load_embedder(args.recognizer)
        photos = args.driving if args.driving is not None else _packaged_photos()
        driving = face_crops(photos, model.crop_size, model.template, detector=args.detector)
        deny = None if args.deny is None else embed_photos(args.deny, embedder, detector=args.detector)
        bank = IdentityBank.from_method(model, args.n, embedder, source=driving, seed=args.seed, avoid=deny)
    return model.with_bank_features(bank).save(args.out)


def _packaged_photos() -> list[torch.Tensor]:
    """The photos packaged with anonloader's dependencies (the astronaut, t1's six people)."""
    import numpy as np

    from anonloader.assets import sample_photo

    return [
        torch.from_numpy(np.asarray(sample_photo(name).convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        for name in ("astronaut", "t1")
    ]


if __name__ == "__main__":  # pragma: no cover
    main()
