"""Video and frame sequences: one synthetic identity per tracked real person.

Each real person is followed across the frames of a clip by
:class:`~anonloader.identity.keys.FaceTracker` (box IoU with the previous frame plus recognizer
similarity), and every face of one track gets the track's identity assignment — the same seed
and synthetic id in every frame, the temporal consistency the papers ask for.

    >>> from anonloader.integrations.video import AnonymizedClips, tracking_anonymizer
    >>> clips = AnonymizedClips(["walk.mp4", "frames/run01/"], tracking_anonymizer("blur", secret=...))  # doctest: +SKIP
    >>> sample = clips[0]   # {"frames": T,3,H,W uint8, "tracks": ..., "records": ..., "fps": ...}

Videos are read and written with PyAV (``pip install av``); frame folders with PIL.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from anonloader.errors import ConfigError, IdentityError, InputError, ModelLoadError
from anonloader.identity.assigner import KeyedIdentityAssigner
from anonloader.identity.keys import FaceTracker
from anonloader.types import Detections, FaceRecord

__all__ = [
    "VIDEO_SUFFIXES",
    "AnonymizedClips",
    "ClipResult",
    "FrameLabel",
    "TrackingIdentityAssigner",
    "anonymize_clip",
    "read_frames",
    "read_video",
    "tracking_anonymizer",
    "write_video",
]

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class FrameLabel:
    """The identity label of one frame: its clip and its faces' boxes (``F,4`` xyxy px)."""

    clip: str
    boxes: torch.Tensor


class TrackingIdentityAssigner(KeyedIdentityAssigner):
    """The ``track`` strategy with boxes: faces linked by IoU *and* recognizer similarity.

    Labels per image are :class:`FrameLabel` (clip name + the frame's boxes, in detection
    order); plain labels fall back to the embedding-only tracker of the base class. The track
    number of every face of the last call is kept in :attr:`last_tracks`.

    Args:
        **kwargs: :class:`~anonloader.identity.assigner.KeyedIdentityAssigner` options
            (``secret``, ``secret_file``, ``bank``, ``embedder``, ``template``, ...).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("strategy", None)
        super().__init__("track", **kwargs)
        self.last_tracks: list[int] = []

    def reset(self, clip: str) -> None:
        """Forget the tracks of ``clip`` (before reading it again from its first frame)."""
        self._trackers.pop(str(clip), None)

    def keys(self, crops: torch.Tensor, image_index: torch.Tensor, labels: Sequence[Any] | None, embeddings: torch.Tensor | None) -> list[str]:
        if not labels or not all(isinstance(label, FrameLabel) for label in labels):
            keys = super().keys(crops, image_index, labels, embeddings)
        else:
            assert embeddings is not None
            index = [int(i) for i in image_index]
            keys = [""] * len(index)
            for image in sorted(set(index)):
                faces = [f for f, i in enumerate(index) if i == image]  # in detection order
                label = labels[image]
                if len(label.boxes) != len(faces):
                    raise IdentityError(f"frame label of image {image} has {len(label.boxes)} boxes for {len(faces)} faces")
                tracker = self._trackers.setdefault(label.clip, FaceTracker(label.clip, self.threshold))
                for f, key in zip(faces, tracker.update(embeddings[faces], label.boxes.float())):
                    keys[f] = key
        self.last_tracks = [int(key.rsplit(":", 1)[1]) for key in keys]
        return keys


def tracking_anonymizer(method: Any = "blur", *, secret: Any = None, secret_file: Any = None, bank: Any = 1_000_000, **kwargs: Any) -> Any:
    """An :class:`~anonloader.pipeline.Anonymizer` whose identity stage tracks faces across frames.

    Args:
        method: method name or instance.
        secret, secret_file: the identity-mapping secret (or ``$ANONLOADER_SECRET``).
        bank: an :class:`~anonloader.identity.bank.IdentityBank`, or a bank size (synthetic ids
            are then indices; default one million).
        **kwargs: other :class:`~anonloader.pipeline.Anonymizer` options.
    """
    from anonloader.methods import get_method
    from anonloader.pipeline import Anonymizer

    method_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in _ANONYMIZER_OPTIONS}
    resolved = get_method(method, **method_kwargs)
    identity = TrackingIdentityAssigner(
        secret=secret, secret_file=secret_file, bank=bank, template=resolved.template, margin=float(getattr(resolved, "margin", 0.0))
    )
    return Anonymizer(resolved, identity=identity, **kwargs)


_ANONYMIZER_OPTIONS = ("detector", "on_error", "on_no_face", "feather", "color_match", "device", "batch_size", "revalidate")


# ------------------------------------------------------------------------------- reading
def _pil_to_uint8(image: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def read_video(path: str | os.PathLike[str]) -> tuple[list[torch.Tensor], float]:
    """The frames (``3,H,W uint8`` RGB) and frame rate of a video file (PyAV)."""
    try:
        import av
    except ImportError as error:
        raise ModelLoadError("reading videos needs PyAV: pip install av") from error
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video file not found: {path}", source=str(path))
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            frames = [torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).contiguous() for frame in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as error:
        raise InputError(f"cannot decode the video ({error}); is it a video file?", source=str(path)) from error
    if not frames:
        raise InputError("the video holds no frame", source=str(path))
    return frames, fps


def read_frames(folder: str | os.PathLike[str]) -> list[torch.Tensor]:
    """The frames of a folder of images, in file-name order (``3,H,W uint8`` RGB)."""
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise InputError(f"no frame images ({', '.join(FRAME_SUFFIXES)}) in {folder}", source=str(folder))
    frames = []
    for file in files:
        with Image.open(file) as image:
            frames.append(_pil_to_uint8(image))
    return frames


def write_video(path: str | os.PathLike[str], frames: Sequence[torch.Tensor], fps: float = 25.0, *, crf: int = 18) -> Path:
    """Writes ``3,H,W uint8`` frames as a video (H.264 when available, else MPEG-4 part 2).

    Odd sizes are padded by one edge pixel (4:2:0 chroma needs even sizes).
    """
    import av
    from fractions import Fraction

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _, height, width = frames[0].shape
    even_h, even_w = height + height % 2, width + width % 2
    codec = "libx264" if "libx264" in av.codecs_available and path.suffix.lower() in (".mp4", ".mkv", ".mov", ".m4v") else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = even_w, even_h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for frame in frames:
            array = frame.permute(1, 2, 0).numpy()
            if (even_h, even_w) != (height, width):
                array = np.pad(array, ((0, even_h - height), (0, even_w - width), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ------------------------------------------------------------------------------- anonymizing
@dataclass
class ClipResult:
    """An anonymized clip.

    Attributes:
        frames: per frame ``3,H,W float32 in [0,1]``, or ``None`` where it was dropped.
        records: per frame, one :class:`FaceRecord` per face.
        tracks: per frame, the track number of each face (same order as ``records``).
        errors: per frame, why it failed (or None).
    """

    frames: list[torch.Tensor | None]
    records: list[list[FaceRecord]]
    tracks: list[list[int]] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)


def _as_float(frame: Any) -> torch.Tensor:
    if not isinstance(frame, torch.Tensor):
        frame = _pil_to_uint8(frame)
    if frame.dtype == torch.uint8:
        return frame.float().div(255)
    return frame.float()


def anonymize_clip(frames: Sequence[Any], anonymizer: Any, *, clip: str = "clip", batch_size: int = 8) -> ClipResult:
    """Anonymizes the frames of one clip in order, one synthetic identity per tracked person.

    Args:
        frames: ``3,H,W`` uint8 or float in [0,1] tensors, or PIL images, in time order.
        anonymizer: an Anonymizer whose ``identity`` is a :class:`TrackingIdentityAssigner`
            (see :func:`tracking_anonymizer`).
        clip: the clip's name (tracks never cross clips).
        batch_size: frames per pipeline call (per detector call for a method with
            ``clip_faces``, which anonymizes the whole clip in one call so every track keeps one
            identity and texture).
    """
    identity = anonymizer.identity
    if not isinstance(identity, TrackingIdentityAssigner):
        raise ConfigError("anonymize_clip needs an Anonymizer with a TrackingIdentityAssigner; build it with tracking_anonymizer()")
    if anonymizer.detector is None:
        raise ConfigError("anonymize_clip needs a detector (the tracker needs every frame's boxes)")
    identity.reset(clip)
    result = ClipResult([], [], [], [])
    step = batch_size
    if hasattr(anonymizer.method, "clip_faces"):  # a video method (DiffDeID's) sees the whole clip at once
        step = max(1, len(frames))
    for start in range(0, len(frames), step):
        chunk = [_as_float(f) for f in frames[start : start + step]]
        detections: list[Detections] = []
        for first in range(0, len(chunk), batch_size):
            detections += anonymizer.detector(chunk[first : first + batch_size])
        labels = [FrameLabel(str(clip), d.boxes.detach().cpu()) for d in detections]
        identity.last_tracks = []
        out = anonymizer(chunk, detections=detections, labels=labels)
        numbers = iter(identity.last_tracks)
        for image, records, error in zip(out.images, out.records, out.errors, strict=True):
            anonymized = [r for r in records if r.status == "anonymized"]
            result.frames.append(image)
            result.records.append(records)
            result.tracks.append([next(numbers) for _ in anonymized])
            result.errors.append(error)
    return result


class AnonymizedClips(Dataset):
    """A dataset of anonymized clips: video files, folders of frames, or in-memory frame lists.

    ``clips[i]`` is ``{"frames": T,3,H,W uint8, "records": per-frame FaceRecords, "tracks":
    per-frame track numbers, "fps": float or None, "clip": name}``. A frame the fail-closed
    policy dropped is replaced by a coarse mosaic (a clip keeps its length and timing).

    Args:
        sources: per clip a video path, a frame folder, or a sequence of frames.
        anonymizer: from :func:`tracking_anonymizer` (built with ``method`` + options when None).
        method, **kwargs: passed to :func:`tracking_anonymizer` when ``anonymizer`` is None.
    """

    def __init__(self, sources: Sequence[Any], anonymizer: Any = None, *, method: Any = "blur", batch_size: int = 8, **kwargs: Any) -> None:
        self.sources = list(sources)
        self.anonymizer = anonymizer if anonymizer is not None else tracking_anonymizer(method, **kwargs)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.sources)

    def _load(self, index: int) -> tuple[list[Any], float | None, str]:
        source = self.sources[index]
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.is_dir():
                return read_frames(path), None, path.name
            if path.suffix.lower() in VIDEO_SUFFIXES:
                frames, fps = read_video(path)
                return frames, fps, path.name
            raise InputError(f"{path} is neither a frame folder nor a video ({', '.join(VIDEO_SUFFIXES)})", index=index)
        return list(source), None, f"clip{index}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        from anonloader.pipeline import obscure_image

        frames, fps, name = self._load(index)
        result = anonymize_clip(frames, self.anonymizer, clip=f"{index}:{name}", batch_size=self.batch_size)
        out = []
        for frame, anonymized in zip(frames, result.frames):
            image = anonymized if anonymized is not None else obscure_image(_as_float(frame))
            out.append(image.mul(255).round().clamp(0, 255).to(torch.uint8))
        return {"frames": torch.stack(out), "records": result.records, "tracks": result.tracks, "fps": fps, "clip": name}
