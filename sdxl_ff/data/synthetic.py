"""Procedurally drawn, captioned images: the bundled sample set and test data, made without downloads."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
           "white": (245, 245, 245), "black": (15, 15, 15), "orange": (245, 140, 30), "purple": (140, 50, 180)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, foreground: str, background: str, width: int = 256, height: int = 256,
               scale: float = 0.6) -> Image.Image:
    """One flat-colour shape centred on a flat background."""
    image = Image.new("RGB", (width, height), COLOURS[background])
    draw_kind(image, shape, width / 2, height / 2, scale * min(width, height) / 2, COLOURS[foreground])
    return image


def draw_kind(image: Image.Image, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    """Draw one flat `shape` of radius `r` centred at (cx, cy) onto `image`."""
    draw = ImageDraw.Draw(image)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def random_colour(rng: random.Random) -> tuple[int, int, int]:
    """Half the time a COLOURS entry (what captions name), else an arbitrary RGB colour."""
    if rng.random() < 0.5:
        return COLOURS[rng.choice(list(COLOURS))]
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def write_sample_set(folder: str | Path, count: int = 12, width: int = 256, height: int = 256) -> list[Path]:
    """Write `count` PNGs with captions like 'a red circle on a blue background'; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    paths = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        foreground = names[(i * 3) % len(names)]
        background = names[(i * 5 + 1) % len(names)]
        if background == foreground:
            background = names[(names.index(background) + 1) % len(names)]
        path = folder / f"{i:03d}_{foreground}_{shape}_on_{background}.png"
        draw_shape(shape, foreground, background, width, height).save(path)
        path.with_suffix(".txt").write_text(f"{_article(foreground)} {foreground} {shape} on "
                                            f"{_article(background)} {background} background\n")
        paths.append(path)
    return paths


def random_shapes(rng: random.Random, size: int = 128) -> Image.Image:
    """A random scene for training/testing an autoencoder: 1-3 flat shapes of random kind, place, size and
    colour on a flat background. Half the colours come from COLOURS (what captions name), half are arbitrary RGB,
    so a model trained on these does not only know the palette. Deterministic for a seeded `rng`."""
    image = Image.new("RGB", (size, size), random_colour(rng))
    for _ in range(rng.randint(1, 3)):
        r = rng.uniform(0.1, 0.4) * size
        cx, cy = rng.uniform(0, size), rng.uniform(0, size)
        kind, fill = rng.choice(SHAPES), random_colour(rng)
        draw_kind(image, kind, cx, cy, r, fill)
    return image


def nearest_colour(rgb: tuple[float, float, float]) -> str:
    """The name of the COLOURS entry nearest `rgb` (Euclidean distance in RGB)."""
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], rgb, strict=True)))


def background_colour(image: Image.Image, border: int = 8) -> str:
    """The named colour of an image's background: the per-channel median of its outer `border`-pixel frame
    (the sample images' shapes never reach it), matched to the nearest COLOURS entry."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    frame = np.concatenate([pixels[:border].reshape(-1, 3), pixels[-border:].reshape(-1, 3),
                            pixels[border:-border, :border].reshape(-1, 3),
                            pixels[border:-border, -border:].reshape(-1, 3)])
    return nearest_colour(tuple(np.median(frame, axis=0)))


def caption_background(caption: str) -> str | None:
    """The background colour a caption like 'a red circle on a green background' names, else None."""
    words = caption.lower().replace(",", " ").split()
    if "background" not in words:
        return None
    before = words[words.index("background") - 1]
    return before if before in COLOURS else None


def grid_background_matches(grid: Image.Image, captions: list[str], width: int, height: int) -> list[bool]:
    """For each cell of an eval grid (evaluation.make_grid's near-square layout of `width` x `height` cells, one
    per caption, in order): does the cell's background colour (background_colour) equal the one its caption names?
    A caption that names no background colour is an error, not a silent miss."""
    import math

    columns = math.ceil(math.sqrt(len(captions)))
    if grid.size != (columns * width, math.ceil(len(captions) / columns) * height):
        raise ValueError(f"grid is {grid.width}x{grid.height}, not {len(captions)} cells of {width}x{height}")
    matches = []
    for n, caption in enumerate(captions):
        wanted = caption_background(caption)
        if wanted is None:
            raise ValueError(f"caption {caption!r} names no background colour from {sorted(COLOURS)}")
        x, y = (n % columns) * width, (n // columns) * height
        matches.append(background_colour(grid.crop((x, y, x + width, y + height))) == wanted)
    return matches
