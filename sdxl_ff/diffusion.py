"""The diffusion maths of a training step: noise, timesteps, targets, SNR, loss weights. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from .config import ConfigError


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

    def randint(self, high: int, n: int, generator: torch.Generator) -> torch.Tensor:
        full = torch.randint(0, high, (n * self.world,), generator=generator)
        return full[self.rank * n:(self.rank + 1) * n]


SINGLE = Shard()


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     device: torch.device | str = "cpu", shard: Shard = SINGLE) -> torch.Tensor:
    """Uniform integer timesteps in [0, T)."""
    return shard.randint(num_train_timesteps, batch, generator).to(device)


def sample_noise(latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0,
                 shard: Shard = SINGLE) -> torch.Tensor:
    """Standard normal noise shaped like `latents`, drawn on the CPU so any device gives the same values.

    With `offset` > 0 each (sample, channel) gets a constant `offset · z`, z ~ N(0, 1), added
    everywhere (offset noise): the model can then change an image's mean colour, which plain
    noise hardly ever destroys.
    """
    noise = shard.randn(tuple(latents.shape), generator)
    if offset > 0:
        noise = noise + offset * shard.randn((*latents.shape[:2], 1, 1), generator)
    return noise.to(latents.device, latents.dtype)


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


def configure_inference_scheduler(scheduler: EulerDiscreteScheduler, prediction_type: str | None,
                                  zero_terminal_snr: bool) -> EulerDiscreteScheduler:
    """The scheduler saved with the model, set to what training used; the training scheduler derives from it.

    Zero terminal SNR rescales the betas so that ᾱ_T = 0 (Lin et al. 2024) and samples with
    "trailing" timestep spacing so that inference starts from that pure-noise step.
    """
    changes: dict = {}
    if prediction_type is not None:
        changes["prediction_type"] = prediction_type
    if zero_terminal_snr:
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    resolved = changes.get("prediction_type", scheduler.config.prediction_type)
    if zero_terminal_snr and resolved != "v_prediction":
        raise ConfigError(f"training.zero_terminal_snr: true, but the model's scheduler predicts {resolved!r}; "
                          f"set training.prediction_type to \"v_prediction\" (ε is undefined at SNR 0)")
    if not changes:
        return scheduler
    return type(scheduler).from_config(scheduler.config, **changes)
