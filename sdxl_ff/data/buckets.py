"""Aspect-ratio buckets and cover-crops: pure maths on sizes, no pixels.

Sizes are (height, width) tuples inside the code, as torch orders them; the config and the log
write resolutions the way users read them, width first: `[896, 1152]` and `"896x1152"` are
896 wide and 1152 high.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

HW = tuple[int, int]


def resolution_key(hw: HW) -> str:
    """'WxH', as `per_resolution_batch_sizes` and the log write it."""
    return f"{hw[1]}x{hw[0]}"


def bucket_for(width: int, height: int, buckets: list[HW]) -> HW:
    """The bucket (height, width) whose aspect ratio is closest to the image's, in log space.

    Log space makes 2:1 and 1:2 equally far from 1:1; a tie goes to the bucket listed first.
    """
    ratio = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - ratio))


def limit_longest_side(width: int, height: int, size: int, multiple: int = 64) -> HW:
    """Target (height, width) without buckets: longest side at most `size`, sides divisible by `multiple`."""
    scale = min(1.0, size / max(width, height))
    w = max(multiple, int(round(width * scale)) // multiple * multiple)
    h = max(multiple, int(round(height * scale)) // multiple * multiple)
    return h, w


@dataclass(frozen=True)
class CoverCrop:
    """How an image becomes `target`: resize to `resized` (height, width), then crop at (top, left)."""
    resized: HW
    top: int
    left: int
    target: HW


def cover_crop(width: int, height: int, target: HW, rng: random.Random | None = None) -> CoverCrop:
    """Scale to cover `target` keeping the aspect ratio; crop in the centre, or at random with `rng`."""
    th, tw = target
    scale = max(tw / width, th / height)
    rw, rh = max(tw, math.ceil(width * scale - 1e-6)), max(th, math.ceil(height * scale - 1e-6))
    if rng is None:
        top, left = (rh - th) // 2, (rw - tw) // 2
    else:
        top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
    return CoverCrop((rh, rw), top, left, target)


@dataclass(frozen=True)
class BucketStats:
    size: HW
    images: int
    batch_size: int
    batches: int
    never_seen: int  # images no batch ever holds: a bucket smaller than its batch size under drop_last


def bucket_stats(sizes: list[HW] | Mapping[HW, int], batch_size_for: dict[HW, int], default_batch_size: int,
                 drop_last: bool) -> list[BucketStats]:
    """Per resolution: image count, batch size, batches per epoch, images never seen. `sizes`: each image's
    training size, or how many images have each size."""
    counts: Mapping[HW, int] = sizes if isinstance(sizes, Mapping) else Counter(sizes)
    stats = []
    for hw in sorted(counts):
        n, bs = counts[hw], batch_size_for.get(hw, default_batch_size)
        batches = n // bs if drop_last else math.ceil(n / bs)
        stats.append(BucketStats(hw, n, bs, batches, n if drop_last and n < bs else 0))
    return stats
