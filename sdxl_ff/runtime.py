"""Where and how training runs: device, precision, which parameters train, and the optimizer."""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, init_empty_weights
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list, extract_model_from_parallel
from transformers import PreTrainedModel

from .config import Config, ConfigError
from .memory import PerParamOptimizer
from .models import SDXLParts

if TYPE_CHECKING:
    from .checkpoint import StopRequest

log = logging.getLogger(__name__)


# accelerate's engines that shard or wrap the model: the 8-bit optimizer, the fused backward pass, EMA and the
# exact-as-loaded saving of frozen weights all assume whole parameters, and none of it is tested under them
SHARDING_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
DATA_PARALLEL = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


def check_launch_engine(environ: dict[str, str], distributed_type: DistributedType | None = None) -> None:
    """Refuse accelerate set-ups other than plain data parallelism, before they fail in their own words."""
    engine = next((name for var, name in SHARDING_ENGINES.items()
                   if environ.get(var, "").lower() in ("1", "true", "yes")), None)
    if engine is None and distributed_type is not None and distributed_type not in DATA_PARALLEL:
        engine = distributed_type.value
    if engine:
        raise ConfigError(f"accelerate launch: {engine} is not supported; sdxl-ff trains data-parallel (DDP) on "
                          f"one or more GPUs and machines. Run `accelerate config` again and answer 'no' to "
                          f"DeepSpeed and FSDP, or launch with `accelerate launch --multi_gpu --num_processes N`")


def make_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator for the configured device and precision (bf16 autocast, fp16 + GradScaler, or fp32)."""
    check_launch_engine(dict(os.environ))
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("device: \"cuda\" was requested but no CUDA device is visible; "
                          "use \"auto\" or \"cpu\", or check the driver (nvidia-smi)")
    on_cpu = cfg.device == "cpu" or not cuda
    if cfg.model.use_bf16:
        precision = "bf16"
    else:
        precision = "no" if on_cpu else "fp16"
    # SDXL conditions on text encoder 1's penultimate layer, so its last layer gets no gradient:
    # DDP must be told, or it waits for those gradients forever.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.model.train_text_encoder_1)
    wait = InitProcessGroupKwargs(timeout=wait_timeout(dict(os.environ)))
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=precision, kwargs_handlers=[ddp, wait])
    check_launch_engine({}, accelerator.distributed_type)
    return accelerator


# The other processes wait while the main one builds caches, saves an SDXL checkpoint, renders eval images
# or exports: NCCL's default of 10 minutes is too short for that on a slow disk.
WAIT_TIMEOUT_ENV = "SDXL_FF_WAIT_TIMEOUT_MINUTES"
DEFAULT_WAIT_TIMEOUT = datetime.timedelta(hours=2)


def wait_timeout(environ: dict[str, str]) -> datetime.timedelta:
    """How long a process waits for the others (collectives and barriers): 2 hours, or $SDXL_FF_WAIT_TIMEOUT_MINUTES."""
    value = environ.get(WAIT_TIMEOUT_ENV)
    if not value:
        return DEFAULT_WAIT_TIMEOUT
    try:
        minutes = float(value)
    except ValueError:
        minutes = 0
    if minutes <= 0:
        raise ConfigError(f"{WAIT_TIMEOUT_ENV}={value!r}: give the wait timeout in minutes, a number above 0 "
                          f"(the default is {DEFAULT_WAIT_TIMEOUT.total_seconds() / 60:g})")
    return datetime.timedelta(minutes=minutes)


def frozen_dtype(accelerator: Accelerator) -> torch.dtype:
    """dtype for frozen modules: the autocast dtype, so they cost half the memory on the GPU."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


@dataclass
class Trainables:
    """The modules that train, with a name each ('unet', 'text_encoder', 'text_encoder_2').

    `pristine` holds CPU copies of frozen modules' weights as loaded, for those cast to a lower
    precision for compute, so that saving writes them unchanged rather than rounded.
    """
    modules: dict[str, torch.nn.Module]
    pristine: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]

    def for_saving(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """`module` itself, or a CPU twin holding its weights as loaded when it was cast for compute."""
        if name not in self.pristine:
            return module
        with init_empty_weights():
            if isinstance(module, PreTrainedModel):
                twin = type(module)(module.config)
            else:  # a diffusers model
                twin = type(module).from_config(module.config)
        twin.load_state_dict(self.pristine[name], assign=True)
        return twin


def configure_modules(parts: SDXLParts, cfg: Config, accelerator: Accelerator) -> Trainables:
    """Freeze or unfreeze each part, place it, pick its dtype, enable gradient checkpointing."""
    device, half = accelerator.device, frozen_dtype(accelerator)
    train = {"unet": True, "text_encoder": cfg.model.train_text_encoder_1,
             "text_encoder_2": cfg.model.train_text_encoder_2}
    vae_dtype = torch.bfloat16 if half == torch.bfloat16 else torch.float32  # SDXL's VAE overflows in fp16
    pristine = {}
    for name, dtype in [(n, half) for n, t in train.items() if not t] + [("vae", vae_dtype)]:
        module = getattr(parts, name)
        if module.dtype != dtype:
            pristine[name] = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    trainables = {}
    for name, trained in train.items():
        module = getattr(parts, name)
        module.requires_grad_(trained)
        module.train(trained)
        module.to(device, (torch.bfloat16 if cfg.model.full_bf16 else torch.float32) if trained else half)
        own_aligned_storage(module)
        if trained:
            trainables[name] = module
            if cfg.model.use_gradient_checkpointing:
                if name == "unet":
                    module.enable_gradient_checkpointing()
                else:
                    module.gradient_checkpointing_enable()
    parts.vae.requires_grad_(False).eval()
    parts.vae.to(device, vae_dtype)
    own_aligned_storage(parts.vae)
    return Trainables(trainables, pristine)


CPU_ALIGNMENT = 64  # bytes; what torch's CPU allocator guarantees and AVX-512 kernels prefer


def own_aligned_storage(module: torch.nn.Module) -> None:
    """Give every weight that sits at an unaligned address its own (aligned) copy.

    Diffusers loads a safetensors file as views into one buffer at arbitrary byte offsets. CPU kernels
    (MKL, oneDNN) take other code paths on unaligned memory and round differently, so a run resumed from
    a checkpoint folder would not compute bit for bit like the run that wrote it. On a GPU `.to(device)`
    has already copied every tensor: nothing to do there.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() % CPU_ALIGNMENT:
            tensor.data = tensor.data.clone()


def learning_rates(cfg: Config) -> dict[str, float | None]:
    """The configured base learning rate of each parameter group."""
    return {"unet": cfg.training.lr_unet, "text_encoder": cfg.training.lr_text_encoder_1,
            "text_encoder_2": cfg.training.lr_text_encoder_2}


def _optimizer_factory(cfg: Config) -> tuple[Callable[[list[dict]], torch.optim.Optimizer], str]:
    """How to build the configured optimizer over some parameter groups, and its name for the log."""
    o = cfg.optimizer
    if o.type == "adafactor":
        from transformers.optimization import Adafactor
        # the configured rate drives it (LR schedule and all): no relative step, no parameter scaling, no warmup
        return (lambda groups: Adafactor(groups, lr=groups[0]["lr"], scale_parameter=False, relative_step=False,
                                         warmup_init=False, weight_decay=o.weight_decay)), \
            "Adafactor (transformers, factored second moment, no first moment)"
    kwargs = dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.type == "adamw8bit":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import bitsandbytes as bnb
            return (lambda groups: bnb.optim.AdamW8bit(groups, **kwargs)), \
                f"AdamW8bit (bitsandbytes {bnb.__version__})"
        except ImportError as e:
            log.warning("optimizer.type is adamw8bit but bitsandbytes cannot be imported (%s); "
                        "using torch AdamW (32-bit state, 2x the optimizer memory)", e)
    return (lambda groups: torch.optim.AdamW(groups, **kwargs)), "AdamW (torch, 32-bit state)"


def build_optimizer(cfg: Config, trainables: Trainables,
                    rounding_generator: torch.Generator | None = None) -> tuple[Any, str]:
    """AdamW8bit from bitsandbytes (torch AdamW when asked, or when bitsandbytes is missing).

    With model.full_bf16 or training.fused_backward the optimizer steps one parameter at a time
    (sdxl_ff/memory.py); otherwise it is one optimizer over one parameter group per module.
    """
    rates = learning_rates(cfg)
    make, name = _optimizer_factory(cfg)
    if not (cfg.model.full_bf16 or cfg.training.fused_backward):
        groups = [{"name": group, "params": [p for p in m.parameters() if p.requires_grad], "lr": rates[group]}
                  for group, m in trainables.modules.items()]
        return make(groups), name
    named = [(group, f"{group}.{pname}", p) for group, m in trainables.modules.items()
             for pname, p in m.named_parameters() if p.requires_grad]
    optimizer = PerParamOptimizer(named, rates, make, stochastic_rounding=cfg.model.full_bf16,
                                  generator=rounding_generator)
    modes = []
    if cfg.model.full_bf16:
        modes.append("bf16 weights with stochastic rounding")
    if cfg.training.fused_backward:
        optimizer.attach_fused_backward()
        modes.append("fused backward pass")
    return optimizer, f"{name}, per parameter ({', '.join(modes)})"


def prepare(accelerator: Accelerator, trainables: Trainables, optimizer) -> tuple[list[torch.nn.Module], Any]:
    """Let accelerate wrap the trained modules (and a regular optimizer) for devices and processes."""
    per_param = isinstance(optimizer, PerParamOptimizer)
    if per_param and accelerator.mixed_precision == "fp16":
        raise ConfigError("model.full_bf16 / training.fused_backward cannot run with fp16 and its GradScaler; "
                          "set model.use_bf16 to true")
    if per_param and optimizer.fused and accelerator.num_processes > 1:
        raise ConfigError("training.fused_backward cannot run on several processes (gradients are all-reduced "
                          "after the backward pass); set it to false for multi-GPU training")
    prepared = accelerator.prepare(*trainables.modules.values(), *([] if per_param else [optimizer]))
    prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
    if per_param:
        return prepared, optimizer
    return prepared[:-1], prepared[-1]


def optimizer_kind(cfg: Config) -> str:
    """The optimizer's type and layout, as recorded in the trainer state (its state only loads into the same)."""
    per_param = cfg.model.full_bf16 or cfg.training.fused_backward
    return f"{cfg.optimizer.type}{' per parameter' if per_param else ''}"


def compile_unet(unet: torch.nn.Module, kwargs: dict) -> torch.nn.Module:
    """torch.compile the UNet (lazy: the first forward pass compiles). Saving must unwrap it (`_orig_mod.` keys)."""
    log.info("torch.compile: UNet with %s (the first steps compile and are slow)", kwargs or "default settings")
    return torch.compile(unet, **kwargs)


def plain_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside any torch.compile / DDP wrappers, whose state_dict keys are the model's own."""
    return extract_model_from_parallel(module, keep_torch_compile=False)


# --------------------------------------------------------------------------- several processes

def mean_over_processes(value: float, accelerator) -> float:
    """The mean of a per-process scalar over all processes (the loss of the global batch)."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="mean").item()


def stop_agreed(stop: StopRequest, accelerator) -> bool:
    """Whether any process was asked to stop; all processes agree so they save the same step."""
    if accelerator.num_processes == 1:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="max").item())


def process_group_timeout() -> datetime.timedelta | None:
    """The wait timeout of the default process group as torch holds it (None when it cannot be read)."""
    try:
        group = torch.distributed.distributed_c10d._get_default_group()
        device = torch.distributed.distributed_c10d._get_pg_default_device(group)
        return group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return None


# torchrun's agent SIGKILLs the workers this many seconds after forwarding Ctrl-C / SIGTERM (default 30)
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
SAFE_SHUTDOWN_SECONDS = 900  # a full SDXL checkpoint (weights, optimizer, EMA) on a slow disk


def shutdown_advice(environ: dict[str, str], num_processes: int) -> str | None:
    """A hint to raise torchrun's shutdown grace period when several processes run with the short default."""
    if num_processes == 1:
        return None
    try:
        seconds = float(environ.get(SHUTDOWN_TIMEOUT_ENV) or 30)
    except ValueError:
        seconds = 30
    if seconds >= SAFE_SHUTDOWN_SECONDS:
        return None
    return (f"{SHUTDOWN_TIMEOUT_ENV} is {seconds:g} s: after Ctrl-C or SIGTERM accelerate launch kills the "
            f"processes that long after forwarding the signal, which can cut the final checkpoint save. Launch with "
            f"{SHUTDOWN_TIMEOUT_ENV}={SAFE_SHUTDOWN_SECONDS} accelerate launch ...")


def describe_processes(accelerator) -> None:
    """Log, once, how the processes run together and what to set for a safe Ctrl-C."""
    if accelerator.num_processes == 1:
        return
    timeout = process_group_timeout()
    log.info("%d processes (%s); a wait for the main process times out after %s (%s)", accelerator.num_processes,
             accelerator.state.backend, timeout if timeout is not None else "the configured time", WAIT_TIMEOUT_ENV)
    advice = shutdown_advice(dict(os.environ), accelerator.num_processes)
    if advice and accelerator.is_main_process:
        log.warning(advice)


def shared_seed(cfg: Config, accelerator) -> int:
    """The configured seed, or a fresh random one (null or 0) drawn by the main process and sent to the others.

    Every process must hold the same seed: it orders the data that the processes share out, and
    seeds the noise and the rounding of the (identical) weights.
    """
    seed = cfg.training.seed
    if seed:
        log.info("seed: %d", seed)
        return seed
    drawn = [secrets.randbelow(2**31 - 1) + 1]
    if accelerator.num_processes > 1:
        broadcast_object_list(drawn, from_process=0)
    seed = drawn[0]
    log.info("seed: %d (random; set training.seed=%d to repeat this run)", seed, seed)
    return seed
