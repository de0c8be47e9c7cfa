"""FAMS self-attention: our N queries against 3N keys/values vs the authors' 3N queries.

The authors' UNet concatenates its N tokens with the two ReferenceNets' N tokens, runs
self-attention with all 3N tokens as queries and keeps the first N output rows. Ours asks only
the N rows it keeps (through ``MultiSourceAttnProcessor``); the results agree (see
``tests/unit/test_fams_attention.py``).

    python benchmarks/fams_attention.py            # CPU timings at a modest shape + 512x512 FLOPs
    python benchmarks/fams_attention.py --tokens 1024 --channels 320 --repeats 5

Prints (1) wall-clock of one self-attention layer both ways on this machine, (2) the same for the
attention core alone with torch's SDPA on both sides, (3) FLOPs of a whole Stable Diffusion 2.1
UNet forward at 512x512 (64x64 latents) counted on the meta device, both ways.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F


class ConcatenatedQueriesProcessor:
    """The authors' computation, for comparison: self-attention over the concatenation of the
    layer's tokens and the extra states (3N queries), keeping the first N rows."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()
        self.extra_states: list[torch.Tensor] = []

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None, attention_mask: Any = None, temb: Any = None, **kwargs: Any) -> torch.Tensor:
        if not self.extra_states:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        joined = torch.cat([hidden_states, *self.extra_states], dim=1)
        return self.inner(attn, joined)[:, : hidden_states.shape[1]]


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def time_layer(tokens: int, channels: int, heads: int, batch: int, repeats: int) -> None:
    from diffusers.models.attention_processor import Attention

    from anonloader.kernels.attention import MultiSourceAttnProcessor

    torch.manual_seed(0)
    attn = Attention(channels, heads=heads, dim_head=channels // heads)
    own = torch.randn(batch, tokens, channels)
    source, driving = torch.randn_like(own), torch.randn_like(own)
    ours, theirs = MultiSourceAttnProcessor(), ConcatenatedQueriesProcessor()
    ours.extra_states = [source, driving]
    theirs.extra_states = [source, driving]
    attn.set_processor(ours)
    out_ours = attn(own)
    t_ours = _time(lambda: attn(own), repeats)
    attn.set_processor(theirs)
    out_theirs = attn(own)
    t_theirs = _time(lambda: attn(own), repeats)
    err = (out_ours - out_theirs).abs().max().item()
    print(f"layer  B={batch} N={tokens} C={channels} heads={heads}: ours (N queries) {t_ours * 1e3:.1f} ms, "
          f"authors' (3N queries) {t_theirs * 1e3:.1f} ms, ratio {t_theirs / t_ours:.2f}x, max |diff| {err:.1e}")

    d = channels // heads
    q = torch.randn(batch, heads, tokens, d)
    k = torch.randn(batch, heads, 3 * tokens, d)
    v = torch.randn_like(k)
    q3 = torch.randn(batch, heads, 3 * tokens, d)
    t_n = _time(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
    t_3n = _time(lambda: F.scaled_dot_product_attention(q3, k, v)[:, :, :tokens], repeats)
    print(f"core   SDPA both sides: N x 3N {t_n * 1e3:.1f} ms, 3N x 3N {t_3n * 1e3:.1f} ms, ratio {t_3n / t_n:.2f}x")


SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
)  # fmt: skip


def count_unet_flops(resolution: int = 512) -> None:
    """FLOPs of one SD 2.1 UNet forward (batch 1) with the reference states routed both ways,
    counted on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from anonloader.methods.fams.attention import (
        install_reference_attention,
        project_reference_states,
        route_reference_kv,
        route_reference_states,
    )

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
    params = sum(p.numel() for p in unet.parameters())
    latent = resolution // 8
    # record the self-attention input shapes with a plain pass
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            hooks.append(module.register_forward_pre_hook(lambda m, args, kw, name=name: shapes.__setitem__(name, tuple(args[0].shape)), with_kwargs=True))
    x = torch.zeros(1, 4, latent, latent, device="meta")
    tokens = torch.zeros(1, 2, 1024, device="meta")
    t = torch.tensor([500], device="meta")
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=tokens)
    for h in hooks:
        h.remove()
    states = {name: torch.zeros(shape, device="meta") for name, shape in shapes.items()}

    def flops_with(route) -> int:
        route()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(x, t, encoder_hidden_states=tokens)
        return counter.get_total_flops()

    processors = install_reference_attention(unet)
    ours = flops_with(lambda: route_reference_states(processors, [states, states]))
    # sampling: the reference states are projected to keys/values once per face, not per step
    with torch.no_grad():
        projected = project_reference_states(unet, [states, states])
    ours_sampling = flops_with(lambda: route_reference_kv(processors, projected))
    unet.set_attn_processor({key: ConcatenatedQueriesProcessor() for key in unet.attn_processors})
    theirs_processors = dict(unet.attn_processors)  # set_attn_processor empties the dict it gets
    for key, proc in theirs_processors.items():
        if key[: -len(".processor")] in states:
            proc.extra_states = [states[key[: -len(".processor")]]] * 2
    theirs = flops_with(lambda: None)
    for proc in theirs_processors.values():
        proc.extra_states = []
    plain = flops_with(lambda: None)
    tf = 1e12
    print(f"UNet   SD 2.1 structure ({params / 1e6:.0f}M params) at {resolution}x{resolution}, batch 1, {len(states)} self-attention layers:")
    print(f"       plain UNet {plain / tf:.3f} TFLOP; with references: ours {ours / tf:.3f} TFLOP, authors' {theirs / tf:.3f} TFLOP "
          f"(ratio {theirs / ours:.2f}x, saving {(theirs - ours) / tf:.3f} TFLOP per UNet call)")
    print(f"       ours while sampling (reference keys/values projected once per face): {ours_sampling / tf:.3f} TFLOP "
          f"(ratio {theirs / ours_sampling:.2f}x)")
    print(f"       per face at 200 DDPM steps with CFG (2 UNet rows per step): ours {400 * ours_sampling / tf:.0f} TFLOP, "
          f"authors' {400 * theirs / tf:.0f} TFLOP")


def estimate_fp16_memory(resolution: int = 512) -> None:
    """Weights and per-face reference keys/values of a FAMS run at fp16, from component sizes
    (networks built on the meta device with the real configurations)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )  # fmt: skip
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=224))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    sizes = {"unet": count(unet), "referencenet x2": 2 * count(unet), "vae": count(vae), "clip vision": count(clip)}
    total = sum(sizes.values())
    latent = resolution // 8
    elements = 0
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            level = int(name.split(".")[1]) if not name.startswith("mid") else 3
            side = latent >> (level if name.startswith("down") else (3 - level) if name.startswith("up") else 3)
            elements += side * side * module.to_k.in_features
    # keys + values; rows per face with CFG: source (2: uncond + cond), null (1, broadcast), driving (2)
    kv_bytes = 2 * elements * 5 * 2
    print(f"fp16   weights: " + ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in sizes.items()) + f"; total {total / 1e9:.2f}B params = {2 * total / 2**30:.1f} GiB")
    print(f"       reference keys/values per face at {resolution}x{resolution} with CFG: {kv_bytes / 2**20:.0f} MiB "
          f"({elements / 1e6:.1f}M state elements per ReferenceNet pass)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="N, the UNet layer's own tokens (1024 = 32x32)")
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    time_layer(args.tokens, args.channels, args.heads, args.batch, args.repeats)
    count_unet_flops(args.resolution)
    estimate_fp16_memory(args.resolution)


if __name__ == "__main__":
    main()
