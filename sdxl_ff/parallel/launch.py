"""The launch engine accelerate's environment names, refused before torch is imported (no torch here): every process
of `accelerate launch --use_fsdp` stops in a fraction of a second instead of after seconds of imports."""

from __future__ import annotations

from collections.abc import Mapping

from sdxl_ff.config.errors import ConfigError

# accelerate's engines that shard or wrap the model: the 8-bit optimizer, the fused backward pass, EMA and the
# exact-as-loaded saving of frozen weights all assume whole parameters, and none of it is tested under them
SHARDING_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def engine_refused(engine: str) -> ConfigError:
    return ConfigError(f"accelerate launch: {engine} is not supported; sdxl-ff trains data-parallel (DDP) on "
                       f"one or more GPUs and machines. Run `accelerate config` again and answer 'no' to "
                       f"DeepSpeed and FSDP, or launch with `accelerate launch --multi_gpu --num_processes N`; "
                       f"to shard the model over the GPUs set training.sharding to \"fsdp2\" (PyTorch's FSDP2)")


def check_launch_environment(environ: Mapping[str, str]) -> None:
    """Refuse the sharding engine that `accelerate launch` announces in the environment (ACCELERATE_USE_FSDP, ...)."""
    engine = next((name for var, name in SHARDING_ENGINES.items()
                   if environ.get(var, "").lower() in ("1", "true", "yes")), None)
    if engine:
        raise engine_refused(engine)
