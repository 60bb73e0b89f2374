"""README's pictures are the quickstart's own (tools/make_readme_images.py): present, PNG, and the sizes the
current quickstart makes, so a change to the quickstart that changes them fails here until they are regenerated."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
from conftest import INSPECTOR_VIEWPORT, ROOT
from PIL import Image

from sdxl_ff.config.load import load_config
from sdxl_ff.eval.evaluation import load_prompts
from sdxl_ff.train import lr_plot

sys.path.insert(0, str(ROOT / "tools"))
import make_readme_images as tool  # noqa: E402

QUICKSTART = load_config(str(ROOT / "configs" / "quickstart.json"))


def test_readme_shows_the_generated_images():
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", (ROOT / "README.md").read_text())
    assert {ROOT / p for p in linked} >= {tool.GRID, tool.LR_CURVE, tool.SCREENSHOT}


@pytest.mark.parametrize("path", [tool.GRID, tool.LR_CURVE, tool.SCREENSHOT], ids=lambda p: p.name)
def test_images_are_rgb_pngs(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"


def test_grid_has_the_quickstarts_layout():
    """The final eval grid: one cell of eval.height x eval.width per prompt, near-square (evaluation.make_grid)."""
    e = QUICKSTART.eval
    count = len(load_prompts(ROOT / e.prompts_path, e.height, e.width))
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    assert Image.open(tool.GRID).size == (columns * e.width, rows * e.height)


def test_lr_curve_and_screenshot_sizes():
    assert Image.open(tool.LR_CURVE).size == (lr_plot.WIDTH, lr_plot.HEIGHT)
    width, height = Image.open(tool.SCREENSHOT).size  # full page: the viewport's width, at least its height
    assert width == INSPECTOR_VIEWPORT["width"] and height >= INSPECTOR_VIEWPORT["height"]


def test_quickstart_ends_with_a_visible_final_eval():
    """README's first command ends in pictures: eval.final on, k-diffusion euler/normal, 20 steps, 128 px, 4 prompts
    in the sample captions' style (each names a background colour the colour check can read)."""
    e = QUICKSTART.eval
    assert e.final.enabled and (e.backend, e.sampler_name, e.scheduler) == ("kdiffusion", "euler", "normal")
    assert (e.num_inference_steps, e.height, e.width) == (20, 128, 128)
    prompts = json.loads((ROOT / e.prompts_path).read_text())
    assert len(prompts) == 4
    from sdxl_ff.data.synthetic import caption_background
    assert all(caption_background(p["prompt"]) for p in prompts)


def test_readme_states_the_committed_grids_colour_check():
    """README's count of grid images whose background follows the prompt is what the colour check reads off the
    committed grid (synthetic.grid_background_matches), so the claim cannot drift from the picture."""
    from sdxl_ff.data.synthetic import grid_background_matches
    e = QUICKSTART.eval
    captions = [p.prompt for p in load_prompts(ROOT / e.prompts_path, e.height, e.width)]
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"background\s+colour\s+follows\s+the\s+prompt\s+in\s+(\d)\s+of\s+the\s+(\d)\s+images", readme)
    assert stated, "README no longer states the colour check's result"
    with Image.open(tool.GRID) as grid:
        matches = grid_background_matches(grid, captions, e.width, e.height)
    assert (int(stated[1]), int(stated[2])) == (sum(matches), len(captions))
