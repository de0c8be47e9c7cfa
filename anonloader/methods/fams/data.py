"""FAMS training records from a folder of photos (paper 4.1), written to disk one at a time.

The paper groups photos by person with a face recogniser, picks per person a *source* and a
*ground truth* photo, and makes the driving image by swapping the ground truth's face to another
person with a face-swap model (InsightFace's inswapper there). :func:`build_records` does the
same:

1. every photo's most confident face is detected (the pipeline's detectors) and embedded with a
   recogniser (``"dlib"`` by default); only landmarks and embeddings stay in memory;
2. faces are grouped at the recogniser's threshold (:func:`~anonloader.identity.keys.cluster_embeddings`);
3. per person with at least two photos, each photo is the ground truth once, with the person's
   next photo as source; a *donor* photo of another person is drawn with ``seed``;
4. ``swapped`` = the ground truth with its face swapped to the donor by a :class:`Swapper`;
5. each record's four ``ffhq``-aligned crops are written as PNG files with one line in
   ``records.jsonl``, before the next record is made (nothing is held for the whole folder).

:class:`SwapRecordFolder` reads the records back lazily, as the
:class:`~anonloader.methods.fams.training.SwapRecord` s the curriculum
(:class:`~anonloader.methods.fams.training.CurriculumTripletData`) takes.

About the swapper, honestly: the paper's driving images come from a separate, strong swap model.
:class:`FAMSSwapper` uses FAMS's own face-swap path, so a FAMS trained on its records learns from
its own outputs (self-distillation: it cannot exceed the swapper's quality, and the swapper's
identity leakage becomes training signal). It is here so the whole path runs without another
model; plug in a dedicated swapper (any object with :class:`Swapper`'s signature) for real
training, and respect its licence (inswapper's weights are non-commercial).

CLI::

    python -m anonloader.methods.fams.data build PHOTOS OUT --weights hkung/face-anon-simple
    python -m anonloader.methods.fams.data build PHOTOS OUT --tiny   # tiny random FAMS: a dry run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from anonloader.errors import ConfigError

from .training import SwapRecord

__all__ = [
    "FAMSSwapper",
    "FaceEntry",
    "RecordPlan",
    "SwapRecordFolder",
    "Swapper",
    "build_records",
    "find_faces",
    "group_faces",
    "plan_records",
]

logger = logging.getLogger(__name__)

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_PARTS = ("source", "ground_truth", "swapped", "donor")


@runtime_checkable
class Swapper(Protocol):
    """Swaps faces: ``targets`` keep pose, expression, background; ``sources`` give the identity.

    ``__call__(targets, sources, seeds)``: ``F,3,R,R float in [0,1]`` ``ffhq``-aligned crops
    each, ``F`` integer seeds -> ``F,3,R,R float in [0,1]``. ``config()``: JSON-able settings.
    """

    name: str

    def __call__(self, targets: torch.Tensor, sources: torch.Tensor, seeds: list[int]) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...


class FAMSSwapper:
    """FAMS's face-swap path as a :class:`Swapper` (source = the donor, driving = the target,
    ``swap_degree`` as configured). See the module docstring for what this costs.

    Args:
        fams: a :class:`~anonloader.methods.fams.FAMS` (its ``resolution`` should match the records').
    """

    name = "fams"

    def __init__(self, fams: Any) -> None:
        self.fams = fams

    def __call__(self, targets: torch.Tensor, sources: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        return self.fams.generate(targets, list(seeds), source=sources)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.fams.config()}


@dataclass(frozen=True)
class FaceEntry:
    """One photo's chosen face: ``box`` ``4 float`` and ``landmarks`` ``5,2 float`` in photo pixels."""

    path: str
    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class RecordPlan:
    """Indices into the face list: ``ground_truth`` and ``source`` show one person, ``donor`` another."""

    source: int
    ground_truth: int
    donor: int


def _read_photo(path: str | os.PathLike[str]) -> torch.Tensor:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def _crop(entry: FaceEntry, crop_size: int, template: str) -> torch.Tensor:
    """``3,S,S float32 in [0,1]``: the entry's face aligned with ``template``."""
    from anonloader.align import align_faces
    from anonloader.types import Detections

    detections = Detections(
        torch.tensor([entry.box], dtype=torch.float32), torch.tensor([entry.landmarks], dtype=torch.float32), torch.ones(1)
    )
    return align_faces([_read_photo(entry.path)], [detections], crop_size=crop_size, template=template).crops[0].clamp(0, 1)


def find_faces(photos: Sequence[str | os.PathLike[str]], detector: Any, embedder: Any) -> tuple[list[FaceEntry], torch.Tensor]:
    """The most confident face of every photo and its recogniser embedding.

    Photos without a face are skipped (logged). Returns the entries and ``N,D float32``
    L2-normalised embeddings, one row per entry.
    """
    entries: list[FaceEntry] = []
    embeddings: list[torch.Tensor] = []
    for path in photos:
        image = _read_photo(path)
        faces = detector([image])[0]
        if len(faces) == 0:
            logger.info("no face in %s: skipped", path)
            continue
        best = int(torch.argmax(faces.scores))
        entry = FaceEntry(
            str(path),
            tuple(float(v) for v in faces.boxes[best]),  # type: ignore[arg-type]
            tuple((float(x), float(y)) for x, y in faces.landmarks[best]),
        )
        crop = _crop(entry, int(embedder.crop_size), str(embedder.template))
        entries.append(entry)
        embeddings.append(embedder(crop.unsqueeze(0))[0].float())
    if not entries:
        raise ConfigError("no faces found in the photos")
    return entries, torch.nn.functional.normalize(torch.stack(embeddings), dim=1)


def group_faces(entries: Sequence[FaceEntry], embeddings: torch.Tensor, threshold: float) -> list[int]:
    """One group number per entry: faces within the recogniser's ``threshold`` (cosine) of one
    another, transitively, share a group (independent of the photos' order)."""
    from anonloader.identity.keys import cluster_embeddings

    hashes = [hashlib.sha256(f"{e.path}|{e.box}".encode()).hexdigest() for e in entries]
    result = cluster_embeddings(embeddings, hashes, threshold)
    numbers = {key: number for number, key in enumerate(result.cluster_keys)}
    return [numbers[key] for key in result.keys]


def plan_records(groups: Sequence[int], seed: int = 0) -> list[RecordPlan]:
    """Per person with two or more faces: each face is the ground truth once, the person's next
    face (in input order, cyclic) its source, and a face of another person (drawn with ``seed``)
    its donor. Needs at least two people."""
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    if len(members) < 2:
        raise ConfigError("FAMS records need photos of at least two people (the donor is another person)")
    rng = random.Random(seed)
    plans = []
    for group in sorted(members):
        faces = members[group]
        if len(faces) < 2:
            continue
        others = [i for i, g in enumerate(groups) if g != group]
        for position, target in enumerate(faces):
            plans.append(RecordPlan(source=faces[(position + 1) % len(faces)], ground_truth=target, donor=rng.choice(others)))
    if not plans:
        raise ConfigError("no person has two photos: FAMS records need a source and a ground truth of the same person")
    return plans


def _save_png(crop: torch.Tensor, path: Path) -> None:
    array = (crop.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)


def build_records(
    photos: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    swapper: Swapper,
    detector: Any = "default",
    embedder: Any = "dlib",
    resolution: int = 512,
    seed: int = 0,
    batch_size: int = 4,
) -> Path:
    """Writes FAMS training records (see the module docstring) into ``out``.

    Args:
        photos: a folder (searched recursively for .jpg/.jpeg/.png/.webp) or a list of files.
        out: the output folder: ``records.jsonl``, ``manifest.json`` and ``crops/*.png``.
        swapper: makes the swapped driving images.
        detector, embedder: names or objects (:func:`~anonloader.detect.load_detector`,
            :func:`~anonloader.identity.embedders.load_embedder`).
        resolution: side of the written crops (the released model: 512).
        seed: donor draws and swap seeds.
        batch_size: records swapped together.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.
    """
    from anonloader.detect import load_detector
    from anonloader.identity.embedders import load_embedder

    if isinstance(photos, (str, os.PathLike)):
        root = Path(photos)
        files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
        if not files:
            raise ConfigError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) in {root}")
    else:
        files = [str(p) for p in photos]
    detector = load_detector(detector)
    embedder = load_embedder(embedder)
    entries, embeddings = find_faces(files, detector, embedder)
    groups = group_faces(entries, embeddings, float(embedder.threshold))
    plans = plan_records(groups, seed)
    folder = Path(out)
    (folder / "crops").mkdir(parents=True, exist_ok=True)
    written = 0
    with open(folder / "records.jsonl", "w") as lines:
        for start in range(0, len(plans), batch_size):
            batch = plans[start : start + batch_size]
            crops = {
                part: torch.stack([_crop(entries[getattr(plan, part)], resolution, "ffhq") for plan in batch])
                for part in ("source", "ground_truth", "donor")
            }
            seeds = [seed * 1_000_003 + start + i for i in range(len(batch))]
            crops["swapped"] = swapper(crops["ground_truth"], crops["donor"], seeds).detach().float().cpu().clamp(0, 1)
            for i, plan in enumerate(batch):
                number = start + i
                files_of = {part: f"crops/{number:07d}_{part}.png" for part in _PARTS}
                for part in _PARTS:
                    _save_png(crops[part][i], folder / files_of[part])
                record = {
                    "index": number,
                    **files_of,
                    "person": groups[plan.ground_truth],
                    "donor_person": groups[plan.donor],
                    "photos": {"source": entries[plan.source].path, "ground_truth": entries[plan.ground_truth].path, "donor": entries[plan.donor].path},
                }
                lines.write(json.dumps(record, sort_keys=True) + "\n")
                lines.flush()
                written += 1
    manifest = {
        "format": "anonloader-fams-records",
        "version": 1,
        "records": written,
        "resolution": resolution,
        "template": "ffhq",
        "seed": seed,
        "people": len(set(groups)),
        "faces": len(entries),
        "swapper": swapper.config(),
        "recognizer": embedder.config(),
        "detector": detector.config() if hasattr(detector, "config") else str(detector),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    logger.info("wrote %d FAMS records of %d people to %s", written, manifest["people"], folder)
    return folder


class SwapRecordFolder(Sequence[SwapRecord]):
    """The records of a :func:`build_records` folder, read lazily (one record per access).

    Each item is a :class:`~anonloader.methods.fams.training.SwapRecord` of four
    ``3,R,R float32 in [0,1]`` crops.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / "manifest.json").read_text())
            self.lines = [json.loads(line) for line in (self.folder / "records.jsonl").read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as error:
            raise ConfigError(f"{self.folder} is not a FAMS records folder (python -m anonloader.methods.fams.data build): {error}") from error

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> SwapRecord:  # type: ignore[override]
        line = self.lines[index]
        return SwapRecord(*(_read_photo(self.folder / line[part]) for part in _PARTS))

    def __iter__(self) -> Iterator[SwapRecord]:
        for index in range(len(self)):
            yield self[index]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m anonloader.methods.fams.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write FAMS training records from a folder of photos")
    build.add_argument("photos", help="folder of photos (recursive)")
    build.add_argument("out", help="output folder")
    build.add_argument("--weights", default=None, help="FAMS weights for the FAMS swapper (directory or hub id)")
    build.add_argument("--tiny", action="store_true", help="tiny random FAMS as swapper (a dry run of the data path)")
    build.add_argument("--allow-download", action="store_true", help="let hub ids be downloaded")
    build.add_argument("--detector", default="default")
    build.add_argument("--recognizer", default="dlib")
    build.add_argument("--resolution", type=int, default=512)
    build.add_argument("--steps", type=int, default=None, help="denoising steps of the FAMS swapper (default: the paper's 200)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--device", default=None)
    return parser


def main(argv: list[str] | None = None) -> Path:
    from .model import FAMS

    args = _build_parser().parse_args(argv)
    if args.tiny == (args.weights is not None):
        raise SystemExit("give either --weights (a FAMS checkpoint for the swapper) or --tiny")
    options: dict[str, Any] = {"crop_size": args.resolution, "device": args.device}
    if args.steps is not None:
        options["num_inference_steps"] = args.steps
    if args.tiny:
        fams = FAMS(tiny=True, resolution=args.resolution, **options)
    else:
        fams = FAMS(args.weights, allow_download=args.allow_download, **options)
    return build_records(
        args.photos, args.out, swapper=FAMSSwapper(fams), detector=args.detector, embedder=args.recognizer, resolution=args.resolution, seed=args.seed
    )


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    main()
