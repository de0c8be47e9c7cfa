"""FAMS sampling on tiny networks: the d control, CFG, seeds, face swap, the Method protocol."""

from __future__ import annotations

import pickle

import pytest
import torch

pytest.importorskip("diffusers")

from anonloader.errors import ConfigError, MethodError  # noqa: E402
from anonloader.methods import Method, get_method  # noqa: E402
from anonloader.methods.fams import FAMS, build_tiny_components  # noqa: E402
from anonloader.types import FaceConditions  # noqa: E402

STEPS = 2
_SHARED = {}


def _conditions(seeds, **extra):
    n = len(seeds)
    return FaceConditions(list(seeds), [None] * n, [None] * n, torch.zeros(n, 5, 2), dict(extra))



@pytest.fixture(scope="module")
def crops():
    generator = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 16, 16, generator=generator)


def _fams(**kwargs):
    """A FAMS on one shared set of tiny networks (building them is the slow part)."""
    kwargs.setdefault("num_inference_steps", STEPS)
    if "components" not in _SHARED:
        _SHARED["components"] = build_tiny_components(0)
    return FAMS.from_components(_SHARED["components"], crop_size=16, resolution=16, **kwargs)


def test_is_a_method_and_registered():
    fams = get_method("fams", tiny=True, crop_size=16, num_inference_steps=STEPS)
    assert isinstance(fams, FAMS) and isinstance(fams, Method)
    assert (fams.name, fams.template) == ("fams", "ffhq")
    assert FAMS(tiny=True).crop_size == 512


class _FirstCall:
    """Records the inputs and output of a module's first forward call."""

    def __init__(self, module):
        self.args = self.kwargs = self.output = None
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        if self.output is None:
            self.args, self.kwargs = [a.clone() for a in args if torch.is_tensor(a)], dict(kwargs)
            self.output = (output[0] if isinstance(output, tuple) else output.sample).clone()

    def close(self):
        self.handle.remove()


@torch.no_grad()
def test_degree_applies_exactly_eqs_1_and_2(crops):
    """The UNet's first prediction equals one with an explicitly built Z' = (1 - d) Z (eq. 1, also
    fed to the source ReferenceNet) and S' = (1 - d) S_cond + d S_uncond (eq. 2) materialized."""
    from anonloader.methods.fams.attention import clear_reference_states, route_reference_states
    from anonloader.methods.fams.pipeline import embed_images, encode_images

    degree = 1.4
    fams = _fams(anonymization_degree=degree, guidance_scale=1.0)
    components = fams.components
    spy = _FirstCall(components.unet)
    try:
        fams.generate(crops, [5, 6])
    finally:
        spy.close()
    z = embed_images(components, crops)
    latents = encode_images(components, crops)
    tokens = torch.cat([(1 - degree) * z, z], dim=1)
    assert torch.equal(spy.kwargs["encoder_hidden_states"], tokens)  # eq. 1 in the source slot
    conditional = components.source_states(latents, (1 - degree) * z)  # eq. 1 into the source ReferenceNet
    null = components.null_states(tuple(latents.shape[-2:]))
    blended = {k: (1 - degree) * conditional[k] + degree * null[k] for k in conditional}  # eq. 2
    route_reference_states(components.processors, [blended, components.driving_states(latents, z)])
    try:
        explicit = components.unet(*spy.args, encoder_hidden_states=tokens).sample
    finally:
        clear_reference_states(components.processors)
    torch.testing.assert_close(spy.output, explicit, rtol=1e-5, atol=1e-6)
    assert (explicit - _prediction_at_degree(fams, crops, 0.0)).abs().max() > 1e-3  # d matters at all


def _prediction_at_degree(fams, crops, degree):
    other = _fams(anonymization_degree=degree, guidance_scale=1.0)
    spy = _FirstCall(other.components.unet)
    try:
        other.generate(crops, [5, 6])
    finally:
        spy.close()
    return spy.output


@torch.no_grad()
def test_cfg_is_eps_u_plus_g_times_eps_c_minus_eps_u(crops, monkeypatch):
    """What the scheduler is given equals eps_u + g (eps_c - eps_u) computed by hand from an
    unguided conditional pass and an explicit unconditional pass (source: null states, zero embedding)."""
    import anonloader.methods.fams.pipeline as sampling
    from anonloader.methods.fams.attention import clear_reference_states, route_reference_states

    given = []
    real_make_scheduler = sampling.make_scheduler

    def recording_scheduler(config, sampler):  # the real scheduler; its first step's input is kept
        scheduler = real_make_scheduler(config, sampler)
        step = scheduler.step
        scheduler.step = lambda model_output, *a, **k: (given.append(model_output.clone()), step(model_output, *a, **k))[1]
        return scheduler

    monkeypatch.setattr(sampling, "make_scheduler", recording_scheduler)
    g, degree = 4.0, 1.25
    guided = _fams(guidance_scale=g, anonymization_degree=degree)
    spy = _FirstCall(guided.components.unet)
    try:
        guided.generate(crops, [5, 6])
    finally:
        spy.close()
    eps_c = _prediction_at_degree(guided, crops, degree)  # unguided run: the conditional pass alone
    components = guided.components
    from anonloader.methods.fams.pipeline import embed_images, encode_images

    z = embed_images(components, crops)
    latents = encode_images(components, crops)
    null = components.null_states(tuple(latents.shape[-2:]))
    route_reference_states(components.processors, [{k: v.expand(2, -1, -1) for k, v in null.items()}, components.driving_states(latents, z)])
    try:
        sample, t = spy.args[0][:2], spy.args[1] if len(spy.args) > 1 else spy.kwargs["timestep"]
        eps_u = components.unet(sample, t, encoder_hidden_states=torch.cat([torch.zeros_like(z), z], dim=1)).sample
    finally:
        clear_reference_states(components.processors)
    torch.testing.assert_close(given[0], eps_u + g * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
    assert (eps_c - eps_u).abs().max() > 1e-3  # the two passes differ: guidance does something


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_swap_with_the_crop_as_source_and_d_zero_is_the_reconstruction(crops, guidance):
    fams = _fams(anonymization_degree=0.0, swap_degree=0.0, guidance_scale=guidance)
    reconstructed = fams.generate(crops, [5, 6], anonymize=False)  # plain states, no blend
    assert torch.equal(fams.generate(crops, [5, 6], source=crops.clone()), reconstructed)
    anonymized = fams.generate(crops, [5, 6])  # eqs. 1-2 with d = 0, the blend done in the kernel
    torch.testing.assert_close(anonymized, reconstructed, rtol=0, atol=1e-6)


def test_same_key_same_bytes_and_seeds_matter(crops):
    fams = _fams()
    first = fams(crops, _conditions([11, 12]))
    again = FAMS.from_config(tiny=True, crop_size=16, num_inference_steps=STEPS)(crops.clone(), _conditions([11, 12]))
    assert torch.equal(first, again)
    other = fams(crops, _conditions([13, 12]))
    assert (first[0] - other[0]).abs().mean() > 1e-4
    torch.testing.assert_close(first[1], other[1], rtol=0, atol=1e-5)  # per-face generators


def test_ddim_sampler_runs_and_is_deterministic(crops):
    fams = _fams(sampler="ddim")
    assert torch.equal(fams(crops, _conditions([1, 2])), fams(crops, _conditions([1, 2])))


def test_swap_with_different_sources_differs(crops):
    fams = _fams()
    generator = torch.Generator().manual_seed(9)
    source_a = torch.rand(2, 3, 24, 24, generator=generator)  # any size: resized to the model's
    source_b = torch.rand(2, 3, 24, 24, generator=generator)
    out_a = fams(crops, _conditions([5, 6], source_images=source_a))
    out_b = fams(crops, _conditions([5, 6], source_images=source_b))
    assert (out_a - out_b).abs().mean() > 1e-4


def test_config_names_every_pixel_changing_setting():
    config = _fams(anonymization_degree=1.2).config()
    assert config["sampling"]["anonymization_degree"] == 1.2
    assert set(config["sampling"]) >= {"swap_degree", "guidance_scale", "num_inference_steps", "sampler", "resolution"}
    assert set(config["weights"]) >= {"unet", "referencenet", "conditioning_referencenet", "vae", "image_encoder"}
    assert config != _fams(anonymization_degree=1.4).config()
    tiny = FAMS(tiny=True, tiny_seed=0).config()
    assert tiny["weights"]["unet"] == config["weights"]["unet"]  # same seed, same weights
    assert tiny["weights"] != FAMS(tiny=True, tiny_seed=1).config()["weights"]


def test_pickles_without_networks_and_rebuilds(crops):
    fams = FAMS.from_config(tiny=True, crop_size=16, num_inference_steps=STEPS)
    out = fams(crops, _conditions([4, 4]))
    clone = pickle.loads(pickle.dumps(fams))
    assert clone._components is None
    assert torch.equal(clone(crops, _conditions([4, 4])), out)


def test_bad_inputs_raise():
    fams = _fams()
    with pytest.raises(MethodError):
        fams(torch.rand(2, 3, 16, 12), _conditions([1, 2]))
    with pytest.raises(MethodError):
        fams(torch.rand(2, 3, 16, 16), _conditions([1]))
    with pytest.raises(ConfigError):
        _fams(sampler="euler")
    with pytest.raises(ConfigError):
        FAMS(weights=None)


def test_paper_and_release_defaults_are_pinned():
    """Paper 4.1 and the authors' README: DDPM, 200 steps, guidance 4.0, d = 1.25 (README; the
    paper's table uses 1.2 and 1.4), 512 px; v-prediction from SD 2.1's scheduler config."""
    from anonloader.methods.fams.components import SD21_SCHEDULER_CONFIG
    from anonloader.methods.fams.pipeline import SamplingSettings

    settings = SamplingSettings()
    assert (settings.sampler, settings.num_inference_steps, settings.guidance_scale) == ("ddpm", 200, 4.0)
    assert (settings.anonymization_degree, settings.swap_degree, settings.resolution) == (1.25, 0.0, 512)
    assert FAMS(tiny=True).settings == SamplingSettings(resolution=16)  # tiny networks run at 16 px
    assert SD21_SCHEDULER_CONFIG["prediction_type"] == "v_prediction"
    assert (SD21_SCHEDULER_CONFIG["beta_schedule"], SD21_SCHEDULER_CONFIG["num_train_timesteps"]) == ("scaled_linear", 1000)
    assert _fams().components.reference_routing == "released"


@torch.no_grad()
def test_latent_sampling_draws_the_posterior_from_the_faces_own_generator(crops):
    """``latent_sampling="sample"``: the source ReferenceNet gets mean + std * eps with eps from the
    generator seeded seed ^ LATENT_SEED_SALT (source first, then driving), nothing else moves."""
    from anonloader.methods.fams.pipeline import LATENT_SEED_SALT

    fams = _fams(latent_sampling="sample", guidance_scale=1.0)
    components = fams.components
    given = []
    handle = components.referencenet.register_forward_pre_hook(lambda module, args: given.append(args[0].clone()))
    try:
        out = fams.generate(crops, [5, 6])
    finally:
        handle.remove()
    posterior = components.vae.encode(crops * 2 - 1).latent_dist
    eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(s ^ LATENT_SEED_SALT)) for s in (5, 6)])
    expected = (posterior.mean + posterior.std * eps) * components.vae.config.scaling_factor
    sources = [g for g in given if g.shape[0] == 2]
    torch.testing.assert_close(sources[0], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(fams.generate(crops, [5, 6]), out)  # deterministic per face
    assert not torch.equal(_fams(guidance_scale=1.0).generate(crops, [5, 6]), out)  # the mean differs
    assert fams.config()["sampling"]["latent_sampling"] == "sample"
