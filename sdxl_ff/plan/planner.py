"""Predict the peak accelerator memory of one training step from model configs alone, no weights loaded.

Which parts are traced and which computed:
- traced: the UNet's forward and backward pass (activations, autocast's weight copies, kernel temporaries,
  gradients as they arrive) run for real under PyTorch's `FakeTensorMode` (tensors have shapes and
  dtypes but no memory) and measured with `torch.distributed._tools.mem_tracker.MemTracker`, at the real
  resolution and batch size. The trace runs PyTorch's CPU kernels: SDPA there is a flash-attention kernel
  that, like CUDA's flash / memory-efficient kernels, keeps only the output and the log-sum-exp for backward.
- computed: weights, gradients and optimizer state from the parameter list (modules built on the meta
  device) and the optimizer's layout; the EMA copy; frozen text encoders and VAE left on the device.
- stated: a margin for the CUDA context, the caching allocator and cuBLAS/cuDNN workspaces, added for
  the fit check only (`required_bytes`); `peak_bytes` is what `torch.cuda.max_memory_allocated` reports.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MODES = ("fp32", "full_bf16", "full_bf16+fused_backward")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes Optimizer2State: smaller tensors keep fp32 moments
BNB_BLOCKSIZE = 256  # bitsandbytes blockwise quantisation: one fp32 absmax per 256 elements and moment
BNB_QMAP_BYTES = 2 * 256 * 4  # the two 256-entry fp32 quantisation maps of each bitsandbytes optimizer
CUDA_CONTEXT_BYTES = 768 * 2**20  # CUDA context + cuBLAS/cuDNN workspaces: outside max_memory_allocated
ALLOCATOR_MARGIN = 0.10  # caching-allocator fragmentation, as a fraction of the tensor peak
GiB = 2**30
# CUDA keeps more activations than the CPU trace does. Measured on an H100 (docs/memory-speed-multi-gpu.md, "Against
# a real GPU"; benchmarks/gpu_acceptance.py), SDXL's UNet at 1024x1024 without gradient checkpointing held
# (max_memory_allocated - computed weights, gradients and state) / traced activations = 1.18 (fp32, batch 1),
# 1.23 (fp32, 4), 1.33 (full_bf16, 1), 1.28 (full_bf16, 4), 1.25 (fused, 1 and 4): the plan was 8-20 % low.
# The largest ratio scales the traced activations of CUDA plans without checkpointing (then 0-6 % high); with
# checkpointing the plan was already within 1.5 % and is left as traced.
CUDA_ACTIVATION_FACTOR = 1.33


@dataclass(frozen=True)
class StepTrace:
    """Bytes seen while tracing one forward + backward pass of the UNet (weights included)."""
    weights: int
    peak: int  # weights + gradients + everything else, at the moment of the highest total
    grads_at_peak: int
    peak_forward: int  # the highest total before the backward pass starts
    backward_without_grads: int  # the highest total less the gradients alive, during the backward pass


@dataclass
class MemoryPlan:
    """Predicted peak of one optimizer step, as rows (what, bytes, how it was obtained)."""
    rows: list[tuple[str, int, str]]
    peak_bytes: int  # tensor bytes at the step's peak: compare with torch.cuda.max_memory_allocated
    margin_bytes: int  # CUDA context, allocator and kernel workspaces (stated, not traced)
    settings: dict = field(default_factory=dict)

    @property
    def required_bytes(self) -> int:
        return self.peak_bytes + self.margin_bytes

    def fits(self, gpu_bytes: int) -> bool:
        return self.required_bytes <= gpu_bytes

    def table(self) -> str:
        lines = [f"  {name:<44} {n / GiB:8.2f} GiB  ({how})" for name, n, how in self.rows]
        lines.append(f"  {'peak (max_memory_allocated)':<44} {self.peak_bytes / GiB:8.2f} GiB  "
                     f"(during the {self.settings.get('peak_at', 'step')})")
        lines.append(f"  {'margin: CUDA context, allocator, workspaces':<44} {self.margin_bytes / GiB:8.2f} GiB  "
                     f"(stated: {CUDA_CONTEXT_BYTES / 2**20:.0f} MiB + {ALLOCATOR_MARGIN:.0%} of the peak)")
        lines.append(f"  {'needed on the card':<44} {self.required_bytes / GiB:8.2f} GiB")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- computed parts

def adamw8bit_state_bytes(numel: int) -> int:
    """bitsandbytes AdamW8bit state of one tensor: uint8 moments with blockwise fp32 absmax, or fp32 moments."""
    if numel < BNB_MIN_8BIT_SIZE:
        return 2 * 4 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / BNB_BLOCKSIZE)


def optimizer_state_bytes(sizes: list[int], optimizer: str, per_param: bool) -> int:
    """Optimizer state for parameter tensors of `sizes` elements (moments fp32 or 8-bit; bf16 weights step an
    fp32 copy, so their moments are fp32 too). `per_param`: a quantisation map per tensor (torchao's, or one
    bitsandbytes optimizer per tensor)."""
    if optimizer == "adamw":
        return sum(2 * 4 * n + 4 for n in sizes)  # exp_avg, exp_avg_sq, and the step count (a 4-byte tensor)
    if optimizer != "adamw8bit":
        raise ValueError(f"optimizer {optimizer!r}: the planner knows 'adamw8bit' and 'adamw'")
    state = sum(adamw8bit_state_bytes(n) for n in sizes)
    has_8bit = [n >= BNB_MIN_8BIT_SIZE for n in sizes]
    return state + BNB_QMAP_BYTES * (sum(has_8bit) if per_param else int(any(has_8bit)))


# The update of one bf16 weight (torchao's AdamW with stochastic rounding, sdxl_ff/optim/adamw.py) holds 49 bytes
# per element of the tensor it steps: its fp32 moments dequantised, the weight and gradient in fp32, the update and
# the rounding's draws. Measured on the CPU, where it runs eagerly (bench_planner.py: the optimizer-step peak of the
# tiny and the 112 M UNet is weights + state + every bf16 gradient + 49.0 x the largest tensor, to the byte); on
# CUDA the compiled update keeps fewer, so the plan errs high there.
BF16_UPDATE_BYTES = 49


def optimizer_step_bytes(sizes: list[int], grad_size: int, full_bf16: bool) -> tuple[int, int]:
    """(gradients alive, update transients) at the highest point of the optimizer step; activations are freed.

    One optimizer over all tensors holds every gradient throughout; stepping the largest bf16 tensor adds its
    update's transients (BF16_UPDATE_BYTES per element); fp32 weights step in place.
    """
    return grad_size * sum(sizes), BF16_UPDATE_BYTES * max(sizes) if full_bf16 else 0


def module_sizes(kind: str, config: dict) -> list[int]:
    """Element count of each parameter tensor of a module built on the meta device from its config."""
    return list(_sizes_cached(kind, json.dumps(config, sort_keys=True, default=str)))


# Kept per process like the trace: a module is built from (kind, config) alone, and every plan of a ladder or of
# model.memory_mode auto's rungs asks again for the UNet's, the text encoders' and the VAE's sizes.
@functools.lru_cache(maxsize=64)
def _sizes_cached(kind: str, key: str) -> tuple[int, ...]:
    with torch.device("meta"):
        module = build_module(kind, json.loads(key))
    return tuple(p.numel() for p in module.parameters())


def build_module(kind: str, config: dict) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind == "unet":
        return UNet2DConditionModel.from_config(config)
    if kind == "vae":
        return AutoencoderKL.from_config(config)
    if kind in ("text_encoder", "text_encoder_2"):
        cls = CLIPTextModel if kind == "text_encoder" else CLIPTextModelWithProjection
        return cls(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
    raise ValueError(f"unknown module kind {kind!r}")


# ----------------------------------------------------------------------------- traced part

def step_tracker() -> tuple:
    """(a MemTracker keeping only the whole step's peak, its category enum).

    MemTracker also records a peak per module after every operator, which costs (modules x operators)
    and takes minutes on SDXL's UNet; we read only the global peak, so that bookkeeping is skipped.
    We also note the forward pass's peak and, during the backward pass, the highest total less the
    gradients alive: a fused backward pass frees each gradient as soon as it is complete.
    """
    # _TOTAL_KEY / _MemRefType are the names MemTracker's snapshots use (torch pinned in requirements.txt)
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class StepTracker(MemTracker):
        peak_forward = backward_without_grads = 0

        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                total = snap[_TOTAL_KEY]
                if self._mod_tracker.is_bw:
                    self.backward_without_grads = max(self.backward_without_grads,
                                                      total - snap.get(_MemRefType.GRAD, 0))
                else:
                    self.peak_forward = max(self.peak_forward, total)
                if self._peak_mem.get(dev, 0) < total:
                    self._peak_mem[dev] = total
                    self._peak_mem_snap[dev] = dict(snap)

    return StepTracker(), _MemRefType


def unet_inputs(config: dict, height: int, width: int, batch: int, dtype: torch.dtype) -> tuple:
    """Noisy latents, timesteps, text embeddings and SDXL's added conditioning for one batch."""
    c = config
    latents = torch.randn(batch, c["in_channels"], height // 8, width // 8, dtype=dtype)
    context = torch.randn(batch, 77, c["cross_attention_dim"], dtype=dtype)
    pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
    added = {"text_embeds": torch.randn(batch, pooled, dtype=dtype), "time_ids": torch.randn(batch, 6)}
    return latents, torch.randint(0, 1000, (batch,)), context, added


def unet_step(unet: torch.nn.Module, inputs: tuple, autocast_dtype: torch.dtype | None) -> None:
    """Forward, the loss in fp32 and backward, as the trainer's step runs them."""
    latents, timesteps, context, added = inputs
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        pred = unet(latents, timesteps, context, added_cond_kwargs=added).sample
    F.mse_loss(pred.float(), latents.float()).backward()


def trace_unet_step(config: dict, height: int, width: int, batch: int, weight_dtype: torch.dtype,
                    autocast_dtype: torch.dtype | None, checkpointing: bool) -> StepTrace:
    """Trace one UNet forward + backward under FakeTensorMode with MemTracker (nothing is allocated)."""
    key = json.dumps(config, sort_keys=True, default=str)
    return _trace_cached(key, height, width, batch, weight_dtype, autocast_dtype, checkpointing)


@functools.lru_cache(maxsize=64)
def _trace_cached(key: str, height: int, width: int, batch: int, weight_dtype: torch.dtype,
                  autocast_dtype: torch.dtype | None, checkpointing: bool) -> StepTrace:
    from diffusers import UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = json.loads(key)
    default = torch.get_default_dtype()
    with FakeTensorMode():
        # built in its dtype: .to() cannot swap fake parameters
        torch.set_default_dtype(weight_dtype)
        try:
            unet = UNet2DConditionModel.from_config(config)
        finally:
            torch.set_default_dtype(default)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        tracker, kinds = step_tracker()
        tracker.track_external(unet)
        with tracker:
            unet_step(unet, unet_inputs(config, height, width, batch, weight_dtype), autocast_dtype)
        snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    return StepTrace(weights=weights, peak=snap["Total"], grads_at_peak=snap.get(kinds.GRAD, 0),
                     peak_forward=tracker.peak_forward, backward_without_grads=tracker.backward_without_grads)


# ----------------------------------------------------------------------------- the plan

def parse_mode(mode: str) -> tuple[bool, bool]:
    """(full_bf16, fused_backward) of a mode name; 'fp32+fused_backward' is allowed too."""
    parts = set(mode.split("+"))
    if not parts <= {"fp32", "full_bf16", "fused_backward"} or ("fp32" in parts) == ("full_bf16" in parts):
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)} (or 'fp32+fused_backward')")
    return "full_bf16" in parts, "fused_backward" in parts


def plan_memory(unet_config: dict, *, resolution: int | tuple[int, int], batch: int, mode: str = "fp32",
                gradient_checkpointing: bool = False, optimizer: str = "adamw8bit",
                mixed_precision: str = "bf16", ema: bool = False, ema_on_cpu: bool = False,
                resident: dict[str, int] | None = None,
                extra_trained: dict[str, list[int]] | None = None, cuda: bool = False) -> MemoryPlan:
    """Predict the peak memory of one optimizer step of SDXL's UNet training.

    `resolution`: the image side (or (height, width)); `mode`: one of MODES; `mixed_precision`:
    "bf16" (autocast, model.use_bf16), "fp16" (autocast on CUDA without use_bf16) or "no";
    `resident`: bytes of frozen modules kept on the device, by name (text encoders, VAE);
    `extra_trained`: parameter sizes of other trained modules (text encoders); `cuda`: the plan is for a CUDA card,
    so traced activations without checkpointing get CUDA_ACTIVATION_FACTOR (False: the CPU's own peak).
    """
    full_bf16, fused = parse_mode(mode)
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    weight_dtype = torch.bfloat16 if full_bf16 else torch.float32
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[mixed_precision]
    trace = trace_unet_step(unet_config, height, width, batch, weight_dtype, autocast, gradient_checkpointing)
    wsize = 2 if full_bf16 else 4
    sizes = module_sizes("unet", unet_config) + [n for s in (extra_trained or {}).values() for n in s]
    extra_params = sum(sum(s) for s in (extra_trained or {}).values())
    weights = trace.weights + wsize * extra_params
    # torchao (bf16 weights) keeps a quantisation map per state tensor, bitsandbytes one per optimizer
    state = optimizer_state_bytes(sizes, optimizer, per_param=full_bf16)
    factor = CUDA_ACTIVATION_FACTOR if cuda and not gradient_checkpointing else 1.0
    if fused:
        # one gradient at a time, freed by its own update as soon as it is complete: the backward pass's
        # traced total less the gradients, plus the largest gradient and its update's transients
        grads, grads_how, peak_at = wsize * max(sizes), "computed: the largest one", "backward with fused updates"
        activations = (int(factor * (trace.backward_without_grads - trace.weights))
                       + (BF16_UPDATE_BYTES * max(sizes) if full_bf16 else 0))
        forward = int(factor * (trace.peak_forward - trace.weights))
        if forward > grads + activations:  # no gradient exists before the backward
            grads, activations, grads_how, peak_at = 0, forward, "traced", "forward"
    else:
        grads_at_peak = trace.grads_at_peak + (wsize * extra_params if trace.grads_at_peak else 0)
        activations = int(factor * (trace.peak - trace.weights - trace.grads_at_peak))
        grads, grads_how, peak_at = grads_at_peak, "traced", "forward/backward"
        step_grads, step_temps = optimizer_step_bytes(sizes, wsize, full_bf16)
        if step_grads + step_temps > activations + grads_at_peak:
            grads, activations, grads_how, peak_at = step_grads, step_temps, "computed", "optimizer step"
    rows = [("weights (trained, %s)" % ("bf16" if full_bf16 else "fp32"), weights, "computed"),
            ("gradients alive at the peak", grads, grads_how),
            (f"optimizer state ({optimizer})", state, "computed"),
            ("activations" + (" (checkpointed)" if gradient_checkpointing else "") + " + temporaries", activations,
             "computed: optimizer step transients" if peak_at == "optimizer step"
             else "traced" if factor == 1 else f"traced x {factor} (CUDA, measured)")]
    if ema:
        ema_bytes = 4 * sum(sizes)
        rows.append(("EMA (fp32 copy)" + (": on the CPU" if ema_on_cpu else ""), 0 if ema_on_cpu else ema_bytes,
                     "computed"))
    for name, n in (resident or {}).items():
        rows.append((f"{name} (frozen, on the device)", n, "computed"))
    peak = sum(n for _, n, _ in rows)
    margin = CUDA_CONTEXT_BYTES + int(ALLOCATOR_MARGIN * peak)
    settings = dict(resolution=(height, width), batch=batch, mode=mode, gradient_checkpointing=gradient_checkpointing,
                    optimizer=optimizer, mixed_precision=mixed_precision, ema=ema, ema_on_cpu=ema_on_cpu,
                    peak_at=peak_at, activation_factor=factor)
    return MemoryPlan(rows, peak, margin, settings)
