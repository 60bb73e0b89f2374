"""training.sharding "fsdp2": the trained modules sharded over the processes with PyTorch's own FSDP2.

Each transformer block and resnet block of the UNet (and each encoder layer of a trained text encoder) and then
the module itself is wrapped with `torch.distributed.fsdp.fully_shard`: every process keeps 1/N of each
weight, its gradient and its optimizer state; a block's full weights exist only while it computes. Mixed
precision is FSDP2's `MixedPrecisionPolicy`: with model.use_bf16 the blocks compute with bf16 copies of the
fp32 shards and gradients are reduced in fp32 (what bf16 autocast over fp32 weights is on one process).

optimizer.type "adamw8bit" is torchao's AdamW8bit here: its state is a DTensor of 8-bit blocks of the local
shard. bitsandbytes' AdamW8bit stops on DTensor parameters ("got mixed torch.Tensor and DTensor"), and so does
transformers' Adafactor, which is refused under fsdp2 (config_rules.sharding_errors).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.model.parts import block_types
from sdxl_ff.runtime.tensors import local

log = logging.getLogger("sdxl_ff")

# FSDP2 warns on every step that the text encoder returns views (its hidden states); SDXL only concatenates
# them (conditioning.encode_prompts), never changes them in place, which is what the warning is about
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")


def check_processes(num_processes: int, mixed_precision: str) -> None:
    """Refuse what fsdp2 cannot do here, on every process alike: one process, fp16 with its GradScaler."""
    if num_processes == 1:
        raise ConfigError("training.sharding is \"fsdp2\" but this run has 1 process: there is nothing to shard "
                          "over. Launch several (accelerate launch --multi_gpu --num_processes N train_sdxl_ff.py "
                          "..., or torchrun --nproc_per_node N train_sdxl_ff.py ...) or set training.sharding to "
                          "\"none\"")
    if mixed_precision == "fp16":
        raise ConfigError("training.sharding is \"fsdp2\" but model.use_bf16 is false on a GPU (fp16 autocast with "
                          "a GradScaler, which does not step sharded gradients); set model.use_bf16 to true")


def mixed_precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """bf16 compute from fp32 shards with fp32 gradient reduction (model.use_bf16), or fp32 throughout."""
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_modules(modules: dict[str, torch.nn.Module], device: torch.device, num_processes: int,
                  mixed_precision: str) -> int:
    """fully_shard each block, then each module (its remaining weights: embeddings, norms, conv_in/out), in place.

    Returns the number of sharded units.
    """
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (num_processes,))
    policy, kinds, units = mixed_precision_policy(mixed_precision), block_types(), 0
    for module in modules.values():
        for block in [m for m in module.modules() if isinstance(m, kinds)]:
            fully_shard(block, mesh=mesh, mp_policy=policy)
            units += 1
        fully_shard(module, mesh=mesh, mp_policy=policy)
        keep_output_capture(module)
        units += 1
    return units


def keep_output_capture(module: torch.nn.Module) -> None:
    """Let transformers find which outputs a text encoder records (hidden_states: SDXL reads the penultimate).

    transformers 5 registers them per model class (as PreTrainedModel.__init__ does) and fully_shard gives the
    module a new class (FSDPCLIPTextModel), for which nothing is registered: hidden_states would be None.
    """
    if getattr(module, "_can_record_outputs", None):
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
        _CAN_RECORD_REGISTRY[module] = module._can_record_outputs


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds in this process: its local shard, and for a quantised state (torchao's 8-bit
    blocks) the tensors inside it, not the dtype it poses as."""
    tensor = local(tensor)
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def local_bytes(params: Iterable[torch.nn.Parameter], optimizer) -> dict[str, int]:
    """Weights, gradients (those alive now) and optimizer state held by this process, measured from its tensors."""
    params = list(params)
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"weights": sum(tensor_bytes(p) for p in params),
            "gradients": sum(tensor_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(tensor_bytes(v) for v in state)}


def describe_bytes(held: dict[str, int], parameters: int, what: str) -> str:
    """One log line: the bytes per process and per trained parameter."""
    total = sum(held.values())
    parts = ", ".join(f"{name} {value / 2**20:.1f} MiB" for name, value in held.items())
    return f"{what}: {parts}; {total / 2**20:.1f} MiB = {total / parameters:.2f} bytes per trained parameter"


COMBINES = ("gradient checkpointing, model.use_bf16 (bf16 compute, fp32 gradient reduction), model.use_ema (per "
            "shard), model.ema_on_cpu, gradient accumulation, max_grad_norm and the latent / text-embedding caches; "
            "model.full_bf16, training.fused_backward, model.use_torch_compile, validation and optimizer.type "
            "adafactor are refused with it")


def shard_trained(modules: dict[str, torch.nn.Module], accelerator, optimizer_type: str) -> None:
    """Shard the trained modules over the processes (before the optimizer is built on their shards) and log how."""
    n = accelerator.num_processes  # check_processes() ran when the strategy was chosen (strategy.py)
    sizes = [p.numel() for m in modules.values() for p in m.parameters() if p.requires_grad]
    units = shard_modules(modules, accelerator.device, n, accelerator.mixed_precision)
    log.info("training.sharding fsdp2: %s sharded over %d processes in %d units (each block, then each module); "
             "combines with %s", ", ".join(modules), n, units, COMBINES)
    log.info("%s", describe_bytes(planned_bytes(sizes, optimizer_type, n), sum(sizes),
                                  f"per process (whole / {n} processes, computed)"))


def planned_bytes(sizes: list[int], optimizer_type: str, num_processes: int) -> dict[str, int]:
    """Weights, gradients and optimizer state of fp32 trained tensors of `sizes`, divided by the processes."""
    from sdxl_ff.plan.planner import optimizer_state_bytes
    whole = 4 * sum(sizes)
    state = optimizer_state_bytes(sizes, optimizer_type, per_param=False) if optimizer_type != "adafactor" else 0
    return {"weights": whole // num_processes, "gradients": whole // num_processes,
            "optimizer": state // num_processes}


def watch_held_bytes(optimizer, params: list[torch.nn.Parameter]) -> dict[str, int]:
    """Measure, at the first optimizer step, what this process holds: weights and gradients just before the
    step, the optimizer state just after it (it is created there). The dict returned fills then."""
    held: dict[str, int] = {}
    parameters = sum(p.numel() for p in params)

    def before(*_):
        held.update(local_bytes(params, optimizer))
        pre.remove()

    def after(*_):
        held["optimizer"] = local_bytes([], optimizer)["optimizer"]
        post.remove()
        log.info("%s", describe_bytes(held, parameters, "held by this process after the first step (measured)"))

    pre, post = optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)
    return held
