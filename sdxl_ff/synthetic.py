"""Procedurally drawn, captioned images: the bundled sample set and test data, made without downloads."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
           "white": (245, 245, 245), "black": (15, 15, 15), "orange": (245, 140, 30), "purple": (140, 50, 180)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, foreground: str, background: str, width: int = 256, height: int = 256,
               scale: float = 0.6) -> Image.Image:
    """One flat-colour shape centred on a flat background."""
    image = Image.new("RGB", (width, height), COLOURS[background])
    draw = ImageDraw.Draw(image)
    r = scale * min(width, height) / 2
    cx, cy = width / 2, height / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[foreground])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[foreground])
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[foreground])
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return image


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
