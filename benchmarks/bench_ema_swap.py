"""Memory an EMA swap (eval.use_ema, the final save) holds on the weights' device, per weight dtype and EMA place.

    OMP_NUM_THREADS=1 python benchmarks/bench_ema_swap.py [--params-m 50] [--device cuda]

A stack of linear layers with about `--params-m` million trained parameters stands in for the UNet. Each
row swaps the EMA in and out once (`EMA.applied()`) and prints the extra bytes on the weights' device while
swapped in (on CUDA: `torch.cuda.memory_allocated`, plus the peak during the swap; on the CPU: the storages
reachable from the EMA object) and whether the trained weights came back bit for bit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sdxl_ff.optim.ema import EMA  # noqa: E402

WIDTH = 1024


def held_bytes(ema: EMA, device: torch.device) -> int:
    """Bytes on `device`: the allocator's count on CUDA, else every distinct storage the EMA object reaches."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    tensors = [*ema.params.values(), *(ema.shadow or {}).values(), *getattr(ema, "_backup", {}).values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.device == device}
    return sum(storages.values())


def measure(params_m: float, dtype: torch.dtype, ema_on_cpu: bool, device: torch.device) -> dict:
    layers = max(1, round(params_m * 1e6 / (WIDTH * WIDTH + WIDTH)))
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)]).to(device, dtype)
    ema = EMA({"model": model}, decay=0.9, update_every=1, start_step=0, device="cpu" if ema_on_cpu else None)
    ema.update(0)
    with torch.no_grad():
        for shadow in ema.shadow.values():
            shadow.add_(0.01)
    trained = [p.detach().clone() for p in model.parameters()]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before, started = held_bytes(ema, device), time.perf_counter()
    with ema.applied():
        during = held_bytes(ema, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    exact = all(torch.equal(p.view(torch.uint8), t.view(torch.uint8))
                for p, t in zip(model.parameters(), trained, strict=True))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"weights": weights, "extra": during - before, "peak": peak, "seconds": seconds, "exact": exact}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-m", type=float, default=50.0, help="trained parameters, in millions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device}, {args.params_m:g}M parameters")
    print(f"{'weights':<9} {'EMA on':<7} {'weights MiB':>11} {'extra held MiB':>14} {'peak MiB':>9} "
          f"{'swap s':>7} {'bit-exact':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        for ema_on_cpu in (False, True):
            if ema_on_cpu and device.type == "cpu":
                continue  # the same place as the weights: the first row
            r = measure(args.params_m, dtype, ema_on_cpu, device)
            peak = "-" if r["peak"] is None else f"{r['peak'] / 2**20:.1f}"
            print(f"{str(dtype).removeprefix('torch.'):<9} {'CPU' if ema_on_cpu else 'device':<7} "
                  f"{r['weights'] / 2**20:>11.1f} {r['extra'] / 2**20:>14.1f} {peak:>9} {r['seconds']:>7.3f} "
                  f"{str(r['exact']):>9}")


if __name__ == "__main__":
    main()
