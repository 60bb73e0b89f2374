"""The latent and text-embedding caches in a run: what --cache-only can build, and building them at start-up."""

from __future__ import annotations

import logging

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.schema import Config
from sdxl_ff.data import dataset as data_lib
from sdxl_ff.data import latent_cache, text_cache
from sdxl_ff.model import parts as models

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


def prepare_caches(cfg: Config, parts: models.SDXLParts, train_set: data_lib.CaptionedImageDataset,
                   accelerator, also: tuple[data_lib.CaptionedImageDataset, ...] = ()) -> None:
    """Build what is missing in the enabled caches, point the dataset (and `also`, e.g. the validation images)
    at them, and move unused encoders off."""
    d, m = cfg.data, cfg.model
    if d.latent_cache.enabled:
        for dataset in (*also, train_set):
            with accelerator.main_process_first():
                report = latent_cache.prepare_latent_cache(
                    dataset, parts.vae, d.latent_cache.cache_dir, d.latent_cache.dtype,
                    d.latent_cache.build_batch_size, d.num_workers, accelerator.autocast)
            dataset.latent_entries = report.entries
        parts.vae.to("cpu")  # training reads the cache: no VAE pass, no accelerator memory for it
        log.info("latent cache: training from %d cached latents; the VAE is on the CPU", len(report.entries))
    if d.text_embedding_cache.enabled:
        reason = text_cache.refusal_reason(m.train_text_encoder_1, m.train_text_encoder_2)
        if reason:
            log.warning("text-embedding cache not used: %s", reason)
            return
        train_set.caption_variants = d.text_embedding_cache.variants  # shuffles pick one of these pre-drawn orders
        written, captions = train_set.drawable_captions()
        empty = int("" in captions and "" not in written)
        log.info("text-embedding cache: %d embeddings for every caption the run can draw: %d captions as written, "
                 "%d empty (caption dropout), %d shuffled orders (up to %d per caption, "
                 "data.text_embedding_cache.variants)", len(captions), len(written), empty,
                 len(captions) - len(written) - empty, d.text_embedding_cache.variants)
        captions |= {r.caption for dataset in also for r in dataset.records}  # validation images, as written
        with accelerator.main_process_first():
            train_set.text_entries = text_cache.prepare_text_cache(
                captions, (parts.tokenizer, parts.tokenizer_2), (parts.text_encoder, parts.text_encoder_2),
                d.text_embedding_cache.cache_dir, accelerator.device, autocast=accelerator.autocast)
        for dataset in also:
            dataset.text_entries = train_set.text_entries
        parts.text_encoder.to("cpu")
        parts.text_encoder_2.to("cpu")
        log.info("text-embedding cache: training from %d cached embeddings; both text encoders are on the CPU",
                 len(train_set.text_entries))
