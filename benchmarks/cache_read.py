"""Cache-hit read throughput, measured side by side in one run.

Loaders, every one through a ``torch.utils.data.DataLoader`` with 2 workers, batch 32, the
same N real-photo images (256x256) yielding ``3,H,W uint8`` tensors:

- plain: decode the original JPEG files from a folder (``torchvision.io.decode_jpeg``);
- cache png / cache raw: ``AnonCache(path).as_dataset()`` of the anonymized images;
- litdata: ``litdata.optimize()`` + ``StreamingDataset`` copy of the same anonymized images
  (stored as uint8 tensors, litdata's fastest serializer).

    python benchmarks/cache_read.py --images 512 --epochs 3

Prints images/s per loader and the ratios cache/plain and cache/litdata.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))
from _photos import AstronautCrops, face_annotations, write_jpegs  # noqa: E402

from anonloader.cache.precompute import precompute  # noqa: E402
from anonloader.cache.store import AnonCache  # noqa: E402


class JpegFolder(Dataset):
    """The plain loader: read each JPEG and decode it to ``3,H,W uint8``."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        return {"image": decode_jpeg(read_file(self.paths[index]), mode=ImageReadMode.RGB), "label": index % 7}


class _LitItem:
    """``litdata.optimize`` function: sample index -> the anonymized sample from the cache."""

    def __init__(self, cache_path: str) -> None:
        self.cache_path = cache_path
        self.dataset = None

    def __call__(self, index: int) -> dict:
        if self.dataset is None:
            self.dataset = AnonCache(self.cache_path).as_dataset()
        sample = self.dataset[index]
        return {"image": sample["image"], "label": sample["label"]}


def _lit_collate(batch: list[dict]) -> dict:
    return {"image": torch.stack([b["image"] for b in batch]), "label": torch.tensor([b["label"] for b in batch])}


def measure(dataset: Dataset, epochs: int, batch_size: int = 32, collate=None) -> float:
    """Images per second over ``epochs`` passes (after one warm-up pass that fills the page cache)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=2, persistent_workers=True, collate_fn=collate)
    for _ in loader:  # warm-up: worker start, page cache
        pass
    count = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            count += batch["image"].shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="anonloader-bench-"))
    try:
        source = AstronautCrops(args.images, size=256)
        paths = write_jpegs(source, root / "jpeg")
        caches = {}
        for codec in ("png", "raw"):
            caches[codec] = root / f"cache-{codec}"
            report = precompute(source, caches[codec], method="blur", annotations=face_annotations, codec=codec,
                                workers=2, batch_size=16, progress=False)
            print(f"precomputed {report.computed} images into {codec} cache in {report.seconds:.1f}s", flush=True)
        import litdata

        litdata.optimize(fn=_LitItem(str(caches["raw"])), inputs=list(range(args.images)), output_dir=str(root / "litdata"),
                         chunk_bytes="64MB", num_workers=1, verbose=False)
        results = {
            "plain JPEG folder": measure(JpegFolder(paths), args.epochs),
            "cache png (as_dataset)": measure(AnonCache(caches["png"]).as_dataset(), args.epochs),
            "cache raw (as_dataset)": measure(AnonCache(caches["raw"]).as_dataset(), args.epochs),
            "litdata StreamingDataset": measure(
                litdata.StreamingDataset(str(root / "litdata")), args.epochs, collate=_lit_collate
            ),
        }
        plain, lit = results["plain JPEG folder"], results["litdata StreamingDataset"]
        print(f"\n{args.images} images 256x256, DataLoader num_workers=2 batch 32, {args.epochs} epochs, {torch.__version__}")
        print(f"{'loader':28s} {'images/s':>10s} {'vs plain':>9s} {'vs litdata':>10s}")
        for name, rate in results.items():
            print(f"{name:28s} {rate:10.1f} {rate / plain:9.2f} {rate / lit:10.2f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
