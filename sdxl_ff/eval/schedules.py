"""Sampler and scheduler names as ComfyUI knows them, and the sigma sequences they mean. Pure functions.

A discrete SDXL model has one sigma per training timestep, sigma_t = sqrt((1 - ᾱ_t) / ᾱ_t), ascending.
ComfyUI's schedulers pick `steps` sigmas from that table (or from its range) and append 0; its
samplers walk that sequence. The functions here reproduce ComfyUI's definitions (comfy/samplers.py,
comfy/model_sampling.py), named as there; karras and exponential come from the k-diffusion package.
tests/eval/test_comfy_reference.py compares them with the output of ComfyUI's own code at a pinned commit.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
import torch

from sdxl_ff.config.sampler_names import (
    DISCARD_PENULTIMATE_SIGMA,
    SCHEDULER_NAMES,
    ZSNR_LAST_ALPHA_BAR,
)


def make_scaled_linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """SD's "scaled_linear" betas (ComfyUI calls it "linear"): squares of a linspace of square roots, float64."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so the last timestep has (almost) zero SNR; the first keeps its value."""
    sqrt_alpha_bar = (1.0 / (sigmas * sigmas + 1.0)).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar ** 2
    alpha_bar[-1] = ZSNR_LAST_ALPHA_BAR
    return ((1.0 - alpha_bar) / alpha_bar) ** 0.5


def discrete_sigmas(beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                    zero_terminal_snr: bool = False) -> torch.Tensor:
    """The model's sigma per training timestep, ascending, float64 (ComfyUI's ModelSamplingDiscrete).

    Kept in float64 because ComfyUI keeps two float32 tables derived from it: the sigmas themselves
    (`table_sigmas()`) and their logs taken in float64 before the cast (`log_sigmas()`). Rounding the sigma
    first and taking the log after moves a timestep by one at exact log-midpoints.
    """
    alpha_bar = torch.cumprod(1.0 - make_scaled_linear_betas(beta_start, beta_end, num_train_timesteps), dim=0)
    sigmas = ((1.0 - alpha_bar) / alpha_bar) ** 0.5
    if zero_terminal_snr:
        sigmas = rescale_zero_terminal_snr_sigmas(sigmas)
    return sigmas


def table_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The float32 sigma table the schedulers read values from (ComfyUI's `model_sampling.sigmas`)."""
    return sigmas.float()


def log_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """log sigma per timestep, taken before the cast to float32 (ComfyUI's `model_sampling.log_sigmas`)."""
    return sigmas.log().float()


def sigmas_from_scheduler_config(config) -> torch.Tensor:
    """discrete_sigmas() for a diffusers scheduler config (SDXL's scaled_linear schedule)."""
    if config.get("beta_schedule", "scaled_linear") != "scaled_linear" or config.get("trained_betas") is not None:
        raise ValueError(f"beta_schedule {config.get('beta_schedule')!r}: only SDXL's scaled_linear is supported")
    return discrete_sigmas(config["beta_start"], config["beta_end"], config["num_train_timesteps"],
                           bool(config.get("rescale_betas_zero_snr", False)))


def sigma_to_timestep(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The integer timestep whose sigma is nearest in log space (what the UNet is fed), as ComfyUI rounds it."""
    dists = sigma.float().log().reshape(1, -1) - log_sigmas(sigmas).to(sigma.device)[:, None]
    return dists.abs().argmin(dim=0).view(sigma.shape)


def timestep_to_sigma(timestep: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma at a possibly fractional timestep, interpolated linearly in log sigma."""
    t = timestep.float().clamp(0, len(sigmas) - 1)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    logs = log_sigmas(sigmas)
    return ((1 - w) * logs[low] + w * logs[high]).exp()


def model_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the UNet sees at noise level sigma: x / sqrt(σ² + 1) (divided, as ComfyUI rounds it)."""
    return x / (_per_sample(sigma, x) ** 2 + 1.0) ** 0.5


def denoised(x: torch.Tensor, sigma: torch.Tensor, model_output: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """The denoised sample from an ε or v prediction at noise level sigma (σ_data = 1), in ComfyUI's order."""
    s = _per_sample(sigma, x)
    if v_prediction:
        return x * 1.0 / (s ** 2 + 1.0) - model_output * s * 1.0 / (s ** 2 + 1.0) ** 0.5
    return x - model_output * s


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(()) if sigma.numel() == 1 else sigma.reshape(-1, *([1] * (x.ndim - 1)))


def normal_scheduler(sigmas: torch.Tensor, steps: int, sgm: bool = False) -> torch.Tensor:
    """Timesteps evenly spaced from T-1 to 0 (sgm: `steps` of `steps+1` points, no final 0 point), then 0."""
    start = sigma_to_timestep(table_sigmas(sigmas)[-1], sigmas)
    end = sigma_to_timestep(table_sigmas(sigmas)[0], sigmas)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(timestep_to_sigma(end, sigmas)), 0, abs_tol=1e-5):
            steps, append_zero = steps + 1, False
        timesteps = torch.linspace(start, end, steps)
    out = [float(timestep_to_sigma(t, sigmas)) for t in timesteps]
    return torch.tensor(out + [0.0] * append_zero, dtype=torch.float32)


def sgm_uniform_scheduler(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    return normal_scheduler(sigmas, steps, sgm=True)


def simple_scheduler(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """Every (T/steps)-th table sigma counted from the top, then 0."""
    stride, sigmas = len(sigmas) / steps, table_sigmas(sigmas)
    return torch.tensor([float(sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


def ddim_uniform_scheduler(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """Table sigmas at 1, 1+s, 1+2s, ... with s = T // steps, descending, ending in 0."""
    out, sigmas = [0.0], table_sigmas(sigmas)
    if math.isclose(float(sigmas[1]), 0, abs_tol=1e-5):
        steps, out = steps + 1, []
    stride = max(len(sigmas) // steps, 1)
    out += [float(sigmas[i]) for i in range(1, len(sigmas), stride)]
    return torch.tensor(out[::-1], dtype=torch.float32)


def beta_scheduler(sigmas: torch.Tensor, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Timesteps at Beta(α, β) quantiles (arXiv:2407.12173), rounded, repeats dropped; the curve is on t, not σ."""
    last_index, sigmas = len(sigmas) - 1, table_sigmas(sigmas)
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    timesteps = np.rint(scipy.stats.beta.ppf(quantiles, alpha, beta) * last_index)
    out, previous = [], None
    for t in timesteps:
        if t != previous:
            out.append(float(sigmas[int(t)]))
        previous = t
    return torch.tensor(out + [0.0], dtype=torch.float32)


def linear_quadratic_scheduler(sigmas: torch.Tensor, steps: int, threshold_noise: float = 0.025) -> torch.Tensor:
    """Mochi's schedule: linear to `threshold_noise` for half the steps, then quadratic; times sigma_max."""
    if steps == 1:
        fractions = [1.0, 0.0]
    else:
        linear_steps = steps // 2
        quadratic_steps = steps - linear_steps
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quad_coef = step_diff / (linear_steps * quadratic_steps ** 2)
        lin_coef = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps ** 2)
        const = quad_coef * linear_steps ** 2
        quadratic = [quad_coef * i ** 2 + lin_coef * i + const for i in range(linear_steps, steps)]
        fractions = [1.0 - x for x in linear + quadratic + [1.0]]
    return torch.tensor(fractions, dtype=torch.float32) * table_sigmas(sigmas)[-1]


def kl_optimal_scheduler(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in arctan(σ) from sigma_max to sigma_min (arXiv:2409.10940), then 0."""
    w = torch.arange(steps, dtype=torch.float32) / (steps - 1)
    out = torch.zeros(steps + 1)
    out[:-1] = (w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)).tan()
    return out


def scheduler_sigmas(scheduler: str, sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """ComfyUI's calculate_sigmas(): the sequence for `steps` steps of the named scheduler."""
    from k_diffusion.sampling import get_sigmas_exponential, get_sigmas_karras
    sigma_min, sigma_max = float(table_sigmas(sigmas)[0]), float(table_sigmas(sigmas)[-1])
    by_range = {"karras": get_sigmas_karras, "exponential": get_sigmas_exponential}
    if scheduler in by_range:
        return by_range[scheduler](n=steps, sigma_min=sigma_min, sigma_max=sigma_max).float()
    if scheduler == "kl_optimal":
        return kl_optimal_scheduler(steps, sigma_min, sigma_max)
    by_table = {"normal": normal_scheduler, "sgm_uniform": sgm_uniform_scheduler, "simple": simple_scheduler,
                "ddim_uniform": ddim_uniform_scheduler, "beta": beta_scheduler,
                "linear_quadratic": linear_quadratic_scheduler}
    if scheduler not in by_table:
        raise ValueError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULER_NAMES)}")
    return by_table[scheduler](sigmas, steps)


def sampling_sigmas(sampler: str, scheduler: str, sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """What ComfyUI's KSampler walks: scheduler_sigmas(), minus the penultimate sigma for some samplers."""
    if sampler not in DISCARD_PENULTIMATE_SIGMA:
        return scheduler_sigmas(scheduler, sigmas, steps)
    longer = scheduler_sigmas(scheduler, sigmas, steps + 1)
    return torch.cat([longer[:-2], longer[-1:]])


def initial_noise_scale(sigma_start: float, sigma_max: float) -> float:
    """ComfyUI starts a full denoise from noise · √(1 + σ₀²), a partial one from noise · σ₀ (float32, as there)."""
    full = math.isclose(sigma_max, sigma_start, rel_tol=1e-5) or sigma_start > sigma_max
    sigma = torch.tensor(sigma_start, dtype=torch.float32)
    return float(torch.sqrt(1.0 + sigma ** 2.0)) if full else float(sigma)
