"""The memory plan of a config: `--plan`, the start-up fit line, and predicted vs measured peak on CUDA.

The maths and the trace live in sdxl_ff/plan/planner.py; this module reads what a config asks for (model
configs only, never a weight file), picks its largest step, and lists settings that would make it fit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.rules import shards_model
from sdxl_ff.config.schema import Config
from sdxl_ff.data import text_cache
from sdxl_ff.model import parts as models
from sdxl_ff.plan.planner import ALLOCATOR_MARGIN, CUDA_CONTEXT_BYTES, GiB, MemoryPlan, module_sizes, plan_memory

log = logging.getLogger("sdxl_ff")
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TRACED_NOTE = ("traced: the UNet's forward and backward (FakeTensorMode + MemTracker, nothing allocated); "
               "computed: weights, gradients, optimizer state, EMA, frozen modules; text encoders' and the VAE's "
               "own activations are not traced (77 tokens; the VAE encodes before the UNet runs)")


def model_configs(cfg: Config) -> dict[str, dict]:
    """The unet/vae/text-encoder configs of model.id, read without any weight file."""
    m = cfg.model
    if m.id == models.TINY_ID:
        parts = models.build_tiny_sdxl(0)
        return {n: (dict(getattr(parts, n).config) if n in ("unet", "vae") else getattr(parts, n).config.to_dict())
                for n in PARTS}
    path = Path(m.id).expanduser()
    if path.is_file():  # a single-file checkpoint: its configs come from model.config_dir (or SDXL base's)
        if not m.config_dir:
            path = None
        else:
            path = Path(m.config_dir).expanduser()
    if path is not None and path.is_dir():
        configs = {}
        for name in PARTS:
            file = path / name / "config.json"
            if not file.is_file():
                raise ConfigError(f"--plan: {file} is missing; the plan needs the configs of a Diffusers SDXL folder "
                                  f"(unet, vae, text_encoder, text_encoder_2)")
            configs[name] = json.loads(file.read_text())
        return configs
    return _hub_configs(models.SDXL_CONFIG_ID if path is None else m.id, m.revision)


def _hub_configs(repo: str, revision: str | None) -> dict[str, dict]:
    from huggingface_hub import hf_hub_download

    try:
        return {n: json.loads(Path(hf_hub_download(repo, f"{n}/config.json", revision=revision)).read_text())
                for n in PARTS}
    except Exception as e:
        raise ConfigError(f"--plan: could not read the configs of {repo!r} from the hub or its cache "
                          f"({type(e).__name__}); point model.id (or model.config_dir) at a Diffusers folder; "
                          f"its config files are enough (download with --exclude \"*.safetensors\")") from e


def largest_step(cfg: Config) -> tuple[int, int, int]:
    """(height, width, batch) of the configured step with the most pixels per batch."""
    d, t = cfg.data, cfg.training
    if not d.bucket.enabled:
        return d.size, d.size, t.batch_size
    default = d.bucket.batch_size or t.batch_size
    per = d.bucket.per_resolution_batch_sizes
    steps = [(h, w, per.get(f"{w}x{h}", default)) for w, h in d.bucket.resolutions]
    return max(steps, key=lambda s: s[0] * s[1] * s[2])


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the plan depends on, so alternatives can be written as changed copies."""
    height: int
    width: int
    batch: int
    full_bf16: bool
    fused_backward: bool
    checkpointing: bool
    ema: bool
    ema_on_cpu: bool
    text_cache: bool
    latent_cache: bool

    @property
    def mode(self) -> str:
        return ("full_bf16" if self.full_bf16 else "fp32") + ("+fused_backward" if self.fused_backward else "")


def settings_of(cfg: Config) -> Settings:
    m, d = cfg.model, cfg.data
    h, w, batch = largest_step(cfg)
    text = d.text_embedding_cache.enabled and text_cache.refusal_reason(
        m.train_text_encoder_1, m.train_text_encoder_2) is None
    return Settings(h, w, batch, m.full_bf16, cfg.training.fused_backward, m.use_gradient_checkpointing, m.use_ema,
                    m.ema_on_cpu, text, d.latent_cache.enabled)


def plan_settings(cfg: Config, configs: dict[str, dict], s: Settings, processes: int = 1) -> MemoryPlan:
    m = cfg.model
    # on CUDA frozen modules run in the autocast dtype, bf16 or fp16 (runtime.frozen_dtype); the VAE stays fp32
    # under fp16, which overflows in it
    precision = "bf16" if m.use_bf16 else "no" if cfg.device == "cpu" else "fp16"  # as runtime.make_accelerator
    encoder_bytes, vae_bytes = 4 if precision == "no" else 2, 2 if m.use_bf16 else 4
    trained = {"text_encoder": m.train_text_encoder_1, "text_encoder_2": m.train_text_encoder_2}
    resident, extra = {}, {}
    for name, on in trained.items():
        if on:
            extra[name] = module_sizes(name, configs[name])
        elif not s.text_cache:
            resident[name] = encoder_bytes * sum(module_sizes(name, configs[name]))
    if not s.latent_cache:
        resident["vae"] = vae_bytes * sum(module_sizes("vae", configs["vae"]))
    plan = plan_memory(configs["unet"], resolution=(s.height, s.width), batch=s.batch, mode=s.mode,
                       gradient_checkpointing=s.checkpointing, optimizer=cfg.optimizer.type,
                       mixed_precision=precision, ema=s.ema, ema_on_cpu=s.ema_on_cpu,
                       resident=resident, extra_trained=extra, cuda=True)  # what a CUDA card will hold
    if shards_model(cfg):
        return per_process(plan, processes, gathered_bytes(configs["unet"], 2 if m.use_bf16 else 4))
    return plan


SHARDED_ROWS = ("weights", "gradients", "optimizer state", "EMA")


def per_process(plan: MemoryPlan, processes: int, gathered: int) -> MemoryPlan:
    """training.sharding fsdp2: weights, gradients, optimizer state and EMA divided by the processes, plus the
    whole weights FSDP2 gathers for the blocks that compute (activations and frozen modules stay whole)."""
    rows = [(what, n // processes, f"{how} / {processes} processes") if what.startswith(SHARDED_ROWS)
            else (what, n, how) for what, n, how in plan.rows]
    rows.append(("whole weights gathered by FSDP2", gathered, "computed: UNet's own + 2 blocks"))
    peak = sum(n for _, n, _ in rows)
    return MemoryPlan(rows, peak, CUDA_CONTEXT_BYTES + int(ALLOCATOR_MARGIN * peak),
                      {**plan.settings, "processes": processes})


def gathered_bytes(unet_config: dict, compute_bytes: int) -> int:
    """Whole weights alive in one process under fsdp2: the UNet's own (outside every block: embeddings, conv_in,
    conv_out, up/down samplers) throughout, and the two largest blocks (one computes, the next is prefetched)."""
    from sdxl_ff.model.parts import block_types
    from sdxl_ff.plan.planner import build_module
    with torch.device("meta"):
        unet = build_module("unet", unet_config)
    blocks = [m for m in unet.modules() if isinstance(m, block_types())]
    sizes = sorted(sum(p.numel() for p in b.parameters()) for b in blocks)
    own = sum(p.numel() for p in unet.parameters()) - sum(sizes)
    return compute_bytes * (own + sum(sizes[-2:]))


def ladder(cfg: Config, s: Settings) -> list[tuple[str, Settings]]:
    """Settings to switch on one after another, cheapest in speed first (each row keeps the ones above)."""
    m, t = cfg.model, cfg.training
    steps = []
    if not s.text_cache and text_cache.refusal_reason(m.train_text_encoder_1, m.train_text_encoder_2) is None:
        steps.append(("data.text_embedding_cache.enabled=true", {"text_cache": True}))
    if not s.latent_cache:
        steps.append(("data.latent_cache.enabled=true", {"latent_cache": True}))
    if s.ema and not s.ema_on_cpu:
        steps.append(("model.ema_on_cpu=true", {"ema_on_cpu": True}))
    sharded = shards_model(cfg)  # full_bf16 and fused_backward are refused with it
    if not s.full_bf16 and m.use_bf16 and not sharded:
        steps.append(("model.full_bf16=true", {"full_bf16": True}))
    if not s.fused_backward and not sharded and t.grad_accum_steps == 1 and t.max_grad_norm is None:
        steps.append(("training.fused_backward=true", {"fused_backward": True}))
    elif not s.fused_backward and not sharded:
        steps.append(("training.fused_backward=true (with training.grad_accum_steps=1, "
                      "training.max_grad_norm=null)", {"fused_backward": True}))
    if not s.checkpointing:
        steps.append(("model.use_gradient_checkpointing=true", {"checkpointing": True}))
    out, current = [], s
    for text, change in steps:
        current = dataclasses.replace(current, **change)
        out.append((text, current))
    batch = s.batch // 2
    while batch >= 1:
        key = "data.bucket.batch_size (or per_resolution_batch_sizes)" if cfg.data.bucket.enabled \
            else "training.batch_size"
        out.append((f"{key}={batch}", dataclasses.replace(current, batch=batch)))
        batch //= 2
    return out


def plan_text(cfg: Config, gpu_gb: float | None, processes: int = 2) -> str:
    """The whole `--plan` report: the configured step's rows, the fit verdict, and what would fit; per process
    over `processes` under training.sharding fsdp2."""
    check_gpu_gb(gpu_gb)
    configs = model_configs(cfg)
    s = settings_of(cfg)
    processes = processes if shards_model(cfg) else 1
    plan = plan_settings(cfg, configs, s, processes)
    each = f" in each of {processes} processes (training.sharding fsdp2; --processes)" if processes > 1 else ""
    lines = [f"memory plan for one optimizer step{each} at {s.height}x{s.width}, batch {s.batch}, {s.mode}, gradient "
             f"checkpointing {'on' if s.checkpointing else 'off'}, optimizer {cfg.optimizer.type}:",
             plan.table(), f"  ({TRACED_NOTE})"]
    if gpu_gb is None:
        lines.append("no --gpu-memory given and no CUDA device found: not checking whether it fits")
        return "\n".join(lines)
    gpu = int(gpu_gb * GiB)
    if plan.fits(gpu):
        lines.append(f"fits: needs {plan.required_bytes / GiB:.1f} GiB of {gpu_gb:g} GiB")
        return "\n".join(lines)
    lines.append(f"does not fit: needs {plan.required_bytes / GiB:.1f} GiB of {gpu_gb:g} GiB. Settings that "
                 f"would make it fit, cheapest in speed first (each keeps the ones above):")
    for text, alt in ladder(cfg, s):
        p = plan_settings(cfg, configs, alt, processes)
        verdict = "fits" if p.fits(gpu) else "does not fit"
        lines.append(f"  --set {text:<58} needs {p.required_bytes / GiB:6.1f} GiB "
                     f"(peak {p.peak_bytes / GiB:.1f})  {verdict}")
        if p.fits(gpu):
            break
    return "\n".join(lines)


def check_gpu_gb(gpu_gb: float | None) -> None:
    if gpu_gb is not None and not 0 < gpu_gb < math.inf:  # inf: int(inf * GiB) would raise OverflowError
        raise ConfigError(f"--gpu-memory: {gpu_gb:g} is not a memory size; give the card's memory in GiB, e.g. 24")


def detected_gpu_gib() -> float | None:
    """The memory of CUDA device 0 in GiB, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GiB


# ----------------------------------------------------------------------------- in a CUDA run

REPORT_AFTER_STEPS = 3  # peak statistics are reset after step 1 (warm-up), read after steps 2-3


def fit_line(plan: MemoryPlan, gpu_bytes: int) -> str | None:
    """The one start-up line saying the plan does not fit the card (None when it fits)."""
    if plan.fits(gpu_bytes):
        return None
    return (f"memory plan: this config needs about {plan.required_bytes / GiB:.1f} GiB but the card has "
            f"{gpu_bytes / GiB:.1f} GiB; it will probably run out of memory (not refused: the plan can be wrong). "
            f"See `python train_sdxl_ff.py --config CONFIG --plan` for settings that fit")


def measured_vs_planned(planned_bytes: int, max_allocated: int) -> tuple[str, dict[str, float]]:
    """The log line and TensorBoard scalars comparing torch.cuda.max_memory_allocated with the plan."""
    ratio = max_allocated / planned_bytes
    line = (f"memory: max allocated {max_allocated / GiB:.2f} GiB, planned {planned_bytes / GiB:.2f} GiB "
            f"(actual/planned {ratio:.3f})")
    return line, {"memory/planned_gib": planned_bytes / GiB, "memory/max_allocated_gib": max_allocated / GiB,
                  "memory/actual_over_planned": ratio}


class MemoryCheck:
    """The plan's prediction at start-up and the measured peak next to it after the first steps (CUDA only)."""

    def __init__(self, plan: MemoryPlan, cuda):
        self.plan, self.cuda, self.done = plan, cuda, False

    @classmethod
    def start(cls, cfg: Config, device, main_process: bool) -> MemoryCheck | None:
        """Before the weights load: log the predicted peak and whether it fits the card; None off CUDA."""
        if device.type != "cuda" or not main_process:
            return None
        import torch

        try:
            plan = plan_settings(cfg, model_configs(cfg), settings_of(cfg))
        except Exception as e:  # the plan is advice: a config it cannot read must not stop training
            log.warning("memory plan unavailable (%s: %s)", type(e).__name__, e)
            return None
        gpu = torch.cuda.get_device_properties(device).total_memory
        log.info("memory plan: peak %.2f GiB at the largest step, %.2f GiB with the margin, card %.1f GiB",
                 plan.peak_bytes / GiB, plan.required_bytes / GiB, gpu / GiB)
        if line := fit_line(plan, gpu):
            log.warning(line)
        return cls(plan, torch.cuda)

    def after_step(self, steps_done: int, last: bool, writer) -> None:
        """Call after every optimizer step of this run (1, 2, ...); `writer`: a TensorBoard SummaryWriter or None."""
        if self.done:
            return
        if steps_done == 1 and not last:
            self.cuda.reset_peak_memory_stats()  # from step 2 on: the optimizer state exists, the warm-up is over
            return
        if steps_done < REPORT_AFTER_STEPS and not last:
            return
        self.done = True
        line, scalars = measured_vs_planned(self.plan.peak_bytes, self.cuda.max_memory_allocated())
        log.info(line)
        if writer is not None:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, steps_done)
