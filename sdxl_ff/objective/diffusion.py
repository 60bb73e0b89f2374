"""The diffusion maths of a training step: noise, timesteps, targets, SNR, loss weights. Pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from sdxl_ff.runtime.tensors import from_host


@dataclass(frozen=True)
class Shard:
    """This process's share of a global batch. Every process draws the random numbers of the whole
    global batch from the same generator and keeps its own slice, so the samples of N processes get
    exactly the noise and timesteps they would get in one process."""
    rank: int = 0
    world: int = 1

    def randn(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        full = torch.randn((shape[0] * self.world, *shape[1:]), generator=generator, dtype=torch.float32)
        return full[self.rank * shape[0]:(self.rank + 1) * shape[0]]

    def randint(self, high: int, n: int, generator: torch.Generator, low: int = 0) -> torch.Tensor:
        full = torch.randint(low, high, (n * self.world,), generator=generator)
        return full[self.rank * n:(self.rank + 1) * n]

    def keep(self, full: torch.Tensor) -> torch.Tensor:
        """This process's slice of values drawn for the whole global batch."""
        n = full.shape[0] // self.world
        return full[self.rank * n:(self.rank + 1) * n]


SINGLE = Shard()


@dataclass(frozen=True)
class TimestepSampling:
    """How training timesteps are drawn (`training.timestep_sampling` and its companions).

    `uniform`: integers in [min, max). `logit_normal`: u = sigmoid(N(mean, std)); `mode`: SD3's
    u = 1 − v − scale·(cos²(πv/2) − 1 + v), v uniform (both via diffusers'
    `compute_density_for_timestep_sampling`). `shift` s maps u to s·u / (1 + (s − 1)·u) (SD3's
    resolution-dependent shift; "resolution" uses s = √(pixels / 1024²) of the batch). The timestep
    is then min + ⌊u·(max − min)⌋.
    """
    kind: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: int = 0
    max_timestep: int | None = None  # exclusive; None: the scheduler's num_train_timesteps
    shift: float | str | None = None

    def __str__(self) -> str:
        text = {"uniform": "uniform", "mode": f"mode (scale {self.mode_scale:g})",
                "logit_normal": f"logit-normal (mean {self.logit_mean:g}, std {self.logit_std:g})"}[self.kind]
        high = "T" if self.max_timestep is None else self.max_timestep
        shift = "" if self.shift is None else f", shift {self.shift}"
        return f"{text} in [{self.min_timestep}, {high}){shift}"


UNIFORM = TimestepSampling()


def shift_fraction(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift of a noise fraction u in [0, 1]: s·u / (1 + (s − 1)·u); s > 1 means noisier."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def resolution_shift(height: int, width: int, base_pixels: int = 1024 * 1024) -> float:
    """The shift for an image of height × width pixels: √(pixels / base) (SD3 paper, section 5.3.2)."""
    return math.sqrt(height * width / base_pixels)


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     device: torch.device | str = "cpu", shard: Shard = SINGLE,
                     sampling: TimestepSampling = UNIFORM, pixels: tuple[int, int] | None = None) -> torch.Tensor:
    """Integer timesteps in [min, max) as `sampling` says (default: uniform in [0, T)).

    The values of the whole global batch are drawn, then this process's share kept (see `Shard`).
    `pixels` (height, width) is the batch's image size, needed for the "resolution" shift.
    """
    low, high = sampling.min_timestep, sampling.max_timestep or num_train_timesteps
    if sampling.kind == "uniform" and sampling.shift is None:
        return from_host(shard.randint(high, batch, generator, low), device)  # today's draw, bit for bit
    u = compute_density_for_timestep_sampling(sampling.kind, batch * shard.world, logit_mean=sampling.logit_mean,
                                              logit_std=sampling.logit_std, mode_scale=sampling.mode_scale,
                                              generator=generator)
    if sampling.shift is not None:
        shift = resolution_shift(*pixels) if sampling.shift == "resolution" else float(sampling.shift)
        u = shift_fraction(u, shift)
    steps = (low + (u * (high - low)).long()).clamp(low, high - 1)
    return from_host(shard.keep(steps), device)


def sample_noise(latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0,
                 shard: Shard = SINGLE) -> torch.Tensor:
    """Standard normal noise shaped like `latents`, drawn on the CPU so any device gives the same values (copied
    to the device without the host waiting).

    With `offset` > 0 each (sample, channel) gets a constant `offset · z`, z ~ N(0, 1), added
    everywhere (offset noise): the model can then change an image's mean colour, which plain
    noise hardly ever destroys.
    """
    noise = shard.randn(tuple(latents.shape), generator)
    if offset > 0:
        noise = noise + offset * shard.randn((*latents.shape[:2], 1, 1), generator)
    return from_host(noise, latents.device).to(latents.dtype)


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: ε for epsilon prediction, v = √ᾱ·ε − √(1−ᾱ)·x₀ for v-prediction."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction type {kind!r} is not supported; use 'epsilon' or 'v_prediction'")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ/(1−ᾱ) at each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def sigma_of_snr(snr_values: torch.Tensor) -> torch.Tensor:
    """σ = √((1−ᾱ)/ᾱ) = 1/√SNR, the noise level of the variance-exploding view (k-diffusion's sigma)."""
    return snr_values.rsqrt()


def loss_weights(snr_values: torch.Tensor, prediction_type: str, snr_gamma: float | None = None,
                 min_sigma: float | None = None) -> torch.Tensor:
    """Per-sample loss weights for Min-SNR-γ and min-sigma; all ones when both are off.

    An MSE on ε equals SNR·‖x₀ − x̂₀‖², an MSE on v equals (SNR+1)·‖x₀ − x̂₀‖²: the prediction
    type fixes an implicit x₀-space weight g(SNR) = SNR (ε) or SNR+1 (v). min-sigma evaluates that
    weight at the clamped SNR ŝ = min(SNR, 1/min_sigma²), i.e. as if σ were never below min_sigma;
    Min-SNR-γ (Hang et al. 2023) replaces it by min(ŝ, γ). The returned factor is new/old weight:
        ε: min(ŝ, γ)/SNR      v: min(ŝ, γ)/(SNR+1)      (γ off: ε: ŝ/SNR, v: (ŝ+1)/(SNR+1))
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")
    snr_values = snr_values.float()
    clamped = snr_values if min_sigma is None else snr_values.clamp(max=1.0 / min_sigma**2)
    wanted = clamped if snr_gamma is None else clamped.clamp(max=snr_gamma)
    if prediction_type == "v_prediction":
        implicit = snr_values + 1.0
        if snr_gamma is None:
            wanted = wanted + 1.0
        return wanted / implicit
    # At SNR 0 (zero terminal SNR) both weights are 0; their ratio tends to 1.
    safe = torch.where(snr_values > 0, snr_values, torch.ones_like(snr_values))
    return torch.where(snr_values > 0, wanted / safe, torch.ones_like(snr_values))


# Loss types and the Huber threshold as kohya-ss/sd-scripts defines them (library/train_util.py,
# get_huber_threshold_if_needed and conditional_loss, at commit 48d368fa557731ad0488c07304dfeba8c07910eb), with
# huber_scale fixed at its default 1.0.
LOSS_TYPES = ("mse", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def huber_threshold(timesteps: torch.Tensor, schedule: str, huber_c: float, alphas_cumprod: torch.Tensor,
                    num_train_timesteps: int) -> torch.Tensor:
    """The per-sample threshold c(t): constant c; exponential c**(t/T); snr (1 − c)/(1 + σ)² + c, σ = √((1−ᾱ)/ᾱ)."""
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c, dtype=torch.float32, device=timesteps.device)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-alpha * timesteps.float())
    if schedule == "snr":
        a = alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1.0 - a) / a) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise ValueError(f"huber_schedule {schedule!r}: use one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str,
                     threshold: torch.Tensor | None = None) -> torch.Tensor:
    """The unreduced loss of each element: (p − y)², |p − y|, or with a per-sample threshold c
    huber 2c(√((p − y)² + c²) − c) and smooth_l1 2(√((p − y)² + c²) − c) (sd-scripts' pseudo-Huber forms)."""
    if loss_type == "mse":
        return F.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"loss type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    c = threshold.view(-1, *([1] * (prediction.ndim - 1))).to(prediction)
    # √(d² + c²) − c written as d² / (√(d² + c²) + c): the same function without the float32 cancellation that
    # made the loss ~1e-3 relative wrong for |d| ≪ c (d = 1e-3, c = 0.1).
    squared = (prediction - target) ** 2
    root = squared / (torch.sqrt(squared + c**2) + c)
    return 2 * c * root if loss_type == "huber" else 2 * root


def debiased_weights(snr_values: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation (sd-scripts' apply_debiased_estimation, same commit): 1/√SNR for ε, 1/(SNR+1)
    for v, with SNR capped at 1000 (at t = 0 it is nearly infinite)."""
    capped = snr_values.float().clamp(max=1000.0)
    return 1.0 / (capped + 1.0) if prediction_type == "v_prediction" else capped.rsqrt()


