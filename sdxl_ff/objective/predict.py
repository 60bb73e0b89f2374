"""One training forward pass, shared by the trainer and the inspector: batch in, prediction and target out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from sdxl_ff.config.schema import TrainingConfig
from sdxl_ff.model.conditioning import encode_prompts, time_ids
from sdxl_ff.model.parts import vae_precision
from sdxl_ff.objective.diffusion import (
    SINGLE,
    UNIFORM,
    Shard,
    TimestepSampling,
    debiased_weights,
    elementwise_loss,
    huber_threshold,
    loss_weights,
    sample_noise,
    sample_timesteps,
    snr,
    training_target,
)
from sdxl_ff.runtime.tensors import from_host


@dataclass
class StepOutput:
    prediction: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    latents: torch.Tensor
    noisy_latents: torch.Tensor
    loss_per_sample: torch.Tensor  # unweighted MSE per sample, fp32 (mask-weighted when the batch has masks)
    mask: torch.Tensor | None = None  # the latent-grid loss mask [B, 1, h, w], or None

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
    noise = from_host(shard.randn(tuple(mean.shape), generator), mean.device).to(mean.dtype)
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
            noise_offset: float = 0.0, shard: Shard = SINGLE, sampling: TimestepSampling = UNIFORM,
            input_perturbation: float = 0.0, device: torch.device | None = None) -> StepOutput:
    """Encode (or take cached latents/embeddings), noise, run the UNet; `timesteps`/`noise` may be given.

    `input_perturbation` γ noises the input with ε + γ·z (z ~ N(0, 1)) while the target keeps ε
    (Ning et al. 2023, as diffusers' train_text_to_image.py). Pass `device` (the UNet's) in the training loop:
    diffusers' `unet.device` walks every submodule (about 5 ms per step on SDXL's UNet).
    """
    device = unet.device if device is None else device
    latents = to_device(batch_latents(vae, batch, generator, device, shard), device).to(torch.float32)
    if noise is None:
        noise = sample_noise(latents, generator, noise_offset, shard)
    if timesteps is None:
        scale = 2 ** (len(vae.config.block_out_channels) - 1)  # latent → pixel size, for the resolution shift
        timesteps = sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, generator, shard=shard,
                                     sampling=sampling, pixels=(latents.shape[2] * scale, latents.shape[3] * scale))
    timesteps = from_host(timesteps, device)
    noised_with = noise
    if input_perturbation > 0:
        perturbation = from_host(shard.randn(tuple(latents.shape), generator), noise.device).to(noise.dtype)
        noised_with = noise + input_perturbation * perturbation
    noisy = scheduler.add_noise(latents, noised_with, timesteps)
    if "prompt_embeds" in batch:  # text-embedding cache
        prompt_embeds = to_device(batch["prompt_embeds"], device)
        pooled = to_device(batch["pooled_prompt_embeds"], device)
    else:
        prompt_embeds, pooled = encode_prompts(batch["caption"], tokenizers, text_encoders, device)
    added = {"text_embeds": pooled,
             "time_ids": from_host(time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"]),
                                   device)}
    prediction = unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added).sample
    target = training_target(scheduler, latents, noise, timesteps)
    mask = to_device(batch["mask"], device) if "mask" in batch else None
    loss = masked_mse(prediction.float(), target.float(), mask)
    return StepOutput(prediction, target, timesteps, noise, latents, noisy, loss, mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of an element-wise loss; with a latent-grid mask [B, 1, h, w] in [0, 1], the mask-weighted
    mean divided by the mask's mean, so a half-masked image gets a full sample's weight (an all-zero mask gives
    0, not NaN)."""
    if mask is None:
        return values.mean(dim=(1, 2, 3))
    coverage = mask.mean(dim=(1, 2, 3))
    return (values * mask).mean(dim=(1, 2, 3)) / coverage.clamp_min(torch.finfo(coverage.dtype).tiny)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE, masked as `masked_mean` says."""
    return masked_mean(F.mse_loss(prediction, target, reduction="none"), mask)


@dataclass(frozen=True)
class LossWeighting:
    """The loss and its per-sample weights: loss type (huber/smooth_l1 with a threshold schedule), Min-SNR-γ,
    min-sigma (see `diffusion.loss_weights`) and debiased estimation."""
    prediction_type: str
    snr_gamma: float | None = None
    min_sigma: float | None = None
    min_sigma_warmup_steps: int = 0
    loss_type: str = "mse"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    debiased: bool = False

    def __str__(self) -> str:
        parts = [f"Min-SNR-γ {self.snr_gamma:g}"] if self.snr_gamma is not None else []
        if self.min_sigma is not None:
            parts.append(f"min_sigma {self.min_sigma:g} (SNR clamped at {self.min_sigma**-2:g}) "
                         f"after {self.min_sigma_warmup_steps} steps")
        if self.debiased:
            parts.append("debiased estimation")
        return ", ".join(parts) or "none"

    @property
    def loss_name(self) -> str:
        if self.loss_type in ("huber", "smooth_l1"):
            return f"{self.loss_type} (huber_c {self.huber_c:g}, {self.huber_schedule} schedule)"
        return self.loss_type

    def sample_losses(self, out: StepOutput, scheduler: DDPMScheduler) -> torch.Tensor:
        """The unweighted per-sample loss of this loss type (for MSE the one `predict` computed)."""
        if self.loss_type == "mse":
            return out.loss_per_sample
        threshold = None
        if self.loss_type in ("huber", "smooth_l1"):
            threshold = huber_threshold(out.timesteps, self.huber_schedule, self.huber_c, scheduler.alphas_cumprod,
                                        scheduler.config.num_train_timesteps)
        return masked_mean(elementwise_loss(out.prediction.float(), out.target.float(), self.loss_type, threshold),
                           out.mask)

    def min_sigma_at(self, step: int) -> float | None:
        """min_sigma for optimizer step `step` (1-based): off until the warmup steps have passed."""
        return self.min_sigma if step > self.min_sigma_warmup_steps else None


def weighted_loss(out: StepOutput, scheduler: DDPMScheduler, weighting: LossWeighting, step: int,
                  sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The loss to optimise at optimizer step `step` (1-based): the weighted mean of the per-sample losses.

    `sample_weights` (the batch's `loss_weight`, per source) multiply each sample's loss; the mean stays over
    the batch size, as in sd-scripts: a weight-0 sample contributes no gradient.
    """
    min_sigma = weighting.min_sigma_at(step)
    losses = weighting.sample_losses(out, scheduler)
    if sample_weights is not None:
        losses = losses * to_device(sample_weights, losses.device)
    if weighting.snr_gamma is None and min_sigma is None and not weighting.debiased:
        return losses.mean()
    snr_values = snr(scheduler.alphas_cumprod, out.timesteps)
    weights = loss_weights(snr_values, weighting.prediction_type, weighting.snr_gamma, min_sigma)
    if weighting.debiased:
        weights = weights * debiased_weights(snr_values, weighting.prediction_type)
    return (losses * weights.to(losses.device)).mean()


def training_objective(t: TrainingConfig, prediction_type: str) -> tuple[LossWeighting, TimestepSampling]:
    """The loss weighting and the timestep sampling that the `training.*` keys describe (their range against the
    scheduler's timesteps is checked by config_rules.scheduler_timestep_errors)."""
    weighting = LossWeighting(prediction_type, t.snr_gamma, t.min_sigma, t.min_sigma_warmup_steps, t.loss_type,
                              0.1 if t.huber_c is None else t.huber_c, t.huber_schedule or "snr",
                              t.debiased_estimation)
    sampling = TimestepSampling(t.timestep_sampling, t.logit_mean, t.logit_std, t.mode_scale, t.min_timestep,
                                t.max_timestep, t.timestep_shift)
    return weighting, sampling
