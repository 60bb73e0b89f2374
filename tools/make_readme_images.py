"""Regenerate README's pictures from the quickstart itself, so they cannot go stale silently.

    python tools/make_readme_images.py

1. runs the quickstart exactly as README's first command does (`train_sdxl_ff.py --config
   configs/quickstart.json`), only into a temporary output root;
2. copies its final eval grid and its planned learning-rate curve to docs/images/;
3. runs the browser test (tests/inspector/test_demo_training_flow.py) against that trained model, which saves the
   inspector screenshot to docs/images/ (needs Debian's chromium and playwright);
4. prints which final eval images have the background colour their prompt names.

tests/project/test_readme_images.py checks the committed files' format and sizes against the current quickstart.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image

from sdxl_ff.data.synthetic import grid_background_matches

QUICKSTART = ROOT / "configs" / "quickstart.json"
IMAGES = ROOT / "docs" / "images"
GRID = IMAGES / "quickstart_grid.png"
LR_CURVE = IMAGES / "quickstart_lr_schedule.png"
SCREENSHOT = IMAGES / "inspector.png"


def colour_check(grid: Path, prompts_path: Path, width: int, height: int) -> list[tuple[str, bool]]:
    """(prompt, whether its cell's background has the colour the prompt names) for each cell of the final grid."""
    from sdxl_ff.eval.evaluation import load_prompts
    captions = [p.prompt for p in load_prompts(prompts_path, height, width)]
    with Image.open(grid) as image:
        return list(zip(captions, grid_background_matches(image, captions, width, height), strict=True))


def main() -> int:
    import argparse
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help; no options
    config = json.loads(QUICKSTART.read_text())
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdxl_ff_readme_") as tmp:
        root = Path(tmp) / "output"
        started = time.time()
        subprocess.run([sys.executable, str(ROOT / "train_sdxl_ff.py"), "--config", str(QUICKSTART),
                        "--set", f"run.output_root={root}"], cwd=ROOT, check=True)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # CPU seconds barely depend on other load
        timing = (f"quickstart: {time.time() - started:.0f} s wall, {usage.ru_utime + usage.ru_stime:.0f} s CPU "
                  f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        print(timing, flush=True)
        run_dir = root / config["run"]["name"]
        shutil.copyfile(run_dir / "eval" / "final" / "grid.png", GRID)
        shutil.copyfile(run_dir / "lr_schedule.png", LR_CURVE)
        env = {**os.environ, "SDXL_FF_INSPECTOR_MODEL": str(run_dir), "SDXL_FF_INSPECTOR_SCREENSHOT": str(SCREENSHOT),
               "SDXL_FF_REQUIRE_BROWSER": "1"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/inspector/test_demo_training_flow.py"], cwd=ROOT,
                       env=env, check=True)
    rows = colour_check(GRID, ROOT / config["eval"]["prompts_path"], config["eval"]["width"],
                        config["eval"]["height"])
    for prompt, match in rows:
        print(f"{'match' if match else 'MISS '}  {prompt!r}")
    print(f"background colour matches the prompt in {sum(m for _, m in rows)}/{len(rows)} images")
    print(timing)
    print(f"wrote {GRID.relative_to(ROOT)}, {LR_CURVE.relative_to(ROOT)}, {SCREENSHOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
