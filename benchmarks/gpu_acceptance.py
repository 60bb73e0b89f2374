"""One command that proves the trainer on a lent GPU: SDXL's UNet per memory mode, the whole trainer, then the
CUDA test tier, within --budget-s (default 480 s: 8 minutes on one H100, most important rows first).

    python benchmarks/gpu_acceptance.py --out gpu_table.md     # on a CUDA GPU
    python benchmarks/gpu_acceptance.py --rows "24 GB,trainer" # rerun a subset (words of the mode names)
    python benchmarks/gpu_acceptance.py --dry-run      # any machine: FLOPs per step, timings left empty
    python benchmarks/gpu_acceptance.py --small --device cpu --skip-tests   # the tiny UNet: checks the script

The full-size SDXL base UNet (2,567.5 M parameters, random weights built on the device, nothing downloaded)
trains at 1024x1024 on random latents and conditioning. Rows, in order: torch.compile (regional, then the whole
UNet; compile time in its own column), each memory mode at batch 1 and 4 (the 24 GB recipe with the planner's
peak beside the measured one), the real trainer (`train_sdxl_ff.train` in this process on the random full-size
SDXL, synthetic images, latent cache, 20 steps) against the bare step of its mode and batch, then pairs that
measure TF32, channels_last and cudnn.benchmark. A row whose H100 estimate no longer fits the budget is printed
as "not run (budget)". Then `pytest -m cuda tests/train/test_cuda.py` with SDXL_FF_REQUIRE_CUDA=1 (a missing GPU
fails instead of skipping) in what is left of the budget. On a machine with 2 or more GPUs, training.sharding
"fsdp2" follows on all of them (bench_memory.py's table 3).
One markdown table goes to stdout and to --out: s/step, images/s, peak memory (max allocated and max
reserved), MFU = model FLOPs per step / step time / the card's dense bf16 peak, and GPU busy = kernel time of one
profiled step (CUPTI) / the timed s/step (below 100 %: the card waits for the host). Model FLOPs are counted
with torch.utils.flop_counter.FlopCounterMode on the meta device, forward + backward, without the recompute
of gradient checkpointing. A mode that runs out of memory prints "out of memory" and the table goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its "kernels" notice at import
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from acceptance_trainer import trainer_step_s  # noqa: E402
from bench_memory import build_unet, config_for  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from sdxl_ff.model.trainables import Trainables  # noqa: E402
from sdxl_ff.optim.optimizers import build_optimizer  # noqa: E402
from sdxl_ff.plan.planner import plan_memory  # noqa: E402
from sdxl_ff.runtime.gpu_settings import set_tf32  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; matched in this order
# against torch.cuda.get_device_name(), so the more specific names come first.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0)]


def peak_tflops(card: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in card), None)


@dataclass(frozen=True)
class Row:
    """One measured configuration of the UNet training step."""
    mode: str
    batch: int
    bf16_weights: bool = False  # model.full_bf16
    autocast: bool = True  # bf16 autocast (model.use_bf16); off: pure fp32 compute
    checkpointing: bool = False
    fused: bool = False
    compile: bool = False
    tf32: bool = True  # model.allow_tf32 (default true)
    channels_last: bool = False  # model.channels_last (default false)
    cudnn_benchmark: bool = True  # model.cudnn_benchmark "auto": on for a run with one batch shape
    regional: bool = False  # with compile: each repeated block compiled, not the whole UNet
    trainer: bool = False  # the whole trainer (train_sdxl_ff.train) instead of the bare step
    plan: bool = False  # the memory planner's peak beside the measured one, even without --plan
    estimate_s: float = 15  # seconds on one H100 (build, warm-up, timed steps); the budget skips by it

    def overrides(self) -> dict[str, str]:
        values = {"model.use_bf16": "true"}
        if self.bf16_weights:
            values["model.full_bf16"] = "true"
        if self.fused:
            values["training.fused_backward"] = "true"
        return values


RECIPE_24GB = "24 GB recipe: full_bf16 + fused_backward + checkpointing"
TRAINER = "trainer (train_sdxl_ff.train): full_bf16 + AdamW8bit"


def plan_rows() -> list[Row]:
    """All rows, most important first, as the --budget-s cuts the tail: compile (its time has its own column),
    every memory mode at batch 1 and 4, the 24 GB recipe, the whole trainer against the bare step, then the
    single-setting pairs. The UNet is rebuilt only where the weights go from bf16 back to fp32 (once)."""
    bf16 = Row("full_bf16 + AdamW8bit", 1, bf16_weights=True, estimate_s=10)
    rows = [replace(bf16, mode="full_bf16 + regional torch.compile (repeated blocks)", compile=True, regional=True,
                    estimate_s=60),
            replace(bf16, mode="full_bf16 + torch.compile (whole UNet)", compile=True, estimate_s=120)]
    rows += [Row("fp32 weights + AdamW8bit", batch, estimate_s=9 + batch) for batch in (1, 4)]  # +5 s: fresh UNet
    rows += [Row("fp32 weights + AdamW8bit + checkpointing", batch, checkpointing=True, estimate_s=9 + 1.5 * batch)
             for batch in (1, 4)]
    rows += [replace(bf16, batch=batch, estimate_s=9 + batch) for batch in (1, 4)]
    rows += [Row("full_bf16 + fused_backward", batch, bf16_weights=True, fused=True, estimate_s=11 + batch)
             for batch in (1, 4)]
    rows += [Row(RECIPE_24GB, batch, bf16_weights=True, fused=True, checkpointing=True, plan=True,
                 estimate_s=40 + 1.5 * batch) for batch in (1, 4)]  # +30 s: the planner traces the UNet on the CPU
    rows += [replace(bf16, mode=TRAINER, trainer=True, estimate_s=90)]  # build, cache, 20 steps, final save
    rows += [replace(bf16, mode="full_bf16, channels_last off"),
             replace(bf16, mode="full_bf16, channels_last on", channels_last=True),
             replace(bf16, mode="full_bf16, cudnn.benchmark off", cudnn_benchmark=False),
             replace(bf16, mode="full_bf16, cudnn.benchmark on"),
             Row("fp32 compute (no autocast), TF32 off", 1, autocast=False, tf32=False, estimate_s=15),
             Row("fp32 compute (no autocast), TF32 on", 1, autocast=False, estimate_s=15)]
    return rows


def planned_gib(row: Row, unet_config: dict, resolution: int) -> float:
    """The memory planner's predicted peak (max allocated) for this row, in GiB (sdxl_ff/plan/planner.py)."""
    mode = "full_bf16+fused_backward" if row.fused else "full_bf16" if row.bf16_weights else "fp32"
    plan = plan_memory(dict(unet_config), resolution=resolution, batch=row.batch, mode=mode,
                       gradient_checkpointing=row.checkpointing, optimizer="adamw8bit",
                       mixed_precision="bf16" if row.autocast else "no")
    return plan.peak_bytes / 2**30


def step_inputs(unet, batch: int, resolution: int, device) -> tuple:
    c = unet.config
    side = resolution // 8
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, 4, side, side, device=device, generator=g)
    ctx = torch.randn(batch, 77, c.cross_attention_dim, device=device, generator=g)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    added = {"text_embeds": torch.randn(batch, pooled, device=device, generator=g),
             "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                      device=device, dtype=torch.float32)}
    t = torch.randint(0, 1000, (batch,), device=device, generator=g)
    return x, t, ctx, added


def unet_config_of(model: str) -> dict:
    return dict(_unet_config(model))  # a copy: the cached one stays as built


@functools.cache  # "tiny" builds its whole pipeline (weights included) for this
def _unet_config(model: str):
    if model == "tiny":
        return build_unet(model).config
    with torch.device("meta"):
        return build_unet(model).config


def count_flops(model: str, batch: int, resolution: int, backward: bool = True) -> int:
    """Model FLOPs of one UNet forward (+ backward) pass, counted on the meta device: no memory, no time."""
    return _count_flops(model, batch, resolution, backward)  # positional: one cache key however it is called


# Kept per process: a count depends only on these arguments (each model is one fixed config; FLOPs do not depend
# on the weights' values), and main() and the tests ask for the same counts again (batch 1 and 4, the forward).
@functools.cache
def _count_flops(model: str, batch: int, resolution: int, backward: bool) -> int:
    config = _unet_config(model) if model == "tiny" else None  # the tiny one is built with its pipeline
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config) if config else build_unet(model)
    x, t, ctx, added = step_inputs_meta(unet, batch, resolution)
    counter = FlopCounterMode(display=False)
    with counter:
        pred = unet(x, t, ctx, added_cond_kwargs=added).sample
        if backward:
            F.mse_loss(pred.float(), x).backward()
    return counter.get_total_flops()


def step_inputs_meta(unet, batch: int, resolution: int) -> tuple:
    c = unet.config
    side = resolution // 8
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    with torch.device("meta"):
        return (torch.randn(batch, 4, side, side), torch.zeros(batch, dtype=torch.long),
                torch.randn(batch, 77, c.cross_attention_dim),
                {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.zeros(batch, 6)})


def run_row(unet, row: Row, device: str, resolution: int, warmup: int, steps: int) -> dict:
    """Train `row.batch` random samples for warmup + steps optimizer steps; time the last `steps`."""
    cuda = device == "cuda"
    if cuda:
        set_tf32(row.tf32)
        torch.backends.cudnn.benchmark = row.cudnn_benchmark
    unet.to(memory_format=torch.channels_last if row.channels_last else torch.contiguous_format)
    if row.checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    cfg = config_for(row.overrides())
    optimizer, _ = build_optimizer(cfg, Trainables({"unet": unet}), torch.Generator(device).manual_seed(0))
    blocks = [m for m in unet.modules() if type(m).__name__ in REPEATED_BLOCKS] if row.regional else []
    if blocks:  # in place: the UNet's own forward stays eager around the compiled blocks
        unet.compile_repeated_blocks()  # diffusers: its _repeated_blocks, the BasicTransformerBlocks
        for block in blocks:
            if block._compiled_call_impl is None:
                block.compile()  # the ResnetBlock2Ds, which diffusers leaves eager
    model = torch.compile(unet) if row.compile and not row.regional else unet
    x, t, ctx, added = step_inputs(unet, row.batch, resolution, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=row.autocast):
            pred = model(x, t, ctx, added_cond_kwargs=added).sample
        F.mse_loss(pred.float(), x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    compile_s, busy = None, None
    try:
        # every ResnetBlock2D width is a shape of its own: past dynamo's default 8 it would run eager unnoticed
        with torch._dynamo.config.patch(recompile_limit=64) if row.compile else contextlib.nullcontext():
            for i in range(warmup + steps):
                if i == warmup:
                    sync(device)
                    start = time.perf_counter()
                first = time.perf_counter()
                step()
                if row.compile and i == 0:
                    sync(device)
                    compile_s = time.perf_counter() - first
            sync(device)
            wall_s = time.perf_counter() - start
            gpu_s = gpu_seconds(step) if cuda else None  # one more step, profiled
            busy = gpu_s / (wall_s / steps) if gpu_s is not None else None
    finally:
        if hasattr(optimizer, "detach_fused_backward"):  # PerParamOptimizer, or one stepping per parameter
            optimizer.detach_fused_backward()  # the next row reuses the UNet's parameters
        unet.zero_grad(set_to_none=True)
        for block in blocks:
            block._compiled_call_impl = None  # nn.Module.compile's hook: the next row runs eager
        optimizer = model = None  # the step closure holds them: drop them here
        if row.compile:
            torch._dynamo.reset()
    return {"step_s": wall_s / steps, "compile_s": compile_s, "gpu_busy": busy,
            "alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}


# The UNet's repeated blocks (diffusers' class names), compiled one by one for the regional compile row.
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def gpu_seconds(step) -> float | None:
    """Seconds the GPU spends in kernels, copies and memsets during one call of `step`, from CUPTI's device-side
    records (torch.profiler, CUDA activity only). CUDA events around a step would not do: they measure the
    stream's span, idle gaps included, so a step waiting on the host would read as busy as one that is not."""
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    except RuntimeError as e:  # CUPTI unavailable: the row keeps its timings, GPU busy reads "-"
        print(f"GPU busy not measured: {e}", file=sys.stderr, flush=True)
        return None
    return sum(e.time_range.elapsed_us() for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_cuda_tier(timeout: int, log_path: Path) -> str:
    """The `cuda` tests (a missing GPU fails them), logged to `log_path` as they go; returns pytest's summary."""
    env = {**os.environ, "SDXL_FF_REQUIRE_CUDA": "1"}
    # several tiny runs side by side when pytest-xdist is there: each is a short process on a big card
    parallel = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    command = [sys.executable, "-m", "pytest", "-o", "addopts=", "-v", "-rfEs", "--durations=10", "-p",
               "no:cacheprovider", *parallel, "-m", "cuda", "tests/train/test_cuda.py"]
    print(f"cuda tier: {' '.join(command[1:])} (log: {log_path})", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    print("\n".join(lines[-40:]), flush=True)
    if code is None:
        done = sum(" PASSED" in line or " FAILED" in line or " SKIPPED" in line for line in lines)
        return f"cuda tier: did not finish in {timeout} s ({done} test(s) had finished; see {log_path})"
    return f"cuda tier (exit {code}): {lines[-1] if lines else 'no output'}"


def sharded_table(device: str, model: str, resolution: int, timeout: float) -> list[str]:
    """training.sharding "fsdp2" on every GPU of the machine (bench_memory.py's table 3: bytes per trained
    parameter held by each process, step time against DDP), or a line saying why it is not run."""
    count = torch.cuda.device_count() if device == "cuda" else 0
    if count < 2:
        return [f"training.sharding fsdp2: not measured, it needs 2 or more GPUs ({count} visible); "
                f"run this script on a multi-GPU machine for its rows"]
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--device", "cuda", "--model", model,
               "--resolution", str(resolution), "--batch", "1", "--steps", "2", "--skip-trainer", "--modes", "none",
               "--sharded", str(count)]
    timeout = max(timeout, 60)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [f"training.sharding fsdp2 on {count} GPUs: past its {timeout:.0f} s budget"]
    if proc.returncode != 0:
        return [f"training.sharding fsdp2 on {count} GPUs failed (exit code {proc.returncode}): "
                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"]
    table = proc.stdout[proc.stdout.index("training.sharding:"):] if "training.sharding:" in proc.stdout else ""
    return ["", *table.rstrip().splitlines()]


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table_line(card: str, row: Row, flops: int, result: dict | str | None, peak: float | None,
               planned: float | None = None) -> str:
    cells = [card, row.mode, str(row.batch), f"{flops / 1e12:.3g}"]
    alloc = result.get("alloc_gib") if isinstance(result, dict) else None
    if isinstance(result, dict):
        mfu = flops / result["step_s"] / (peak * 1e12) if peak else None
        busy = result.get("gpu_busy")
        cells += [f"{result['step_s']:.3f}", f"{row.batch / result['step_s']:.2f}",
                  fmt(alloc, ".1f") or "-", fmt(result.get("reserved_gib"), ".1f") or "-",
                  f"{100 * mfu:.1f} %" if mfu is not None else "-", f"{100 * busy:.0f} %" if busy is not None else "-",
                  fmt(result.get("compile_s"), ".0f")]
        note = result.get("note", "")
    else:
        note = result or ""
        cells += ["", "", "", "", "", "", ""]
    cells += [fmt(planned, ".3g"), f"{alloc / planned:.2f}" if alloc is not None and planned else ""]
    return "| " + " | ".join([*cells, note]) + " |"


HEADER = ["card", "mode", "batch", "TFLOP/step", "s/step", "images/s", "max alloc GiB", "max reserved GiB", "MFU",
          "GPU busy", "compile s", "planned GiB", "actual/planned", "notes"]


def header() -> str:
    return "| " + " | ".join(HEADER) + " |\n" + "|---" * len(HEADER) + "|"


def selected_rows(words: str, small_cpu: bool) -> list[Row]:
    """The rows whose mode contains one of the comma-separated `words` (all when empty), in plan_rows' order."""
    wanted = [w.strip() for w in words.split(",") if w.strip()]
    rows = [r for r in plan_rows() if not wanted or any(w in r.mode for w in wanted)]
    if small_cpu:
        rows = [r for r in rows if not r.compile]  # inductor compiles for minutes on a CPU
    return rows


def measure(row: Row, unet, args, model: str, resolution: int, results: dict) -> tuple[object, dict | str]:
    """One row: the bare step on the shared UNet (rebuilt where fp32 follows bf16), or the whole trainer."""
    # small: one timed step, from the start (it creates the optimizer state) unless it compiles; such timings only
    # show the script works, and the trainer row times its first step too (bench_memory.trainer_seconds_per_step)
    warmup, steps = (int(row.compile), 1) if args.small else (2, 5)
    if row.trainer:  # main() has dropped the shared UNet: the trainer builds its own model
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        bare = results.get((False, row.bf16_weights, row.fused, row.checkpointing, row.batch))
        trainer_s = trainer_step_s(row.overrides(), full_size=model == "full", device=args.device,
                                   resolution=resolution, batch=row.batch, checkpointing=row.checkpointing,
                                   steps=2 if args.small else 20)
        note = (f"trainer/bare {trainer_s / bare['step_s']:.2f} (bare step {bare['step_s']:.3f} s)" if bare
                else "trainer/bare: the bare row of this mode and batch was not run")
        cuda = args.device == "cuda"
        return None, {"step_s": trainer_s, "compile_s": None, "note": note,
                      "alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                      "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}
    if unet is not None and not row.bf16_weights and unet.dtype == torch.bfloat16:
        unet = None  # fp32 after bf16 rows: a fresh UNet, as casting bf16 back would lose the fp32 weights' bits
        free(args.device)
    if unet is None:
        with torch.device(args.device):
            unet = build_unet(model).train()
    if row.bf16_weights and unet.dtype != torch.bfloat16:
        unet.to(torch.bfloat16)
    result = run_row(unet, row, args.device, resolution, warmup, steps)
    if not row.compile and row.tf32 and row.autocast and not row.channels_last:
        results[(False, row.bf16_weights, row.fused, row.checkpointing, row.batch)] = result
    return unet, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="count FLOPs only (no GPU needed); timings empty")
    parser.add_argument("--small", action="store_true", help="the tiny UNet at 128x128, one timed step per row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the cuda test tier")
    parser.add_argument("--tests-timeout", type=int, default=200,
                        help="seconds for the cuda tier at most (default 200; it runs after the rows, in what is "
                             "left of --budget-s)")
    parser.add_argument("--budget-s", type=float, default=480,
                        help="seconds for the whole script (default 480): a row whose H100 estimate no longer fits "
                             "is printed as 'not run (budget)'")
    parser.add_argument("--plan", action="store_true",
                        help="add the memory planner's predicted peak to every row, not only the 24 GB recipe's "
                             "(traces the UNet on the CPU: about half a minute per distinct setting for SDXL)")
    parser.add_argument("--rows", default="", help="comma-separated words: run only the rows whose mode contains "
                                                   "one (e.g. 'compile' or '24 GB,trainer')")
    parser.add_argument("--out", default=str(ROOT / ".output" / "gpu_acceptance.md"), help="file for the table")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model, resolution = ("tiny", 128) if args.small else ("full", 1024)
    if not args.dry_run and args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible: use --dry-run (FLOPs only) or --small --device cpu")
    if not args.dry_run and args.device != "cuda" and not args.small:
        parser.error("the full-size UNet on the CPU takes hours: use --dry-run, or --small for the tiny one")
    rows = selected_rows(args.rows, args.small and args.device != "cuda")
    if not rows:
        parser.error(f"--rows {args.rows!r} matches no row; the rows are: {', '.join(r.mode for r in plan_rows())}")
    flops = {batch: count_flops(model, batch, resolution) for batch in sorted({r.batch for r in rows})}
    forward = count_flops(model, 1, resolution, backward=False)
    unet_config = unet_config_of(model)
    card = torch.cuda.get_device_name() if args.device == "cuda" and not args.dry_run else (
        "-" if args.dry_run else f"CPU ({platform.processor() or platform.machine()})")
    peak = peak_tflops(card)
    lines = [f"SDXL UNet ({model}), {resolution}x{resolution}, random weights; torch {torch.__version__}"
             + (f", CUDA {torch.version.cuda}" if args.device == "cuda" else "")
             + f"; forward {forward / 1e12:.3g} TFLOP per image; dense bf16 peak: "
             + (f"{peak:g} TFLOP/s" if peak else "unknown card, MFU not computed")]
    print("\n".join(lines), flush=True)
    print(header(), flush=True)
    body, results, unet = [], {}, None
    for row in rows:
        result: dict | str | None = None
        if not args.dry_run:
            if time.perf_counter() - started + (0 if args.small else row.estimate_s) > args.budget_s:
                result = f"not run (budget): its ~{row.estimate_s:g} s on an H100 is past --budget-s {args.budget_s:g}"
            else:
                try:
                    if row.trainer:
                        unet = None
                        free(args.device)
                    unet, result = measure(row, unet, args, model, resolution, results)
                except torch.OutOfMemoryError:
                    result = "out of memory"
                except Exception as e:  # one broken mode must not cost the rest of the table
                    result = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                free(args.device)
        wanted = (args.plan or row.plan) and (args.dry_run or isinstance(result, dict))  # not for a skipped row
        planned = planned_gib(row, unet_config, resolution) if wanted else None
        line = table_line(card, row, flops[row.batch], result, peak, planned)
        body.append(line)
        print(line, flush=True)
    unet = None
    free(args.device)
    if not args.dry_run:
        left = args.budget_s - (time.perf_counter() - started)
        if not args.skip_tests:
            body += ["", run_cuda_tier(int(min(args.tests_timeout, left)), Path(args.out).with_name("cuda_tier.log"))
                     if left > 30 else f"cuda tier: not run (budget): {left:.0f} s of --budget-s left"]
            left = args.budget_s - (time.perf_counter() - started)
        sharded = sharded_table(args.device, model, resolution, left)
        print("\n".join(sharded), flush=True)
        body += sharded
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*lines, "", header(), *body]) + "\n")
    print(f"table written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
