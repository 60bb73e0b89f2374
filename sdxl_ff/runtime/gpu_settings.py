"""GPU speed settings that diffusers' training examples set: TF32, channels_last and cudnn.benchmark.

Each is a config key under `model` (allow_tf32, channels_last, cudnn_benchmark), applied once before
training, and logged in one line. `benchmarks/gpu_acceptance.py` measures each as an off/on row pair.
"""

from __future__ import annotations

import torch

# cudnn.benchmark times every convolution algorithm once per input shape: worth it when the shapes repeat,
# a stall at every new shape when they do not (many aspect buckets).
CUDNN_BENCHMARK_MAX_SHAPES = 8


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions (Ampere and newer); bf16/fp16 compute is unaffected.

    Through the API that keeps torch's old and new precision flags consistent: mixing
    `torch.backends.cuda.matmul.fp32_precision` with the legacy flags makes torch refuse to read either.
    """
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def cudnn_benchmark_wanted(setting: bool | str, distinct_shapes: int) -> bool:
    """`model.cudnn_benchmark`: true / false as given; "auto" turns it on when the run has few batch shapes."""
    if setting == "auto":
        return distinct_shapes <= CUDNN_BENCHMARK_MAX_SHAPES
    return bool(setting)


def apply_speed_settings(unet: torch.nn.Module, device: torch.device, *, allow_tf32: bool, channels_last: bool,
                         cudnn_benchmark: bool | str, distinct_shapes: int) -> str:
    """Apply the three settings for this run; return the log line saying what is on and why."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    layout = "channels_last" if channels_last else "contiguous (NCHW)"
    if device.type != "cuda":
        return f"UNet memory format: {layout}; TF32 and cudnn.benchmark apply to CUDA only"
    set_tf32(allow_tf32)
    benchmark = cudnn_benchmark_wanted(cudnn_benchmark, distinct_shapes)
    torch.backends.cudnn.benchmark = benchmark
    why = f"{distinct_shapes} batch shape(s)"
    if cudnn_benchmark == "auto":
        why += f", auto: on up to {CUDNN_BENCHMARK_MAX_SHAPES}"
    return (f"UNet memory format: {layout}; TF32 for fp32 matmuls/convolutions: {'on' if allow_tf32 else 'off'} "
            f"(model.allow_tf32); cudnn.benchmark: {'on' if benchmark else 'off'} ({why})")
