"""Data sources: `data.datasets` (or `data.image_dir` alone) resolved into folders with repeats, loss weights,
masks and their own caption settings; their checks; and the description `dataset.py --config` prints.

A run's samples per epoch are every image of every source, each repeated `repeats` times. The sampler sees
"units" (image index, repeat number); repeat 0 of an image keeps the random stream an image had before sources
existed, so a config with one folder trains exactly as it did.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdxl_ff.config.sources import Source
from sdxl_ff.data.buckets import HW, bucket_stats, resolution_key

# --------------------------------------------------------------------------- samples per epoch

# An epoch's order is drawn, grouped and kept whole in memory (and in every checkpoint's state), 8 to 16 bytes a
# sample while it is drawn: 100 M samples would take gigabytes and minutes per epoch. Far above real data sets
# (1 M images x 10 repeats), far below what a typo like repeats: 1000000000 asks for.
MAX_SAMPLES_PER_EPOCH = 10_000_000


class Units(Sequence):
    """The units of an epoch: (image index, repeat number) for every repeat of every image, in image order,
    computed when asked for (an image's repeats are not listed one by one)."""

    def __init__(self, repeats: list[int]):
        self.repeats = list(repeats)
        self.starts = list(itertools.accumulate(self.repeats, initial=0))  # the first unit of each image

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, unit: int) -> tuple[int, int]:
        if not -len(self) <= unit < len(self):
            raise IndexError(unit)
        unit %= len(self)
        image = bisect.bisect_right(self.starts, unit) - 1
        return image, unit - self.starts[image]

    def images(self) -> np.ndarray:
        """The image index of every unit, as one array."""
        return np.repeat(np.arange(len(self.repeats)), self.repeats)


def expand_repeats(repeats: list[int]) -> Units:
    """The units of an epoch: (image index, repeat number) for every repeat of every image, in image order."""
    return Units(repeats)


def samples_problem(sources: list[Source], images_per_source: list[int]) -> str | None:
    """Why an epoch of these sources (images x repeats) is too large to hold, or None."""
    samples = [n * s.repeats for s, n in zip(sources, images_per_source, strict=True)]
    if sum(samples) <= MAX_SAMPLES_PER_EPOCH:
        return None
    i = max(range(len(sources)), key=samples.__getitem__)
    what = f"{sources[i].key.removesuffix('image_dir')}repeats: {sources[i].repeats} repeats of " \
        if sources[i].key.startswith("data.datasets") else f"{sources[i].key}: "
    return (f"{what}{images_per_source[i]:,} images make {sum(samples):,} samples per epoch; an epoch holds at most "
            f"{MAX_SAMPLES_PER_EPOCH:,} (its order is kept in memory and in every checkpoint): lower the repeats "
            f"(training.num_steps or num_epochs sets how long the run is), or train on a part of the images")


def overlap_warning(paths_per_source: list[list[Path]], sources: list[Source]) -> str | None:
    """The warning when some image belongs to more than one source (allowed: it is then seen in each).

    Folders are resolved once (links, `..`), not each image: resolving 100,000 paths takes seconds.
    """
    if len(sources) < 2:
        return None
    owners: dict[str, list[int]] = {}
    for s, paths in enumerate(paths_per_source):
        root = str(Path(sources[s].image_dir))
        real_root = os.path.realpath(root)
        for path in paths:
            owners.setdefault(real_root + str(path)[len(root):], []).append(s)
    shared = {p: o for p, o in owners.items() if len(o) > 1}
    if not shared:
        return None
    example, where = next(iter(shared.items()))
    return (f"{len(shared)} image(s) belong to more than one source (e.g. {example} in "
            f"{', '.join(repr(sources[s].name) for s in where)}); each is trained once per source and repeat, "
            f"with that source's settings")


@dataclass(frozen=True)
class SourceSummary:
    name: str
    image_dir: str
    images: int
    repeats: int
    samples_per_epoch: int
    loss_weight: float
    masks: str  # "none", "files" (<stem>_mask.png) or "alpha"


def describe_data(sources: list[Source], images_per_source: list[int], sample_sizes: list[HW] | dict[HW, int],
                  default_batch: int, batch_size_for: dict[HW, int], drop_last: bool) -> dict:
    """What one epoch holds, per source and per bucket, as plain JSON data (`dataset.py --json`)."""
    summaries = [SourceSummary(s.name, s.image_dir, n, s.repeats, n * s.repeats, s.loss_weight,
                               ("alpha" if s.mask_from_alpha else "files") if s.masks else "none").__dict__
                 for s, n in zip(sources, images_per_source, strict=True)]
    buckets = [{"resolution": resolution_key(b.size), "width": b.size[1], "height": b.size[0], "samples": b.images,
                "batch_size": b.batch_size, "batches_per_epoch": b.batches, "samples_never_seen": b.never_seen}
               for b in bucket_stats(sample_sizes, batch_size_for, default_batch, drop_last)]
    return {"sources": summaries, "buckets": buckets,
            "images": sum(images_per_source), "samples_per_epoch": sum(b["samples"] for b in buckets),
            "batches_per_epoch": sum(b["batches_per_epoch"] for b in buckets)}


def format_description(info: dict) -> str:
    """`describe_data()` as the tables `dataset.py --config` prints."""
    lines = ["sources:", f"  {'name':<20} {'images':>8} {'repeats':>7} {'samples':>8} {'weight':>7}  masks  folder"]
    for s in info["sources"]:
        lines.append(f"  {s['name']:<20} {s['images']:>8} {s['repeats']:>7} {s['samples_per_epoch']:>8} "
                     f"{s['loss_weight']:>7g}  {s['masks']:<5}  {s['image_dir']}")
    lines += ["buckets:", f"  {'resolution':<11} {'samples':>8} {'batch':>5} {'batches':>8}"]
    for b in info["buckets"]:
        unseen = f"  ({b['samples_never_seen']} never seen: fewer than the batch size)" if b["samples_never_seen"] \
            else ""
        lines.append(f"  {b['resolution']:<11} {b['samples']:>8} {b['batch_size']:>5} {b['batches_per_epoch']:>8}"
                     f"{unseen}")
    lines.append(f"{info['images']} images, {info['samples_per_epoch']} samples and {info['batches_per_epoch']} "
                 f"batches per epoch")
    return "\n".join(lines)


def batches_per_source(batches: list[list[int]], units: list[tuple[int, int]], image_source: list[int],
                       n_sources: int) -> list[int]:
    """How many samples of each source an epoch's batches hold (for checks and tests)."""
    counts = [0] * n_sources
    for batch in batches:
        for unit in batch:
            counts[image_source[units[unit][0]]] += 1
    return counts
