"""Look inside the training forward pass: x_t, the UNet's x0 estimate, the loss and cross-attention maps.

The inspector loads the model and data exactly as `train_sdxl_ff.py` does and runs the trainer's own
`predict` (sdxl_ff/objective/predict.py) for one sample at a chosen timestep, with noise fixed by a seed, under
`torch.no_grad()`. The Gradio UI (`demo_training_flow.py`) only displays what this module returns.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import Attention

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.schema import Config
from sdxl_ff.data.dataset import collate
from sdxl_ff.model import parts as models
from sdxl_ff.model.trainables import own_aligned_storage
from sdxl_ff.objective.predict import predict

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pure maths

def predicted_x0(noisy: torch.Tensor, prediction: torch.Tensor, alphas_cumprod: torch.Tensor,
                 timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Invert x_t = √ᾱ·x0 + √(1−ᾱ)·ε for x0, given the UNet's ε or v = √ᾱ·ε − √(1−ᾱ)·x0."""
    a = alphas_cumprod.to(noisy.device, torch.float64)[timesteps.to(noisy.device)]
    a = a.view(-1, *([1] * (noisy.ndim - 1)))
    x_t, out = noisy.double(), prediction.double()
    if prediction_type == "epsilon":
        x0 = (x_t - (1 - a).sqrt() * out) / a.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
    else:
        raise ValueError(f"prediction type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")
    return x0.to(noisy.dtype)


def normalise(heat: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] (min → 0, max → 1); a constant map becomes all zeros."""
    lo, hi = heat.min(), heat.max()
    return (heat - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat)


def heatmap(maps: torch.Tensor, token_index: int, image_hw: tuple[int, int]) -> torch.Tensor:
    """One token's attention map [h, w] (from maps [tokens, h, w]) upsampled to the image, in [0, 1]."""
    token_map = maps[token_index].float()[None, None]
    return normalise(F.interpolate(token_map, size=image_hw, mode="bilinear", align_corners=False)[0, 0])


def overlay(image: np.ndarray, heat: torch.Tensor, alpha: float = 0.55) -> np.ndarray:
    """Blend a blue (0) → red (1) colouring of `heat` [H, W] over an RGB uint8 image."""
    h = heat.cpu().numpy()[..., None]
    colour = np.concatenate([h, np.zeros_like(h), 1 - h], axis=-1) * 255
    return (image.astype(np.float32) * (1 - alpha) + colour * alpha).round().clip(0, 255).astype(np.uint8)


def to_image(pixels: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] → RGB uint8 [H, W, 3]."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


# --------------------------------------------------------------------------- cross-attention capture

class CrossAttentionCapture:
    """Wraps an attention processor: the output is the wrapped one's; the probabilities are kept.

    The probabilities are recomputed from the same query/key projections with diffusers'
    `Attention.get_attention_scores`, so the UNet's result stays exactly what training computes.
    """

    def __init__(self, inner, store: list[torch.Tensor]):
        self.inner, self.store = inner, store

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if encoder_hidden_states is not None and hidden_states.ndim == 3:
            context = encoder_hidden_states
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(context))
            probs = attn.get_attention_scores(query, key)  # [batch*heads, pixels, tokens]
            batch = hidden_states.shape[0]
            self.store.append(probs.float().view(batch, attn.heads, *probs.shape[1:]).mean(dim=1))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


@contextmanager
def capture_cross_attention(unet: torch.nn.Module):
    """Record the head-averaged probabilities [batch, pixels, tokens] of every `attn2` (cross-attention)."""
    store: list[torch.Tensor] = []
    layers = [m for name, m in unet.named_modules() if name.endswith("attn2") and isinstance(m, Attention)]
    originals = [m.processor for m in layers]
    for module in layers:
        module.set_processor(CrossAttentionCapture(module.processor, store))
    try:
        yield store
    finally:
        for module, processor in zip(layers, originals, strict=True):
            module.set_processor(processor)


def high_resolution_maps(store: list[torch.Tensor], latent_hw: tuple[int, int]) -> torch.Tensor:
    """Average the layers with the most pixels (the highest-resolution ones) → [tokens, h, w] of sample 0."""
    most = max(p.shape[1] for p in store)
    mean = torch.stack([p[0] for p in store if p.shape[1] == most]).mean(dim=0)  # [pixels, tokens]
    lh, lw = latent_hw
    h = round((most * lh / lw) ** 0.5)
    return mean.T.reshape(-1, h, most // h)


# --------------------------------------------------------------------------- the inspector

@dataclass
class FlowView:
    """What one (sample, timestep) looks like inside the training step."""
    index: int
    timestep: int
    loss: float
    input_image: np.ndarray        # the training input after resize/normalisation, as uint8
    noisy_image: np.ndarray        # x_t decoded through the VAE
    x0_image: np.ndarray           # the UNet's x0 estimate decoded through the VAE
    tokens: list[str]              # tokenizer 1's tokens of the caption (with start/end tokens)
    attention: torch.Tensor        # [77, h, w] high-resolution cross-attention per token position
    latents: torch.Tensor
    noise: torch.Tensor
    noisy_latents: torch.Tensor
    prediction: torch.Tensor
    x0_latents: torch.Tensor

    def heatmap(self, token_index: int) -> torch.Tensor:
        return heatmap(self.attention, token_index, self.input_image.shape[:2])

    def overlay(self, token_index: int) -> np.ndarray:
        return overlay(self.input_image, self.heatmap(token_index))


@dataclass
class Inspector:
    """Models (name → parts with their training scheduler) and samples, ready to be looked at."""
    models: dict[str, tuple[models.SDXLParts, DDPMScheduler]]
    sources: dict[str, str]  # name → model.id or folder it was loaded from
    samples: list[dict]
    device: torch.device
    seed: int = 0
    autocast: bool = False  # bf16 autocast, as training runs with model.use_bf16
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_train_timesteps(self) -> int:
        return next(iter(self.models.values()))[1].config.num_train_timesteps

    def sample_labels(self) -> list[str]:
        return [f"{i}: {s['caption'] or '(empty caption)'}" for i, s in enumerate(self.samples)]

    def tokens(self, index: int, model: str | None = None) -> list[str]:
        parts = self.models[model or next(iter(self.models))][0]
        return caption_tokens(parts.tokenizer, self.samples[index]["caption"])

    def view(self, index: int, timestep: int, model: str | None = None) -> FlowView:
        """Run the training step for sample `index` at `timestep`; the noise depends on the sample only."""
        model = model or next(iter(self.models))
        cached = self._cache.get(model)  # the last view per model: a token change needs no new forward pass
        if cached is None or cached.timestep != timestep or cached.index != index:
            cached = self._cache[model] = self._compute(model, index, timestep)
        return cached

    @torch.no_grad()
    def _compute(self, model: str, index: int, timestep: int) -> FlowView:
        parts, scheduler = self.models[model]
        sample = self.samples[index]
        batch = collate([sample])  # a batch of one, built as the trainer's DataLoader builds it
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)  # VAE sample, then noise
        with capture_cross_attention(parts.unet) as store, \
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = predict(parts.unet, parts.vae, (parts.tokenizer, parts.tokenizer_2),
                          (parts.text_encoder, parts.text_encoder_2), scheduler, batch, generator,
                          timesteps=torch.tensor([timestep]), device=self.device)
        x0 = predicted_x0(out.noisy_latents, out.prediction.float(), scheduler.alphas_cumprod, out.timesteps,
                          scheduler.config.prediction_type)
        return FlowView(
            index=index, timestep=timestep, loss=out.loss_per_sample[0].item(), input_image=to_image(sample["pixels"]),
            noisy_image=decode(parts, out.noisy_latents), x0_image=decode(parts, x0),
            tokens=caption_tokens(parts.tokenizer, sample["caption"]),
            attention=high_resolution_maps(store, tuple(out.latents.shape[-2:])).cpu(),
            latents=out.latents.cpu(), noise=out.noise.cpu(), noisy_latents=out.noisy_latents.cpu(),
            prediction=out.prediction.float().cpu(), x0_latents=x0.cpu())


def caption_tokens(tokenizer, caption: str) -> list[str]:
    """The caption's tokens as the UNet sees them at positions 0, 1, ... (start/end tokens included)."""
    ids = tokenizer(caption, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return tokenizer.convert_ids_to_tokens(ids)


@torch.no_grad()
def decode(parts: models.SDXLParts, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents → RGB uint8 image through the VAE, as a pipeline decodes."""
    vae = parts.vae
    pixels = vae.decode((latents / vae.config.scaling_factor).to(vae.device, vae.dtype)).sample
    return to_image(pixels[0])


def pick_indices(count: int, wanted: int) -> list[int]:
    """`wanted` indices spread evenly over `count` samples (all of them when there are fewer)."""
    wanted = min(wanted, count)
    return sorted({i * count // wanted for i in range(wanted)})


def inspector_device(cfg: Config) -> torch.device:
    """The GPU when there is one (unless the config says cpu), else the CPU."""
    return torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


def load_compared(folder: str) -> models.SDXLParts:
    """A trained output folder (a Diffusers SDXL folder), with errors that name --model."""
    if not Path(folder).is_dir():
        raise ConfigError(f"--model {folder!r} is not a folder; give the training.output_dir of a finished run")
    try:
        return models.load_parts(folder)
    except ConfigError as e:
        raise ConfigError(f"--model {folder!r}: {str(e).removeprefix('model.id: ')}") from e


def load_inspector(cfg: Config, num_samples: int = 3, compare_with: str | None = None) -> Inspector:
    """Load the configured model (and optionally a trained output folder) and pick samples like training."""
    from sdxl_ff.data.dataset import build_data  # the trainer's own data path: same sizes and caption transforms

    seed = cfg.training.seed or 0
    train_set, _ = build_data(cfg, seed, num_processes=1)
    indices = pick_indices(len(train_set), num_samples)
    samples = [train_set[i] for i in indices]
    device = inspector_device(cfg)
    dtype = torch.bfloat16 if cfg.model.use_bf16 else torch.float32  # nothing trains here: bf16 halves memory
    sources = {"base": cfg.model.id}
    if compare_with:
        sources["fine-tuned"] = compare_with
    loaded = {}
    for name, source in sources.items():
        if name == "fine-tuned":
            parts = load_compared(source)  # its saved scheduler already has the objective it was trained with
        else:
            parts = models.load_configured_model(cfg)  # as training loads it (config_dir for single files)
        for module in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
            module.requires_grad_(False).eval().to(device, dtype)
            own_aligned_storage(module)  # as training does: a folder's weights sit unaligned in the file's mmap
        loaded[name] = (parts, parts.noise_scheduler())
        log.info("inspector: %s model from %s", name, source)
    log.info("inspector: %d samples (%s), device %s, %s", len(samples), ", ".join(map(str, indices)), device,
             "bf16 autocast" if cfg.model.use_bf16 else "fp32")
    return Inspector(loaded, sources, samples, device, seed=seed, autocast=cfg.model.use_bf16)
