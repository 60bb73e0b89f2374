"""Deterministic validation loss: a progress signal that does not depend on which timesteps a step drew.

Every validation image is noised at each of `validation.timesteps` with noise from a generator
seeded by (validation.seed, image index, timestep), and its latent drawn from the VAE posterior with
a generator seeded by (seed, image index); the loss is the configured loss type, unweighted. So two
evaluations of the same weights give the same number to the last bit. With several processes each
takes every N-th image and the per-image losses are summed over the processes into one table in
which every entry comes from exactly one process (x + 0 = x), so N processes report exactly what
one does. Validation images come from `validation.image_dir`, or are a seeded `validation.split`
of data.image_dir that the training never sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdxl_ff.config.schema import Config
from sdxl_ff.data.dataset import CaptionedImageDataset, collate
from sdxl_ff.data.records import DataError, scan_images
from sdxl_ff.data.scan import target_size_rule

if TYPE_CHECKING:
    from sdxl_ff.objective.predict import LossWeighting
    from sdxl_ff.optim.ema import EMA

log = logging.getLogger(__name__)


def validation_set(cfg: Config, train_set: CaptionedImageDataset) -> CaptionedImageDataset | None:
    """The validation images at their training sizes, without caption augmentation or random crops."""
    v = cfg.validation
    if not v.enabled:
        return None
    records = train_set.held_out if v.image_dir is None else scan_images(v.image_dir, cfg.data.skip_bad_images)
    trained = {Path(r.path).resolve() for r in train_set.records}
    overlap = [r.path for r in records if Path(r.path).resolve() in trained]
    if overlap:
        raise DataError(overlap_message(cfg, len(overlap), overlap[0]))
    dataset = CaptionedImageDataset(records, target_size_rule(cfg))
    log.info("validation: %d images (%s), timesteps %s, every %d steps", len(records), describe_source(cfg),
             v.timesteps, v.every_n_steps)
    return dataset


def describe_source(cfg: Config) -> str:
    """Where the validation images come from, as the start-up line says it."""
    v, d = cfg.validation, cfg.data
    if v.image_dir is not None:
        return v.image_dir
    where = d.image_dir if not d.datasets else f"each of the {len(d.datasets)} sources of data.datasets"
    return f"{v.split:g} of {where}, held out of training"


def overlap_message(cfg: Config, count: int, example: Path) -> str:
    """Why validation images that are also training images are refused, naming the key that was set."""
    v = cfg.validation
    if v.image_dir is not None:
        return (f"validation.image_dir: {count} image(s) are also training images (e.g. {example}); use a folder "
                f"outside the training folders, or validation.split")
    return (f"validation.split: {v.split:g} held out {count} image(s) of one source that another source of "
            f"data.datasets trains on (e.g. {example}): the sources overlap, so the validation loss would be measured "
            f"on trained images; make the data.datasets folders disjoint, or set validation.image_dir to a separate "
            f"folder instead of validation.split")


def draw_seed(*parts: int) -> int:
    """A 63-bit generator seed for a tuple of integers (different tuples, unrelated streams)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def repeat_batch(batch: dict, k: int) -> dict:
    """A collated one-sample batch repeated k times along the batch dimension."""
    return {key: value * k if isinstance(value, list) else value.expand(k, *value.shape[1:])
            for key, value in batch.items()}


class Validator:
    """Evaluates the validation loss every `every_n_steps` optimizer steps (and before the first)."""

    def __init__(self, dataset: CaptionedImageDataset, timesteps: Sequence[int], every_n_steps: int, seed: int,
                 output_dir: str | Path):
        """`timesteps` below the scheduler's count (config_rules.scheduler_timestep_errors checks them)."""
        self.dataset, self.timesteps, self.every, self.seed = dataset, list(timesteps), every_n_steps, seed
        self.record_path = Path(output_dir) / "validation.jsonl"
        self.postfix: dict[str, str] = {}

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step == total_steps

    @torch.inference_mode()
    def image_losses(self, index: int, unet, vae, tokenizers: tuple, text_encoders: tuple, scheduler,
                     weighting: LossWeighting, autocast) -> torch.Tensor:
        """The loss of validation image `index` at each timestep, fp32 on the CPU."""
        from sdxl_ff.objective.predict import batch_latents, predict
        single = collate([self.dataset[index]])
        latents = batch_latents(vae, single, torch.Generator().manual_seed(draw_seed(self.seed, index)), unet.device)
        k = len(self.timesteps)
        noise = torch.stack([torch.randn(tuple(latents.shape[1:]),
                                         generator=torch.Generator().manual_seed(draw_seed(self.seed, index, t)))
                             for t in self.timesteps])
        batch = repeat_batch({**single, "latents": latents.float()}, k)
        with autocast():
            out = predict(unet, vae, tokenizers, text_encoders, scheduler, batch, torch.Generator(),
                          timesteps=torch.tensor(self.timesteps), noise=noise.to(unet.device))
        return weighting.sample_losses(out, scheduler).float().cpu()

    def table(self, parts, scheduler, weighting: LossWeighting, autocast, rank: int, world: int) -> torch.Tensor:
        """[images, timesteps] losses of this process's images (every `world`-th from `rank`), zeros elsewhere."""
        losses = torch.zeros(len(self.dataset), len(self.timesteps))
        modules = [parts.unet, parts.text_encoder, parts.text_encoder_2]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            for index in range(rank, len(self.dataset), world):
                losses[index] = self.image_losses(index, parts.unet, parts.vae, (parts.tokenizer, parts.tokenizer_2),
                                                  (parts.text_encoder, parts.text_encoder_2), scheduler, weighting,
                                                  autocast)
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.train(mode)
        return losses

    def evaluate(self, step: int, parts, scheduler, weighting: LossWeighting, accelerator, ema: EMA | None,
                 tracker) -> dict[str, float]:
        """Validation losses of the trained (and, on the main process, the EMA) weights; logged and recorded."""
        plain = plain_parts(parts, accelerator)
        table = self.table(plain, scheduler, weighting, accelerator.autocast, accelerator.process_index,
                           accelerator.num_processes)
        if accelerator.num_processes > 1:
            table = accelerator.reduce(table.to(accelerator.device), reduction="sum").cpu()
        values = summarise(table, self.timesteps, "")
        if ema is not None and ema.shadow is not None:  # the EMA lives on the main process only
            with ema.applied():
                values |= summarise(self.table(plain, scheduler, weighting, accelerator.autocast, 0, 1),
                                    self.timesteps, "_ema")
        if accelerator.is_main_process:
            tracker.log_scalars(step, values)
            with open(self.record_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
            self.postfix = {"val": f"{values['val/loss']:.4f}"}
        accelerator.wait_for_everyone()
        return values


def summarise(table: torch.Tensor, timesteps: list[int], suffix: str) -> dict[str, float]:
    """val/loss<suffix> (the mean over images and timesteps) and val/loss<suffix>_t<t> per timestep."""
    values = {f"val/loss{suffix}": table.mean().item()}
    for t, column in zip(timesteps, table.mean(dim=0).tolist(), strict=True):
        values[f"val/loss{suffix}_t{t}"] = column
    return values


def describe(values: dict[str, float], step: int) -> str:
    """One progress line: the mean, the EMA's mean if any, and each timestep's loss."""
    per_t = "  ".join(f"t{k.rsplit('_t', 1)[1]} {v:.4f}" for k, v in values.items()
                      if "_t" in k and "_ema" not in k)
    ema = f" (EMA {values['val/loss_ema']:.4f})" if "val/loss_ema" in values else ""
    return f"validation step {step}: loss {values['val/loss']:.4f}{ema}  [{per_t}]"


def plain_parts(parts, accelerator):
    """The SDXL parts with the trained modules unwrapped from DDP and torch.compile (validation runs uncompiled)."""
    from sdxl_ff.model.parts import SDXLParts
    unwrapped = {name: accelerator.unwrap_model(getattr(parts, name), keep_torch_compile=False)
                 for name in ("unet", "text_encoder", "text_encoder_2")}
    return SDXLParts(**{**parts.__dict__, **unwrapped})


def make_validator(cfg: Config, dataset: CaptionedImageDataset | None) -> Validator | None:
    """The run's validator, or None when validation is off."""
    v = cfg.validation
    if dataset is None:
        return None
    return Validator(dataset, v.timesteps, v.every_n_steps, v.seed, cfg.training.output_dir)
