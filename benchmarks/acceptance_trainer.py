"""gpu_acceptance.py's trainer row: `train_sdxl_ff.train` in this process on synthetic images with the latent cache,
on the random full-size SDXL (its real component configs, tests/reference/sdxl_base_configs, built on the device:
nothing downloaded) or the built-in tiny one, in the same mode and batch as a bare-step row it is divided by."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from bench_memory import trainer_seconds_per_step
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdxl_ff.data.synthetic import write_sample_set
from sdxl_ff.model import parts as models
from sdxl_ff.model.parts import configure_inference_scheduler

ROOT = Path(__file__).resolve().parent.parent
SDXL_CONFIGS = ROOT / "tests" / "reference" / "sdxl_base_configs"  # SDXL base 1.0's component configs


def random_full_size_sdxl(device: str) -> models.SDXLParts:
    """SDXL base 1.0's architecture with random weights, initialised on `device` (seconds on a GPU). The tiny
    tokenizers are used: their ids lie inside CLIP's vocabulary, and speed does not depend on the words."""
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIGS / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_CONFIGS / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder_2"))
    return models.SDXLParts(unet, vae, text_encoder, text_encoder_2, models.tiny_tokenizer(),
                            models.tiny_tokenizer(pad_token="!"), EulerDiscreteScheduler(**models.SDXL_SCHEDULE))


@contextlib.contextmanager
def full_size_model(device: str) -> Iterator[None]:
    """The trainer loads the random full-size SDXL instead of `model.id` (as load_configured_model would)."""
    def load(cfg, model_id=None):
        parts = random_full_size_sdxl(device)
        t = cfg.training
        parts.scheduler = configure_inference_scheduler(parts.scheduler, t.prediction_type, t.zero_terminal_snr)
        return parts

    with mock.patch.object(models, "load_configured_model", load):
        yield


def trainer_step_s(overrides: dict[str, str], *, full_size: bool, device: str, resolution: int, batch: int,
                   checkpointing: bool, steps: int) -> float:
    """The trainer's seconds per step: `steps` steps on 12 synthetic images at `resolution`, latents cached."""
    with tempfile.TemporaryDirectory() as work:
        images, cache = Path(work) / "images", Path(work) / "cache"  # nothing is written into the current folder
        write_sample_set(images, count=12, width=resolution, height=resolution)
        settings = {"device": device, "model.id": "builtin:tiny-sdxl", "model.train_text_encoder_1": "false",
                    "model.train_text_encoder_2": "false", "data.image_dir": str(images), "data.size": str(resolution),
                    "data.latent_cache.cache_dir": str(cache / "latents"),
                    "data.text_embedding_cache.cache_dir": str(cache / "text_embeddings"),
                    "data.image_index_path": str(cache / "image_index.json"),
                    "data.latent_cache.enabled": "true", "data.num_workers": "0", "training.batch_size": str(batch),
                    "training.grad_accum_steps": "1", "training.max_grad_norm": "null",
                    "optimizer.type": "adamw8bit", "model.use_gradient_checkpointing": str(checkpointing).lower(),
                    **overrides}
        with full_size_model(device) if full_size else contextlib.nullcontext():
            return trainer_seconds_per_step(ROOT / "config.json", steps, [f"{k}={v}" for k, v in settings.items()])
