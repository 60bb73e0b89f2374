"""Data pipeline throughput: loader images/s on 1024-class JPEGs, and tiny-model steps/s with and without caches.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py [--images-per-size 8] [--steps 12] [--workers 0 2]

Everything is generated into a temporary folder (procedural JPEGs, the built-in tiny SDXL); nothing
is downloaded. The loader rows time `CaptionedImageDataset` through a DataLoader with SDXL's usual
buckets (decode, EXIF, Lanczos resize, crop, fp16 pixels), and reading the same images back from
the latent cache. The steps/s rows train the tiny SDXL at 128 px for `--steps` steps per setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import train_sdxl_ff  # noqa: E402
from sdxl_ff.config.load import load_config  # noqa: E402
from sdxl_ff.data import dataset as data_lib  # noqa: E402
from sdxl_ff.data import latent_cache  # noqa: E402
from sdxl_ff.data.buckets import bucket_for  # noqa: E402
from sdxl_ff.data.records import scan_images
from sdxl_ff.data.synthetic import draw_shape, write_sample_set  # noqa: E402
from sdxl_ff.model.parts import build_tiny_sdxl  # noqa: E402

SOURCE_SIZES = [(1024, 1024), (1536, 1024), (1024, 1536), (2048, 1365)]  # width, height
SDXL_BUCKETS = [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (1344, 768)]


def write_jpegs(folder: Path, width: int, height: int, count: int) -> None:
    """Shapes on a noisy background (so JPEG decoding has real detail), quality 92."""
    rng = np.random.default_rng(width * 7 + height)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        base = np.asarray(draw_shape("circle", "red", "blue", width, height), dtype=np.int16)
        noisy = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{n:03d}.jpg", quality=92)
        (folder / f"{n:03d}.txt").write_text("a red circle, blue background, noise")


def loader_rate(ds: data_lib.CaptionedImageDataset, workers: int, batch_size: int = 2) -> float:
    """Images/s of the second epoch: persistent workers are started once per run, as in training."""
    sampler = data_lib.SameSizeBatchSampler(ds.sizes, batch_size, seed=1)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=data_lib.collate, num_workers=workers,
                        persistent_workers=workers > 0)
    for _ in loader:
        pass
    started = time.perf_counter()
    images = sum(len(batch["path"]) for batch in loader)
    return images / (time.perf_counter() - started)


def loader_rows(root: Path, per_size: int, workers: list[int], cached: int) -> list[tuple[str, ...]]:
    buckets = [(h, w) for w, h in SDXL_BUCKETS]
    vae = build_tiny_sdxl(0).vae.eval()
    rows = []
    for width, height in SOURCE_SIZES:
        folder = root / f"{width}x{height}"
        write_jpegs(folder, width, height, per_size)
        ds = data_lib.CaptionedImageDataset(scan_images(folder),
                                            lambda r: bucket_for(r.width, r.height, buckets))
        bucket = f"{ds.sizes[0][1]}x{ds.sizes[0][0]}"
        for w in workers:
            rows.append((f"JPEG {width}x{height} -> {bucket}", f"workers {w}", f"{loader_rate(ds, w):.1f} img/s"))
    # The tiny VAE is slow at 1024 px on one core: cache only a few images of the first size.
    ds = data_lib.CaptionedImageDataset(scan_images(root / "{}x{}".format(*SOURCE_SIZES[0]))[:cached],
                                        lambda r: bucket_for(r.width, r.height, buckets))
    started = time.perf_counter()
    report = latent_cache.prepare_latent_cache(ds, vae, root / "latents", "fp32", build_batch_size=2)
    rows.append((f"latent cache build, tiny VAE, {len(report.built)} images", "workers 0",
                 f"{len(report.built) / (time.perf_counter() - started):.2f} img/s"))
    cached = ds.with_entries(data_lib.CachedEntries(latents=tuple(report.entries)))
    rows.append(("latent cache read, 1024x1024 (mean + std fp32)", "workers 0", f"{loader_rate(cached, 0):.0f} img/s"))
    return rows


def steps_rows(root: Path, steps: int) -> list[tuple[str, ...]]:
    images = root / "small"
    write_sample_set(images, count=12, width=160, height=128)
    base = {"device": "cpu", "model.id": "builtin:tiny-sdxl", "model.use_bf16": "false",
            "run.output_root": str(root / "out"), "training.num_steps": str(steps), "training.seed": "1",
            "training.batch_size": "4", "data.image_dir": str(images), "data.size": "128",
            "optimizer.type": "adamw", "model.train_text_encoder_1": "false", "training.log_every": "1000"}
    latent = {"data.latent_cache.enabled": "true", "data.latent_cache.cache_dir": str(root / "lc")}
    text = {"data.text_embedding_cache.enabled": "true", "data.text_embedding_cache.cache_dir": str(root / "tc")}
    settings = [("no cache", {}), ("latent cache", latent), ("text-embedding cache", text),
                ("both caches", {**latent, **text})]
    rows = []
    for name, extra in settings:
        # one run folder per setting: a fresh run into an earlier run's folder is refused
        run_name = "bench-" + name.replace(" ", "-")
        overrides = [f"{k}={v}" for k, v in {**base, "run.name": run_name, **extra}.items()]
        if extra:  # build the caches outside the timed loop
            train_sdxl_ff.train(load_config(None, overrides), cache_only=True)
        summary = train_sdxl_ff.train(load_config(None, overrides))
        rows.append((f"tiny SDXL 128 px, batch 4: {name}", f"{steps} steps",
                     f"{summary['global_step'] / summary['seconds']:.2f} steps/s"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--cached-images", type=int, default=4, help="images encoded for the latent-cache rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_data.") as tmp:
        rows = loader_rows(Path(tmp), args.images_per_size, args.workers, args.cached_images)
        rows += steps_rows(Path(tmp), args.steps)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"| {'what':<{widths[0]}} | {'setting':<{widths[1]}} | {'rate':>{widths[2]}} |")
    print(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|{'-' * (widths[2] + 1)}:|")
    for a, b, c in rows:
        print(f"| {a:<{widths[0]}} | {b:<{widths[1]}} | {c:>{widths[2]}} |")


if __name__ == "__main__":
    main()
