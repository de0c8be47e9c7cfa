"""Diff-Privacy cost per face: MSI regime, refinement, group size, guidance gradient, inversion k,
and the size of a recovery key beside an encrypted copy of the crop.

    python benchmarks/diffprivacy.py                       # tiny models, CPU, paper's N = 50
    python benchmarks/diffprivacy.py --faces 2 --steps 20 --refine 0,20,100 --per-image-steps 50

Every row runs in a fresh child process with one torch thread: the networks are built, one face
is anonymized to warm up, then ``--faces`` faces are anonymized one call each. ``s/face`` is
wall time per face; ``RSS before`` the resident memory after the warm-up; ``run peak`` the
largest resident memory during the timed calls (sampled every 5 ms), ``+run`` their difference
(what the anonymization itself adds), ``process peak`` VmHWM (models and torch included).

Rows: amortized MSI (one MSI forward per face) with ``refine_steps`` of per-face tuning of the
10 pseudo-words; per-image MSI (the paper's regime: a fresh MSI trained ``--per-image-steps``
steps on the face, eq. 7, AdamW 1e-3, then the face anonymized with its words); group size
G = 4 vs 1; guidance through ẑ0 (decoder + recognizer) vs z_t (also the UNet); inversion k
(recoverable: DDIM inversion with at most k UNet calls per step) and no inversion
(``recoverable=False``). Unless a row says otherwise: anonymize mode, G = 4, ``guidance_grad
"z0"``, k = 5, recoverable, refine 0, ``--steps`` DDIM steps (S_ns 0.6: 60% of them run).

THE NUMBERS ARE TINY-MODEL CPU NUMBERS: random networks of SD v1.5's block structure at 8-16
channels, 32 px crops (latents 4x16x16), on whatever CPU runs this. They show how the settings
scale relative to each other; they say nothing about seconds on a GPU with SD v1.5 at 512 px.

Key bytes: a key's plaintext (safetensors: z_T, 10 pseudo-words, metadata) and its AES-256-GCM
blob, measured for the tiny 32 px model and computed for SD v1.5 at 512 px (z_T 4x64x64 float32,
words 10x768 float32, the tiny key's header), beside the same face crop at 512 px as JPEG
quality 95 and as PNG (lossless), each sealed with the same AES-256-GCM cipher.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _photos import FACE_BOX  # noqa: E402

TINY = 32


def _vm(field: str) -> float:
    """``field`` (VmHWM, VmRSS) of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakRss:
    """The largest resident memory of this process while in the ``with`` block, sampled every
    ``interval`` s by a thread (VmHWM cannot be reset on every kernel)."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.interval, self.peak = interval, _vm("VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _vm("VmRSS"))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _vm("VmRSS"))


def face_crops(count: int, size: int) -> torch.Tensor:
    """``count,3,size,size float32 in [0,1]``: squares around the astronaut's face (a real photo),
    shifted 3 px apart, resized to ``size``."""
    import numpy as np
    import torch.nn.functional as F

    from anonloader.assets import sample_photo

    photo = torch.from_numpy(np.array(sample_photo("astronaut"), dtype=np.uint8)).permute(2, 0, 1).float() / 255
    x1, y1, x2, y2 = FACE_BOX
    side = int(1.6 * max(x2 - x1, y2 - y1))
    cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
    crops = []
    for i in range(count):
        left, top = max(cx - side // 2 + 3 * i, 0), max(cy - side // 2, 0)
        window = photo[:, top : top + side, left : left + side]
        crops.append(F.interpolate(window[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
    return torch.stack(crops).clamp(0, 1)


def _conditions(seeds: list[int], size: int, extra: dict[str, Any] | None = None) -> Any:
    from anonloader.align import template_points
    from anonloader.types import FaceConditions

    n = len(seeds)
    return FaceConditions(
        seeds=seeds, identity_keys=[None] * n, synthetic_ids=[None] * n,
        landmarks=template_points(size, "ffhq")[None].repeat(n, 1, 1), extra=extra or {},
    )


def _per_image_words(method: Any, crop: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """The paper's regime for one face: a fresh copy of the MSI trained ``steps`` AdamW steps
    (lr 1e-3, batch 1) with eq. 7 on the face, then its ``10,D`` pseudo-words."""
    from anonloader.methods.diffprivacy.msi import prompt_slot
    from anonloader.methods.diffprivacy.training import per_image_words

    backbone, template, _ = method.load()
    return per_image_words(backbone, template, prompt_slot(backbone), crop[None], steps, seed=seed)[0]


def run_child(config: dict[str, Any]) -> dict[str, Any]:
    """One row: builds the method, warms up on one face, then times ``faces`` faces."""
    from anonloader.methods.diffprivacy import DiffPrivacy

    torch.set_num_threads(1)
    options = dict(config["options"])
    per_image = int(config.get("per_image_steps", 0))
    method = DiffPrivacy(tiny=True, **options)
    method.load()
    crops = face_crops(config["faces"] + 1, TINY)
    keys = bool(options.get("recoverable", True))

    def one(i: int) -> None:
        extra = {"stage_words": [_per_image_words(method, crops[i], per_image, i)]} if per_image else None
        conditions = _conditions([1000 + i], TINY, extra)
        if keys:
            method.anonymize_with_keys(crops[i : i + 1], conditions)
        else:
            method(crops[i : i + 1], conditions)

    one(config["faces"])  # warm-up (another face)
    base = _vm("VmRSS")
    times = []
    with PeakRss() as peak:
        for i in range(config["faces"]):
            start = time.perf_counter()
            one(i)
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.mean(times), "base_mb": base, "run_peak_mb": peak.peak, "process_peak_mb": _vm("VmHWM")}


def key_sizes(steps: int, k: int) -> list[tuple[str, int]]:
    """Bytes of one face's recovery key (plain and sealed) and of the sealed crop as JPEG q95 / PNG."""
    from PIL import Image

    from anonloader.methods.diffprivacy import DiffPrivacy
    from anonloader.methods.diffprivacy.crypto import KdfParams, Secret, derive_cipher
    from anonloader.methods.diffprivacy.keys import RecoveryKey

    torch.set_num_threads(1)
    cipher = derive_cipher(Secret("benchmark password"), KdfParams.new(memory_cost=1024, iterations=1, lanes=1), "benchmark")
    method = DiffPrivacy(tiny=True, num_inference_steps=steps, inversion_iters=k, group_size=1)
    crop = face_crops(1, TINY)
    _, (key,) = method.anonymize_with_keys(crop, _conditions([7], TINY))
    key = key.with_placement(torch.eye(2, 3), 0.1)
    plain = key.to_bytes()
    header = int.from_bytes(plain[:8], "little") + 8
    real = RecoveryKey(torch.zeros(4, 64, 64), torch.zeros(10, 768), "words", key.meta).to_bytes()
    rows = [
        ("key, tiny (z_T 4x16x16, words 10x16), plaintext", len(plain)),
        ("key, tiny, AES-256-GCM blob", len(cipher.encrypt("e", 0, plain))),
        ("key, SD v1.5 512 px (z_T 4x64x64, words 10x768), plaintext [computed]", len(real)),
        ("key, SD v1.5 512 px, AES-256-GCM blob [computed]", len(cipher.encrypt("e", 0, real))),
    ]
    face512 = face_crops(1, 512)[0].mul(255).round().byte().permute(1, 2, 0).numpy()
    for name, fmt, kwargs in (("JPEG q95", "JPEG", {"quality": 95}), ("PNG (lossless)", "PNG", {"optimize": True})):
        buffer = io.BytesIO()
        Image.fromarray(face512).save(buffer, format=fmt, **kwargs)
        rows.append((f"the 512 px crop as {name}, AES-256-GCM blob", len(cipher.encrypt("e", 0, buffer.getvalue()))))
    rows.append(("  (of which the key's safetensors header + metadata)", header))
    return rows


def _child_main(config_json: str) -> None:
    result = run_child(json.loads(config_json))
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=2, help="faces timed per row (after one warm-up face)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps N over the schedule (paper 50)")
    parser.add_argument("--refine", default="0,100,500", help="refine_steps values of the amortized rows")
    parser.add_argument("--per-image-steps", type=int, default=100, help="MSI training steps per face in the per-image row (paper ~6,100)")
    parser.add_argument("--k", default="0,2,5", help="inversion_iters values")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child_main(args.child)
        return
    base = {"num_inference_steps": args.steps}
    rows: list[tuple[str, dict[str, Any]]] = []
    for refine in [int(v) for v in args.refine.split(",") if v]:
        rows.append((f"amortized MSI, refine {refine}", {"options": {**base, "refine_steps": refine}}))
    rows.append((f"per-image MSI ({args.per_image_steps} steps)", {"options": base, "per_image_steps": args.per_image_steps}))
    rows.append(("G = 1 (G = 4 is the first row)", {"options": {**base, "group_size": 1}}))
    rows.append(("guidance_grad zt (through the UNet)", {"options": {**base, "guidance_grad": "zt"}}))
    for k in [int(v) for v in args.k.split(",") if v]:
        rows.append((f"inversion k = {k}", {"options": {**base, "inversion_iters": k}}))
    rows.append(("recoverable=False (no inversion)", {"options": {**base, "recoverable": False}}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"Diff-Privacy, tiny models on CPU (1 thread), {args.faces} faces per row, N = {args.steps}; "
          "defaults: G 4, grad z0, k 5, recoverable, refine 0", flush=True)
    print(f"{'configuration':44s} {'s/face':>8s} {'RSS before MiB':>15s} {'run peak MiB':>13s} {'+run MiB':>9s} {'process peak MiB':>17s}", flush=True)
    for name, config in rows:
        config = {**config, "faces": args.faces}
        command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            print(f"{name:44s} FAILED: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}", flush=True)
            continue
        result = json.loads(line[len("RESULT ") :])
        r = result
        print(f"{name:44s} {r['seconds']:8.2f} {r['base_mb']:15.0f} {r['run_peak_mb']:13.0f} {r['run_peak_mb'] - r['base_mb']:9.1f} {r['process_peak_mb']:17.0f}", flush=True)
    print("\nrecovery key bytes per face beside the crop itself (AES-256-GCM adds a 12 B nonce and a 16 B tag)")
    sizes = key_sizes(args.steps, 5)
    for name, size in sizes:
        print(f"{name:72s} {size:9d} B ({size / 1024:6.1f} KiB)")
    values = dict(sizes)
    key512 = values["key, SD v1.5 512 px, AES-256-GCM blob [computed]"]
    jpeg = values["the 512 px crop as JPEG q95, AES-256-GCM blob"]
    png = values["the 512 px crop as PNG (lossless), AES-256-GCM blob"]
    print(
        f"\nSD v1.5 key / encrypted JPEG-q95 crop: {key512 / jpeg:.2f}x; key / encrypted PNG crop: {key512 / png:.2f}x. "
        + ("The encrypted lossless PNG of the crop is SMALLER than the key, and it gives back the exact pixels. "
           if png < key512 else "The key is smaller than the encrypted lossless PNG of the crop. ")
        + ("The encrypted JPEG-q95 crop is SMALLER than the key. " if jpeg < key512 else "")
        + "The key gives back D(E(x)), the VAE's reconstruction of the crop, not its exact pixels."
    )


if __name__ == "__main__":
    main()
