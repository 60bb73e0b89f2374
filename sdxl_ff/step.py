"""One training forward pass, shared by the trainer and the inspector: batch in, prediction and target out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from .conditioning import encode_prompts, time_ids
from .diffusion import SINGLE, Shard, loss_weights, sample_noise, sample_timesteps, snr, training_target
from .models import vae_precision


@dataclass
class StepOutput:
    prediction: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    latents: torch.Tensor
    noisy_latents: torch.Tensor
    loss_per_sample: torch.Tensor  # unweighted MSE per sample, fp32

    @property
    def loss(self) -> torch.Tensor:
        return self.loss_per_sample.mean()


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A batch tensor on `device`. To CUDA from the loader's pinned memory the copy is queued without the host
    waiting for it (non_blocking), so Python goes on queueing the step's kernels; elsewhere a plain copy."""
    return tensor.to(device, non_blocking=torch.device(device).type == "cuda")


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
                     scaling_factor: float, shard: Shard = SINGLE) -> torch.Tensor:
    """One draw from the VAE's diagonal Gaussian posterior, scaled as SDXL expects (noise drawn on the CPU)."""
    noise = shard.randn(tuple(mean.shape), generator).to(mean)
    return (mean + std * noise) * scaling_factor


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator,
                   shard: Shard = SINGLE) -> torch.Tensor:
    """VAE latents of pixels in [-1, 1], sampled from the posterior and scaled as SDXL expects."""
    with vae_precision(vae):
        dist = vae.encode(to_device(pixels, vae.device).to(vae.dtype)).latent_dist
    return sample_posterior(dist.mean, dist.std, generator, vae.config.scaling_factor, shard)


def batch_latents(vae: AutoencoderKL, batch: dict, generator: torch.Generator,
                  device: torch.device | str, shard: Shard = SINGLE) -> torch.Tensor:
    """Latents of a batch: given, sampled from the cached posterior (latent cache), or encoded now."""
    if "latents" in batch:
        return batch["latents"]
    if "latent_mean" in batch:  # the same draw encode_latents makes, from the cached mean and std
        return sample_posterior(to_device(batch["latent_mean"], device), to_device(batch["latent_std"], device),
                                generator, vae.config.scaling_factor, shard)
    return encode_latents(vae, batch["pixels"], generator, shard)


def predict(unet: UNet2DConditionModel, vae: AutoencoderKL, tokenizers: tuple, text_encoders: tuple,
            scheduler: DDPMScheduler, batch: dict, generator: torch.Generator,
            timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
            noise_offset: float = 0.0, shard: Shard = SINGLE, device: torch.device | None = None) -> StepOutput:
    """Encode (or take cached latents/embeddings), noise, run the UNet; `timesteps`/`noise` may be given.

    Pass `device` (the UNet's) in the training loop: diffusers' `unet.device` walks every submodule (about 5 ms
    per step on SDXL's UNet)."""
    device = unet.device if device is None else device
    latents = to_device(batch_latents(vae, batch, generator, device, shard), device).to(torch.float32)
    if noise is None:
        noise = sample_noise(latents, generator, noise_offset, shard)
    if timesteps is None:
        timesteps = sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, generator, shard=shard)
    timesteps = timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if "prompt_embeds" in batch:  # text-embedding cache
        prompt_embeds = to_device(batch["prompt_embeds"], device)
        pooled = to_device(batch["pooled_prompt_embeds"], device)
    else:
        prompt_embeds, pooled = encode_prompts(batch["caption"], tokenizers, text_encoders, device)
    added = {"text_embeds": pooled,
             "time_ids": time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"]).to(device)}
    prediction = unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added).sample
    target = training_target(scheduler, latents, noise, timesteps)
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return StepOutput(prediction, target, timesteps, noise, latents, noisy, loss)


@dataclass(frozen=True)
class LossWeighting:
    """How per-sample losses are weighted: Min-SNR-γ and min-sigma (see `diffusion.loss_weights`)."""
    prediction_type: str
    snr_gamma: float | None = None
    min_sigma: float | None = None
    min_sigma_warmup_steps: int = 0

    def __str__(self) -> str:
        parts = [f"Min-SNR-γ {self.snr_gamma:g}"] if self.snr_gamma is not None else []
        if self.min_sigma is not None:
            parts.append(f"min_sigma {self.min_sigma:g} (SNR clamped at {self.min_sigma**-2:g}) "
                         f"after {self.min_sigma_warmup_steps} steps")
        return ", ".join(parts) or "none (plain MSE)"

    def min_sigma_at(self, step: int) -> float | None:
        """min_sigma for optimizer step `step` (1-based): off until the warmup steps have passed."""
        return self.min_sigma if step > self.min_sigma_warmup_steps else None


def weighted_loss(out: StepOutput, scheduler: DDPMScheduler, weighting: LossWeighting, step: int) -> torch.Tensor:
    """The loss to optimise at optimizer step `step` (1-based): the weighted mean of the per-sample losses."""
    min_sigma = weighting.min_sigma_at(step)
    if weighting.snr_gamma is None and min_sigma is None:
        return out.loss
    weights = loss_weights(snr(scheduler.alphas_cumprod, out.timesteps), weighting.prediction_type,
                           weighting.snr_gamma, min_sigma)
    return (out.loss_per_sample * weights.to(out.loss_per_sample.device)).mean()
