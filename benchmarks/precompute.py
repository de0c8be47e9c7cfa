"""Precompute throughput with a classical method: 1 process vs 2 processes, one run.

    python benchmarks/precompute.py --images 96

Same N real-photo images (256x256, face boxes annotated, method blur, the default lossless codec); prints
images/s for each and the speed-up.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _photos import AstronautCrops, face_annotations  # noqa: E402

from anonloader.cache.codecs import DEFAULT_CODEC  # noqa: E402
from anonloader.cache.precompute import precompute  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--method", default="blur")
    args = parser.parse_args()
    source = AstronautCrops(args.images, size=256)
    root = Path(tempfile.mkdtemp(prefix="anonloader-precompute-"))
    try:
        torch.set_num_threads(1)  # one thread per process in both runs (2 processes get 1 each)
        precompute(AstronautCrops(8, size=256), root / "warmup", method=args.method, annotations=face_annotations, progress=False)
        rates = {}
        for workers in (1, 2):
            report = precompute(source, root / f"w{workers}", method=args.method, annotations=face_annotations,
                                workers=workers, batch_size=8, progress=False)
            rates[workers] = report.images_per_second
            print(f"workers={workers}: {report.computed} images in {report.seconds:.1f}s = {report.images_per_second:.1f} images/s", flush=True)
        print(f"\n{args.images} images 256x256, method {args.method}, {DEFAULT_CODEC} codec (the default), 1 torch thread per process, after a warm-up run")
        print(f"speed-up 2 processes / 1 process: {rates[2] / rates[1]:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
