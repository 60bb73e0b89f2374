"""Timestep sampling, loss types, debiased estimation and input perturbation against their closed forms."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config
from sdxl_ff.model.parts import SDXL_SCHEDULE, build_tiny_sdxl
from sdxl_ff.objective.diffusion import (
    Shard,
    TimestepSampling,
    debiased_weights,
    elementwise_loss,
    huber_threshold,
    loss_weights,
    resolution_shift,
    sample_noise,
    sample_timesteps,
    shift_fraction,
    snr,
)
from sdxl_ff.objective.predict import LossWeighting, StepOutput, predict, training_objective, weighted_loss

T = 1000
DRAWS = 200_000


def draw(sampling: TimestepSampling, n: int = DRAWS, seed: int = 0, pixels=None) -> np.ndarray:
    return sample_timesteps(n, T, torch.Generator().manual_seed(seed), sampling=sampling, pixels=pixels).numpy()


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def empirical_cdf(steps: np.ndarray, k: int) -> float:
    return float((steps < k).mean())


# --------------------------------------------------------------------------- timestep sampling

def test_default_sampling_is_todays_draw_bit_for_bit():
    """The default keys draw exactly what the trainer drew before they existed: torch.randint(0, T)."""
    got = sample_timesteps(8, T, torch.Generator().manual_seed(11))
    assert torch.equal(got, torch.randint(0, T, (8,), generator=torch.Generator().manual_seed(11)))
    shards = [sample_timesteps(4, T, torch.Generator().manual_seed(11), shard=Shard(r, 2)) for r in (0, 1)]
    assert torch.equal(torch.cat(shards), got)


@pytest.mark.parametrize("kind", ["logit_normal", "mode", "uniform"])
def test_every_sampler_shards_like_one_process(kind):
    sampling = TimestepSampling(kind, logit_mean=0.3, shift=None if kind != "uniform" else 3.0)
    single = sample_timesteps(6, T, torch.Generator().manual_seed(2), sampling=sampling)
    parts = [sample_timesteps(2, T, torch.Generator().manual_seed(2), shard=Shard(r, 3), sampling=sampling)
             for r in range(3)]
    assert torch.equal(torch.cat(parts), single)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (-0.5, 0.7), (1.0, 1.5)])
def test_logit_normal_cdf(mean, std):
    """P(t < k) = P(sigmoid(Z)·T < k) = Φ((logit(k/T) − mean)/std) for Z ~ N(mean, std²)."""
    steps = draw(TimestepSampling("logit_normal", logit_mean=mean, logit_std=std))
    assert steps.min() >= 0 and steps.max() <= T - 1
    for k in (50, 200, 500, 800, 950):
        expected = normal_cdf((math.log(k / T) - math.log(1 - k / T) - mean) / std)
        assert empirical_cdf(steps, k) == pytest.approx(expected, abs=0.005)


def mode_fraction(v: np.ndarray, scale: float) -> np.ndarray:
    return 1 - v - scale * (np.cos(np.pi * v / 2) ** 2 - 1 + v)


@pytest.mark.parametrize("scale", [0.0, 1.29, -0.8])
def test_mode_sampling_moments(scale):
    """SD3's mode density: u = 1 − v − s(cos²(πv/2) − 1 + v), v ~ U(0, 1); E[u] = 1/2 for every s, E[u²] by
    quadrature of u(v)² over [0, 1]."""
    steps = draw(TimestepSampling("mode", mode_scale=scale))
    v = (np.arange(1_000_000) + 0.5) / 1_000_000
    second = float((mode_fraction(v, scale) ** 2).mean())
    u = (steps + 0.5) / T  # the midpoint of each timestep's interval of u
    assert u.mean() == pytest.approx(0.5, abs=0.003)
    assert (u**2).mean() == pytest.approx(second + 1 / (12 * T**2), abs=0.003)
    if scale > 0:  # the mode sits at the middle: more mass there than uniform
        assert ((steps >= 250) & (steps < 750)).mean() > 0.55


def test_uniform_in_range_and_shift():
    steps = draw(TimestepSampling(min_timestep=200, max_timestep=400))
    assert steps.min() == 200 and steps.max() == 399
    assert steps.mean() == pytest.approx(299.5, abs=0.5)
    # shift s: u' = s·u/(1 + (s − 1)·u), so P(u' < x) = P(u < x/(s − (s − 1)·x))
    s = 3.0
    shifted = draw(TimestepSampling(shift=s))
    for k in (100, 500, 900):
        x = k / T
        assert empirical_cdf(shifted, k) == pytest.approx(x / (s - (s - 1) * x), abs=0.005)
    assert shift_fraction(torch.tensor([0.0, 0.5, 1.0]), 3.0).tolist() == pytest.approx([0.0, 0.75, 1.0])


def test_resolution_shift():
    assert resolution_shift(1024, 1024) == 1.0 and resolution_shift(2048, 2048) == 2.0
    assert resolution_shift(512, 512) == 0.5
    by_size = TimestepSampling(shift="resolution")
    at_2048 = draw(by_size, pixels=(2048, 2048))
    assert empirical_cdf(at_2048, 500) == pytest.approx(0.5 / (2 - 0.5), abs=0.005)
    assert np.array_equal(draw(by_size, pixels=(1024, 1024), n=1000), draw(TimestepSampling(shift=1.0), n=1000))


# --------------------------------------------------------------------------- loss types

def test_loss_types_by_hand():
    """d = p − y = 3 with c = 4: mse 9, l1 3, huber 2c(√(d² + c²) − c) = 8, smooth_l1 2(√(d² + c²) − c) = 2."""
    p, y = torch.full((1, 1, 1, 2), 3.0), torch.zeros(1, 1, 1, 2)
    c = torch.tensor([4.0])
    got = {kind: elementwise_loss(p, y, kind, c).flatten().tolist()
           for kind in ("mse", "l1", "huber", "smooth_l1")}
    assert got == {"mse": [9.0, 9.0], "l1": [3.0, 3.0], "huber": [8.0, 8.0], "smooth_l1": [2.0, 2.0]}


def test_huber_limits():
    """Small errors: huber ≈ d² (like MSE); large: huber ≈ 2c|d| (like L1 scaled by 2c)."""
    c = torch.tensor([0.1, 0.1])
    small, large = torch.full((2, 1, 1, 1), 1e-3), torch.full((2, 1, 1, 1), 100.0)
    zero = torch.zeros(2, 1, 1, 1)
    assert elementwise_loss(small, zero, "huber", c).flatten().tolist() == pytest.approx([1e-6] * 2, rel=1e-3)
    assert elementwise_loss(large, zero, "huber", c).flatten().tolist() == pytest.approx([2 * 0.1 * 100] * 2, rel=1e-3)


def test_pseudo_huber_has_no_cancellation_for_small_errors():
    """|d|/c = 1e-3: float32 2c(√(d² + c²) − c) kept only ~3 digits (1.00136e-6 for 1e-6); the loss must match
    the float64 value of the same function to 1e-6 relative, for huber and smooth_l1, at several c."""
    c = torch.tensor([0.1, 1.0, 0.003])
    d = (c * 1e-3).view(-1, 1, 1, 1) * torch.tensor([1.0, -1.0, 0.5, 2.0]).view(1, 4, 1, 1)
    zero = torch.zeros_like(d)
    c64, d64 = c.double().view(-1, 1, 1, 1), d.double()
    root64 = torch.sqrt(d64**2 + c64**2) - c64  # float64 keeps ~10 digits of it here
    exact = {"huber": 2 * c64 * root64, "smooth_l1": 2 * root64}
    for loss_type, expected in exact.items():
        got = elementwise_loss(d, zero, loss_type, c)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0, msg=loss_type)


def test_huber_threshold_schedules():
    alphas = torch.tensor([0.5, 0.2, 0.1])  # σ = √((1−ᾱ)/ᾱ) = 1, 2, 3
    t = torch.tensor([0, 1, 2])
    c = 0.1
    assert huber_threshold(t, "constant", c, alphas, T).tolist() == pytest.approx([c] * 3)
    assert huber_threshold(t, "snr", c, alphas, T).tolist() == pytest.approx(
        [(1 - c) / 4 + c, (1 - c) / 9 + c, (1 - c) / 16 + c])
    # exponential: c**(t/T), from 1 at t = 0 down to c at t = T
    steps = torch.tensor([0, 500, 1000])
    assert huber_threshold(steps, "exponential", c, alphas, T).tolist() == pytest.approx([1.0, c**0.5, c])


def test_debiased_weights():
    values = torch.tensor([4.0, 0.25, 1e6])
    assert debiased_weights(values, "epsilon").tolist() == pytest.approx([0.5, 2.0, 1000**-0.5])
    assert debiased_weights(values, "v_prediction").tolist() == pytest.approx([0.2, 0.8, 1 / 1001])


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler.from_config(EulerDiscreteScheduler(**SDXL_SCHEDULE).config)


def fake_output(generator_seed: int = 0) -> StepOutput:
    g = torch.Generator().manual_seed(generator_seed)
    prediction, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    per_sample = torch.nn.functional.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    timesteps = torch.tensor([10, 500, 990])
    return StepOutput(prediction, target, timesteps, target, target, target, per_sample)


def test_default_loss_is_the_plain_mean_bit_for_bit(scheduler):
    out = fake_output()
    assert torch.equal(weighted_loss(out, scheduler, LossWeighting("epsilon"), 1), out.loss)


@pytest.mark.parametrize("kind", ["l1", "huber", "smooth_l1"])
@pytest.mark.parametrize("kind_pred", ["epsilon", "v_prediction"])
def test_loss_types_compose_with_min_snr_and_debiasing(scheduler, kind, kind_pred):
    out = fake_output(1)
    weighting = LossWeighting(kind_pred, snr_gamma=5.0, min_sigma=0.4, loss_type=kind, huber_c=0.2,
                              huber_schedule="constant", debiased=True)
    d = out.prediction - out.target
    elementwise = {"l1": d.abs(), "huber": 2 * 0.2 * (torch.sqrt(d**2 + 0.04) - 0.2),
                   "smooth_l1": 2 * (torch.sqrt(d**2 + 0.04) - 0.2)}[kind]
    s = snr(scheduler.alphas_cumprod, out.timesteps)
    weights = loss_weights(s, kind_pred, 5.0, 0.4) * debiased_weights(s, kind_pred)
    expected = (elementwise.mean(dim=(1, 2, 3)) * weights).mean()
    assert weighted_loss(out, scheduler, weighting, 1).item() == pytest.approx(expected.item(), rel=1e-5)


# --------------------------------------------------------------------------- input perturbation, wiring

def test_input_perturbation_noises_the_input_not_the_target():
    """γ > 0: the UNet sees add_noise(x₀, ε + γz) with z the next draw after the timesteps; the target stays ε."""
    parts = build_tiny_sdxl(0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    config = parts.unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    batch = {"latents": latents, "prompt_embeds": torch.zeros(2, 77, config.cross_attention_dim),
             "pooled_prompt_embeds": torch.zeros(2, pooled), "original_size": torch.tensor([[64, 64]] * 2),
             "crop_top_left": torch.tensor([[0, 0]] * 2), "target_size": torch.tensor([[64, 64]] * 2)}
    scheduler = parts.noise_scheduler()
    with torch.no_grad():
        out = predict(parts.unet, parts.vae, (), (), scheduler, batch, torch.Generator().manual_seed(3),
                      input_perturbation=0.5)
        plain = predict(parts.unet, parts.vae, (), (), scheduler, batch, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.randint(0, T, (2,), generator=g)
    z = torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(out.noise, noise) and torch.equal(out.timesteps, timesteps)
    assert torch.equal(out.target, noise) and torch.equal(plain.target, noise)
    assert torch.equal(out.noisy_latents, scheduler.add_noise(latents, noise + 0.5 * z, timesteps))
    assert torch.equal(plain.noisy_latents, scheduler.add_noise(latents, noise, timesteps))


BASE = ["training.num_steps=1", "run.name=x", "model.train_text_encoder_1=false"]


def test_objective_from_config_and_its_refusals():
    cfg = load_config(None, BASE + ["training.loss_type=huber", "training.timestep_sampling=logit_normal",
                                    "training.logit_std=0.5", "training.debiased_estimation=true"])
    weighting, sampling = training_objective(cfg.training, "epsilon")
    assert (weighting.loss_type, weighting.huber_c, weighting.huber_schedule, weighting.debiased) == \
        ("huber", 0.1, "snr", True)  # sd-scripts' defaults for c and the schedule
    assert (sampling.kind, sampling.logit_std, sampling.max_timestep) == ("logit_normal", 0.5, None)
    with pytest.raises(ConfigError, match="training.max_timestep: 1001 is above the scheduler's 1000 timesteps"):
        load_config(None, BASE + ["model.id=builtin:tiny-sdxl", "training.max_timestep=1001"])


@pytest.mark.parametrize("overrides, message", [
    (["training.huber_schedule=snr"], 'training.huber_schedule: "snr" only applies to loss_type "huber" or '
                                      '"smooth_l1"'),
    (["training.loss_type=l1", "training.huber_c=0.2"], 'training.huber_c: 0.2 only applies to loss_type'),
    (["training.mode_scale=1.0"], 'training.mode_scale: 1.0 only applies to timestep_sampling "mode"'),
    (["training.logit_mean=0.5", "training.timestep_sampling=mode"],
     'training.logit_mean: 0.5 only applies to timestep_sampling "logit_normal", but timestep_sampling is "mode"'),
    (["training.min_timestep=500", "training.max_timestep=400"], "training.max_timestep: 400 must be above"),
    (["training.timestep_shift=0"], "training.timestep_shift: 0 is out of range; allowed: > 0"),
    (["training.timestep_shift=auto"], 'training.timestep_shift: expected a number or one of "resolution" or null'),
    (["training.huber_c=1.5", "training.loss_type=huber"], "training.huber_c: 1.5 is out of range"),
    (["training.logit_std=0", "training.timestep_sampling=logit_normal"], "training.logit_std: 0 is out of range"),
    (["training.input_perturbation=-0.1"], "training.input_perturbation: -0.1 is out of range"),
    (["model.ema_warmup.power=0.5"], "model.ema_warmup is set but model.use_ema is false"),
    (["training.min_sigma_warmup_steps=100"],  # issue 28.11: it was silently ignored
     "training.min_sigma_warmup_steps: 100 delays training.min_sigma, but min_sigma is not set; set "
     "training.min_sigma (e.g. 0.5) or remove min_sigma_warmup_steps"),
    (["training.loss_type=hubr"], 'training.loss_type: expected one of "mse", "l1", "huber", "smooth_l1", got '
                                  '"hubr" (string); did you mean \'huber\'?'),
    (["training.timestep_sampling=logit-normal"], "did you mean 'logit_normal'?"),
    (["training.huber_schedule=exponentail", "training.loss_type=huber"], "did you mean 'exponential'?"),
])
def test_invalid_keys_and_combinations_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, BASE + overrides)
    assert message in str(error.value)


@pytest.mark.parametrize("override, message", [
    # issue 28.9: each of these trained a wrong model with exit 0 (or crashed) before it had an upper bound
    ("training.timestep_shift=3.5e38", "training.timestep_shift: 3.5e+38 is out of range; allowed: > 0 and <= 1000"),
    ("training.noise_offset=1e300", "training.noise_offset: 1e+300 is out of range; allowed: >= 0 and <= 1"),
    ("training.input_perturbation=1e300",
     "training.input_perturbation: 1e+300 is out of range; allowed: >= 0 and <= 1"),
    # their siblings of the same kind, float keys that overflowed float32, made NaN, zeroed the loss or crashed
    ("training.min_sigma=1e300", "training.min_sigma: 1e+300 is out of range; allowed: >= 0.0001 and <= 100"),
    ("training.min_sigma=1e-200", "training.min_sigma: 1e-200 is out of range; allowed: >= 0.0001 and <= 100"),
    ("training.snr_gamma=1e-300", "training.snr_gamma: 1e-300 is out of range; allowed: >= 0.0001 and <= 10000"),
    ("training.huber_c=1e-300", "training.huber_c: 1e-300 is out of range; allowed: >= 0.0001 and <= 1"),
    ("training.logit_mean=1e300", "training.logit_mean: 1e+300 is out of range; allowed: >= -10 and <= 10"),
    ("training.logit_std=1e300", "training.logit_std: 1e+300 is out of range; allowed: > 0 and <= 10"),
    ("training.lr_scheduler.cycle_mult=1e300",
     "training.lr_scheduler.cycle_mult: 1e+300 is out of range; allowed: >= 1 and <= 100"),
    ("optimizer.eps=1e300", "optimizer.eps: 1e+300 is out of range; allowed: >= 1e-30 and <= 1"),
    ("optimizer.eps=1e-300", "optimizer.eps: 1e-300 is out of range; allowed: >= 1e-30 and <= 1"),
    ('data.datasets=[{"image_dir": "A", "loss_weight": 1e300}]',
     "data.datasets[0].loss_weight: 1e+300 is out of range; allowed: >= 0 and <= 1000"),
    ("eval.cfg_scale=1e39", "eval.cfg_scale: 1e+39 is out of range; allowed: >= 0 and <= 100"),
    ("optimizer.weight_decay=1000", "optimizer.weight_decay: 1000 with training.lr_unet 0.001 multiplies every "
                                    "weight by 1 - lr·weight_decay = 0 each step"),
])
def test_absurd_values_are_refused_with_their_range(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, BASE + ["training.lr_unet=1e-3", override])
    assert message in str(error.value)


def test_the_bounds_keep_the_objective_finite_and_the_shift_noisy():
    """At the new upper bounds the maths stays finite and means what it says; just past the old ones it did not."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    assert torch.isfinite(sample_noise(latents, torch.Generator().manual_seed(1), offset=1.0)).all()
    assert not torch.isfinite(sample_noise(latents, torch.Generator().manual_seed(1), offset=1e300)).all()
    # shift 1000: u = 0.5 maps to 1000/1001, timestep 999; at 3.5e38 (float32's edge) the same draw gave t = 0
    assert np.median(draw(TimestepSampling(shift=1000.0), n=10_000)) == 999
    assert draw(TimestepSampling(shift=3.5e38), n=10_000).min() == 0
    # the weight decay rule's edge: 1 - lr·wd just above 0 is allowed
    load_config(None, BASE + ["training.lr_unet=1e-3", "optimizer.weight_decay=999"])
