"""The memory planner's prediction next to the real peak of the same training step, on the CPU.

    python benchmarks/bench_planner.py                 # tiny UNet, 128 px, batch 2 (about 3 minutes)
    python benchmarks/bench_planner.py --model mid     # 112 M parameters, SDXL's widths, 256 px, batch 1
    python benchmarks/bench_planner.py --sdxl-plan     # planned only: SDXL base at 1024 px, batch 1 and 4

The real step (random weights and inputs, the trainer's optimizer from `optim.build_optimizer`,
second step so that the optimizer state exists) runs on real tensors; its peak is the tracked bytes
of every live tensor (weights, gradients, optimizer state, activations, temporaries), as PyTorch's
MemTracker counts them on the real storages. The prediction comes from `sdxl_ff.plan.planner.plan_memory`
(a FakeTensorMode trace plus computed weights and optimizer state). On a GPU the same comparison is
made against `torch.cuda.max_memory_allocated` by benchmarks/gpu_acceptance.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402
import torch  # noqa: E402

from sdxl_ff.config.load import load_config  # noqa: E402
from sdxl_ff.model.parts import build_tiny_sdxl  # noqa: E402
from sdxl_ff.model.trainables import Trainables  # noqa: E402
from sdxl_ff.optim.optimizers import build_optimizer  # noqa: E402
from sdxl_ff.optim.per_param import optimizer_state_tensors  # noqa: E402
from sdxl_ff.plan.planner import parse_mode, plan_memory, step_tracker, unet_inputs, unet_step  # noqa: E402

diffusers.utils.logging.set_verbosity_error()

# SDXL's first two levels (widths 320 and 640, 64-wide heads, 2048-wide context, text-time embedding), 112 M
# parameters: weights, gradients and optimizer state dominate the peak as in SDXL (tiny: activations do), so the
# computed rows and the optimizer-step peak are checked; a third 640-wide level (185 M in all) adds half the CPU time
MID = dict(sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640),
           layers_per_block=1, transformer_layers_per_block=(1, 1), attention_head_dim=(5, 10),
           cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
           addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SIZES = {"tiny": (128, 2), "mid": (256, 1)}  # resolution, batch
MODES = ("fp32", "full_bf16", "full_bf16+fused_backward")
ROWS = [(mode, ckpt) for mode in MODES for ckpt in (False, True)]


def unet_config(kind: str) -> dict:
    if kind == "tiny":
        return dict(build_tiny_sdxl(0).unet.config)
    with torch.device("meta"):  # the config alone: no memory, no initialisation of 112 M weights
        return dict(diffusers.UNet2DConditionModel(**MID).config)


def measured_peaks(config: dict, resolution: int, batch: int, mode: str) -> dict[bool, int]:
    """Peak tensor bytes of a real training step without and with gradient checkpointing, {checkpointing: bytes}.

    Both are steps of one model and optimizer after a first step that creates the optimizer state: the
    step's peak depends on the weights, their gradients, the state and the activations, not on history,
    and building the model and stepping an 8-bit optimizer once more would double the cost on the CPU.
    """
    full_bf16, fused = parse_mode(mode)
    cfg = load_config(ROOT / "config.json", [
        "run.name=bench", "optimizer.type=adamw8bit", "training.max_grad_norm=null", "training.grad_accum_steps=1",
        f"model.full_bf16={str(full_bf16).lower()}", f"training.fused_backward={str(fused).lower()}"])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if full_bf16 else torch.float32
    unet = diffusers.UNet2DConditionModel.from_config(config).to(dtype)
    unet.train()
    optimizer, _ = build_optimizer(cfg, Trainables({"unet": unet}), torch.Generator().manual_seed(0))

    def step() -> None:
        unet_step(unet, unet_inputs(config, resolution, resolution, batch, dtype), torch.bfloat16)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    peaks = {}
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        tracker, _ = step_tracker()
        tracker.track_external(unet, *optimizer_state_tensors(optimizer))
        with tracker, warnings.catch_warnings():
            # MemTracker's gradient hook warns when the fused backward pass has already freed the gradient
            warnings.filterwarnings("ignore", "Expected a tensor or a traceable wrapper-subclass")
            step()
        peaks[checkpointing] = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    return peaks


def compare(kind: str, mode: str) -> list[dict]:
    """Planned against measured peak for `mode`, without and with gradient checkpointing."""
    config = unet_config(kind)
    resolution, batch = SIZES[kind]
    real = measured_peaks(config, resolution, batch, mode)
    rows = []
    for checkpointing in (False, True):
        plan = plan_memory(config, resolution=resolution, batch=batch, mode=mode,
                           gradient_checkpointing=checkpointing, optimizer="adamw8bit", mixed_precision="bf16")
        rows.append({"model": kind, "mode": mode, "checkpointing": checkpointing, "planned": plan.peak_bytes,
                     "measured": real[checkpointing], "error": plan.peak_bytes / real[checkpointing] - 1})
    return rows


def sdxl_plan_table(resolution: int, batches: list[int]) -> None:
    """The plan of SDXL base's UNet (configs in tests/reference) per mode; both caches on, no EMA."""
    import json
    config = json.loads((ROOT / "tests" / "reference" / "sdxl_base_configs" / "unet" / "config.json").read_text())
    print(f"SDXL base UNet at {resolution}x{resolution}, AdamW8bit, bf16 autocast, text/latent caches on, no EMA\n"
          "| batch | mode | checkpointing | weights | grads at peak | optimizer | activations | peak GiB | "
          "needed GiB | peak during |\n|---:|---|---|---:|---:|---:|---:|---:|---:|---|")
    for batch in batches:
        for mode, ckpt in ROWS:
            p = plan_memory(config, resolution=resolution, batch=batch, mode=mode, gradient_checkpointing=ckpt)
            w, g, o, a = (n / 2**30 for _, n, _ in p.rows[:4])
            print(f"| {batch} | {mode} | {'on' if ckpt else 'off'} | {w:.2f} | {g:.2f} | {o:.2f} | {a:.2f} | "
                  f"{p.peak_bytes / 2**30:.2f} | {p.required_bytes / 2**30:.2f} | {p.settings['peak_at']} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--sdxl-plan", action="store_true", help="print SDXL base's plan per mode and exit")
    parser.add_argument("--resolution", type=int, default=1024, help="with --sdxl-plan")
    parser.add_argument("--batches", default="1,4", help="with --sdxl-plan: comma-separated batch sizes")
    args = parser.parse_args()
    if args.sdxl_plan:
        sdxl_plan_table(args.resolution, [int(b) for b in args.batches.split(",")])
        return
    print("| model | mode | checkpointing | planned MiB | measured MiB | error |\n|---|---|---|---:|---:|---:|")
    for r in (row for mode in MODES for row in compare(args.model, mode)):
        mode, ckpt = r["mode"], r["checkpointing"]
        print(f"| {r['model']} | {mode} | {'on' if ckpt else 'off'} | {r['planned'] / 2**20:.1f} | "
              f"{r['measured'] / 2**20:.1f} | {r['error']:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
