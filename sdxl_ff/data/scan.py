"""What the trainer's data is, without torch: the sources and their images (sizes from the headers or the index),
each image's training size, the batch sizes, and the description `python dataset.py --config CFG` prints."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.schema import Config
from sdxl_ff.config.sources import Source, resolve_sources
from sdxl_ff.data import sources
from sdxl_ff.data.buckets import HW, bucket_for, limit_longest_side
from sdxl_ff.data.image_index import ImageIndex
from sdxl_ff.data.records import ImageRecord, scan_images

log = logging.getLogger("sdxl_ff.data.dataset")  # the data pipeline's messages, as before this module


def target_size_rule(cfg: Config) -> Callable[[ImageRecord], HW]:
    """Each image's training (height, width): its closest-ratio bucket, or its longest side limited to data.size."""
    bucket, size = cfg.data.bucket, cfg.data.size
    if bucket.enabled:
        buckets = [(h, w) for w, h in bucket.resolutions]
        return lambda r: bucket_for(r.width, r.height, buckets)
    return lambda r: limit_longest_side(r.width, r.height, size)


def batch_sizes(cfg: Config) -> tuple[int, dict[HW, int], bool]:
    """(default batch size, batch size per resolution, drop_last): data.bucket.* when buckets are on."""
    bucket = cfg.data.bucket
    if not bucket.enabled:
        return cfg.training.batch_size, {}, False
    per_size = {(int(k.split("x")[1]), int(k.split("x")[0])): n for k, n in bucket.per_resolution_batch_sizes.items()}
    return bucket.batch_size or cfg.training.batch_size, per_size, bucket.drop_last


def scan_sources(cfg: Config) -> tuple[list[Source], list[ImageRecord]]:
    """The run's sources (data.datasets, or data.image_dir alone) and all their images, source by source."""
    d = cfg.data
    run_sources = resolve_sources(d)
    index = ImageIndex(d.image_index_path)
    # a cached latent never reopens its image, so an indexed size is checked against the header now; beside the
    # cache's own start-up work (it hashes every image's bytes) a header read costs little
    per_source = [scan_images(s.image_dir, d.skip_bad_images, s.key, ("alpha" if s.mask_from_alpha else "files")
                              if s.masks else "", source=i, index=index, max_pixels=d.max_image_pixels,
                              check_index=d.latent_cache.enabled)
                  for i, s in enumerate(run_sources)]
    if index.wrong:
        log.warning("image index %s: %d entr%s had a size that is not the image's, e.g. %s; corrected from the "
                    "files", d.image_index_path, len(index.wrong), "y" if len(index.wrong) == 1 else "ies",
                    index.wrong[0])
    index.save()
    if d.image_index_path:
        log.info("image index %s: %d image sizes from the index, %d read from the files", d.image_index_path,
                 index.hits, index.misses)
    if warning := sources.overlap_warning([[r.path for r in rs] for rs in per_source], run_sources):
        log.warning("data.datasets: %s", warning)
    return run_sources, [r for rs in per_source for r in rs]


def describe(cfg: Config) -> dict:
    """Sources, buckets and samples per epoch of `cfg`'s data, as `python dataset.py --config CFG --json` prints."""
    run_sources, records = scan_sources(cfg)
    target = target_size_rule(cfg)
    sizes = [target(r) for r in records]
    default_batch, per_size, drop_last = batch_sizes(cfg)
    images = Counter(r.source for r in records)
    per_source = [images[i] for i in range(len(run_sources))]
    if problem := sources.samples_problem(run_sources, per_source):
        raise ConfigError(problem)
    samples: Counter[HW] = Counter()
    for record, size in zip(records, sizes, strict=True):
        samples[size] += run_sources[record.source].repeats
    return sources.describe_data(run_sources, per_source, samples, default_batch, per_size, drop_last)
