"""The images of a folder as records: finding them, reading sizes, captions and masks, refusing bad files.

A record is what the data pipeline knows of an image before it decodes the pixels: its path, caption,
size and source. Scanning reads each file's header (or the image index), never the pixels, so 100k-image
folders are scanned in seconds; a broken file stops the scan with its path, or is skipped with a warning
under data.skip_bad_images. `split_records` holds out validation images by a seeded hash of their path.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sdxl_ff.config.errors import ConfigError, UserError
from sdxl_ff.data import masks
from sdxl_ff.data.image_index import ImageIndex, ImageInfo, IndexedSize, list_files, stat_key
from sdxl_ff.data.images import DEFAULT_MAX_PIXELS, TooManyPixels, open_image, pixel_limit_problem

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


class DataError(UserError, ValueError):
    """A problem with the training images or captions; the message names the files."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    width: int
    height: int
    source: int = 0  # index into the run's sources
    # set when the size came from the image index unchecked: the dataset checks it when it opens the image
    indexed: IndexedSize | None = field(default=None, compare=False)


def _read_record(path: Path, mask: str = "", source: int = 0, index: ImageIndex | None = None,
                 index_key: str = "", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 check_index: bool = False) -> ImageRecord:
    caption_path = path.with_suffix(".txt")
    try:  # opened straight away: a stat first would cost a system call per image on large folders
        with open(os.path.splitext(index_key)[0] + ".txt" if index_key else caption_path, "rb") as f:
            caption_bytes = f.read()
    except (FileNotFoundError, IsADirectoryError):
        hint = "; if it is a mask, set masks: true on its source in data.datasets" if masks.is_mask_file(path) else ""
        raise DataError(f"{path}: no caption file {caption_path.name} (create it; an empty file "
                        f"means an empty caption{hint})") from None
    stat = stat_key(index_key) if index is not None else None
    info = index.get(index_key, stat) if index is not None else None
    unchecked = info is not None and not check_index
    if info is None:
        info = _read_header(path, max_pixels, verify=True)
        if index is not None:
            index.put(index_key, stat, info)
    elif check_index or (mask and masks.mask_problem(path, info.width, info.height, mask == "alpha", info.alpha)):
        # a mask that disagrees with an indexed size may be the index's fault: the header decides
        info = _correct_entry(index, index_key, stat, info, _read_header(path, max_pixels, verify=False))
        unchecked = False
    else:
        mask = ""  # its mask was checked against this size just above
        if problem := pixel_limit_problem(info.width, info.height, max_pixels):  # the limit holds for indexed sizes
            raise DataError(f"{path}: {problem}")
    width, height, alpha = info.width, info.height, info.alpha
    if mask and (problem := masks.mask_problem(path, width, height, mask == "alpha", alpha)):
        raise DataError(problem)
    try:
        # -sig: a BOM is no caption text; then read_text's newline handling
        caption = caption_bytes.decode("utf-8-sig").replace("\r\n", "\n").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"{caption_path}: caption is not UTF-8 text ({e})") from e
    return ImageRecord(path, caption, width, height, source, index.indexed(index_key, stat) if unchecked else None)


def _read_header(path: Path, max_pixels: int | None, verify: bool) -> ImageInfo:
    """The displayed size and alpha of the image at `path`; `verify`: check its structure and checksums too."""
    try:
        with open_image(path, max_pixels) as im:  # opened once: the header gives the size, verify() the rest
            if verify:
                im.verify()  # structure and checksums, without decoding every pixel
            width, height = (im.height, im.width) if _rotated(im) else im.size
            return ImageInfo(width, height, masks.has_alpha(im))
    except TooManyPixels as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def _correct_entry(index: ImageIndex, key: str, stat: tuple[int, int], indexed: ImageInfo,
                   actual: ImageInfo) -> ImageInfo:
    if actual != indexed:
        index.put(key, stat, actual)
        index.wrong.append(f"{key}: {indexed.width}x{indexed.height} in the index, {actual.width}x{actual.height} "
                           f"in the file")
    return actual


def _rotated(im: Image.Image) -> bool:
    if im.format == "PNG" and "exif" not in im.info:  # getexif() would decode the whole PNG to look for it
        return False
    return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap width/height


def scan_images(image_dir: str | Path, skip_bad: bool = False, key: str = "data.image_dir", mask: str = "",
                source: int = 0, index: ImageIndex | None = None,
                max_pixels: int | None = DEFAULT_MAX_PIXELS, check_index: bool = False) -> list[ImageRecord]:
    """All images below `image_dir` (sorted, recursive) with their captions and sizes.

    `mask` is "" (no masks), "files" (each image's <stem>_mask.png, not itself an image) or "alpha".
    With `index`, an unchanged image's size comes from it instead of the file (the caller saves the index);
    `check_index` reads each header anyway (not verify()) and corrects an entry that disagrees with it.
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise DataError(f"{key}: {str(image_dir)!r} is not a folder")
    names = [n for n in list_files(root, IMAGE_SUFFIXES) if not (mask == "files" and masks.is_mask_file(Path(n)))]
    absolute_root = str(root.absolute())
    records, problems = [], []
    for name in names:
        try:
            records.append(_read_record(root / name, mask, source, index, os.path.join(absolute_root, name),
                                        max_pixels, check_index))
        except DataError as e:
            problems.append(str(e))
    if problems and not skip_bad:
        raise DataError(f"{len(problems)} bad file(s) in {image_dir} (fix them, or set "
                        f"data.skip_bad_images=true to skip them):\n  - " + "\n  - ".join(problems))
    if index is not None:
        index.forget_missing(absolute_root, {os.path.join(absolute_root, n) for n in names})
    for problem in problems:
        log.warning("skipping %s", problem)
    if not records:
        raise DataError(f"{key}: no usable images (PNG/JPG/WebP with .txt captions) in {image_dir}")
    return records


def split_records(records: list[ImageRecord], fraction: float | None, seed: int,
                  root: str | Path) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training, held-out) records: the round(fraction·N) images (at least 1, at most N − 1) with the smallest
    hash of (seed, path below `root`), so the choice stays with an image when others are added or removed."""
    if not fraction:
        return records, []
    if len(records) < 2:
        raise ConfigError(f"validation.split: {fraction:g}, but {root} holds {len(records)} usable image(s); "
                          f"holding some out needs at least 2 (or set validation.image_dir)")
    count = min(len(records) - 1, max(1, round(fraction * len(records))))

    def rank(record: ImageRecord) -> str:
        relative = Path(record.path).resolve().relative_to(Path(root).resolve()).as_posix()
        return hashlib.sha256(f"{seed}/{relative}".encode()).hexdigest()

    held = set(sorted(range(len(records)), key=lambda i: rank(records[i]))[:count])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
