"""The colour check that README's grid description rests on (sdxl_ff.data.synthetic), tested on drawn images."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from PIL import Image

from sdxl_ff.data.synthetic import (
    COLOURS,
    SHAPES,
    background_colour,
    caption_background,
    draw_shape,
    grid_background_matches,
    nearest_colour,
)
from sdxl_ff.eval.evaluation import make_grid

PAIRS = [(f, b) for f, b in itertools.permutations(COLOURS, 2)]


def test_nearest_colour_of_each_palette_entry_is_itself():
    assert all(nearest_colour(rgb) == name for name, rgb in COLOURS.items())


@pytest.mark.parametrize("shape", SHAPES)
def test_background_of_every_drawn_pair(shape):
    """Every foreground/background pair of the palette, at the eval size: the frame, not the shape, decides."""
    for foreground, background in PAIRS:
        assert background_colour(draw_shape(shape, foreground, background, 128, 128)) == background, (foreground,
                                                                                                      background)


def test_background_survives_noise_and_a_shape_touching_the_frame():
    """A sampled image is neither flat nor tidy: Gaussian noise (sigma 30 of 255) and a shape that covers part of
    the frame (a circle of scale 1.0 covers 37 % of the 8-pixel frame) still give the background's name."""
    rng = np.random.default_rng(0)
    for foreground, background in PAIRS:
        drawn = np.asarray(draw_shape("circle", foreground, background, 128, 128, scale=1.0), dtype=np.float64)
        noisy = np.clip(drawn + rng.normal(0, 30, drawn.shape), 0, 255).astype(np.uint8)
        assert background_colour(Image.fromarray(noisy)) == background, (foreground, background)


def test_caption_background():
    assert caption_background("a red circle on a green background") == "green"
    assert caption_background("A purple triangle on a Blue background, centred") == "blue"
    assert caption_background("a red circle") is None
    assert caption_background("a red circle on a teal background") is None  # not a palette colour


def test_grid_background_matches_counts_each_cell():
    """A grid laid out by the real evaluation.make_grid: cells 0 and 3 have the prompted background, 1 and 2 not."""
    captions = ["a red circle on a green background", "a green circle on a red background",
                "a white square on a black background", "a purple triangle on a blue background"]
    drawn = [("red", "green"), ("green", "blue"), ("black", "white"), ("purple", "blue")]
    images = [draw_shape(SHAPES[i % 3], f, b, 128, 128) for i, (f, b) in enumerate(drawn)]
    assert grid_background_matches(make_grid(images), captions, 128, 128) == [True, False, False, True]


def test_grid_background_matches_odd_count_and_size():
    """5 cells of 96x64 in make_grid's 3x2 layout (one empty cell); every cell matches."""
    rng = random.Random(5)
    pairs = rng.sample(PAIRS, 5)
    images = [draw_shape("square", f, b, 96, 64) for f, b in pairs]
    captions = [f"a {f} square on a {b} background" for f, b in pairs]
    assert grid_background_matches(make_grid(images), captions, 96, 64) == [True] * 5


def test_grid_background_matches_refuses_a_wrong_layout_or_caption():
    grid = make_grid([draw_shape("circle", "red", "green", 128, 128)] * 4)
    with pytest.raises(ValueError, match="not 4 cells of 64x64"):
        grid_background_matches(grid, ["a red circle on a green background"] * 4, 64, 64)
    with pytest.raises(ValueError, match="names no background colour"):
        grid_background_matches(grid, ["a red circle on a green background"] * 3 + ["a red circle"], 128, 128)
