"""DiffDeID's video paradigm (paper sec. 3.4): one synthetic identity and one texture per track.

For each track (faces sharing ``FaceConditions.identity_keys``; a face without a key is its own
track) of a clip:

1. the track's first frame goes through the image method (:class:`~.model.DiffDeID`): its output
   I_d fixes the synthetic person, so the track has exactly one z'_id;
2. every later frame f goes through a second network built with ``identity_condition=False``
   (``C = W_ρ ρ̂ + W_t emb(t)``), whose texture encoder E_t sees I_d (not the masked frame), and
   whose ρ̂ = {α_d, β_f, δ_d, γ_d, p_f, ω_f}: α, δ, γ from M_3D(I_d); β, p, ω averaged over the
   track's frames with frame index in ``[f - k, f + k]`` (our ``k = 2``; clipped at the clip's
   ends, and over the frames the track has);
3. I_3d is rendered from ρ̂; the DDIM noise comes from the frame's own seed.

The video network is trained on frame pairs of one clip (reference -> target) with eq. 11
(:class:`~.training.DiffDeIDModule` with ``identity_condition=False`` batches carrying
``reference``; ``train video``).

:meth:`DiffDeIDVideo.clip_faces` takes a whole clip's aligned crops at once. Wiring it into
:class:`anonloader.Anonymizer` (splitting ``_anonymize_faces`` into prepare / finish) and
``integrations/video.py`` is not done here (other owners): call ``clip_faces`` on aligned crops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from anonloader.errors import ConfigError, MethodError
from anonloader.methods.diffdeid.conditions import RhoLayout, landmarks_68
from anonloader.methods.diffdeid.model import (
    DiffDeID,
    ddim_generate,
    load_network,
    save_network,
    state_hash,
)
from anonloader.methods.diffdeid.network import DiffDeIDUNet
from anonloader.types import FaceConditions

__all__ = ["DiffDeIDVideo", "video_rho", "window_mean"]

_FROM_REFERENCE = ("alpha", "delta", "gamma")
_FROM_WINDOW = ("beta", "pose", "omega")


def window_mean(values: torch.Tensor, frames: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Row ``i`` -> mean of the rows whose frame index lies in ``[frames[i] - k, frames[i] + k]``.

    Args:
        values: ``T,K`` per-frame vectors of one track.
        frames: ``T`` int frame indices (distinct).
    Returns:
        ``T,K`` window means (clipped at the ends: fewer rows there).
    """
    frames = frames.long()
    near = (frames[:, None] - frames[None, :]).abs() <= k  # T,T
    weights = near.to(values.dtype)
    return weights @ values / weights.sum(1, keepdim=True)


def video_rho(layout: RhoLayout, frame_rho: torch.Tensor, reference_rho: torch.Tensor, frames: torch.Tensor, k: int = 2) -> torch.Tensor:
    """ρ̂ per frame: α, δ, γ from ``reference_rho`` (``n_ρ``, M_3D(I_d)); β, p, ω the window
    means of ``frame_rho`` (``T,n_ρ``, the track's real frames) -> ``T,n_ρ``."""
    out = frame_rho.clone()
    smooth = window_mean(frame_rho, frames, k)
    for name in _FROM_REFERENCE:
        out[:, layout.slice(name)] = reference_rho[layout.slice(name)]
    for name in _FROM_WINDOW:
        out[:, layout.slice(name)] = smooth[:, layout.slice(name)]
    return out


class DiffDeIDVideo:
    """Track-consistent DiffDeID for clips.

    Args:
        image_method: the image :class:`~.model.DiffDeID` (first frame of every track; its face
            model, renderer and step count are shared).
        network: the video :class:`DiffDeIDUNet` (``identity_condition=False``), or a folder
            written by :meth:`save_pretrained`.
        window: ``k`` of the β, p, ω window (2).
    """

    name = "diffdeid-video"

    def __init__(self, image_method: DiffDeID, network: DiffDeIDUNet | str | Path, *, window: int = 2) -> None:
        self._weights_hash: str | None = None
        if not isinstance(network, DiffDeIDUNet):
            network, self._weights_hash, _ = load_network(network)
        if network.identity_condition:
            raise ConfigError("the video network must be built with identity_condition=False (C = W_ρ ρ̂ + W_t emb(t))")
        if network.crop_size != image_method.crop_size:
            raise ConfigError(f"video network crop {network.crop_size} differs from the image method's {image_method.crop_size}")
        if window < 0:
            raise ConfigError(f"window must be >= 0, got {window}")
        self.image_method, self.network, self.window = image_method, network.eval(), int(window)
        self.crop_size, self.template = image_method.crop_size, image_method.template

    def save_pretrained(self, path: str | Path) -> Path:
        """The video network alone (``diffdeid.json`` + ``model.safetensors``)."""
        return save_network(self.network, path, {"video": {"window": self.window}})

    def config(self) -> dict[str, Any]:
        if self._weights_hash is None:
            self._weights_hash = state_hash(self.network)
        return {"name": self.name, "image": self.image_method.config(), "network": self.network.config(),
                "weights_sha256": self._weights_hash, "window": self.window}

    def __call__(self, crops: torch.Tensor, conditions: FaceConditions) -> torch.Tensor:
        """Faces outside a clip (single images): each is the first frame of its own track, so
        the image method de-identifies it. ``crops``: ``F,3,S,S float32 in [0,1]``; returns the same."""
        return self.image_method(crops, conditions)

    @staticmethod
    def tracks(conditions: FaceConditions) -> list[list[int]]:
        """Face indices grouped by identity key (in first-seen order); keyless faces alone."""
        groups: dict[Any, list[int]] = {}
        for i, key in enumerate(conditions.identity_keys):
            groups.setdefault(key if key is not None else ("face", i), []).append(i)
        return list(groups.values())

    @torch.no_grad()
    def clip_faces(self, crops: torch.Tensor, conditions: FaceConditions, frame_index: list[int] | torch.Tensor) -> torch.Tensor:
        """Anonymize every face of a clip.

        Args:
            crops: ``F,3,S,S float32 in [0,1]`` aligned crops of all frames.
            conditions: one entry per crop; ``identity_keys`` are the tracks.
            frame_index: ``F`` frame numbers (a track has at most one face per frame).
        Returns:
            ``F,3,S,S float32 in [0,1]`` (same device as ``crops``).
        """
        frames = torch.as_tensor(frame_index, dtype=torch.long)
        if crops.ndim != 4 or len(crops) != len(conditions) or len(frames) != len(crops):
            raise MethodError(f"clip_faces needs F crops, F conditions and F frame indices, got {tuple(crops.shape)}, {len(conditions)}, {len(frames)}")
        if len(crops) == 0:
            return crops.clone()
        cpu = crops.detach().float().cpu()
        landmarks = conditions.landmarks.detach().float().cpu()
        tracks = [sorted(t, key=lambda i: int(frames[i])) for t in self.tracks(conditions)]
        for track in tracks:
            if len({int(frames[i]) for i in track}) != len(track):
                raise MethodError(f"track {conditions.identity_keys[track[0]]!r} has two faces in one frame; tracks must be one face per frame")
        firsts = [t[0] for t in tracks]
        sub = FaceConditions([conditions.seeds[i] for i in firsts], [conditions.identity_keys[i] for i in firsts],
                             [conditions.synthetic_ids[i] for i in firsts], landmarks[firsts])
        first_out = self.image_method(cpu[firsts], sub).float().cpu()
        out = torch.empty_like(cpu)
        out[firsts] = first_out
        later = [t for t in tracks if len(t) > 1]
        if later:
            model = self.image_method
            layout = model.layout
            texture, rho_hat, rows = [], [], []
            for track, deidentified in zip(tracks, first_out):
                if len(track) < 2:
                    continue
                real_rho = model.face_model(cpu[track], landmarks_68(cpu[track], landmarks[track])).float()
                first_lm = landmarks[track[0]][None]
                reference_rho = model.face_model(deidentified[None], landmarks_68(deidentified[None], first_lm)).float()[0]
                hat = video_rho(layout, real_rho, reference_rho, frames[track], self.window)
                rows += track[1:]
                rho_hat.append(hat[1:])
                texture.append(deidentified[None].expand(len(track) - 1, -1, -1, -1))
            rho = torch.cat(rho_hat)
            rendered = model.renderer(rho, self.crop_size).float()
            generated = ddim_generate(self.network, torch.cat(texture), rendered, rho, None,
                                      [conditions.seeds[i] for i in rows], model.num_inference_steps)
            out[rows] = generated.float().cpu()
        return out.to(crops.device, crops.dtype)
