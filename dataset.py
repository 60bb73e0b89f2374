"""Images with same-stem `.txt` captions, resized for SDXL, batched one resolution at a time.

Each sample carries SDXL's micro-conditioning describing exactly what was done to it:
the original size, the crop's top-left corner in the resized image, and the target size.

Bad input policy: an image that cannot be read, or has no caption file, stops the run at
start-up with the list of files, unless `data.skip_bad_images` is true, in which case each
such file is skipped with a warning. An image that breaks later (e.g. changed on disk) stops
the run with its path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


class DataError(ValueError):
    """A problem with the training images or captions; the message names the files."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    width: int
    height: int


def _read_record(path: Path) -> ImageRecord:
    caption_path = path.with_suffix(".txt")
    if not caption_path.is_file():
        raise DataError(f"{path}: no caption file {caption_path.name} (create it; an empty file "
                        f"means an empty caption)")
    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums, without decoding every pixel
        with Image.open(path) as im:
            width, height = (im.height, im.width) if _rotated(im) else im.size
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    try:
        caption = caption_path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"{caption_path}: caption is not UTF-8 text ({e})") from e
    return ImageRecord(path, caption, width, height)


def _rotated(im: Image.Image) -> bool:
    return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap width/height


def scan_images(image_dir: str | Path, skip_bad: bool = False) -> list[ImageRecord]:
    """All images below `image_dir` (sorted, recursive) with their captions and sizes."""
    root = Path(image_dir)
    if not root.is_dir():
        raise DataError(f"data.image_dir: {str(image_dir)!r} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    records, problems = [], []
    for path in paths:
        try:
            records.append(_read_record(path))
        except DataError as e:
            problems.append(str(e))
    if problems and not skip_bad:
        raise DataError(f"{len(problems)} bad file(s) in {image_dir} (fix them, or set "
                        f"data.skip_bad_images=true to skip them):\n  - " + "\n  - ".join(problems))
    for problem in problems:
        log.warning("skipping %s", problem)
    if not records:
        raise DataError(f"data.image_dir: no usable images (PNG/JPG/WebP with .txt captions) in {image_dir}")
    return records


def limit_longest_side(width: int, height: int, size: int, multiple: int = 64) -> tuple[int, int]:
    """Target (height, width) without buckets: longest side at most `size`, sides divisible by `multiple`."""
    scale = min(1.0, size / max(width, height))
    w = max(multiple, int(round(width * scale)) // multiple * multiple)
    h = max(multiple, int(round(height * scale)) // multiple * multiple)
    return h, w


def resize_and_crop(image: Image.Image, target_hw: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Scale to cover target_hw, centre-crop; return the image and the crop's (top, left)."""
    th, tw = target_hw
    w, h = image.size
    scale = max(tw / w, th / h)
    rw, rh = max(tw, math.ceil(w * scale - 1e-6)), max(th, math.ceil(h * scale - 1e-6))
    if (rw, rh) != (w, h):
        image = image.resize((rw, rh), Image.Resampling.LANCZOS)
    top, left = (rh - th) // 2, (rw - tw) // 2
    return image.crop((left, top, left + tw, top + th)), (top, left)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB image to a float16 tensor [3, H, W] in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float16)


class CaptionedImageDataset(Dataset):
    """Samples: pixels (fp16), caption, SDXL micro-conditioning, path."""

    def __init__(self, records: list[ImageRecord], target_size: Callable[[ImageRecord], tuple[int, int]],
                 caption_transform: Callable[[str, int], str] | None = None):
        self.records = records
        self.sizes = [target_size(r) for r in records]
        self.caption_transform = caption_transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            with Image.open(record.path) as im:
                image = ImageOps.exif_transpose(im).convert("RGB")
        except Exception as e:
            raise DataError(f"{record.path}: could not be read during training ({type(e).__name__}: {e})") from e
        image, (top, left) = resize_and_crop(image, self.sizes[index])
        caption = record.caption
        if self.caption_transform is not None:
            caption = self.caption_transform(caption, index)
        return {
            "pixels": to_pixels(image),
            "caption": caption,
            "original_size": torch.tensor([record.height, record.width]),
            "crop_top_left": torch.tensor([top, left]),
            "target_size": torch.tensor(list(self.sizes[index])),
            "path": str(record.path),
        }


def collate(samples: list[dict]) -> dict:
    batch = {key: torch.stack([s[key] for s in samples]) for key in
             ("pixels", "original_size", "crop_top_left", "target_size")}
    batch["caption"] = [s["caption"] for s in samples]
    batch["path"] = [s["path"] for s in samples]
    return batch


class SameSizeBatchSampler(Sampler[list[int]]):
    """Batches that hold one resolution only, in a seeded order that a resumed run can continue.

    The order of an epoch depends only on (seed, epoch). `start` skips the batches an
    interrupted run already consumed, so resuming continues exactly where it stopped.
    """

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, seed: int,
                 drop_last: bool = False, batch_size_for: dict[tuple[int, int], int] | None = None):
        self.sizes = sizes
        self.batch_size = batch_size
        self.batch_size_for = batch_size_for or {}
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.sizes), generator=generator).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        for index in order:
            groups.setdefault(self.sizes[index], []).append(index)
        batches = []
        for size in sorted(groups):
            members, n = groups[size], self.batch_size_for.get(size, self.batch_size)
            for i in range(0, len(members), n):
                chunk = members[i:i + n]
                if len(chunk) == n or not self.drop_last:
                    batches.append(chunk)
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle]

    def __len__(self) -> int:
        return len(self.batches(0))

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.start:]
