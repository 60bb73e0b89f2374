"""Start-up on large folders: first and second start-up time and peak memory, and the loader with masks.

    OMP_NUM_THREADS=1 python benchmarks/bench_startup.py [--counts 10000 100000] [--root /tmp/sdxl_ff_startup]
    OMP_NUM_THREADS=1 python benchmarks/bench_startup.py --small     # 300 images in a temporary folder

Images are small procedurally made PNGs in four aspect ratios, each with a caption, generated once below
`--root` (kept for the next run: 100,000 images take minutes to write). Each start-up runs in a fresh
process and times what the trainer does before loading a model: `dataset.build_data` (scan, captions,
sizes from the image index or the files, buckets, the epoch's batches). "first" starts without the index
(every image opened once), "second" with it (no image opened). Memory: the process's peak RSS (Python,
torch and the data) and how much of it `build_data` added, next to the index file's size. CPU time (user +
system) is shown beside wall time: on a shared machine it is what the start-up itself costs. The last
table times the DataLoader on 1024-class JPEGs with SDXL buckets, masks off and on (each image's
`<stem>_mask.png` read, cropped and averaged to the latent grid).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

SIZES = [(64, 64), (80, 48), (48, 80), (72, 56)]  # width, height
BUCKETS = [[64, 64], [80, 48], [48, 80]]
SDXL_BUCKETS = [[1024, 1024], [896, 1152], [1152, 896], [832, 1216], [1216, 832]]

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from sdxl_ff.data import dataset
from PIL import Image
opened, open_image = [0], Image.open
def counting_open(*args, **kwargs):  # how many images the start-up opens
    opened[0] += 1
    return open_image(*args, **kwargs)
Image.open = counting_open
from sdxl_ff.config.load import load_config
cfg = load_config(None, {overrides!r})
usage = resource.getrusage(resource.RUSAGE_SELF)
started = time.perf_counter()
train_set, sampler = dataset.build_data(cfg, seed=1, num_processes=1)
seconds = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu, "opened": opened[0], "images": len(train_set),
                  "batches": len(sampler), "rss_before_kb": usage.ru_maxrss, "max_rss_kb": after.ru_maxrss}}))
"""


def png_bytes(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: Path, count: int) -> float:
    """`count` small PNGs with captions in 100 subfolders (as large sets are kept); seconds taken, 0 if present."""
    marker = folder / ".complete"
    if marker.is_file() and marker.read_text() == str(count):
        return 0.0
    started = time.perf_counter()
    blobs = [png_bytes(w, h, n) for n, (w, h) in enumerate(SIZES)]
    for n in range(count):
        sub = folder / f"{n % 100:02d}"
        if n < 100:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{n:06d}.png").write_bytes(blobs[n % len(blobs)])
        (sub / f"{n:06d}.txt").write_text(f"image {n}, noise, {SIZES[n % len(SIZES)][0]} wide")
    marker.write_text(str(count))
    return time.perf_counter() - started


def start_up(folder: Path, index: Path) -> dict:
    overrides = ["training.num_steps=1", "run.name=bench", "model.train_text_encoder_1=false",
                 f"data.image_dir={folder}", f"data.image_index_path={index}",
                 "data.bucket.enabled=true", f"data.bucket.resolutions={json.dumps(BUCKETS)}",
                 "data.bucket.divisible_by=16", "training.batch_size=4"]
    child = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), overrides=overrides)],
                           capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"start-up failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def startup_rows(root: Path, counts: list[int]) -> list[tuple[str, ...]]:
    rows = []
    for count in counts:
        folder = root / f"images_{count}"
        generated = write_images(folder, count)
        if generated:
            print(f"wrote {count} images in {generated:.0f} s", file=sys.stderr)
        index = root / f"index_{count}.json"
        index.unlink(missing_ok=True)
        for which in ("first", "second"):
            r = start_up(folder, index)
            assert r["images"] == count, r
            growth = (r["max_rss_kb"] - r["rss_before_kb"]) / 1024
            rows.append((f"{count} images", which, str(r["opened"]), f"{r['seconds']:.2f} s",
                         f"{r['cpu_seconds']:.2f} s", f"{r['images'] / r['seconds']:.0f}",
                         f"{r['max_rss_kb'] / 1024:.0f} MiB", f"{growth:.0f} MiB",
                         f"{index.stat().st_size / 2**20:.1f} MiB"))
    return rows


def loader_rows(root: Path, per_size: int, workers: int) -> list[tuple[str, ...]]:
    from bench_data import SOURCE_SIZES, loader_rate, write_jpegs

    from sdxl_ff.config.load import load_config
    from sdxl_ff.data import dataset as data_lib
    plain, masked = root / "jpegs", root / "masked"  # the same JPEGs (hard links), the second with masks
    for width, height in SOURCE_SIZES:
        size = f"{width}x{height}"
        write_jpegs(plain / size, width, height, per_size)
        (masked / size).mkdir(parents=True)
        for file in (plain / size).iterdir():
            os.link(file, masked / size / file.name)
        for n in range(per_size):  # a mask: the middle quarter of the image
            mask = Image.new("L", (width, height), 0)
            mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
            mask.save(masked / size / f"{n:03d}_mask.png")
    rows = []
    for masks in (False, True):
        source = {"image_dir": str(masked if masks else plain), "masks": masks}
        cfg = load_config(None, ["training.num_steps=1", "run.name=bench", "model.train_text_encoder_1=false",
                                 "data.image_dir=null", f"data.datasets={json.dumps([source])}",
                                 "data.bucket.enabled=true", f"data.bucket.resolutions={json.dumps(SDXL_BUCKETS)}",
                                 f"data.image_index_path={root / 'jpeg_index.json'}"])
        train_set, _ = data_lib.build_data(cfg, seed=1, num_processes=1)
        rows.append((f"loader, {len(train_set)} JPEGs -> SDXL buckets", f"masks {'on' if masks else 'off'}",
                     f"workers {workers}", f"{loader_rate(train_set, workers):.1f} img/s"))
    return rows


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--root", default="/tmp/sdxl_ff_startup", help="where the generated images are kept")
    parser.add_argument("--jpegs-per-size", type=int, default=6, help="1024-class JPEGs per size for the loader")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="300 images and 1 JPEG per size in a temporary folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_startup.") as tmp:
        root = Path(tmp) if args.small else Path(args.root)
        counts, per_size = ([300], 1) if args.small else (args.counts, args.jpegs_per_size)
        startup = startup_rows(root, counts)
        loader = loader_rows(Path(tmp), per_size, args.workers)
    print(f"\n{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(table(("folder", "start-up", "images opened", "wall time", "CPU time", "images/s", "peak RSS",
                 "RSS growth in build_data", "index file"),
                startup))
    print()
    print(table(("what", "masks", "workers", "rate"), loader))


if __name__ == "__main__":
    main()
