"""Images with same-stem `.txt` captions, caption augmentation, sizes, one-resolution batches.

Each sample carries SDXL's micro-conditioning describing exactly what was done to it:
the original size, the crop's top-left corner in the resized image, and the target size.

Randomness per sample (caption dropout/shuffle, random crop) comes from a `random.Random`
seeded by (seed, epoch, index): the same run seed gives the same captions and crops whatever
the number of DataLoader workers and wherever a resumed run starts. The batch sampler hands
the epoch to the dataset by yielding (epoch, index) pairs.

Bad input policy: an image that cannot be read, or has no caption file, stops the run at
start-up with the list of files, unless `data.skip_bad_images` is true, in which case each
such file is skipped with a warning. An image that breaks later (e.g. changed on disk) stops
the run with its path.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# bitsandbytes (imported by diffusers) warns at import that an optional CPU kernel package is missing: not needed.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.schema import Config
from sdxl_ff.config.sources import CaptionSettings as CaptionAugment
from sdxl_ff.config.sources import Source
from sdxl_ff.data import latent_cache, masks, sources, text_cache
from sdxl_ff.data.batch_sampler import SameSizeBatchSampler
from sdxl_ff.data.buckets import HW, CoverCrop, bucket_stats, cover_crop, limit_longest_side, resolution_key
from sdxl_ff.data.captions import augment_caption, possible_captions, shuffled_variant, with_prefix
from sdxl_ff.data.image_index import drop_entry, stat_key
from sdxl_ff.data.images import DEFAULT_MAX_PIXELS, open_image, to_rgb
from sdxl_ff.data.records import DataError, ImageRecord, split_records
from sdxl_ff.data.scan import batch_sizes, scan_sources, target_size_rule

# re-exported: the no-bucket size rule, the caption functions and the batch sampler belong to the data API
__all__ = ["CaptionAugment", "SameSizeBatchSampler", "augment_caption", "limit_longest_side", "possible_captions",
           "shuffled_variant", "with_prefix"]

log = logging.getLogger(__name__)


def apply_crop(image: Image.Image, plan: CoverCrop) -> Image.Image:
    """Resize (Lanczos) and crop as `plan` says."""
    if plan.resized != (image.height, image.width):
        image = image.resize((plan.resized[1], plan.resized[0]), Image.Resampling.LANCZOS)
    th, tw = plan.target
    return image.crop((plan.left, plan.top, plan.left + tw, plan.top + th))


def load_image(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image as 8-bit RGB (16-bit scaled, sdxl_ff/data/images.py) with its EXIF rotation applied; DataError
    naming the file if it broke after the scan."""
    try:
        with open_image(path, max_pixels) as im:
            return to_rgb(ImageOps.exif_transpose(im))
    except Exception as e:
        raise DataError(f"{path}: could not be read during training ({type(e).__name__}: {e})") from e


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB image to a float16 tensor [3, H, W] in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float16)


# --------------------------------------------------------------------------- per-sample randomness

def sample_rng(seed: int, epoch: int, index: int, repeat: int = 0) -> random.Random:
    """The random stream of one sample in one epoch; string seeds are hashed (SHA-512), not PYTHONHASHSEED.

    Each repeat of an image (data.datasets[].repeats) has its own stream; repeat 0 keeps the one-source stream.
    """
    return random.Random(f"sdxl-ff/{seed}/{epoch}/{index}" + (f"/{repeat}" if repeat else ""))


# --------------------------------------------------------------------------- dataset

@dataclasses.dataclass(frozen=True)
class CachedEntries:
    """What a dataset reads instead of its images and captions (sdxl_ff/data/caches.py builds them): the latent
    cache's entry of each record, and the text cache's entry of each caption the run can draw."""
    latents: tuple[Path, ...] | None = None
    text: Mapping[str, Path] | None = None


class CaptionedImageDataset(Dataset):
    """Samples: pixels (fp16) or cached latents, caption (or cached embeddings), micro-conditioning, path;
    with `sources`, also each sample's loss weight (when a source's differs from 1) and its latent-grid mask
    (when a source has masks; all ones for the others).

    An index is `i`, `(epoch, i)` or `(epoch, i, repeat)`; epoch and repeat feed the per-sample randomness.
    With `sources`, each record's caption settings are its source's (`captions` is then not used).
    `target_size` is each record's training size, or the rule that gives it. The cache entries come with the
    construction (`entries`, or `with_entries` for the same samples read from the caches); they cannot be set later.
    """

    def __init__(self, records: list[ImageRecord], target_size: Callable[[ImageRecord], HW] | Sequence[HW],
                 captions: CaptionAugment | None = None, seed: int = 0, random_crop: bool = False,
                 sources: list[Source] | None = None, *, held_out: Sequence[ImageRecord] = (),
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, caption_variants: int = 0,
                 entries: CachedEntries = CachedEntries()):
        self.records = records
        self.sizes = [target_size(r) for r in records] if callable(target_size) else list(target_size)
        if len(self.sizes) != len(records):
            raise ValueError(f"{len(self.sizes)} training sizes for {len(records)} records")
        self.captions = captions
        self.seed = seed
        self.random_crop = random_crop
        self.sources = sources or []
        self.with_masks = any(s.masks for s in self.sources)
        self.weighted = any(s.loss_weight != 1 for s in self.sources)
        self.held_out = list(held_out)  # images kept for validation.split, never trained on
        self.max_pixels = max_pixels  # data.max_image_pixels
        self.caption_variants = caption_variants  # with the text cache: pre-drawn shuffle orders per caption
        if entries.latents is not None and len(entries.latents) != len(records):
            raise ValueError(f"{len(entries.latents)} latent cache entries for {len(records)} records")
        self._entries = entries

    @property
    def entries(self) -> CachedEntries:
        return self._entries

    @property
    def latent_entries(self) -> tuple[Path, ...] | None:
        """The latent cache's entry of each record, or None: the images are read."""
        return self._entries.latents

    @property
    def text_entries(self) -> Mapping[str, Path] | None:
        """The text cache's entry of each caption, or None: captions are encoded live."""
        return self._entries.text

    def with_entries(self, entries: CachedEntries) -> CaptionedImageDataset:
        """The same samples (records, sizes, caption settings) read from `entries`: a new dataset built with them."""
        return CaptionedImageDataset(list(self.records), self.sizes, self.captions, self.seed, self.random_crop,
                                     self.sources, held_out=self.held_out, max_pixels=self.max_pixels,
                                     caption_variants=self.caption_variants, entries=entries)

    def __len__(self) -> int:
        return len(self.records)

    def mask_mode(self, index: int) -> str:
        """How record `index` is masked: "" (not), "files" (<stem>_mask.png) or "alpha"."""
        source = self.sources[self.records[index].source] if self.sources else None
        return ("alpha" if source.mask_from_alpha else "files") if source and source.masks else ""

    def _mask(self, index: int, crop: CoverCrop) -> torch.Tensor:
        mode, (h, w) = self.mask_mode(index), crop.target
        if not mode:
            return torch.ones(1, h // masks.LATENT_FACTOR, w // masks.LATENT_FACTOR)
        record = self.records[index]
        try:
            mask = masks.load_mask(record.path, from_alpha=mode == "alpha")
        except Exception as e:
            raise DataError(f"{record.path}: its mask could not be read during training ({type(e).__name__}: "
                            f"{e})") from e
        return masks.to_latent_grid(apply_crop(mask, crop))

    def __getitem__(self, key: int | tuple[int, ...]) -> dict:
        epoch, index, repeat = (*key, 0)[:3] if isinstance(key, tuple) else (0, key, 0)
        record, size = self.records[index], self.sizes[index]
        rng = sample_rng(self.seed, epoch, index, repeat)
        if self.latent_entries is None:  # opened before the crop: an image index may have had its size wrong
            # a size read at the scan is the limit (the file must not grow); an indexed one is not checked yet
            image = load_image(record.path, self.max_pixels if record.indexed else record.width * record.height)
            if image.size != (record.width, record.height):
                record = self._size_from_file(index, image.size)
        crop = cover_crop(record.width, record.height, size, rng if self.random_crop else None)
        sample = {"original_size": torch.tensor([record.height, record.width]),
                  "crop_top_left": torch.tensor([crop.top, crop.left]),
                  "target_size": torch.tensor(list(size)), "path": str(record.path)}
        if self.latent_entries is not None:
            tensors = latent_cache.read_tensors(self.latent_entries[index])
            sample["latent_mean"], sample["latent_std"] = tensors["mean"], tensors["std"]
            if self.with_masks:
                sample["mask"] = tensors["mask"].float()
        else:
            sample["pixels"] = to_pixels(apply_crop(image, crop))
            if self.with_masks:
                sample["mask"] = self._mask(index, crop)
        captions = self.sources[record.source].captions if self.sources else self.captions
        caption = record.caption if captions is None else augment_caption(record.caption, captions, rng,
                                                                          self.caption_variants, self.seed)
        caption = with_prefix(caption, captions.prefix, captions.separator) if captions is not None else caption
        sample["caption"] = caption
        if self.weighted:
            sample["loss_weight"] = torch.tensor(self.sources[record.source].loss_weight, dtype=torch.float32)
        if self.text_entries is not None:
            sample["prompt_embeds"], sample["pooled_prompt_embeds"] = text_cache.read_entry(self.text_entries[caption])
        return sample

    def _size_from_file(self, index: int, size: tuple[int, int]) -> ImageRecord:
        """Record `index` with the `size` its file has: the image index had it wrong (the entry is dropped, and the
        image trains at the resolution chosen for it), or the file changed during the run (DataError)."""
        record = self.records[index]
        if record.indexed is None or stat_key(record.path) != record.indexed.stat:
            raise DataError(f"{record.path}: is {size[0]}x{size[1]} now, {record.width}x{record.height} at "
                            f"start-up; it changed during the run, restart it")
        drop_entry(record.indexed)
        (h, w) = self.sizes[index]
        log.warning("%s: is %dx%d, but the image index %s said %dx%d; the entry is dropped (the next start-up reads "
                    "the file) and this run trains it at %dx%d, the resolution chosen from the wrong size",
                    record.path, size[0], size[1], record.indexed.index_file, record.width, record.height, w, h)
        self.records[index] = record = dataclasses.replace(record, width=size[0], height=size[1], indexed=None)
        return record

    def drawable_captions(self) -> tuple[set[str], set[str]]:
        """(each image's caption as written, prefix applied; every caption the run can draw, those included)."""
        written, drawn = set(), set()
        for record in self.records:
            aug = self.sources[record.source].captions if self.sources else self.captions
            if aug is None:
                written.add(record.caption)
                continue
            written.add(with_prefix(record.caption, aug.prefix, aug.separator))
            drawn |= possible_captions(record.caption, aug, self.caption_variants, self.seed)
        return written, written | drawn


def collate(samples: list[dict]) -> dict:
    """Stack the tensors of one-resolution samples; keep captions and paths as lists."""
    return {key: [s[key] for s in samples] if isinstance(value, str) else torch.stack([s[key] for s in samples])
            for key, value in samples[0].items()}


# --------------------------------------------------------------------------- wiring (config -> data)

def warn_upscaled(records: list[ImageRecord], sizes: list[HW]) -> list[ImageRecord]:
    """Name the images smaller than their training size (they are upscaled, as sd-scripts and OneTrainer do)."""
    small = [(r, size) for r, size in zip(records, sizes, strict=True) if r.width < size[1] or r.height < size[0]]
    if small:
        shown = ", ".join(f"{r.path} ({r.width}x{r.height} -> {w}x{h})" for r, (h, w) in small[:5])
        log.warning("%d image(s) are smaller than their training size and are upscaled (blurrier than the rest; "
                    "replace them or leave them out): %s%s", len(small), shown,
                    f" and {len(small) - 5} more" if len(small) > 5 else "")
    return [r for r, _ in small]


def hold_out(records: list[ImageRecord], run_sources: list[Source],
             cfg: Config) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training, held-out) records: validation.split holds out that fraction of each source, never trained on."""
    v = cfg.validation
    kept, held = [], []
    for i, source in enumerate(run_sources):
        train_part, held_part = split_records([r for r in records if r.source == i], v.split if v.enabled else None,
                                              v.seed, source.image_dir)
        kept += train_part
        held += held_part
    return kept, held


def caption_variants(cfg: Config) -> int:
    """Pre-drawn shuffle orders per caption: data.text_embedding_cache.variants when the text cache is used (a
    shuffle picks one, so the cache holds every caption the run can draw), else 0 (shuffles drawn freely)."""
    d, m = cfg.data, cfg.model
    used = d.text_embedding_cache.enabled and \
        text_cache.refusal_reason(m.train_text_encoder_1, m.train_text_encoder_2) is None
    return d.text_embedding_cache.variants if used else 0


def build_data(cfg: Config, seed: int, num_processes: int,
               process_index: int = 0) -> tuple[CaptionedImageDataset, SameSizeBatchSampler]:
    """Scan images, choose each one's training size, and batch them one resolution at a time.

    The dataset reads the images; caches.prepare_caches gives the one that reads the caches instead."""
    d = cfg.data
    run_sources, records = scan_sources(cfg)
    records, held_out = hold_out(records, run_sources, cfg)
    train_set = CaptionedImageDataset(records, target_size_rule(cfg), None, seed, d.random_crop, run_sources,
                                      held_out=held_out, max_pixels=d.max_image_pixels,
                                      caption_variants=caption_variants(cfg))
    warn_upscaled(records, train_set.sizes)
    if problem := sources.samples_problem(run_sources, [sum(r.source == i for r in records)
                                                        for i in range(len(run_sources))]):
        raise ConfigError(problem)
    default_batch, per_size, drop_last = batch_sizes(cfg)
    sampler = SameSizeBatchSampler(train_set.sizes, default_batch, seed, drop_last, per_size,
                                   num_replicas=num_processes, rank=process_index,
                                   repeats=[run_sources[r.source].repeats for r in records])
    world = num_processes  # counts below are of global batches: each process takes 1/world of each
    stats = bucket_stats(sampler.resolution_counts(), {hw: n * world for hw, n in per_size.items()},
                         default_batch * world, drop_last or world > 1)
    where = d.image_dir if not d.datasets else f"{len(run_sources)} sources ({len(sampler.units)} samples per epoch)"
    log.info("data: %d images in %s, %d batches per epoch (%s); per resolution:", len(records), where,
             len(sampler), "aspect buckets" if d.bucket.enabled else f"longest side <= {d.size}")
    for s, n in zip(run_sources, Counter(r.source for r in records).values(), strict=True) if d.datasets else ():
        log.info("  source %r: %d images x %d repeats, loss weight %g%s, in %s", s.name, n, s.repeats,
                 s.loss_weight, ", masked" if s.masks else "", s.image_dir)
    for s in stats:
        log.info("  %s: %d images, batch %d per process (effective %d), %d batches per epoch",
                 resolution_key(s.size), s.images, s.batch_size // world,
                 s.batch_size * cfg.training.grad_accum_steps, s.batches)
        if world > 1 and not drop_last and s.images % s.batch_size:
            log.warning("%s: %d images do not fill whole global batches of %d (%d processes share each batch "
                        "equally): %d images per epoch are left out, different ones each epoch",
                        resolution_key(s.size), s.images, s.batch_size, world, s.images % s.batch_size)
        elif s.never_seen:
            log.warning("bucket %s holds %d images, fewer than its batch size %d, and data.bucket.drop_last is "
                        "true: these %d images will never be seen; lower its batch size in "
                        "data.bucket.per_resolution_batch_sizes or set drop_last to false",
                        resolution_key(s.size), s.images, s.batch_size, s.never_seen)
    if len(sampler) == 0:
        raise DataError("no batch can be formed: every bucket holds fewer images than its batch size "
                                 "under data.bucket.drop_last; lower the batch sizes or set drop_last to false")
    return train_set, sampler


def make_loader(cfg: Config, train_set: CaptionedImageDataset, sampler: SameSizeBatchSampler,
                pin_memory: bool) -> DataLoader:
    """Worker processes stay alive across epochs; pinned memory lets the copy to the GPU overlap.

    The loader draws its workers' base seed from its own generator: drawn from the global torch RNG, each
    epoch's iterator would move that stream, and a resumed run (which opens its first epoch again) would
    continue it one draw off the run that saved the state.
    """
    workers = cfg.data.num_workers
    return DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=pin_memory, prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(sampler.seed))
