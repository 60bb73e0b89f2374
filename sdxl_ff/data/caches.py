"""The latent and text-embedding caches in a run: what --cache-only can build, and building them at start-up."""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import Accelerator

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.schema import Config
from sdxl_ff.data import latent_cache, text_cache
from sdxl_ff.data.dataset import CachedEntries, CaptionedImageDataset
from sdxl_ff.model import parts as models
from sdxl_ff.runtime.pause import pause_point

log = logging.getLogger("sdxl_ff")


def check_cache_only(cfg: Config) -> None:
    """--cache-only needs a cache this run can use; say which setting stands in the way."""
    if cfg.data.latent_cache.enabled:
        return
    d, m = cfg.data, cfg.model
    if not d.text_embedding_cache.enabled:
        raise ConfigError("--cache-only: no cache is enabled; set data.latent_cache.enabled and/or "
                          "data.text_embedding_cache.enabled to true")
    if reason := text_cache.refusal_reason(m.train_text_encoder_1, m.train_text_encoder_2):
        raise ConfigError(f"--cache-only: the only enabled cache, data.text_embedding_cache, cannot be used: "
                          f"{reason}")


def prepare_caches(cfg: Config, parts: models.SDXLParts, accelerator: Accelerator, train_set: CaptionedImageDataset,
                   val_set: CaptionedImageDataset | None = None) -> tuple[CaptionedImageDataset,
                                                                          CaptionedImageDataset | None]:
    """Build what is missing in the enabled caches and move unused encoders off; the training (and validation)
    dataset built with their entries (the ones given when no cache is used)."""
    d = cfg.data
    pause_point("caches")  # the models are loaded, nothing is cached yet; tests start two builders from here
    datasets = [dataset for dataset in (val_set, train_set) if dataset is not None]  # the validation images first
    latents = latent_entries(cfg, parts, accelerator, datasets) if d.latent_cache.enabled else [None] * len(datasets)
    text = text_entries(cfg, parts, accelerator, train_set, val_set) if d.text_embedding_cache.enabled else None
    if text is None and not d.latent_cache.enabled:
        return train_set, val_set
    cached = [dataset.with_entries(CachedEntries(entries, text)) for dataset, entries in zip(datasets, latents,
                                                                                            strict=True)]
    return cached[-1], (cached[0] if val_set is not None else None)


def latent_entries(cfg: Config, parts: models.SDXLParts, accelerator: Accelerator,
                   datasets: list[CaptionedImageDataset]) -> list[tuple[Path, ...]]:
    """Each dataset's latent cache entries, built where missing; the VAE then moves to the CPU."""
    d, entries = cfg.data, []
    for dataset in datasets:
        with accelerator.main_process_first():
            report = latent_cache.prepare_latent_cache(
                dataset, parts.vae, d.latent_cache.cache_dir, d.latent_cache.dtype,
                d.latent_cache.build_batch_size, d.num_workers, accelerator.autocast)
        entries.append(tuple(report.entries))
    parts.vae.to("cpu")  # training reads the cache: no VAE pass, no accelerator memory for it
    log.info("latent cache: training from %d cached latents; the VAE is on the CPU", len(entries[-1]))
    return entries


def text_entries(cfg: Config, parts: models.SDXLParts, accelerator: Accelerator, train_set: CaptionedImageDataset,
                 val_set: CaptionedImageDataset | None) -> dict[str, Path] | None:
    """The text cache's entry of every caption the run can draw (and of each validation caption), built where
    missing; both text encoders then move to the CPU. None when a trained encoder rules the cache out."""
    d, m = cfg.data, cfg.model
    if reason := text_cache.refusal_reason(m.train_text_encoder_1, m.train_text_encoder_2):
        log.warning("text-embedding cache not used: %s", reason)
        return None
    written, captions = train_set.drawable_captions()
    empty = int("" in captions and "" not in written)
    log.info("text-embedding cache: %d embeddings for every caption the run can draw: %d captions as written, "
             "%d empty (caption dropout), %d shuffled orders (up to %d per caption, "
             "data.text_embedding_cache.variants)", len(captions), len(written), empty,
             len(captions) - len(written) - empty, d.text_embedding_cache.variants)
    captions |= {r.caption for r in val_set.records} if val_set is not None else set()  # as written
    with accelerator.main_process_first():
        entries = text_cache.prepare_text_cache(
            captions, (parts.tokenizer, parts.tokenizer_2), (parts.text_encoder, parts.text_encoder_2),
            d.text_embedding_cache.cache_dir, accelerator.device, autocast=accelerator.autocast)
    parts.text_encoder.to("cpu")
    parts.text_encoder_2.to("cpu")
    log.info("text-embedding cache: training from %d cached embeddings; both text encoders are on the CPU",
             len(entries))
    return entries
