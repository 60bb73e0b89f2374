"""Loss masks: which pixels of an image matter. Read from `<stem>_mask.png` or the image's alpha channel,
checked at start-up, cropped like the image (the dataset applies the image's own resize and crop), and
averaged down to the latent grid (H/8 x W/8), where it multiplies the per-pixel loss (`step.masked_mse`).

White (255) trains fully, black (0) not at all, grey in between: kohya sd-scripts' and OneTrainer's convention.
A 16-bit grey mask is scaled by its range as images are (images.scaled_grey: 30000/65535 is 117/255), not clipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from sdxl_ff.data.images import scaled_grey

if TYPE_CHECKING:
    import torch

MASK_SUFFIX = "_mask"
LATENT_FACTOR = 8  # the SDXL VAE halves the image three times
# how a mask file's pixels become weights; part of a cached latent's key, so entries built by an older reading
# (16-bit masks clipped, a mask's own alpha ignored) are rebuilt, not reused
READING = 2


def mask_path(image: Path) -> Path:
    """Where an image's mask file lives: `<stem>_mask.png` beside it."""
    return image.with_name(f"{image.stem}{MASK_SUFFIX}.png")


def is_mask_file(path: Path) -> bool:
    """A `<stem>_mask.png` file: a mask, not a training image (in a source with masks)."""
    return path.suffix.lower() == ".png" and path.stem.endswith(MASK_SUFFIX)


def _displayed_size(im: Image.Image) -> tuple[int, int]:
    rotated = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap width/height
    return (im.height, im.width) if rotated else im.size


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def mask_problem(image: Path, width: int, height: int, from_alpha: bool, alpha: bool) -> str | None:
    """Why the mask of `image` (width x height as displayed) cannot be used, or None when it can."""
    if from_alpha:
        if not alpha:
            return (f"{image}: has no alpha channel, but its source sets mask_from_alpha: true; "
                    f"save it with transparency, or use a {image.stem}{MASK_SUFFIX}.png file (masks without "
                    f"mask_from_alpha)")
        return None
    path = mask_path(image)
    if not path.is_file():
        return f"{image}: its mask {path.name} is missing (the source sets masks: true; white = train, black = ignore)"
    try:
        with Image.open(path) as im:
            size = _displayed_size(im)
    except Exception as e:  # PIL raises many types for broken files
        return f"{path}: not a readable mask image ({type(e).__name__}: {e})"
    if size != (width, height):
        return (f"{path}: the mask is {size[0]}x{size[1]} but its image {image.name} is {width}x{height}; a mask "
                f"must have its image's size")
    return None


def load_mask(image: Path, from_alpha: bool) -> Image.Image:
    """The mask as an 8-bit grey image ("L"), EXIF rotation applied like the image's."""
    if from_alpha:
        with Image.open(image) as im:
            im = ImageOps.exif_transpose(im)
            return im.convert("RGBA").getchannel("A")
    with Image.open(mask_path(image)) as im:
        return mask_weights(ImageOps.exif_transpose(im))


def mask_weights(mask: Image.Image) -> Image.Image:
    """A mask file's pixels as 8-bit grey weights: 16-bit and float grey scaled by their range, colour by
    luminance, and a transparent pixel weighs grey x alpha (transparent = not trained).

    The mask's own alpha is used, not dropped: sd-scripts and OneTrainer read only a mask's colour, but the
    colour an editor stores under fully transparent pixels is arbitrary (white in some, black in others), so a
    mask painted as strokes on a transparent layer would train its empty part in one editor and not in another;
    the alpha says what was painted. A fully opaque alpha (what many editors write) changes nothing, so a mask
    that worked in sd-scripts weighs the same here.
    """
    if (grey := scaled_grey(mask)) is not None:  # these modes have no alpha
        return grey
    if not has_alpha(mask):
        return mask.convert("L")
    rgba = mask.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.uint32)
    grey = np.asarray(rgba.convert("L"), dtype=np.uint32)  # RGBA -> L takes the colour only
    return Image.fromarray(((grey * alpha + 127) // 255).astype(np.uint8))  # rounded grey * alpha / 255


def to_latent_grid(mask: Image.Image) -> torch.Tensor:
    """A cropped mask (target size) as float32 [1, H/8, W/8] in [0, 1]: each latent cell the mean of its pixels."""
    import torch  # here: the start-up checks above run in dataset.py's torch-free description
    import torch.nn.functional as F

    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    h, w = pixels.shape[-2:]
    return F.interpolate(pixels, size=(h // LATENT_FACTOR, w // LATENT_FACTOR), mode="area")[0]
