"""Train the built-in tiny SDXL's VAE on procedurally drawn coloured shapes and write its safetensors.

    OMP_NUM_THREADS=1 python tools/train_tiny_vae.py   # 4,500 steps, batch 8, 64 px: about 10 minutes on one core

The result is deterministic from --seed (one CPU thread; PIL drawing and torch's CPU kernels are deterministic),
so the committed sdxl_ff/model/assets/tiny_vae.safetensors can be rebuilt and its sha256 compared. The images are drawn
procedurally (never the bundled sample images): half of each batch sdxl_ff.data.synthetic.random_shapes (1-3 shapes of
random kind, place, size and colour), half flat_heavy_batch (one big shape on a flat background). The loss is the
usual autoencoder one (MSE plus a tiny KL term, as SD's VAE was trained); the scaling factor is 1/std of the
sampled latents on fresh images, so the UNet sees unit-variance latents (SDXL's 0.13025 does the same for SDXL's
VAE). At the end the script prints the metric (quality()), the file's sha256 and the scaling factor for
sdxl_ff/model/parts.py. It trains on 64 px images (a quarter of the cost of 128 px; the VAE is convolutional).

The metric, on fixed seeds never trained on, so every recipe is judged on the same images: PSNR of the mean MSE
over 256 random 128 px scenes, their per-image median and 5th percentile, and PSNR on 64 sample-style images.
Measured (one thread each, ~10 min each on a shared 2-core machine; dB):

    recipe (flags)                                       PSNR   median  5th pct  sample-style
    before: --steps 1800 --flat 0 (the old defaults)     17.73  19.03   12.69    21.53
    --steps 4500 --flat 0                                21.18  22.92   17.01    25.95
    --steps 4500 --flat 0.5 (the defaults, committed)    21.78  22.95   17.37    26.18
    --steps 4500 --flat 0 --lr 3e-3 --warmup 200 --clip 1  21.57  22.77   17.64    25.59
    --steps 4500 --flat 0.5 --lr 3e-3 --warmup 200 --clip 1: stuck near 14 dB batch PSNR at step 2,800, stopped
    control, 2x wider: --steps 1800 --flat 0 --channels 16 32 64 64 (3.9 MB; 2x the time per step)
                                                         15.13  17.14   10.67    18.48

Steps help most (1,800 -> 4,500: +3.5 dB), the flat-heavy half +0.6 dB; 25 dB is not reached in ~10 minutes.
Width is not the limit at this budget: the 2x wider control learns slower per step (15.13 against 17.73 dB after
1,800 steps) and costs twice as much per step; the tiny VAE is undertrained, not too small.
The worst images are flat areas decoded in a wrong colour. That error is a function of the colour itself, not of
the rest of the image: on 64 flat 128 px images of random colours the committed VAE's background RMS error is
median 16.7, max 52.7 (of 255), and 15.0 / 45.9 with a random circle added (per-colour correlation 0.95; the
weights before: 32.5 / 81.2 and 29.6 / 80.8, correlation 0.95). With one group, each GroupNorm maps a flat
colour's feature vector to its direction only (zero mean, unit scale), so colours are carried by a nonlinear,
projective code that a net of 8-32 channels learns slowly.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import save_file

from sdxl_ff.data.synthetic import COLOURS, SHAPES, draw_kind, draw_shape, random_colour, random_shapes
from sdxl_ff.model.parts import TINY_VAE_FILE, TINY_VAE_LAYOUT
from sdxl_ff.runtime.files import write_atomic

KL_WEIGHT = 1e-6  # as in SD's VAE training: keeps the posterior bounded without blurring


HELD_OUT_SEED = 1_000_003  # the metric's random scenes; training draws from random.Random(--seed), a small seed
SAMPLE_STYLE_SEED = 1_000_033  # the metric's sample-style images


def to_tensor(images: list) -> torch.Tensor:
    """PIL images as a (count, 3, H, W) tensor in [-1, 1], as the trainer feeds the VAE."""
    arrays = [np.asarray(image, dtype=np.float32) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def shapes_batch(rng: random.Random, count: int, size: int) -> torch.Tensor:
    """`count` random-shape images (synthetic.random_shapes) as a (count, 3, size, size) tensor in [-1, 1]."""
    return to_tensor([random_shapes(rng, size) for _ in range(count)])


def sample_style_batch(rng: random.Random, count: int, size: int) -> torch.Tensor:
    """Images like the bundled samples the quickstart trains on: one centred shape of scale 0.3-0.8 in one palette
    colour on a flat background of another (synthetic.draw_shape)."""
    images = []
    for _ in range(count):
        foreground, background = rng.sample(list(COLOURS), 2)
        images.append(draw_shape(rng.choice(SHAPES), foreground, background, size, size, rng.uniform(0.3, 0.8)))
    return to_tensor(images)


def decibels(mse: float) -> float:
    """PSNR in dB of a mean squared error on the [0, 1] scale (peak 1)."""
    return 10 * math.log10(1.0 / mse)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    return decibels((((reconstruction.clamp(-1, 1) - target) / 2) ** 2).mean().item())


@torch.no_grad()
def per_image_mse(vae: AutoencoderKL, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """MSE (on the [0, 1] scale) of each image's decode(mode(encode(image)))."""
    errors = []
    for part in images.split(chunk):
        reconstruction = vae.decode(vae.encode(part).latent_dist.mode()).sample.clamp(-1, 1)
        errors.append((((reconstruction - part) / 2) ** 2).mean(dim=(1, 2, 3)))
    return torch.cat(errors)


def quality(vae: AutoencoderKL, count: int = 256, size: int = 128) -> dict[str, float]:
    """The VAE's reconstruction metric, on images never trained on (fixed seeds, so every candidate is judged on
    the same images): `psnr` of the mean MSE over `count` random scenes, their per-image `median` and 5th
    percentile `p5` PSNR (the mean-MSE PSNR is dominated by the worst images: a wrong colour of a large flat area),
    and `sample_style` (the mean-MSE PSNR of count/4 images like the bundled samples, what the quickstart feeds)."""
    mse = per_image_mse(vae, shapes_batch(random.Random(HELD_OUT_SEED), count, size)).double()
    per_image = 10 * torch.log10(1.0 / mse)
    sample_mse = per_image_mse(vae, sample_style_batch(random.Random(SAMPLE_STYLE_SEED), count // 4, size))
    return {"psnr": decibels(mse.mean().item()), "median": per_image.median().item(),
            "p5": torch.quantile(per_image, 0.05).item(), "sample_style": decibels(sample_mse.double().mean().item())}


def format_quality(q: dict[str, float]) -> str:
    return (f"PSNR {q['psnr']:.2f} dB (per image: median {q['median']:.2f}, 5th percentile {q['p5']:.2f}); "
            f"sample-style {q['sample_style']:.2f} dB")


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator) -> float:
    """Standard deviation of the sampled (unscaled) latents, as training draws them."""
    return vae.encode(images).latent_dist.sample(generator).std().item()


def flat_heavy_batch(rng: random.Random, count: int, size: int) -> torch.Tensor:
    """Images dominated by large flat areas: one big shape (radius 0.15-0.45 of the side, near the centre) in an
    arbitrary or palette colour on a flat background of another. Their colours are what a GroupNorm with one group
    makes hard (it removes the features' global mean and scale), and what the worst held-out images get wrong."""
    images = []
    for _ in range(count):
        background, foreground = random_colour(rng), random_colour(rng)
        image = Image.new("RGB", (size, size), background)
        r = rng.uniform(0.15, 0.45) * size
        cx, cy = size / 2 + rng.uniform(-0.2, 0.2) * size, size / 2 + rng.uniform(-0.2, 0.2) * size
        draw_kind(image, rng.choice(SHAPES), cx, cy, r, foreground)
        images.append(image)
    return to_tensor(images)


def train(steps: int, batch: int, size: int, lr: float, seed: int, log_every: int = 100, *, warmup: int = 0,
          final_lr: float = 0.05, clip: float = 0.0, latent: str = "sample", flat: float = 0.0,
          layout: dict | None = None) -> AutoencoderKL:
    """Train a fresh VAE; `flat` is the share of each batch drawn by flat_heavy_batch instead of random_shapes."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**(layout or TINY_VAE_LAYOUT)).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)

    def factor(s: int) -> float:  # linear warmup, then cosine decay to final_lr
        if s < warmup:
            return (s + 1) / warmup
        progress = min(s - warmup, steps - warmup) / max(1, steps - warmup)
        return final_lr + (1 - final_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    flat_count = round(flat * batch)
    start = time.time()
    for step in range(1, steps + 1):
        images = shapes_batch(rng, batch - flat_count, size)
        if flat_count:
            images = torch.cat([images, flat_heavy_batch(rng, flat_count, size)])
        posterior = vae.encode(images).latent_dist
        latents = posterior.sample(generator) if latent == "sample" else posterior.mode()
        reconstruction = vae.decode(latents).sample
        loss = torch.nn.functional.mse_loss(reconstruction, images) + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), clip)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps}  loss {loss.item():.5f}  batch PSNR {psnr(reconstruction, images):.2f} dB  "
                  f"{(time.time() - start) / step:.2f} s/step", flush=True)
    return vae.eval()


def save(vae: AutoencoderKL, path: Path) -> str:
    """Write the weights atomically (state.write_atomic) and return the file's sha256. No safetensors metadata:
    its header keeps metadata in a hash map whose order changes from run to run, which would change the sha256."""
    tensors = {k: v.contiguous() for k, v in vae.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="training image size (default 64: a quarter of the "
                        "cost of 128 px; the VAE is convolutional and its norms are global, so it carries over)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear warmup before the cosine decay")
    parser.add_argument("--final-lr", type=float, default=0.05, help="the cosine's floor, a fraction of --lr")
    parser.add_argument("--clip", type=float, default=0.0, help="gradient-norm clipping (0: none)")
    parser.add_argument("--latent", choices=("sample", "mode"), default="sample",
                        help="decode a sample of the posterior (as SD's VAE was trained) or its mean")
    parser.add_argument("--flat", type=float, default=0.5,
                        help="share of each batch with one big flat shape on a flat background (flat_heavy_batch)")
    parser.add_argument("--channels", type=int, nargs=4, help="block_out_channels instead of the built-in layout's "
                        "(a control experiment; the trainer loads only the built-in layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TINY_VAE_FILE)
    args = parser.parse_args()
    if args.seed >= min(HELD_OUT_SEED, SAMPLE_STYLE_SEED):
        parser.error(f"--seed {args.seed}: seeds from {min(HELD_OUT_SEED, SAMPLE_STYLE_SEED)} draw the metric's images")
    torch.set_num_threads(1)  # determinism (and fairness on a shared machine)
    vae = train(args.steps, args.batch, args.size, args.lr, args.seed, warmup=args.warmup, final_lr=args.final_lr,
                clip=args.clip, latent=args.latent, flat=args.flat,
                layout=args.channels and {**TINY_VAE_LAYOUT, "block_out_channels": tuple(args.channels)})
    fresh = shapes_batch(random.Random(args.seed + 1), 64, 128)  # fresh images, never trained on
    scaling_factor = float(f"{1.0 / latent_std(vae, fresh, torch.Generator().manual_seed(args.seed)):.5g}")
    digest = save(vae, args.out)
    print(f"held-out {format_quality(quality(vae))}\nwrote {args.out}\nset in sdxl_ff/model/parts.py:\n"
          f'TINY_VAE_SHA256 = "{digest}"\nTINY_VAE_SCALING_FACTOR = {scaling_factor}')


if __name__ == "__main__":
    main()
