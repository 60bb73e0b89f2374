"""Loss weights, noise offset, v-prediction and zero terminal SNR against their closed forms."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.model.parts import SDXL_SCHEDULE, configure_inference_scheduler
from sdxl_ff.objective.diffusion import loss_weights, sample_noise, sigma_of_snr, snr, training_target
from sdxl_ff.objective.predict import LossWeighting, StepOutput, weighted_loss

TIMESTEPS = [0, 100, 400, 700, 999]


def sdxl_snr_closed_form(t: int) -> float:
    """SNR of SDXL's scaled-linear schedule, computed in float64 from its definition."""
    alpha_bar = 1.0
    for i in range(t + 1):
        beta = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2
        alpha_bar *= 1.0 - beta
    return alpha_bar / (1.0 - alpha_bar)


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler.from_config(EulerDiscreteScheduler(**SDXL_SCHEDULE).config)


@pytest.fixture(scope="module")
def snrs(scheduler):
    values = snr(scheduler.alphas_cumprod, torch.tensor(TIMESTEPS))
    expected = [sdxl_snr_closed_form(t) for t in TIMESTEPS]
    assert values.tolist() == pytest.approx(expected, rel=1e-4)
    return values, expected


def expected_weight(s: float, kind: str, gamma: float | None, min_sigma: float | None) -> float:
    clamped = s if min_sigma is None else min(s, 1 / min_sigma**2)
    if gamma is not None:
        return min(clamped, gamma) / (s if kind == "epsilon" else s + 1)
    return clamped / s if kind == "epsilon" else (clamped + 1) / (s + 1)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma, min_sigma", [(None, None), (5.0, None), (None, 0.4), (5.0, 0.4), (20.0, 0.4)])
def test_weights_match_formula_at_known_timesteps(snrs, kind, gamma, min_sigma):
    values, expected_snr = snrs
    got = loss_weights(values, kind, gamma, min_sigma)
    want = [expected_weight(s, kind, gamma, min_sigma) for s in expected_snr]
    assert got.tolist() == pytest.approx(want, rel=1e-4)


def test_min_snr_values_by_hand(snrs):
    values, expected_snr = snrs
    s0, s_last = expected_snr[0], expected_snr[-1]
    eps = loss_weights(values, "epsilon", 5.0).tolist()
    v = loss_weights(values, "v_prediction", 5.0).tolist()
    assert eps[0] == pytest.approx(5.0 / s0, rel=1e-4) and eps[-1] == pytest.approx(1.0)  # SNR < γ: unweighted
    assert v[0] == pytest.approx(5.0 / (s0 + 1), rel=1e-4) and v[-1] == pytest.approx(s_last / (s_last + 1), rel=1e-4)
    assert s0 > 1000 and s_last < 0.005  # the ends of SDXL's schedule


def test_min_sigma_is_a_sigma_floor(snrs):
    values, _ = snrs
    sigmas = sigma_of_snr(values)
    weights = loss_weights(values, "epsilon", min_sigma=1.0)
    for sigma, weight in zip(sigmas.tolist(), weights.tolist(), strict=True):
        # ε weight = (1/min_sigma²)/SNR = σ² below the floor, 1 above it
        assert weight == pytest.approx(min(1.0, sigma**2), rel=1e-4)


def test_zero_snr_weight_is_finite():
    values = torch.tensor([0.0, 1.0])
    assert loss_weights(values, "epsilon", 5.0).tolist() == [1.0, 1.0]
    assert loss_weights(values, "v_prediction", 5.0).tolist() == [0.0, 0.5]


def step_output(timesteps, losses):
    zeros = torch.zeros(len(timesteps), 4, 2, 2)
    return StepOutput(zeros, zeros, torch.tensor(timesteps), zeros, zeros, zeros, torch.tensor(losses))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_sigma_inactive_until_warmup(scheduler, kind):
    out = step_output([0, 999], [2.0, 4.0])
    weighting = LossWeighting(kind, min_sigma=0.4, min_sigma_warmup_steps=10)
    assert weighted_loss(out, scheduler, weighting, step=10).item() == 3.0  # steps 1..10: plain mean
    after = weighted_loss(out, scheduler, weighting, step=11).item()
    w = loss_weights(snr(scheduler.alphas_cumprod, out.timesteps), kind, min_sigma=0.4)
    assert after == pytest.approx((2.0 * w[0] + 4.0 * w[1]).item() / 2) and after < 3.0


def test_weighted_loss_with_gamma(scheduler):
    out = step_output([0, 999], [2.0, 4.0])
    s0 = sdxl_snr_closed_form(0)
    got = weighted_loss(out, scheduler, LossWeighting("epsilon", snr_gamma=5.0), step=1).item()
    assert got == pytest.approx((2.0 * 5.0 / s0 + 4.0 * 1.0) / 2, rel=1e-4)


def test_v_target_is_scheduler_velocity():
    sched = DDPMScheduler.from_config(
        configure_inference_scheduler(EulerDiscreteScheduler(**SDXL_SCHEDULE), "v_prediction", False).config)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 500, 999])
    target = training_target(sched, latents, noise, t)
    assert torch.equal(target, sched.get_velocity(latents, noise, t))
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(target, a.sqrt() * noise - (1 - a).sqrt() * latents, atol=1e-6)


def test_zero_terminal_snr_schedule():
    base = EulerDiscreteScheduler(**SDXL_SCHEDULE)
    inference = configure_inference_scheduler(base, "v_prediction", True)
    assert inference.config.prediction_type == "v_prediction" and inference.config.rescale_betas_zero_snr
    assert inference.config.timestep_spacing == "trailing"
    train = DDPMScheduler.from_config(inference.config)
    assert train.alphas_cumprod[-1].item() == 0.0  # ᾱ_T = 0: the last step is pure noise
    assert train.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-6)
    assert snr(train.alphas_cumprod, torch.tensor([999])).item() == 0.0
    x0, noise = torch.ones(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert torch.equal(train.add_noise(x0, noise, torch.tensor([999])), noise)


def test_scheduler_untouched_by_default_and_ztsnr_needs_v():
    base = EulerDiscreteScheduler(**SDXL_SCHEDULE)
    assert configure_inference_scheduler(base, None, False) is base
    with pytest.raises(ConfigError, match="training.zero_terminal_snr.*'epsilon'.*v_prediction"):
        configure_inference_scheduler(base, None, True)


def test_noise_offset_statistics():
    latents = torch.zeros(512, 4, 32, 32)
    plain = sample_noise(latents, torch.Generator().manual_seed(3))
    offset = sample_noise(latents, torch.Generator().manual_seed(3), offset=0.1)
    shift = offset - plain  # the same first draw: the difference is the offset alone
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # constant per channel
    channel_means = offset.mean(dim=(2, 3))
    expected_std = math.sqrt(0.1**2 + 1 / (32 * 32))
    assert channel_means.std().item() == pytest.approx(expected_std, rel=0.05)
    assert abs(channel_means.mean().item()) < 0.01
    assert plain.mean(dim=(2, 3)).std().item() == pytest.approx(1 / 32, rel=0.05)
    assert shift[:, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.05)
