"""Train the built-in tiny SDXL's VAE on procedurally drawn coloured shapes and write its safetensors.

    OMP_NUM_THREADS=1 python tools/train_tiny_vae.py            # 1,800 steps, batch 8, 64 px, one core

The result is deterministic from --seed (one CPU thread; PIL drawing and torch's CPU kernels are deterministic),
so the committed sdxl_ff/assets/tiny_vae.safetensors can be rebuilt and its sha256 compared. The images are drawn
by sdxl_ff.synthetic.random_shapes (random shapes, places, sizes and colours), never the bundled sample images.
The loss is the usual autoencoder one (MSE plus a tiny KL term, as SD's VAE was trained); the scaling factor is
1/std of the sampled latents on fresh images, so the UNet sees unit-variance latents (SDXL's 0.13025 does the same
for SDXL's VAE). At the end the script prints the file's sha256 and the scaling factor for sdxl_ff/models.py.

It trains on 64 px images (a quarter of the cost of 128 px; the VAE is convolutional and its single-group norms
are over the whole image) and reports PSNR on held-out 128 px images: 19.2 dB for the committed weights, trained
with the defaults below on a heavily shared 2-core machine. Training at 128 px instead (`--size 128`, four times the
cost, about 30 minutes on one busy core) does not help: 18.34 dB held-out (scaling factor 0.57467), so the 64 px
weights stay. More steps should give more; retraining changes every latent, so the README's pictures too.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from sdxl_ff.models import TINY_VAE_FILE, TINY_VAE_LAYOUT
from sdxl_ff.synthetic import random_shapes

KL_WEIGHT = 1e-6  # as in SD's VAE training: keeps the posterior bounded without blurring


def shapes_batch(rng: random.Random, count: int, size: int) -> torch.Tensor:
    """`count` random-shape images as a (count, 3, size, size) tensor in [-1, 1], as the trainer feeds the VAE."""
    arrays = [np.asarray(random_shapes(rng, size), dtype=np.float32) for _ in range(count)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak 1 on the [0, 1] scale)."""
    mse = (((reconstruction.clamp(-1, 1) - target) / 2) ** 2).mean().item()
    return 10 * math.log10(1.0 / mse)


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """PSNR of decode(mode(encode(images))), the path the trainer's latent cache and eval take."""
    return psnr(vae.decode(vae.encode(images).latent_dist.mode()).sample, images)


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator) -> float:
    """Standard deviation of the sampled (unscaled) latents, as training draws them."""
    return vae.encode(images).latent_dist.sample(generator).std().item()


def train(steps: int, batch: int, size: int, lr: float, seed: int, log_every: int = 100) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE_LAYOUT).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    # cosine decay to 5 %: the last few hundred steps at a small rate add ~1-2 dB of sharpness
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(1, steps + 1):
        images = shapes_batch(rng, batch, size)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, images) + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps}  loss {loss.item():.5f}  batch PSNR {psnr(reconstruction, images):.2f} dB  "
                  f"{(time.time() - start) / step:.2f} s/step", flush=True)
    return vae.eval()


def save(vae: AutoencoderKL, path: Path) -> str:
    """Write the weights (temporary name, then rename) and return the file's sha256. No safetensors metadata:
    its header keeps metadata in a hash map whose order changes from run to run, which would change the sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(temporary))
    os.replace(temporary, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="training image size (default 64: a quarter of the "
                        "cost of 128 px; the VAE is convolutional and its norms are global, so it carries over)")
    parser.add_argument("--eval-size", type=int, default=128, help="size of the held-out images (the size used)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TINY_VAE_FILE)
    args = parser.parse_args()
    torch.set_num_threads(1)  # determinism (and fairness on a shared machine)
    vae = train(args.steps, args.batch, args.size, args.lr, args.seed)
    held_out = shapes_batch(random.Random(args.seed + 1), 64, args.eval_size)  # fresh images, never trained on
    scaling_factor = float(f"{1.0 / latent_std(vae, held_out, torch.Generator().manual_seed(args.seed)):.5g}")
    quality = reconstruction_psnr(vae, held_out)
    digest = save(vae, args.out)
    print(f"held-out PSNR {quality:.2f} dB\nwrote {args.out}\nset in sdxl_ff/models.py:\n"
          f'TINY_VAE_SHA256 = "{digest}"\nTINY_VAE_SCALING_FACTOR = {scaling_factor}')


if __name__ == "__main__":
    main()
