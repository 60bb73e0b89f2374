"""Batches that hold one resolution only, in a seeded order that a resumed run can continue.

The epoch's order is computed in arrays (one permutation of the units, grouped by resolution, cut, the batches
shuffled): an epoch of millions of samples (images x repeats) costs a second, not minutes and gigabytes.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from sdxl_ff.data import sources
from sdxl_ff.data.buckets import HW

log = logging.getLogger("sdxl_ff.data.dataset")  # its messages are the data pipeline's, as before this module


class SameSizeBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches that hold one resolution only, in a seeded order that a resumed run can continue.

    The order of an epoch depends only on (seed, epoch). `start` skips the batches an
    interrupted run already consumed, so resuming continues exactly where it stopped. Each
    batch is a list of (epoch, index) pairs so the dataset knows the epoch of every sample.

    With `repeats` (per image), an epoch holds every image that many times: the sampler orders "units"
    (image, repeat number), and a repeat after the first is yielded as (epoch, index, repeat).
    """

    def __init__(self, sizes: list[HW], batch_size: int, seed: int,
                 drop_last: bool = False, batch_size_for: dict[HW, int] | None = None,
                 num_replicas: int = 1, rank: int = 0, repeats: list[int] | None = None):
        self.sizes = sizes
        self.units = sources.expand_repeats(repeats or [1] * len(sizes))
        self.resolutions = sorted(set(sizes))
        size_ids = {size: k for k, size in enumerate(self.resolutions)}
        self.unit_resolutions = np.array([size_ids[s] for s in sizes], dtype=np.int64)[self.units.images()]
        self.batch_size = batch_size
        self.batch_size_for = batch_size_for or {}
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.start = 0

    @functools.cached_property
    def unit_sizes(self) -> list[HW]:
        """The training size of every unit (for reports and tests; the sampler itself works on arrays)."""
        return [self.resolutions[k] for k in self.unit_resolutions.tolist()]

    def resolution_counts(self) -> dict[HW, int]:
        """How many units (samples of an epoch) have each training size."""
        counts = np.bincount(self.unit_resolutions, minlength=len(self.resolutions)).tolist()
        return dict(zip(self.resolutions, counts, strict=True))

    def _batch_size(self, size: HW) -> int:
        # With several processes a batch is the global batch: every process takes an equal share of it
        return self.batch_size_for.get(size, self.batch_size) * self.num_replicas

    def _keep_partial(self) -> bool:
        # ... so a partial one that cannot be shared equally is dropped
        return not self.drop_last and self.num_replicas == 1

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The units of `epoch` in batch order, and where each batch starts (and the last ends) in them.

        One permutation of the units; then each resolution's units in that order (resolutions sorted), cut into
        batches; the batches shuffled with the same generator. Arrays, not lists: an epoch may hold millions.
        """
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.units), generator=generator).numpy()
        resolution = self.unit_resolutions[order]
        grouped = order[np.argsort(resolution, kind="stable")]  # by resolution, each in the drawn order
        starts, lengths, first = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)], 0
        for size, count in self.resolution_counts().items():
            n = self._batch_size(size)
            whole = count - count % n
            starts.append(np.arange(first, first + whole, n, dtype=np.int64))
            lengths.append(np.full(whole // n, n, dtype=np.int64))
            if whole < count and self._keep_partial():
                starts.append(np.array([first + whole]))
                lengths.append(np.array([count - whole]))
            first += count
        shuffle = torch.randperm(sum(map(len, starts)), generator=generator).numpy()
        begin, length = np.concatenate(starts)[shuffle], np.concatenate(lengths)[shuffle]
        offsets = np.concatenate([[0], np.cumsum(length)]).astype(np.int64)
        return grouped[np.repeat(begin - offsets[:-1], length) + np.arange(offsets[-1])], offsets

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch`, each a list of units (the trainer state keeps them to check a resume)."""
        units, offsets = self._epoch(epoch)
        units, offsets = units.tolist(), offsets.tolist()
        return [units[a:b] for a, b in itertools.pairwise(offsets)]

    def __len__(self) -> int:
        return sum(count // self._batch_size(size) + bool(count % self._batch_size(size) and self._keep_partial())
                   for size, count in self.resolution_counts().items())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        units, offsets = self._epoch(self.epoch)
        for b in range(self.start, len(offsets) - 1):
            batch = units[offsets[b]:offsets[b + 1]].tolist()
            share = len(batch) // self.num_replicas
            yield [self._key(u) for u in batch[self.rank * share:(self.rank + 1) * share]]

    def _key(self, unit: int) -> tuple[int, ...]:
        index, repeat = self.units[unit]
        return (self.epoch, index, repeat) if repeat else (self.epoch, index)

    def state_dict(self, epoch: int, next_batch: int) -> dict:
        """Where the next batch comes from, with the epoch's order so a resume can check it is unchanged."""
        order = self.batches(epoch)
        if next_batch >= len(order):  # the epoch is complete: the next batch is the next epoch's first
            epoch, next_batch, order = epoch + 1, 0, self.batches(epoch + 1)
        return {"seed": self.seed, "epoch": epoch, "next_batch": next_batch, "order": order}

    def check_order(self, state: dict) -> bool:
        """Whether a saved `state_dict` describes this sampler's order; warns when the data changed since."""
        same = state["seed"] == self.seed and self.batches(state["epoch"]) == state["order"]
        if not same:
            log.warning("the images, their sizes or the batch sizes changed since the state was saved: the resumed "
                        "run continues at epoch %d, batch %d of the new order, not the saved one",
                        state["epoch"], state["next_batch"])
        return same
