"""Step time of each training.loss_type (and timestep sampler) relative to MSE, side by side in one run.

    python benchmarks/bench_loss_types.py                    # tiny UNet on the CPU (about a minute)
    python benchmarks/bench_loss_types.py --device cuda --model mid --resolution 1024 --batch 1
    python benchmarks/bench_loss_types.py --small            # a few steps, for the test that keeps it working

Each step is the trainer's own forward and loss (`step.predict`, `step.weighted_loss`) on random
latents and conditioning, then backward and an AdamW step. The variants are timed in interleaved
rounds (one step of each per round), so a machine that gets busier slows them all alike; the table
gives each variant's median step time and its ratio to MSE.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_memory import build_unet  # noqa: E402
from sdxl_ff.model.parts import build_tiny_sdxl  # noqa: E402
from sdxl_ff.objective.diffusion import TimestepSampling  # noqa: E402
from sdxl_ff.objective.predict import LossWeighting, predict, weighted_loss  # noqa: E402

VARIANTS = {
    "mse": (LossWeighting("epsilon"), TimestepSampling()),
    "l1": (LossWeighting("epsilon", loss_type="l1"), TimestepSampling()),
    "huber (snr schedule)": (LossWeighting("epsilon", loss_type="huber"), TimestepSampling()),
    "smooth_l1 (exponential)": (LossWeighting("epsilon", loss_type="smooth_l1", huber_schedule="exponential"),
                                TimestepSampling()),
    "mse + Min-SNR 5 + debiased": (LossWeighting("epsilon", snr_gamma=5.0, debiased=True), TimestepSampling()),
    "mse, logit-normal timesteps": (LossWeighting("epsilon"), TimestepSampling("logit_normal")),
}


def measure(model: str, device: str, resolution: int, batch: int, rounds: int) -> dict[str, float]:
    """Median seconds per step of each variant over `rounds` interleaved rounds (after one warm-up round)."""
    parts = build_tiny_sdxl(0)
    unet = build_unet(model).to(device).train()
    scheduler = parts.noise_scheduler()
    c = unet.config
    side = resolution // 8
    batch_data = {"latents": torch.randn(batch, 4, side, side),
                  "prompt_embeds": torch.randn(batch, 77, c.cross_attention_dim),
                  "pooled_prompt_embeds": torch.randn(batch, c.projection_class_embeddings_input_dim
                                                      - 6 * c.addition_time_embed_dim),
                  "original_size": torch.tensor([[resolution] * 2] * batch),
                  "crop_top_left": torch.zeros(batch, 2, dtype=torch.long),
                  "target_size": torch.tensor([[resolution] * 2] * batch)}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(rounds + 1):
        for name, (weighting, sampling) in VARIANTS.items():
            start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                out = predict(unet, parts.vae, (), (), scheduler, batch_data, generator, sampling=sampling)
            weighted_loss(out, scheduler, weighting, step=1).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "mid", "full"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--small", action="store_true", help="2 rounds at 64x64, batch 1 (for the test)")
    args = parser.parse_args(argv)
    if args.small:
        args.model, args.resolution, args.batch, args.rounds = "tiny", 64, 1, 2
    medians = measure(args.model, args.device, args.resolution, args.batch, args.rounds)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} thread)"
    print(f"\nLoss types: {args.model} UNet, {args.resolution}x{args.resolution}, batch {args.batch}, {name}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'variant':30} {'s/step':>8} {'vs mse':>7}")
    for variant, seconds in medians.items():
        print(f"{variant:30} {seconds:8.4f} {seconds / medians['mse']:7.3f}")


if __name__ == "__main__":
    main()
