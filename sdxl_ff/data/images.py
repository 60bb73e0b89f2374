"""Any PIL image mode to the 8-bit RGB the VAE was trained on, scaled by the mode's real range.

PIL's own `convert("RGB")` clips high-bit-depth modes instead of scaling them: a 16-bit grey PNG
(`I;16`, 0..65535) becomes pure white above 255. Those modes are scaled here; every other mode
(1, L, P, PA, LA, RGBA, CMYK, YCbCr, ...) is PIL's conversion, which is exact for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# PIL refuses above 2 x Image.MAX_IMAGE_PIXELS (and warns above 1x): the default of data.max_image_pixels
# keeps that refusal limit, so every image that loaded before still loads, now without the warning
DEFAULT_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


class TooManyPixels(ValueError):
    """An image above data.max_image_pixels (a decompression-bomb guard); the message says how to allow it."""


def open_image(path: str | Path, max_pixels: int | None) -> Image.Image:
    """Image.open (the header only) with `max_pixels` (data.max_image_pixels; None: no limit) as the limit.

    PIL's own guard is lifted for this call: its error ("could be decompression bomb DOS attack") names
    neither the key nor the remedy, and it could not honour a limit raised by the user.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        image = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    if problem := pixel_limit_problem(*image.size, max_pixels):
        image.close()
        raise TooManyPixels(problem)
    return image


def pixel_limit_problem(width: int, height: int, max_pixels: int | None) -> str | None:
    """Why a width x height image is refused under data.max_image_pixels (`max_pixels`), or None."""
    if max_pixels is None or width * height <= max_pixels:
        return None
    return (f"{width}x{height} = {width * height} pixels, above the limit data.max_image_pixels ({max_pixels}), a "
            f"guard against decompression bombs; if you trust the file, raise it (--set "
            f"data.max_image_pixels={width * height}) or set it to null")

# 16-bit integer modes hold 0..65535; "I" (32-bit) is what PIL gives 16-bit grey data after integer
# operations, so it is read in the same range; "F" (float) is taken as 0..1, the usual float image range.
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def scaled_grey(image: Image.Image) -> Image.Image | None:
    """A 16-bit or float grey image as 8-bit grey ("L"), scaled by its mode's range; None for every other mode.
    16-bit values keep their high byte (x >> 8: 65535 -> 255, 30000 -> 117), as PIL itself decodes 16-bit
    RGB(A) PNGs; floats are clipped to 0..1 and rounded (NaN is 0)."""
    if image.mode in SIXTEEN_BIT:
        values = np.asarray(image).astype(np.int64)  # native order whatever the mode's byte order
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        return Image.fromarray(np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8))
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB: high-bit-depth grey scaled (`scaled_grey`); alpha is dropped, as PIL's convert does
    (and sd-scripts / OneTrainer)."""
    if image.mode == "RGB":
        return image
    if (grey := scaled_grey(image)) is not None:
        return grey.convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return image.convert("RGB")
