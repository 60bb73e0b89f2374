"""What the finiteness check before every save costs next to the save itself.

    OMP_NUM_THREADS=1 python benchmarks/bench_save_check.py [--params-m 100] [--device cuda]

A stack of linear layers with about `--params-m` million parameters stands in for the UNet. Each row
times `non_finite_weights` (the check `write_model_folder` runs before a checkpoint or the final model
is written) and `safetensors.torch.save_file` of the same weights (what the save writes), side by side
in one run, and prints their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sdxl_ff.checkpoint.model_folder import non_finite_weights  # noqa: E402

WIDTH = 1024


def measure(params_m: float, dtype: torch.dtype, device: torch.device) -> dict:
    layers = max(1, round(params_m * 1e6 / (WIDTH * WIDTH + WIDTH)))
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)]).to(device, dtype)
    modules = {"unet": model}
    non_finite_weights(modules)  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    bad = non_finite_weights(modules)
    check = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(folder) / "w.safetensors"))
        save = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return {"params_m": params / 1e6, "dtype": str(dtype).removeprefix("torch."), "check_s": check, "save_s": save,
            "ratio": check / save, "found": len(bad)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-m", type=float, default=100.0, help="parameters, in millions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [measure(args.params_m, dtype, device) for dtype in (torch.float32, torch.bfloat16)]
    print(f"device {device}; check = non_finite_weights, save = safetensors save_file of the same weights")
    print(f"{'params (M)':>10} {'dtype':>9} {'check (s)':>10} {'save (s)':>9} {'check/save':>11}")
    for r in rows:
        print(f"{r['params_m']:>10.1f} {r['dtype']:>9} {r['check_s']:>10.4f} {r['save_s']:>9.4f} {r['ratio']:>11.3f}")
    return rows


if __name__ == "__main__":
    main()
