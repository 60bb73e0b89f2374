"""Memory modes side by side: step time, peak memory and bytes per trainable parameter, plus trainer overhead.

    python benchmarks/bench_memory.py                      # tiny UNet on the CPU (about 2 minutes)
    python benchmarks/bench_memory.py --model mid          # 185 M parameters, SDXL's widths
    python benchmarks/bench_memory.py --model full --device cuda --resolution 1024 --batch 1
                                                           # SDXL base's UNet (2.57 B), random weights
    python benchmarks/bench_memory.py --skip-trainer --modes none --sharded 2,4
                                                           # only the training.sharding table

Table 1 trains only the UNet on random latents and conditioning (speed and memory do not depend
on the weights' values). Peak memory is CUDA's max allocated on a GPU; on the CPU it is the bytes
held by weights, gradients (all at once, or the largest single one with the fused backward pass)
and optimizer state. Table 2 compares the whole trainer (`train_sdxl_ff.train`, data loading,
VAE, text encoders, logging) with a bare hand-written step on the same tiny model and batch.
Table 3 (--sharded, default 2 and 4 processes; torchrun on the CPU over gloo, on GPUs with nccl)
shards the UNet as training.sharding "fsdp2" does and reports what each process holds, measured
from its local shards, beside one process, with the step time relative to DDP's.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from sdxl_ff.config.load import load_config  # noqa: E402
from sdxl_ff.model.parts import build_tiny_sdxl  # noqa: E402
from sdxl_ff.model.trainables import Trainables  # noqa: E402
from sdxl_ff.optim.optimizers import build_optimizer  # noqa: E402
from sdxl_ff.optim.per_param import training_bytes  # noqa: E402

UNETS = {
    "mid": dict(block_out_channels=(320, 640, 640), layers_per_block=1, transformer_layers_per_block=(1, 1, 1),
                attention_head_dim=(5, 10, 10)),
    "full": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20)),
}
MODES = {
    "fp32 + AdamW8bit": {},
    "fp32 + AdamW8bit + checkpointing": {"checkpointing": True},
    "bf16 (stochastic rounding) + AdamW8bit": {"model.full_bf16": "true"},
    "bf16 + AdamW8bit + fused backward": {"model.full_bf16": "true", "training.fused_backward": "true"},
    "fp32 + Adafactor": {"optimizer.type": "adafactor"},
    "bf16 + Adafactor + fused backward": {"model.full_bf16": "true", "training.fused_backward": "true",
                                          "optimizer.type": "adafactor"},
}


diffusers.utils.logging.set_verbosity_error()


def build_unet(kind: str) -> UNet2DConditionModel:
    if kind == "tiny":
        return build_tiny_sdxl(0).unet
    return UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, **UNETS[kind])


def config_for(overrides: dict[str, str]):
    values = {"model.use_bf16": "true", "training.max_grad_norm": "null", "training.num_steps": "1",
              "training.grad_accum_steps": "1",
              "run.name": "bench", "optimizer.type": "adamw8bit",
              **{k: v for k, v in overrides.items() if "." in k}}
    return load_config(ROOT / "config.json", [f"{k}={v}" for k, v in values.items()])


def unet_mode_row(kind: str, mode: str, overrides: dict, device: str, resolution: int, batch: int,
                  steps: int) -> dict:
    cfg = config_for(overrides)
    unet = build_unet(kind).to(device, torch.bfloat16 if cfg.model.full_bf16 else torch.float32)
    if overrides.get("checkpointing"):
        unet.enable_gradient_checkpointing()
    unet.train()
    params = list(unet.parameters())
    optimizer, _ = build_optimizer(cfg, Trainables({"unet": unet}), torch.Generator(device).manual_seed(0))
    c = unet.config
    side = resolution // 8
    x = torch.randn(batch, 4, side, side, device=device)
    ctx = torch.randn(batch, 77, c.cross_attention_dim, device=device)
    added = {"text_embeds": torch.randn(batch, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim,
                                        device=device),
             "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                      device=device, dtype=torch.float32)}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    grad_bytes, times = 0, []
    for step in range(steps + 1):  # the first step warms up and creates the optimizer state
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda" or cfg.model.full_bf16):
            pred = unet(x, torch.randint(0, 1000, (batch,), device=device), ctx, added_cond_kwargs=added).sample
        F.mse_loss(pred.float(), x).backward()
        if not getattr(optimizer, "fused", False):  # the fused backward pass frees each gradient as it steps
            grad_bytes = max(grad_bytes, sum(p.grad.numel() * p.grad.element_size() for p in params))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    if getattr(optimizer, "fused", False):
        grad_bytes = optimizer.peak_grad_bytes
    report = training_bytes(params, optimizer, grad_bytes)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else report["total"]
    return {"mode": mode, "params_m": report["parameters"] / 1e6, "step_s": sum(times) / len(times),
            "peak_gib": peak / 2**30, "bytes_per_param": report["bytes_per_parameter"]}


def trainer_seconds_per_step(config: Path, steps: int, overrides: list[str]) -> float:
    """`train_sdxl_ff.train` in this process for `steps` optimizer steps, writing into a temporary folder, with
    no logging between and no final eval grid: the loop's seconds per step (the first step included; loading,
    caching and the final save are not)."""
    from train_sdxl_ff import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [f"training.num_steps={steps}", f"run.output_root={tmp}",
                                   "training.log_every=1000", "eval.final.enabled=false", *overrides])
        return train(cfg)["seconds"] / steps


def trainer_overhead(steps: int) -> tuple[float, float]:
    """Seconds per step: the whole trainer vs a bare step (same tiny model, batch, resolution)."""
    from sdxl_ff.model.conditioning import encode_prompts, time_ids
    from sdxl_ff.objective.predict import encode_latents

    trainer_s = trainer_seconds_per_step(
        ROOT / "configs" / "quickstart.json", steps,
        [f"data.image_dir={ROOT / 'data' / 'images'}",  # runs from any folder
         "training.batch_size=4", "optimizer.type=adamw8bit",  # the bare step's batch and optimizer
         "data.latent_cache.enabled=false"])  # the bare step encodes its latents too
    parts = build_tiny_sdxl(0)
    unet, te1, te2, vae = parts.unet, parts.text_encoder, parts.text_encoder_2, parts.vae
    te2.requires_grad_(False)
    vae.requires_grad_(False)
    params = list(unet.parameters()) + list(te1.parameters())
    import bitsandbytes as bnb
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=0.0)  # as the trainer row above
    scheduler = parts.noise_scheduler()
    pixels = torch.rand(4, 3, 128, 128) * 2 - 1
    captions = ["a red circle on a green background"] * 4
    sizes = torch.tensor([[128, 128]] * 4)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        latents = encode_latents(vae, pixels, g)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        embeds, pooled = encode_prompts(captions, (parts.tokenizer, parts.tokenizer_2), (te1, te2), "cpu")
        added = {"text_embeds": pooled, "time_ids": time_ids(sizes, torch.zeros_like(sizes), sizes)}
        pred = unet(scheduler.add_noise(latents, noise, t), t, embeds, added_cond_kwargs=added).sample
        F.mse_loss(pred, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    return trainer_s, sum(times) / len(times)


SHARDED_MODES = {"DDP + AdamW": ("ddp", "adamw"), "fsdp2 + AdamW": ("fsdp2", "adamw"),
                 "fsdp2 + AdamW8bit (torchao)": ("fsdp2", "adamw8bit")}


def sharded_worker(kind: str, device: str, resolution: int, batch: int, steps: int) -> None:
    """One of N processes (torchrun): each mode of SHARDED_MODES on the same UNet; rank 0 prints a JSON line."""
    import json

    import torch.distributed as dist

    from sdxl_ff.parallel.fsdp2 import local_bytes, shard_modules
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rows = {}
    for mode, (wrap, optimizer_type) in SHARDED_MODES.items():
        unet = build_unet(kind).to(device)
        unet.train()
        if wrap == "fsdp2":
            shard_modules({"unet": unet}, torch.device(device), world, "bf16" if device == "cuda" else "no")
            model = unet
        else:
            model = torch.nn.parallel.DistributedDataParallel(unet)
        cfg = config_for({"optimizer.type": optimizer_type, "training.sharding": wrap.replace("ddp", "none"),
                          "model.use_bf16": str(device == "cuda").lower()})
        optimizer, _ = build_optimizer(cfg, Trainables({"unet": unet}), sharded=wrap == "fsdp2")
        params, c, side = list(unet.parameters()), unet.config, resolution // 8
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(batch, 4, side, side, generator=g).to(device)
        ctx = torch.randn(batch, 77, c.cross_attention_dim, generator=g).to(device)
        added = {"text_embeds": torch.randn(batch, c.projection_class_embeddings_input_dim
                                            - 6 * c.addition_time_embed_dim, generator=g).to(device),
                 "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                          device=device, dtype=torch.float32)}
        times, held = [], {}
        for step in range(steps + 1):  # the first step warms up and creates the optimizer state
            dist.barrier()
            start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                pred = model(x, torch.full((batch,), 500, device=device), ctx, added_cond_kwargs=added).sample
            F.mse_loss(pred.float(), x).backward()
            held = local_bytes(params, optimizer)  # weights and gradients, before the step frees nothing
            optimizer.step()
            held["optimizer"] = local_bytes([], optimizer)["optimizer"]
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - start)
        n = sum(p.numel() for p in params)
        rows[mode] = {"params_m": n / 1e6, "step_s": sum(times) / len(times),
                      "bytes_per_param": sum(held.values()) / n, **{k: v / n for k, v in held.items()}}
        del model, unet, optimizer, params
        gc.collect()
    if rank == 0:
        print("SHARDED " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def sharded_table(kind: str, device: str, resolution: int, batch: int, steps: int, counts: list[int]) -> None:
    """Table 3: per process bytes and step time of fsdp2 (and DDP) at each number of processes."""
    import json
    import subprocess
    print(f"\ntraining.sharding: {kind} UNet, {resolution}x{resolution}, batch {batch} per process, "
          f"{'CUDA' if device == 'cuda' else 'CPU, gloo, 1 thread per process'}; bytes per trained parameter held "
          f"by each process (measured from its local shards)")
    print(f"{'processes':>9} {'mode':30} {'weights':>8} {'grads':>7} {'optim':>7} {'total':>7} {'s/step':>8} "
          f"{'vs DDP':>7}")
    one = {"AdamW": {"optimizer.type": "adamw"}, "AdamW8bit (bitsandbytes)": {}}
    for mode, overrides in one.items():  # one process: training.sharding "none"
        row = unet_mode_row(kind, mode, overrides, device, resolution, batch, steps)
        print(f"{1:>9} {mode:30} {'':>8} {'':>7} {'':>7} {row['bytes_per_param']:7.2f} {row['step_s']:8.3f}")
    for count in counts:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(count),
                   "--master_port", str(29400 + count), str(Path(__file__).resolve()), "--sharded-worker",
                   "--model", kind, "--device", device, "--resolution", str(resolution), "--batch", str(batch),
                   "--steps", str(steps)]
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("SHARDED ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{count} processes failed (exit code {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows = json.loads(line.removeprefix("SHARDED "))
        ddp = rows["DDP + AdamW"]["step_s"]
        for mode, row in rows.items():
            print(f"{count:>9} {mode:30} {row['weights']:8.2f} {row['gradients']:7.2f} {row['optimizer']:7.2f} "
                  f"{row['bytes_per_param']:7.2f} {row['step_s']:8.3f} {row['step_s'] / ddp:7.2f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "mid", "full"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-trainer", action="store_true", help="only the memory-mode table")
    parser.add_argument("--modes", default="", help="comma-separated words; run only the modes whose name contains "
                                                     "one (e.g. 'fused' for a full-size run in 24 GiB of RAM)")
    parser.add_argument("--sharded", default="2,4", help="comma-separated numbers of processes for the "
                                                             "training.sharding table ('' skips it)")
    parser.add_argument("--trainer-steps", type=int, default=20, help="steps of table 2 (trainer vs bare step)")
    parser.add_argument("--sharded-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sharded_worker:
        return sharded_worker(args.model, args.device, args.resolution, args.batch, args.steps)
    wanted = [w.strip() for w in args.modes.split(",") if w.strip()]
    modes = {m: o for m, o in MODES.items() if not wanted or any(w in m for w in wanted)}
    if not modes and args.modes != "none":
        parser.error(f"--modes {args.modes!r} matches none of: {', '.join(MODES)} (or 'none')")
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} thread)"
    print(f"\nUNet memory modes: {args.model} model, {args.resolution}x{args.resolution}, batch {args.batch}, "
          f"{name}")
    print(f"{'mode':42} {'params (M)':>10} {'s/step':>8} {'peak GiB':>9} {'bytes/param':>12}")
    for mode, overrides in modes.items():
        try:
            row = unet_mode_row(args.model, mode, overrides, args.device, args.resolution, args.batch, args.steps)
        except torch.OutOfMemoryError:  # the table's point on a 24 GB card: which modes fit
            row = None
        if row is None:  # outside the except block, so the failed mode's tensors can be freed
            gc.collect()
            torch.cuda.empty_cache()
            print(f"{mode:42} {'out of memory':>42}", flush=True)
            continue
        print(f"{row['mode']:42} {row['params_m']:10.1f} {row['step_s']:8.3f} {row['peak_gib']:9.3f} "
              f"{row['bytes_per_param']:12.2f}", flush=True)
    counts = [int(n) for n in args.sharded.split(",") if n.strip()]
    if counts:
        sharded_table(args.model, args.device, args.resolution, args.batch, args.steps, counts)
    if not args.skip_trainer:
        trainer_s, bare_s = trainer_overhead(steps=args.trainer_steps)
        print("\nTrainer vs bare step: tiny SDXL, 128x128, batch 4, UNet + text encoder 1 trained, CPU")
        print(f"{'trainer s/step':>15} {'bare s/step':>12} {'overhead ratio':>15}")
        print(f"{trainer_s:15.3f} {bare_s:12.3f} {trainer_s / bare_s:15.2f}")


if __name__ == "__main__":
    main()
