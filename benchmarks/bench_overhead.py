"""Host overhead of one optimizer step, mode by mode, measured on any machine (no GPU needed).

    python benchmarks/bench_overhead.py                  # every mode on the CPU (a few minutes)
    python benchmarks/bench_overhead.py --small          # 4 modes, few steps (tests/benchmarks/test_benchmarks.py)
    python benchmarks/bench_overhead.py --device cuda    # the same on a GPU

The UNet is SDXL base's own config (tests/reference/sdxl_base_configs/unet: the same blocks, transformer depths
1/2/10, text_time embedding and 1,680 parameter tensors) with narrow channels, at a 64 px (8x8 latent) batch
of one, so the figures are the host's: Python, dispatch, syncs. Each mode builds its run with the trainer's own
code (`configure_modules`, `Run`: optimizer, per-parameter modes, EMA) and times `train_step` +
`Run.after_step` on non-logging steps from cached latents and text embeddings; config.json's defaults otherwise
(bf16 autocast, max_grad_norm 1.0, detect_anomaly on).

Per optimizer step it prints the aten ops dispatched (a TorchDispatchMode counter; bitsandbytes' CUDA kernels
are called through ctypes and are not aten ops; torchao's update, compiled on CUDA, runs eagerly under the
counter, which torch.compile refuses, so its counted ops are the eager ones and only its timed steps compiled),
the host-device syncs (sdxl_ff/runtime/host_sync.py: `.item()`,
`.tolist()`, blocking host<->CUDA copies, `torch.cuda.synchronize`; on the CPU what would wait on a GPU) and the
host milliseconds (median of timed steps, no counter attached). The floor is the bare forward/backward of the
same UNet plus one fused torch AdamW step (foreach where fused is unavailable). The last line reads
`worst: MODE ops/floor X.XX ms/floor Y.YY syncs N` for the mode furthest above the floor, N its syncs per step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from sdxl_ff.checkpoint.checkpointer import StopRequest  # noqa: E402
from sdxl_ff.config.load import load_config  # noqa: E402
from sdxl_ff.data.batch_sampler import SameSizeBatchSampler  # noqa: E402
from sdxl_ff.model.parts import build_tiny_sdxl  # noqa: E402
from sdxl_ff.model.trainables import configure_modules  # noqa: E402
from sdxl_ff.parallel.accelerator import make_accelerator  # noqa: E402
from sdxl_ff.parallel.strategy import Parallelism  # noqa: E402
from sdxl_ff.runtime.host_sync import HostSyncCounter, optimizer_step_counters  # noqa: E402
from sdxl_ff.train.run import Run  # noqa: E402
from sdxl_ff.train.step import train_step  # noqa: E402

SDXL_UNET_CONFIG = ROOT / "tests" / "reference" / "sdxl_base_configs" / "unet" / "config.json"
# SDXL's heads (5/10/20) over 4 channels each; the tiny text encoders' widths; every block and layer kept
NARROW = dict(block_out_channels=[20, 40, 80], norm_num_groups=4, cross_attention_dim=96,
              addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=8)
LATENT = 8  # 64 px
REGIONAL = "fp32 + AdamW8bit + regional compile"
MODES = {
    "fp32 + AdamW8bit": {},
    "fp32 + AdamW (torch)": {"optimizer.type": "adamw"},
    "full_bf16 + AdamW8bit": {"model.full_bf16": "true"},
    "full_bf16 + fused_backward": {"model.full_bf16": "true", "training.fused_backward": "true",
                                   "training.max_grad_norm": "null"},
    "fp32 + AdamW8bit + EMA": {"model.use_ema": "true", "training.ema_update_every": "1"},
    "fp32 + AdamW8bit + EMA on CPU": {"model.use_ema": "true", "training.ema_update_every": "1",
                                      "model.ema_on_cpu": "true"},
    REGIONAL: {"model.use_torch_compile": "regional"},  # + the backend of --compile-backend
}
SMALL_MODES = ("fp32 + AdamW8bit", "full_bf16 + fused_backward", "fp32 + AdamW8bit + EMA", REGIONAL)
diffusers.utils.logging.set_verbosity_error()


def narrow_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    config = json.loads(SDXL_UNET_CONFIG.read_text())
    config.update(NARROW)
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(config)


def config_for(overrides: dict[str, str], device: str, out: str, num_steps: int):
    values = {"device": device, "model.id": "builtin:tiny-sdxl", "run.name": "bench", "run.output_root": out,
              "training.num_steps": str(num_steps), "training.batch_size": "1", "training.grad_accum_steps": "1",
              "model.use_gradient_checkpointing": "false", "training.log_every": "1000000",
              "data.image_dir": str(ROOT / "data" / "images"), **overrides}
    return load_config(ROOT / "config.json", [f"{k}={v}" for k, v in values.items()])


def cached_batch(pin: bool) -> dict:
    """One batch as the latent and text-embedding caches give it (the loader pins it for CUDA)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"latent_mean": torch.randn(1, 4, LATENT, LATENT, generator=g),
               "latent_std": torch.rand(1, 4, LATENT, LATENT, generator=g) * 0.1,
               "prompt_embeds": torch.randn(1, 77, NARROW["cross_attention_dim"], generator=g),
               "pooled_prompt_embeds": torch.randn(1, 32, generator=g)}
    if pin:
        tensors = {k: v.pin_memory() for k, v in tensors.items()}
    size = torch.tensor([[LATENT * 8, LATENT * 8]])
    return {**tensors, "original_size": size, "crop_top_left": torch.zeros(1, 2, dtype=torch.long),
            "target_size": size, "path": ["bench.png"]}


def endless(batch: dict):
    index = 0
    while True:
        yield 0, index, batch
        index += 1


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(step, device: str, warmup: int, counted: int, timed: int, host_side=lambda: ()) -> dict:
    """Ops and syncs per step (counted steps), host ms per step (median of timed steps, no counter attached)."""
    for _ in range(warmup):
        step()
    sync(device)
    counter = HostSyncCounter(host_side())
    with counter:
        for _ in range(counted):
            step()
    sync(device)
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    sync(device)
    kinds = ", ".join(f"{k} {v / counted:g}" for k, v in sorted(counter.syncs.items()))
    return {"ops": counter.ops / counted, "syncs": counter.total_syncs / counted, "kinds": kinds,
            "ms": statistics.median(times) * 1000}


def mode_row(name: str, device: str, warmup: int, counted: int, timed: int, backend: str = "inductor") -> dict:
    """One mode's row; a compiling mode compiles during its warm-up steps (so give it at least one)."""
    overrides = dict(MODES[name])
    if "model.use_torch_compile" in overrides:
        overrides["model.torch_compile_kwargs"] = json.dumps({"backend": backend})
    # one step more than measured: no step is the run's last (which logs), and the run's planned learning-rate curve
    # (lr_schedule.png, a factor and a point per step) is drawn for these steps, not for a million
    num_steps = warmup + counted + timed + 1
    with tempfile.TemporaryDirectory() as out:
        cfg = config_for(overrides, device, out, num_steps)
        accelerator = make_accelerator(cfg)
        parts = build_tiny_sdxl(0)
        parts.unet = narrow_sdxl_unet()
        trainables = configure_modules(parts, cfg, accelerator)
        sampler = SameSizeBatchSampler([(LATENT * 8, LATENT * 8)], 1, 0)
        batches = endless(cached_batch(pin=device == "cuda"))
        with StopRequest() as stop, contextlib.redirect_stderr(io.StringIO()):  # the real bar, drawn into a buffer
            run = Run(cfg, accelerator, Parallelism.for_run(cfg, accelerator), parts, trainables, sampler, 0, num_steps)

            def step():
                result = train_step(run, batches, stop)
                assert run.after_step(result, stop) is None

            row = measure(step, device, warmup, counted, timed, lambda: optimizer_step_counters(run.optimizer))
            run.bar.close()
    return {"mode": name, **row}


def floor_row(device: str, warmup: int, counted: int, timed: int) -> dict:
    """The bare step: forward, MSE, backward, one fused (else foreach) torch AdamW step, under bf16 autocast."""
    unet = narrow_sdxl_unet().to(device).train()
    params = list(unet.parameters())
    try:
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    except RuntimeError:
        optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, LATENT, LATENT, generator=g).to(device)
    ctx = torch.randn(1, 77, NARROW["cross_attention_dim"], generator=g).to(device)
    added = {"text_embeds": torch.randn(1, 32, generator=g).to(device),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]], device=device)}
    t = torch.tensor([500], device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            pred = unet(x, t, ctx, added_cond_kwargs=added).sample
        F.mse_loss(pred.float(), x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"mode": "floor: bare step + fused AdamW", **measure(step, device, warmup, counted, timed,
                                                               lambda: optimizer_step_counters(optimizer))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--small", action="store_true", help="4 modes, 1 warm-up, 1 counted and 1 timed step")
    parser.add_argument("--modes", help=f"comma-separated subset of: {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (median)")
    parser.add_argument("--compile-backend", help="torch.compile backend of the regional compile row (default "
                                                  "inductor; with --small eager: inductor compiles for minutes on a "
                                                  "CPU, eager measures the compiled blocks' guards and dispatch)")
    args = parser.parse_args(argv)
    backend = args.compile_backend or ("eager" if args.small else "inductor")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    modes = args.modes.split(",") if args.modes else list(SMALL_MODES if args.small else MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    warmup, counted, timed = (1, 1, 1) if args.small else (3, 3, args.steps)
    floor = floor_row(args.device, warmup, counted, timed)
    rows = [mode_row(m, args.device, warmup, counted, timed, backend) for m in modes]
    unet = narrow_sdxl_unet()
    print(f"device {args.device}; SDXL base's UNet config with channels {NARROW['block_out_channels']} "
          f"({len(list(unet.parameters()))} parameter tensors, {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}"
          f" M parameters), batch 1 at {LATENT * 8} px; {warmup} warm-up, {counted} counted, {timed} timed steps; "
          f"regional compile with backend {backend}\n")
    print("| mode | aten ops/step | syncs/step | host ms/step | ops/floor | ms/floor |")
    print("|---|---|---|---|---|---|")
    for row in [floor, *rows]:
        row["ops_ratio"], row["ms_ratio"] = row["ops"] / floor["ops"], row["ms"] / floor["ms"]
        syncs = f"{row['syncs']:g}" + (f" ({row['kinds']})" if row["kinds"] else "")
        print(f"| {row['mode']} | {row['ops']:.0f} | {syncs} | {row['ms']:.1f} | {row['ops_ratio']:.2f} | "
              f"{row['ms_ratio']:.2f} |")
    worst = max(rows, key=lambda r: max(r["ops_ratio"], r["ms_ratio"]))
    print(f"\nworst: {worst['mode']} ops/floor {worst['ops_ratio']:.2f} ms/floor {worst['ms_ratio']:.2f} "
          f"syncs {worst['syncs']:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
