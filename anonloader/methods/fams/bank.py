"""Synthetic identity banks rendered by FAMS itself, for its identity mode.

FAMS at full anonymization (``d`` above 1, the paper's 1.4 gives the most distinct face shapes)
turns a driving face into a new person; different seeds give different people (paper fig. 5).
:func:`render_bank` renders seeds ``seed, seed + 1, ...`` from a few driving crops in turn,
embeds every face with a recogniser (re-aligned from FAMS's ``ffhq`` template to the
recogniser's), and keeps a face only when it is farther than the recogniser's threshold from every
kept face and from every face of a *deny list* (real people who must not appear as a synthetic
identity, e.g. the dataset's own faces). The bank's images stay in FAMS's template
(``meta["template"] = "ffhq"``), so FAMS's identity mode uses them as they are.

CLI (writes a bank loadable with ``IdentityBank.load``)::

    python -m anonloader.methods.fams.bank OUT --n 1000 --weights hkung/face-anon-simple \\
        [--driving PHOTOS] [--deny PHOTOS] [--degree 1.4]

Without ``--driving`` the driving faces are the photos packaged with anonloader (the astronaut and
the six people of ``t1.jpg``); their pose, expression and background shape the bank images.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from anonloader.errors import ConfigError

__all__ = ["embed_ffhq_crops", "packaged_driving_crops", "render_bank"]

logger = logging.getLogger(__name__)


def embed_ffhq_crops(crops: torch.Tensor, embedder: Any) -> torch.Tensor:
    """Recogniser embeddings of ``F,3,S,S float in [0,1]`` ``ffhq``-aligned crops (re-aligned to
    the recogniser's template and size first). Returns ``F,D float32``, L2-normalised."""
    from anonloader.identity.bank import embed_crops

    return embed_crops(crops, embedder, "ffhq")


def packaged_driving_crops(resolution: int) -> torch.Tensor:
    """The faces of anonloader's packaged photos (astronaut, t1's six people), ``ffhq``-aligned:
    ``7,3,R,R float32 in [0,1]``. Detected with MTCNN (facenet-pytorch)."""
    from anonloader.align import align_faces
    from anonloader.assets import sample_photo
    from anonloader.detect import load_detector

    import numpy as np

    detector = load_detector("mtcnn")
    crops = []
    for name in ("astronaut", "t1"):
        image = torch.from_numpy(np.asarray(sample_photo(name).convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        faces = detector([image])
        crops.append(align_faces([image], faces, crop_size=resolution, template="ffhq").crops)
    return torch.cat(crops).clamp(0, 1)


def render_bank(
    fams: Any,
    n: int,
    embedder: Any,
    *,
    driving: torch.Tensor,
    deny: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 4,
    max_attempts: int | None = None,
) -> Any:
    """``n`` distinct synthetic identities rendered by ``fams`` (see the module docstring).

    Args:
        fams: a :class:`~anonloader.methods.fams.FAMS` without a bank (its ``anonymization_degree``
            sets how far from the driving faces the identities are).
        n: identities wanted.
        embedder: a recogniser (``crop_size``, ``template``, ``threshold``, ``config()``, ``__call__``).
        driving: ``D,3,S,S float in [0,1]`` ``ffhq``-aligned driving crops, used in turn.
        deny: ``M,E`` recogniser embeddings of real faces no identity may be near, or None.
        seed: first seed; face ``k`` of the render order uses ``seed + k``.
        batch_size: faces rendered together.
        max_attempts: renders before giving up (default ``20 n + 100``).

    Returns:
        an :class:`~anonloader.identity.bank.IdentityBank` with ``n`` identities, their images
        (``ffhq``, FAMS's crop size) and ``meta`` naming the method, recogniser, seeds and deny list.

    Raises:
        IdentityError: fewer than ``n`` distinct identities within ``max_attempts`` renders.
    """
    from anonloader.identity.bank import IdentityBank

    if n < 1:
        raise ConfigError(f"render_bank needs n >= 1, got {n}")
    if getattr(fams, "bank", None) is not None:
        raise ConfigError("render_bank renders with FAMS's anonymization path; pass a FAMS without bank=")
    if driving.ndim != 4 or driving.shape[0] == 0:
        raise ConfigError(f"driving crops must be D,3,S,S with D >= 1, got {tuple(driving.shape)}")
    return IdentityBank.from_method(
        fams, n, embedder, source=driving.float(), seed=seed, batch_size=batch_size, avoid=deny, max_attempts=max_attempts,
    )


def _photo_crops(folder: str, resolution: int) -> torch.Tensor:
    """``ffhq`` crops of the most confident face of every photo in ``folder``."""
    from anonloader.detect import load_detector
    from anonloader.identity.embedders import load_embedder

    from .data import PHOTO_SUFFIXES, _crop, find_faces

    files = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    entries, _ = find_faces(files, load_detector("default"), load_embedder("dlib"))
    return torch.stack([_crop(entry, resolution, "ffhq") for entry in entries])


def main(argv: Sequence[str] | None = None) -> Path:
    from anonloader.identity.bank import embed_photos
    from anonloader.identity.embedders import load_embedder

    from .model import FAMS

    parser = argparse.ArgumentParser(prog="python -m anonloader.methods.fams.bank", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="bank folder to write")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--weights", default=None, help="FAMS weights (directory or hub id)")
    parser.add_argument("--tiny", action="store_true", help="tiny random FAMS (a dry run)")
    parser.add_argument("--allow-download", action="store_true")
    parser.add_argument("--degree", type=float, default=1.4, help="anonymization degree d of the renders (paper: 1.4 is the most distinct)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--driving", default=None, help="folder of photos whose faces drive the renders (default: the packaged photos)")
    parser.add_argument("--deny", default=None, help="folder of photos of real people no identity may resemble (every face in them)")
    parser.add_argument("--recognizer", default="dlib")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.tiny == (args.weights is not None):
        raise SystemExit("give either --weights or --tiny")
    options: dict[str, Any] = {"crop_size": args.resolution, "anonymization_degree": args.degree, "device": args.device}
    if args.steps is not None:
        options["num_inference_steps"] = args.steps
    fams = FAMS(tiny=True, resolution=args.resolution, **options) if args.tiny else FAMS(args.weights, allow_download=args.allow_download, **options)
    embedder = load_embedder(args.recognizer)
    driving = packaged_driving_crops(args.resolution) if args.driving is None else _photo_crops(args.driving, args.resolution)
    deny = None if args.deny is None else embed_photos(args.deny, embedder)  # every face of every photo
    bank = render_bank(fams, args.n, embedder, driving=driving, deny=deny, seed=args.seed)
    return bank.save(args.out)


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    main()
