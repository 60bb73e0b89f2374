"""The diffusion maths of a training step: noise, timesteps, targets, SNR. Pure functions."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform integer timesteps in [0, T)."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator).to(device)


def sample_noise(latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like `latents`, drawn on the CPU so any device gives the same values."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
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
