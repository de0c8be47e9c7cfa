"""Cache-hit read throughput and disk size, measured side by side in one run.

Loaders, every one through ``torch.utils.data.DataLoader(num_workers=2, batch_size=32,
persistent_workers=True)``, each measured alone, over the same N real-photo images (crops of
scikit-image's astronaut, 256x256, the face annotated) yielding ``3,H,W uint8`` tensors:

- plain: decode the original JPEG files (quality 90) from a folder (``torchvision.io``);
- litdata: ``litdata.optimize()`` + ``StreamingDataset`` of the same anonymized images
  (uint8 tensors: litdata's fastest serializer, raw bytes, no compression);
- cache <codec>: ``AnonCache(path).as_dataset()`` of a ``precompute`` with that codec
  (``raw`` is the default; also keyed with a secret = HMAC-SHA256 on every read, and with
  LMDB ``readahead=True``);
- wrap read-only: ``anonymize(jpeg_folder, cache=..., cache_mode="read-only")`` — the one-line
  wrap kept in training: decode the original, hash it, read the cache.

Each loader runs 1 warm-up epoch and 6 timed epochs; the best epoch counts. Sequential and
shuffled order. ``--runs 2`` repeats the whole table. On a shared machine wall-clock rates
move with everyone else's load, so the table also gives each loader's CPU time per image read
in one process (``time.process_time``, all its threads), with speed-ups as ratios. Also printed: precompute images/s per
codec (``method="blur"``, annotated faces, ``revalidate=False`` so the codec's share shows),
and MB on disk of every loader's files.

    python benchmarks/cache_read.py --images 512 --epochs 6 --runs 2
    python benchmarks/cache_read.py --codecs       # encode / decode / size of each codec on real photos

Measured 2026-12-02 on this 2-core machine with nothing else running (the first command; images/s,
ratios against the plain JPEG folder and LitData measured in the same run):

    loader                 MB     | sequential             | shuffled               | CPU us/img
    run 1 plain JPEG q90    10.5  | 1722                   | 1863                   | 417
          litdata          100.7  | 3459                   | 2936                   |  22
          cache raw (def.) 103.4  | 3520  2.04x  1.02x lit | 3106  1.67x  1.06x lit |  83
          cache lz4         92.9  | 2906  1.69x  0.84x lit | 2923  1.57x  1.00x lit | 190
          wrap read-only   103.4  |  645  0.37x            |  528  0.28x            | 3389
    run 2 plain JPEG q90    10.5  | 1965                   | 1898                   | 420
          litdata          100.7  | 3933                   | 2702                   |  25
          cache raw (def.) 103.4  | 3336  1.70x  0.85x lit | 3366  1.77x  1.25x lit |  92
          cache lz4         92.9  | 2881  1.47x  0.73x lit | 3256  1.72x  1.21x lit | 128
          wrap read-only   103.4  |  520  0.26x            |  593  0.31x            | 3301

The default cache is 9.9x the q90 JPEG folder on disk (lossless; lossless WebP 4.2x). Precompute
images/s (blur, 2 workers, run 1): raw 110.7, lz4 100.0, png 75.2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))
from _photos import AstronautCrops, face_annotations, write_jpegs  # noqa: E402

import anonloader  # noqa: E402
from anonloader.cache.codecs import DEFAULT_CODEC, get_codec  # noqa: E402
from anonloader.cache.precompute import precompute  # noqa: E402
from anonloader.cache.store import AnonCache  # noqa: E402

CODECS = ("raw", "lz4", "zstd", "qoi", "png", "webp")
SECRET = "benchmark secret, 32 bytes long!"


class JpegFolder(Dataset):
    """The plain loader: read each JPEG and decode it to ``3,H,W uint8`` (with label and face box)."""

    def __init__(self, paths: list[Path], boxes: list[torch.Tensor] | None = None) -> None:
        self.paths = [str(p) for p in paths]
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        sample = {"image": decode_jpeg(read_file(self.paths[index]), mode=ImageReadMode.RGB), "label": index % 7}
        if self.boxes is not None:
            sample["box"] = self.boxes[index]
        return sample


class _LitItem:
    """``litdata.optimize`` function: sample index -> the anonymized sample from a cache."""

    def __init__(self, cache_path: str) -> None:
        self.cache_path = cache_path
        self.dataset = None

    def __call__(self, index: int) -> dict:
        if self.dataset is None:
            self.dataset = AnonCache(self.cache_path).as_dataset()
        sample = self.dataset[index]
        return {"image": sample["image"], "label": sample["label"]}


def _collate(batch: list[dict]) -> dict:
    return {"image": torch.stack([b["image"] for b in batch]), "label": torch.tensor([b["label"] for b in batch])}


def measure(dataset: Dataset, epochs: int, shuffle: bool, batch_size: int = 32) -> float:
    """Best images/s over ``epochs`` timed passes, after one warm-up pass (worker start, page cache)."""
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=2, persistent_workers=True, collate_fn=_collate,
        shuffle=shuffle and not iterable,
    )
    for _ in loader:
        pass
    best = 0.0
    for _ in range(epochs):
        count = 0
        start = time.perf_counter()
        for batch in loader:
            count += batch["image"].shape[0]
        best = max(best, count / (time.perf_counter() - start))
    del loader
    return best


def cpu_us_per_image(dataset: Dataset, batch_size: int = 32) -> float:
    """CPU time (all threads of this process) per sample read in this process, after a warm-up
    pass: stable where wall-clock rates are not (the machine's other load does not count)."""
    def one_pass() -> int:
        if isinstance(dataset, torch.utils.data.IterableDataset):
            return sum(1 for _ in dataset)
        n = len(dataset)
        if hasattr(dataset, "__getitems__"):
            for start in range(0, n, batch_size):
                dataset.__getitems__(list(range(start, min(n, start + batch_size))))
        else:
            for i in range(n):
                dataset[i]
        return n

    one_pass()
    start = time.process_time()
    count = one_pass() + one_pass()
    return (time.process_time() - start) / count * 1e6


def disk_mb(path: Path) -> float:
    """MB the files under ``path`` occupy on disk (allocated blocks: LMDB's sparse map counts as used)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files) / 1e6


def codec_table(sizes: tuple[int, ...] = (256, 512)) -> None:
    """Encode / decode time and size of every codec on crops of five real photos, one thread."""
    import importlib.util

    import skimage.data as data
    from PIL import Image

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    spec = importlib.util.find_spec("insightface")
    if spec is not None and spec.origin is not None:
        photos.append(np.array(Image.open(Path(spec.origin).parent / "data/images/t1.jpg").convert("RGB")))
    names = [*CODECS, "jpeg:90"]
    for size in sizes:
        crops = []
        for photo in photos:
            side = min(photo.shape[:2])
            for k in range(4):
                x0 = (photo.shape[1] - side) * k // 4
                crop = Image.fromarray(photo[:side, x0 : x0 + side]).resize((size, size), Image.BILINEAR)
                crops.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1).contiguous())
        print(f"\n{len(crops)} crops of {len(photos)} real photos at {size}x{size}, one thread, per image")
        print(f"{'codec':8s} {'encode ms':>10s} {'decode ms':>10s} {'KiB':>8s} {'vs raw':>7s} {'exact':>6s}")
        for name in names:
            codec = get_codec(name)
            start = time.perf_counter()
            encoded = [codec.encode(c) for c in crops]
            encode = (time.perf_counter() - start) / len(crops)
            decode = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                decoded = [codec.decode(memoryview(e)) for e in encoded]
                decode = min(decode, (time.perf_counter() - start) / len(crops))
            exact = all(torch.equal(d, c) for d, c in zip(decoded, crops, strict=True))
            size_kib = sum(map(len, encoded)) / len(crops) / 1024
            raw_kib = crops[0].numel() / 1024
            print(f"{name:8s} {encode * 1e3:10.2f} {decode * 1e3:10.3f} {size_kib:8.1f} {raw_kib / size_kib:7.2f} {exact!s:>6s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--codecs", action="store_true", help="only the codec table (encode / decode / size)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    logging.getLogger("anonloader").setLevel(logging.ERROR)  # the unsalted-cache warning, once per cache
    torch.set_num_threads(1)
    if args.codecs:
        codec_table()
        return
    root = Path(args.workdir or tempfile.mkdtemp(prefix="anonloader-bench-"))
    try:
        source = AstronautCrops(args.images, size=256)
        paths = write_jpegs(source, root / "jpeg")
        boxes = [source[i]["box"] for i in range(len(source))]
        options = dict(method="blur", annotations=face_annotations, workers=2, batch_size=32, progress=False, revalidate=False)
        caches: dict[str, Path] = {}
        rates: dict[str, float] = {}
        # warm-up (imports, worker start-up paths, page cache) so the first codec timed pays no more than the others
        precompute(AstronautCrops(64, size=256), root / "warm-up", codec=DEFAULT_CODEC, **options)
        for codec in CODECS:
            caches[codec] = root / f"cache-{codec}"
            report = precompute(source, caches[codec], codec=codec, **options)
            rates[codec] = report.images_per_second
        caches["keyed"] = root / "cache-keyed"
        rates["keyed"] = precompute(source, caches["keyed"], codec=DEFAULT_CODEC, secret=SECRET, **options).images_per_second
        caches["wrap"] = root / "cache-wrap"
        precompute(JpegFolder(paths, boxes), caches["wrap"], codec=DEFAULT_CODEC, **options)
        import litdata

        litdata.optimize(fn=_LitItem(str(caches["raw"])), inputs=list(range(args.images)), output_dir=str(root / "litdata"),
                         chunk_bytes="64MB", num_workers=1, verbose=False)
        print("precompute images/s (blur, 2 workers, revalidate off): "
              + ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()))
        loaders = {
            "plain JPEG folder (q90)": (lambda: JpegFolder(paths), root / "jpeg"),
            "litdata StreamingDataset": (lambda: litdata.StreamingDataset(str(root / "litdata")), root / "litdata"),
            f"cache {DEFAULT_CODEC} (default)": (lambda: AnonCache(caches[DEFAULT_CODEC]).as_dataset(), caches[DEFAULT_CODEC]),
            f"cache {DEFAULT_CODEC} keyed (HMAC)": (lambda: AnonCache(caches["keyed"], secret=SECRET).as_dataset(), caches["keyed"]),
            f"cache {DEFAULT_CODEC} readahead": (lambda: AnonCache(caches[DEFAULT_CODEC], readahead=True).as_dataset(), caches[DEFAULT_CODEC]),
        }
        for codec in CODECS:
            if codec != DEFAULT_CODEC:
                loaders[f"cache {codec}"] = (lambda c=codec: AnonCache(caches[c]).as_dataset(), caches[codec])
        loaders["wrap read-only (anonymize)"] = (
            lambda: anonloader.anonymize(JpegFolder(paths, boxes), "blur", annotations=face_annotations, cache=caches["wrap"],
                                         cache_mode="read-only", revalidate=False),
            caches["wrap"],
        )
        for run in range(1, args.runs + 1):
            results = {}
            cpu = {}
            for name, (make, _) in loaders.items():
                results[name] = {}
                cpu[name] = cpu_us_per_image(make())
                for order in ("sequential", "shuffled"):
                    shuffled = order == "shuffled"
                    dataset = make() if "litdata" not in name else litdata.StreamingDataset(str(root / "litdata"), shuffle=shuffled)
                    results[name][order] = measure(dataset, args.epochs, shuffled)
            plain = results["plain JPEG folder (q90)"]
            lit = results["litdata StreamingDataset"]
            print(f"\nrun {run}: {args.images} images 256x256, DataLoader num_workers=2 batch_size=32, best of {args.epochs} "
                  f"epochs, torch {torch.__version__}, {os.cpu_count()} CPUs")
            print(f"{'loader':30s} {'MB':>7s} | {'seq img/s':>9s} {'x plain':>7s} {'x lit':>6s} | "
                  f"{'shuf img/s':>10s} {'x plain':>7s} {'x lit':>6s} | {'CPU us/img':>10s} {'x plain':>7s} {'x lit':>6s}")
            for name, by_order in results.items():
                row = f"{name:30s} {disk_mb(loaders[name][1]):7.1f} |"
                for order in ("sequential", "shuffled"):
                    rate = by_order[order]
                    row += f" {rate:9.0f} {rate / plain[order]:7.2f} {rate / lit[order]:6.2f} |"
                # CPU ratios as speed-ups: plain's (litdata's) CPU per image over this loader's
                row += f" {cpu[name]:10.0f} {cpu['plain JPEG folder (q90)'] / cpu[name]:7.2f} {cpu['litdata StreamingDataset'] / cpu[name]:6.2f}"
                print(row)
            default_mb = disk_mb(caches[DEFAULT_CODEC])
            print(f"disk: the default cache ({DEFAULT_CODEC}) takes {default_mb:.1f} MB, {default_mb / disk_mb(root / 'jpeg'):.1f}x "
                  f"the q90 JPEG folder ({disk_mb(root / 'jpeg'):.1f} MB; JPEG is lossy, the cache is not)")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
